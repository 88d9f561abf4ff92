"""Analytic memory budget of QLoRA training, term by term: a budget, not a measurement.

Parameter counts come from the real module tree, built on the meta device (no bytes, no download); bytes per
element come from the recipe; activations and logits from the shapes. A GPU needs more than the total: the budget
leaves out the CUDA context (with torch's and bitsandbytes' kernels), cuBLAS workspaces, the caching allocator's
fragmentation, one layer's recomputation workspace in backward and autocast's weight copies. OMITTED_GIB gives the
first three as a range; benchmark_one_step.py measures everything that lives in tensors.
"""

import torch

GIB = 2**30
# Left out of the budget, as a range for a desktop GPU such as the RTX 4060. Estimates, not measurements: the
# context is what torch + bitsandbytes typically show in nvidia-smi before the first tensor; cuBLAS keeps a
# workspace of a few MiB per handle and stream (cuBLASLt up to 32 MiB on Hopper); reserved above allocated is
# typically 5-20% of the allocated peak for a training loop whose batch shapes vary.
OMITTED_GIB = {"CUDA context + torch/bitsandbytes kernels": (0.3, 0.8), "cuBLAS/cuBLASLt workspaces": (0.01, 0.07)}
FRAGMENTATION = (0.05, 0.20)  # fraction of the allocated peak
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit scale per 64 (double quant) + fp32 per 64 * 256


def parameter_counts(config, lora_r: int) -> dict[str, int]:
    """Parameters by how QLoRA stores them: quantised linear layers, vocabulary matrices (embeddings and an
    untied lm_head), the rest (norms, q/k/v biases), and LoRA (r * (in + out) on every linear layer but lm_head)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    quant = sum(m.weight.numel() for m in linears)
    vocab = model.get_input_embeddings().weight.numel() + (0 if config.tie_word_embeddings else head.weight.numel())
    return {"quant": quant, "vocab": vocab, "other": sum(p.numel() for p in model.parameters()) - quant - vocab,
            "lora": sum(lora_r * (m.in_features + m.out_features) for m in linears)}


def budget_terms(counts: dict, config, tokens: int, chunk_size: int, *, chunked: bool = True, vocab_bytes: int = 2,
                 adam_bytes: int = 2, act_bytes: int = 4) -> dict[str, float]:
    """Bytes per term for one training step over `tokens` tokens (batch x sequence).

    vocab_bytes: 2 = frozen embeddings and lm_head kept in bf16 (finetune.py), 4 = peft's fp32 upcast.
    adam_bytes: per LoRA parameter, 2 = 8-bit AdamW (two 1-byte moments), 8 = fp32 AdamW.
    act_bytes: checkpointed layer inputs; 4 because peft's fp32 norms turn the residual stream fp32.
    Logits: the logits, their log-softmax and its gradient, in fp32 (x3), for the whole sequence or one chunk."""
    logit_rows = min(tokens, chunk_size) if chunked else tokens
    return {
        "NF4 base weights": counts["quant"] * NF4_BYTES,
        "embeddings + lm_head": counts["vocab"] * vocab_bytes,
        "norms and biases (fp32)": counts["other"] * 4,
        "LoRA weights (fp32)": counts["lora"] * 4,
        "LoRA gradients (fp32)": counts["lora"] * 4,
        "Adam state": counts["lora"] * adam_bytes,
        "checkpointed layer inputs": config.num_hidden_layers * tokens * config.hidden_size * act_bytes,
        "logits x3 (fp32)": 3 * logit_rows * config.vocab_size * 4,
    }


def budget_table(config, seq_lens: list[int], batch_size: int, chunk_size: int, lora_r: int) -> str:
    """The budget of the textbook recipe (full logits, fp32 vocabulary matrices) against finetune.py's (chunked
    loss, bf16 vocabulary matrices), both with 8-bit AdamW, plus what the budget leaves out, as a range."""
    counts = parameter_counts(config, lora_r)
    gib, unit = (GIB, "GiB") if counts["vocab"] * 4 > GIB else (2**20, "MiB")  # the tiny config reads in MiB
    one = budget_terms(counts, config, batch_size * seq_lens[0], chunk_size)
    lines = [f"Analytic budget, batch {batch_size} ({unit}; LoRA r={lora_r}: {counts['lora']:,} params). "
             f"A budget, not a measurement:",
             f"NF4 weights {one['NF4 base weights'] / gib:.2f} | "
             f"embeddings+lm_head fp32 {counts['vocab'] * 4 / gib:.2f}"
             f" (bf16 {counts['vocab'] * 2 / gib:.2f}) | LoRA fp32 weights+grads {counts['lora'] * 8 / gib:.2f}"
             f" + 8-bit Adam {counts['lora'] * 2 / gib:.2f}",
             "| seq | checkpointed layer inputs (fp32) | logits fp32 x3 (full) | logits x3 (chunked) "
             "| total: +paged8bit | total: +chunked +bf16frozen (finetune.py) |", "|---|---|---|---|---|---|"]
    for seq in seq_lens:
        full = budget_terms(counts, config, batch_size * seq, chunk_size, chunked=False, vocab_bytes=4)
        new = budget_terms(counts, config, batch_size * seq, chunk_size)
        lines.append(f"| {seq} | {new['checkpointed layer inputs'] / gib:.2f} | {full['logits x3 (fp32)'] / gib:.2f} "
                     f"| {new['logits x3 (fp32)'] / gib:.2f} | {sum(full.values()) / gib:.2f} "
                     f"| {sum(new.values()) / gib:.2f} |")
    low = sum(lo for lo, _ in OMITTED_GIB.values())
    high = sum(hi for _, hi in OMITTED_GIB.values())
    lines.append(f"Left out: {', '.join(OMITTED_GIB)} ({low:.2f}-{high:.2f} GiB together), allocator fragmentation "
                 f"(+{FRAGMENTATION[0]:.0%} to +{FRAGMENTATION[1]:.0%} of the peak), one layer's recomputation "
                 f"workspace and autocast copies: estimates for a GPU, to add before comparing with nvidia-smi.")
    return "\n".join(lines)
