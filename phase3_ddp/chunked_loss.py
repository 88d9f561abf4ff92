"""Causal-LM cross-entropy computed chunk by chunk over the sequence, so the full logits are never stored.

Why: Qwen's vocabulary has 151,936 tokens. The textbook loss builds logits (B, T, V) and upcasts them
to fp32: at T = 2048 that is 2048 * 151,936 * 4 B = 1.16 GiB, and cross_entropy's backward adds
log-softmax and gradient tensors of the same size, on a GPU with 8 GB. Here the (N, C) hidden states
are cut into chunks of `chunk_size` rows; each chunk's logits (chunk, V) are built, reduced to a
summed loss and dropped at once. torch.utils.checkpoint (non-reentrant) recomputes a chunk's logits
in backward instead of keeping them, so forward AND backward hold one chunk of logits at a time:
memory O(chunk * V) instead of O(N * V), for one extra lm_head matmul per chunk.

The loss and its gradients are those of F.cross_entropy on full fp32 logits (tests assert 1e-5).

Use: `enable_chunked_loss(model)` once after get_peft_model(); then `model(**batch).loss` (own loop)
or Trainer(model=model, ...) computes the chunked loss in training and the usual logits otherwise.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label value that masks a position (prompt tokens, padding), as in HF and F.cross_entropy
# 256 rows x 151,936 vocab x 4 B = 148 MiB of fp32 logits per chunk (x3 with log-softmax and its gradient).
# Smaller chunks save little more and make the lm_head matmuls too thin to run at full speed.
DEFAULT_CHUNK_SIZE = 256


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()  # (chunk, V), fp32 like HF's loss, alive only here
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight^T + bias, targets_i) / num_items, over targets != -100.

    hidden (N, C), weight (V, C), targets (N,). num_items defaults to the number of unmasked targets
    (a token mean, F.cross_entropy's reduction="mean"); pass the whole batch's count when accumulating
    gradients over micro-batches (HF's num_items_in_batch).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if torch.is_autocast_enabled(hidden.device.type) and weight.dtype != torch.get_autocast_dtype(hidden.device.type):
        # Autocast would re-cast the whole (V, C) weight inside every chunk (and again in its recomputation);
        # cast it once here instead. Keeping frozen lm_head weights in the compute dtype avoids even this copy.
        weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]  # (chunk, C), (chunk,)
        # Non-reentrant checkpoint: saves only (h, weight, bias, t) for backward and rebuilds this
        # chunk's logits there, so no chunk's (chunk, V) logits survive to the backward pass.
        total = total + checkpoint(_chunk_loss_sum, h, weight, bias, t, use_reentrant=False)
    if num_items is None:
        num_items = (targets != IGNORE_INDEX).sum()
    return total / num_items  # 0 / 0 = nan when every target is masked, exactly like F.cross_entropy


def causal_lm_chunked_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           bias: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                           num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The loss of transformers' ForCausalLMLoss (position t predicts labels[t + 1]) from the decoder's
    last hidden states (B, T, C) and the lm_head weight (V, C), without (B, T, V) logits."""
    # Shift the labels, not the hidden states: pad one -100 at the end, as HF does, so the hidden
    # states are used as they are (a free view instead of a (B, T-1, C) copy).
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    return chunked_cross_entropy(hidden_states.reshape(-1, hidden_states.shape[-1]), weight,
                                 shift_labels.reshape(-1).to(hidden_states.device), bias=bias,
                                 chunk_size=chunk_size, num_items=num_items_in_batch)


def enable_chunked_loss(model, chunk_size: int = DEFAULT_CHUNK_SIZE, in_eval: bool = False):
    """Make a HF causal LM (plain or peft LoRA/QLoRA-wrapped) compute its training loss chunk by chunk.

    The model's forward is wrapped on this instance: given labels in training mode, it runs the decoder
    stack only and returns CausalLMOutputWithPast(loss=chunked loss, logits=None). Everything else (eval,
    generate, no labels) takes the original forward. in_eval=True chunks the eval loss as well; the HF
    Trainer then needs prediction_loss_only=True, as there are no logits to hand back.
    Because the call still goes through model(...), it works unchanged with a custom loop
    (`model(**batch).loss`), the HF Trainer (which passes num_items_in_batch under gradient accumulation)
    and DDP. LoRA layers live inside the decoder (peft injects them in place), so they are trained.
    Returns the model.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        raise ValueError("chunked loss supports LoRA-style adapters, not prompt learning (peft rewrites its inputs)")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper -> HF CausalLM
    original_forward = lm.forward

    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or not (lm.training or in_eval):
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        kwargs.pop("use_cache", None)  # a KV cache is useless when training
        out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        head = lm.get_output_embeddings()  # nn.Linear(C, V); may be tied to the input embeddings
        loss = causal_lm_chunked_loss(out.last_hidden_state, head.weight, labels, bias=head.bias,
                                      chunk_size=chunk_size, num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    lm.forward = forward  # instance attribute: shadows the class's forward for this model only
    return model
