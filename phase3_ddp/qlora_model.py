"""Load a causal LM in 4-bit / 8-bit / full precision and wrap it with LoRA adapters (QLoRA).

QLoRA (Dettmers et al., 2023) = frozen base weights stored in 4-bit NormalFloat (NF4),
de-quantised block by block to bf16/fp16 inside each matmul, plus small trainable LoRA
matrices A (r x in) and B (out x r) in higher precision. Only A and B get gradients and
Adam states, which is what lets a 1.8B model train in 8 GB.
check_chat_model refuses a base model before any of that: LoRA cannot teach it to stop at <|im_end|>.
"""

import contextlib
import logging
import os
import warnings
from functools import partial
from pathlib import Path

import torch

# Two messages every run would print, harmless here; filtered by their exact text, before peft imports bitsandbytes.
# 1. bitsandbytes 0.50, on import on a CPU with AVX512-BF16, tries to fetch a faster 4-bit inference kernel from the
#    Hugging Face hub (package `kernels`) and warns when it can't: it then uses its own built-in CPU kernel, and
#    training uses neither (add_lora turns that path off). A script that imports peft before this module still
#    shows it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
# 2. peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` in PeftModel.__init__; nothing to do.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
)

QUANTIZATIONS = ("4bit", "8bit", "none")


class UsageError(Exception):
    """Bad user input (paths, flags, data). Scripts print `error: <msg>` and exit 2."""


def compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The dtype matmuls run in: bf16 on GPUs of compute capability >= 8.0 (Ampere and later, e.g. the
    RTX 4060 at 8.9), fp16 on older CUDA GPUs (trained with a loss scaler), fp32 on CPU (CPU half-precision
    matmuls are slow or missing). The capability decides, not torch.cuda.is_bf16_supported(): that also says
    True on T4 / V100 / RTX 20xx, which only emulate bf16, several times slower than their fp16 tensor cores."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return torch.float32
    major, _minor = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for --quantization; None means plain weights."""
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",          # NF4: 16 levels at the quantiles of N(0, 1), matching weight stats
            bnb_4bit_use_double_quant=True,     # quantise the per-block fp32 scales too: ~0.37 bit/param saved
            bnb_4bit_compute_dtype=dtype,       # de-quantise to this dtype for each matmul
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)  # LLM.int8(): int8 weights, fp16 outlier columns
    if quantization == "none":
        return None
    raise UsageError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")


def check_model_path(model_name_or_path: str, required: str = "config.json") -> None:
    """Fail early, with a hint, on a local path that is not a saved model (or tokenizer: required=
    "tokenizer_config.json", e.g. an adapter directory, which holds the tokenizer but no config.json)."""
    path = str(model_name_or_path)
    looks_local = path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1  # hub ids: "owner/name"
    if looks_local and not Path(path).expanduser().is_dir():
        raise UsageError(f"model directory not found: {path} (build a tiny one with phase2_lora/make_tiny_model.py, "
                         f"or pass a hub id such as Qwen/Qwen1.5-1.8B-Chat)")
    if Path(path).is_dir() and not (Path(path) / required).is_file():
        raise UsageError(f"model directory {path} has no {required}; pass a directory written by save_pretrained "
                         f"or a hub id such as Qwen/Qwen1.5-1.8B-Chat")


def _load_error(path: str, err: OSError) -> UsageError:
    # transformers raises OSError subclasses for unknown hub ids, no network, or missing files.
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") else ""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return UsageError(f"cannot load model {path!r}: not a local model directory and could not be downloaded"
                      f"{offline}: {first_line}")


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False):
    """The model's own tokenizer (its chat template included), with a pad token and right padding, which is
    what training wants: the prompt starts at position 0 and pads come after the end-of-turn token."""
    check_model_path(model_name_or_path, required="tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_name_or_path), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _load_error(str(model_name_or_path), e) from e
    if tokenizer.pad_token is None:
        # Reusing EOS as pad is safe here because sft_data masks by lengths, never by pad id.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# ---------------------------------------------------------------- a chat model, not a base model

def end_of_turn_text(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (<|im_end|> for ChatML, <|eot_id|>
    for Llama 3), found by rendering a probe chat; else the tokenizer's EOS token."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                         tokenize=False)
    after = text[text.rindex("ok") + 2:]
    for token in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        if token and after.lstrip().startswith(token):
            return token
    return tokenizer.eos_token


def stop_token_ids(name: str, tokenizer, trust_remote_code: bool = False) -> set[int]:
    """The ids the model's files say generation stops at: the tokenizer's EOS, eos_token_id (int or list) of
    config.json and of generation_config.json."""
    ids = [tokenizer.eos_token_id]
    for load in (partial(AutoConfig.from_pretrained, trust_remote_code=trust_remote_code),
                 GenerationConfig.from_pretrained):
        with contextlib.suppress(OSError):  # a file that is not there declares nothing (load_model reports it)
            eos = load(name).eos_token_id
            ids += eos if isinstance(eos, list) else [eos]
    return set(ids) - {None}


def check_chat_model(name: str, tokenizer, trust_remote_code: bool = False) -> None:
    """Refuse a base model (Qwen/Qwen1.5-1.8B, not -Chat). It never saw ChatML: the embedding and lm_head rows of
    <|im_start|>/<|im_end|> are untrained, and LoRA, which freezes them, cannot teach it to stop. The signal is in
    the model's files, so local folders count too: a chat model stops at the token its template closes answers
    with (Qwen1.5-Chat: <|im_end|>); a base model ships the same template but stops at <|endoftext|> only."""
    if not tokenizer.chat_template:
        raise UsageError(f"{name} has no chat template (a base model?): fine-tuning trains the model's own chat "
                         f"format; fine-tune a chat model such as Qwen/Qwen1.5-1.8B-Chat")
    eot = end_of_turn_text(tokenizer)
    eot_id, stops = tokenizer.convert_tokens_to_ids(eot), stop_token_ids(name, tokenizer, trust_remote_code)
    if eot_id not in stops:
        stops = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})" for i in sorted(stops))
        raise UsageError(
            f"{name} looks like a base model, not a chat model: its template ends each answer with {eot} (id "
            f"{eot_id}) but it stops only at {stops}, so its {eot} rows were never "
            f"trained and LoRA, which freezes embeddings and lm_head, cannot teach it to stop; fine-tune the chat "
            f"model (e.g. Qwen/Qwen1.5-1.8B-Chat), or, if this is one, add {eot_id} to "
            f"eos_token_id in its generation_config.json")


# ---------------------------------------------------------------- the model

def load_model(model_name_or_path: str, quantization: str = "4bit", trust_remote_code: bool = False,
               device_map=None, dtype: torch.dtype | None = None):
    """The causal LM, quantised as asked: "4bit" (QLoRA: NF4 + double quant), "8bit" (LLM.int8) or "none"
    (weights in the compute dtype). device_map defaults to the first GPU when there is one, else CPU;
    dtype (compute and unquantised-weight dtype) defaults to compute_dtype()."""
    check_model_path(model_name_or_path)
    dtype = dtype or compute_dtype()
    quant = quantization_config(quantization, dtype)
    if device_map is None:
        device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(model_name_or_path),
            quantization_config=quant,
            dtype=dtype,                       # modules left unquantised (norms, embeddings, lm_head) use this
            device_map=device_map,
            trust_remote_code=trust_remote_code,
        )
    except OSError as e:
        raise _load_error(str(model_name_or_path), e) from e


def load_model_and_tokenizer(model_name_or_path: str, quantization: str = "4bit", trust_remote_code: bool = False,
                             device_map=None):
    """(model, tokenizer) for a hub id or a local directory written by save_pretrained.
    Raises UsageError when the model cannot be found or --quantization is unknown."""
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
    return load_model(model_name_or_path, quantization, trust_remote_code, device_map), tokenizer


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear",
             gradient_checkpointing: bool = True, keep_vocab_dtype: bool = True) -> PeftModel:
    """Freeze the base model and insert LoRA adapters: W x + (alpha / r) * B A x, with B = 0 at start
    so the wrapped model starts exactly equal to the base model.

    target_modules="all-linear": peft wraps every nn.Linear / bnb Linear4bit except the output layer
    (lm_head), i.e. q,k,v,o,gate,up,down_proj in each Qwen2 layer.
    keep_vocab_dtype: for quantised models, undo peft's fp32 upcast of the two vocabulary matrices (see below).
    """
    # use_reentrant=False: the non-reentrant checkpoint recomputes activations in backward without
    # needing the checkpointed block's inputs to require grad (the frozen embeddings output doesn't).
    gc_kwargs = {"use_reentrant": False}
    if is_quantized(model):
        vocab_dtype = model.get_input_embeddings().weight.dtype
        # Freezes all base weights, casts the remaining fp16/bf16 params (norms, embeddings) to fp32 for
        # stable training, and turns on gradient checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
        if keep_vocab_dtype and vocab_dtype != torch.float32:
            # embed_tokens and lm_head are not quantised: 2 x 151,936 x 2048 = 622M frozen params in
            # Qwen1.5-1.8B, 2.5 GB in fp32 against 1.2 GB in bf16. Their values came from bf16 anyway, so the
            # upcast adds no information; put them back and feed lm_head hidden states in its own dtype
            # (logits in bf16; the loss upcasts them to fp32).
            model.get_input_embeddings().to(vocab_dtype)
            lm_head = model.get_output_embeddings().to(vocab_dtype)
            lm_head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    for module in model.modules():
        # bitsandbytes (0.50) repacks 4-bit weights in place for a faster CPU kernel the first time a layer runs
        # in eval mode on an AVX512-BF16 CPU, and that kernel has no backward: training after the first eval
        # would crash. Keep the trainable layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if gradient_checkpointing:
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    check_target_modules(model, target_modules)
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules, bias="none")
    model = get_peft_model(model, config)
    for param in model.parameters():
        # Trainable weights in fp32 whatever the base dtype: fp16 training unscales fp32 gradients only (the
        # GradScaler refuses fp16 ones), and Adam updates of ~1e-4 relative size vanish in a 16-bit weight.
        # peft already does this by default (autocast_adapter_dtype); this makes it a guarantee.
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def check_target_modules(model, target_modules) -> None:
    """UsageError when a --target_modules name matches no linear layer of the model (peft would raise a
    long ValueError deep inside get_peft_model); the message lists the names that exist."""
    if target_modules == "all-linear" or isinstance(target_modules, str):
        return
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"}
    missing = [name for name in target_modules if name not in linear]
    if missing:
        raise UsageError(f"--target_modules {' '.join(missing)}: no such linear layer in the model; "
                         f"choose from {' '.join(sorted(linear))}, or all-linear")


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts. A bnb Params4bit tensor packs two 4-bit values per byte
    (numel() counts bytes), so it counts 2 * bytes-per-element per stored element, as peft does."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
