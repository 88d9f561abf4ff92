"""QLoRA memory and speed at the real Qwen1.5-1.8B size, against what a user gets by default, in one run.

A randomly initialised model with Qwen1.5-1.8B's exact architecture is built from its config (no
download), saved once, then loaded in 4-bit NF4 by finetune.py's own loader and wrapped with LoRA
with finetune.py's defaults (r=16, alpha=32, dropout 0.05, all linear layers). Each recipe trains a
few steps on random tokens at each (sequence length, batch) setting and reports peak memory, tokens/s
and trainable parameters. Every ratio is against `default`; the recipes after it are cumulative, so each
technique shows up as a ratio:

  default        what a user gets by default: from_pretrained (default attention, SDPA),
                 prepare_model_for_kbit_training + get_peft_model with their defaults (reentrant checkpointing,
                 fp32 embeddings and lm_head), the HF Trainer's default optimizer, full logits
  eager          extra row, not cumulative: default with eager attention (the textbook (T, T) softmax)
  +nonreentrant  non-reentrant checkpointing (qlora_model.add_lora, exactly as finetune.py)
  +paged8bit     paged 8-bit AdamW (bitsandbytes)
  +chunked       chunked_loss.py: the (B, T, 151936) fp32 logits are never materialised
  +bf16frozen    frozen embeddings and lm_head kept in bf16 (peft's prepare step upcasts them to fp32)
                 = finetune.py's recipe

    python phase2_lora/benchmark.py                       # GPU: the full table (a few minutes on one GPU)
    python phase2_lora/benchmark.py --simulate_gb 8       # cap this process at 8 GB, like an RTX 4060
    python phase2_lora/benchmark.py --tiny                # CPU smoke run of the same code on a tiny config
    python phase2_lora/benchmark.py --budget              # the analytic memory budget at 1.8B, no GPU needed
    python phase2_lora/benchmark_one_step.py              # finetune.py's recipe at 1.8B measured on CPU vs budget

Memory: on CUDA, torch.cuda.max_memory_allocated / max_memory_reserved over the steps of a setting.
On CPU (no CUDA counters) benchmark_tools.py counts the bytes of live tensors: weights + everything the
step allocates; there is no "reserved" on CPU.
"""

import argparse
import gc
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from benchmark_tools import PeakMemory, tensor_bytes, write_atomic
from chunked_loss import DEFAULT_CHUNK_SIZE, enable_chunked_loss
from finetune import parse_args as finetune_args
from lora_from_scratch import QWEN_TINY, qwen_config
from memory_budget import budget_table
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from qlora_model import add_lora, compute_dtype, load_model, trainable_parameters
from tqdm import tqdm
from transformers import TrainingArguments
from transformers.utils import logging as hf_logging

# Qwen's README, "Q-LoRA" row for Qwen-1.8B at batch 1: peak GB per sequence length, measured on their GPU for
# another model (Qwen-1, GPTQ int4) and another code base. Shown for orientation, never as the baseline.
QWEN_PUBLISHED_GB = {256: 5.8, 512: 6.0, 1024: 6.6, 2048: 7.8}
# The HF Trainer's default optimizer in the installed transformers (adamw_torch_fused with torch >= 2.8).
TRAINER_DEFAULT_OPTIM = str(getattr(TrainingArguments.optim, "value", TrainingArguments.optim))
BASELINE = "default"
DEFAULT = {"attn": None, "reentrant": True, "optim": TRAINER_DEFAULT_OPTIM, "chunked": False, "bf16_frozen": False}
TECHNIQUES = {  # each recipe = the previous one + one technique (attn None: from_pretrained's default, SDPA)
    "default": {}, "+nonreentrant": {"reentrant": False}, "+paged8bit": {"optim": "paged_adamw_8bit"},
    "+chunked": {"chunked": True}, "+bf16frozen": {"bf16_frozen": True},
}
EXTRA = {"eager": {**DEFAULT, "attn": "eager"}}  # extra rows, each its own change to the default
RECIPES = [BASELINE, *EXTRA, *list(TECHNIQUES)[1:]]  # table order
# finetune.py's own defaults, read from its parser so the two never drift apart.
FINETUNE = finetune_args([])
LORA = {"r": FINETUNE.lora_r, "alpha": FINETUNE.lora_alpha, "dropout": FINETUNE.lora_dropout}
DEFAULT_BATCH = FINETUNE.batch_size
TINY = QWEN_TINY  # --tiny


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config (runs on CPU): seq 64/128, batch 1/2, 4 steps")
    p.add_argument("--seq_lens", type=int, nargs="+", default=None, help="default 256 512 1024 2048 (--tiny: 64 128)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                   help=f"default 1 {DEFAULT_BATCH} (finetune.py's --batch_size); --tiny: 1 2")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per setting after 1 warm-up; tokens/s from the fastest (default 3; --tiny: 4)")
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=RECIPES)
    p.add_argument("--chunk_size", type=int, default=None,
                   help=f"rows per logits chunk (default {DEFAULT_CHUNK_SIZE}; --tiny: 32, so short sequences chunk)")
    p.add_argument("--simulate_gb", type=float, default=None, help="cap CUDA memory of this process at N GB")
    p.add_argument("--output_dir", type=Path, default=Path("checkpoints/qlora_benchmark"),
                   help="results.json, results.md, memory.png")
    p.add_argument("--budget", action="store_true", help="print the analytic memory budget only (no GPU needed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.seq_lens = args.seq_lens or ([64, 128] if args.tiny else [256, 512, 1024, 2048])
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.tiny else [1, DEFAULT_BATCH])
    args.steps = args.steps or (4 if args.tiny else 3)
    args.chunk_size = args.chunk_size or (32 if args.tiny else DEFAULT_CHUNK_SIZE)
    if min(args.seq_lens + args.batch_sizes + [args.steps, args.chunk_size]) < 1:
        p.error("--seq_lens, --batch_sizes, --steps and --chunk_size must be positive")
    return args


# ---------------------------------------------------------------- model

def save_random_model(config, path: Path, device: torch.device) -> None:
    """Random weights (HF init, std 0.02) in the compute dtype, written like any checkpoint. Built on the
    GPU when there is one: initialising 1.8B parameters there takes a second instead of a minute."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype(device))
    model.save_pretrained(path)  # config.json + safetensors shards
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_recipe(model_dir: Path, flags: dict):
    """4-bit NF4 base + LoRA, built as the recipe says. The default recipe calls peft exactly as its docs do;
    non-reentrant recipes go through qlora_model.add_lora, i.e. exactly finetune.py's code path."""
    model = load_model(str(model_dir), quantization="4bit")  # finetune.py's loader: NF4, double quant
    if flags["attn"]:  # None: keep from_pretrained's choice (SDPA)
        model.set_attn_implementation(flags["attn"])
    if flags["reentrant"]:
        # The defaults: gradient checkpointing without kwargs, i.e. torch's checkpoint with use_reentrant unset,
        # which torch 2.x still runs as reentrant (with a warning we silence: it is the default we measure).
        warnings.filterwarnings("ignore", message=r".*use_reentrant parameter should be passed explicitly")
        model = prepare_model_for_kbit_training(model)
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=LORA["dropout"], target_modules="all-linear"))
    else:
        # keep_vocab_dtype: peft's prepare step upcasts the frozen embeddings and lm_head to fp32 (1.2 GB
        # more at 1.8B, for weights nothing updates); add_lora undoes that from the +bf16frozen recipe on.
        model = add_lora(model, **LORA, target_modules="all-linear", gradient_checkpointing=True,
                         keep_vocab_dtype=flags["bf16_frozen"])
    if flags["chunked"]:
        enable_chunked_loss(model, chunk_size=flags["chunk_size"])
    return model


def make_optimizer(model, name: str):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb
        # On CPU bnb cannot page and says so at every first step; falling back is fine for a smoke run.
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    # The Trainer's adamw_torch(_fused): torch AdamW, fused kernel or not, weight decay 0 (its default)
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=name == "adamw_torch_fused")


# ---------------------------------------------------------------- one setting

def train_step(model, optimizer, batch: dict, device: torch.device) -> float:
    # bf16 autocast on the GPU, as the HF Trainer does with bf16=True (finetune.py); fp32 on CPU.
    with torch.autocast(device.type, dtype=compute_dtype(device), enabled=device.type == "cuda"):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)  # Trainer default
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def timed_steps(model, optimizer, batch: dict, steps: int, device: torch.device, losses: list) -> float:
    """Seconds of the fastest of `steps` steps: other processes only ever add time, so the minimum is the
    least noisy estimate of what the recipe itself costs (on a quiet GPU all steps take about the same)."""
    best = math.inf
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, batch, device))  # .item() syncs: the step really ended
        best = min(best, time.perf_counter() - start)
    return best


def run_setting(model, optim_name: str, seq_len: int, batch_size: int, steps: int, vocab: int,
                device: torch.device) -> dict:
    """Peak memory of a warm-up step (on CUDA: of every step), then tokens/s over `steps` more steps."""
    gen = torch.Generator().manual_seed(seq_len * 100 + batch_size)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = make_optimizer(model, optim_name)  # fresh: its state is part of this setting's memory
    cuda, losses = device.type == "cuda", []
    try:
        with PeakMemory(device, baseline_bytes=tensor_bytes(model)) as mem:
            losses.append(train_step(model, optimizer, batch, device))  # warm-up: kernels, optimizer state
            if cuda:
                seconds = timed_steps(model, optimizer, batch, steps, device, losses)
        if not cuda:  # the CPU tensor counter slows every op: time outside it
            seconds = timed_steps(model, optimizer, batch, steps, device, losses)
        row = {"allocated_mib": mem.allocated / 2**20, "reserved_mib": mem.reserved / 2**20 if cuda else None,
               "tokens_per_s": batch_size * seq_len / seconds,
               "optimizer_state_mib": tensor_bytes(optimizer) / 2**20, "losses": losses}
    except torch.OutOfMemoryError:
        row = {"allocated_mib": None, "reserved_mib": None, "tokens_per_s": None, "optimizer_state_mib": None,
               "losses": losses, "oom": True}
    del optimizer, batch
    model.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------- report

def fmt(x, spec: str) -> str:
    return "OOM" if x is None else format(x, spec)


def ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def markdown_table(rows: list[dict], cuda: bool) -> str:
    """One row per (recipe, setting). GPU memory in GB (GiB); CPU tensor counts in MB (MiB)."""
    scale, unit = (1 / 1024, "GB") if cuda else (1, "MB")
    mem = f"peak allocated {unit}" if cuda else f"peak tensors {unit} (CPU count)"
    lines = [f"| recipe | seq | batch | {mem} | peak reserved {unit} | optimizer state MB | tokens/s "
             f"| memory vs default | speed vs default | Qwen Q-LoRA GB (measured, Qwen-1 GPTQ, batch 1) |",
             "|" + "---|" * 10]
    base = {(r["seq_len"], r["batch_size"]): r for r in rows if r["recipe"] == BASELINE}
    for r in rows:
        b = base.get((r["seq_len"], r["batch_size"]), {})
        qwen = QWEN_PUBLISHED_GB.get(r["seq_len"]) if r["batch_size"] == 1 and cuda else None
        alloc = None if r["allocated_mib"] is None else r["allocated_mib"] * scale
        reserved = "n/a" if not cuda else fmt(r["reserved_mib"] and r["reserved_mib"] * scale, ".2f")
        lines.append(f"| {r['recipe']} | {r['seq_len']} | {r['batch_size']} | {fmt(alloc, '.2f')} | {reserved} "
                     f"| {fmt(r['optimizer_state_mib'], '.1f')} | {fmt(r['tokens_per_s'], ',.0f')} "
                     f"| {ratio(r['allocated_mib'], b.get('allocated_mib'))} "
                     f"| {ratio(r['tokens_per_s'], b.get('tokens_per_s'))} | {qwen or '-'} |")
    return "\n".join(lines)


def goal_lines(rows: list[dict], recipe: str) -> list[str]:
    """The issue's targets for one recipe: <= 4 GB at 1024 and <= 6 GB at 2048 (batch 1), >= 1.5x speed."""
    get = {(r["recipe"], r["seq_len"], r["batch_size"]): r for r in rows}
    out = []
    for seq, limit in ((1024, 4.0), (2048, 6.0)):
        r = get.get((recipe, seq, 1))
        if r and r["allocated_mib"] is not None:
            peak = max(r["allocated_mib"], r["reserved_mib"] or 0) / 1024
            out.append(f"{recipe} @ {seq} tokens, batch 1: {peak:.2f} GB peak reserved vs goal <= {limit} GB "
                       f"(for orientation, Qwen-1 GPTQ Q-LoRA as published: {QWEN_PUBLISHED_GB[seq]} GB) -> "
                       f"{'met' if peak <= limit else 'NOT met'}")
    speedups = [r["tokens_per_s"] / b["tokens_per_s"] for r in rows if r["recipe"] == recipe and r["tokens_per_s"]
                for b in [get.get((BASELINE, r["seq_len"], r["batch_size"]))] if b and b["tokens_per_s"]]
    if speedups:
        out.append(f"{recipe} tokens/s vs {BASELINE}: {min(speedups):.2f}x to {max(speedups):.2f}x "
                   f"(goal >= 1.5x) -> {'met' if min(speedups) >= 1.5 else 'NOT met'}")
    return out


def save_plot(rows: list[dict], path: Path, cuda: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    batch = min(r["batch_size"] for r in rows)
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        pts = [(r["seq_len"], r["allocated_mib"] / (1024 if cuda else 1)) for r in rows
               if r["recipe"] == recipe and r["batch_size"] == batch and r["allocated_mib"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=recipe)
    published = [(s, g) for s, g in QWEN_PUBLISHED_GB.items() if s in {r["seq_len"] for r in rows}]
    if published and cuda and batch == 1:
        ax.plot(*zip(*published, strict=True), "k--", label="Qwen-1 GPTQ Q-LoRA as published (another model)")
    ax.set(xlabel=f"sequence length (batch {batch})", ylabel="peak allocated GB" if cuda else "peak tensors MB (CPU)",
           title="QLoRA peak memory by recipe", xscale="log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main

def recipe_flags(name: str) -> dict:
    """The full settings of a recipe: the default plus every technique up to `name` (or its extra change)."""
    if name in EXTRA:
        return dict(EXTRA[name])
    flags = dict(DEFAULT)
    for step, change in TECHNIQUES.items():  # cumulative: every recipe adds its technique to the previous ones
        flags.update(change)
        if step == name:
            return flags
    raise KeyError(name)


def run_recipes(args, config, device: torch.device) -> list[dict]:
    """Every requested recipe x seq_len x batch_size; one model per recipe, loaded from a random checkpoint."""
    rows = []
    recipes = [name for name in RECIPES if name in args.recipes]
    with tempfile.TemporaryDirectory() as tmp:
        save_random_model(config, Path(tmp), device)
        bar = tqdm(total=len(recipes) * len(args.seq_lens) * len(args.batch_sizes), desc="benchmark",
                   disable=not sys.stderr.isatty())  # in a log file: the table is the progress
        for name in recipes:
            flags = {**recipe_flags(name), "chunk_size": args.chunk_size}
            torch.manual_seed(args.seed)
            model = build_recipe(Path(tmp), flags)
            model.train()
            trainable, total = trainable_parameters(model)
            for seq_len in args.seq_lens:
                for batch_size in args.batch_sizes:
                    bar.set_postfix_str(f"{name} T={seq_len} B={batch_size}")
                    row = run_setting(model, flags["optim"], seq_len, batch_size, args.steps, config.vocab_size,
                                      device)
                    rows.append({"recipe": name, "seq_len": seq_len, "batch_size": batch_size,
                                 "trainable_params": trainable, "total_params": total, **row})
                    bar.update()
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        bar.close()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    config = qwen_config(**TINY) if args.tiny else qwen_config()
    budget = budget_table(config, args.seq_lens, 1, args.chunk_size, LORA["r"])
    if args.budget:
        print(budget)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where finetune.py's loader puts it
    if not sys.stderr.isatty():  # a log file: no "Writing model shards" / "Loading weights" carriage-return bars
        hf_logging.disable_progress_bar()
    if not args.tiny and device.type != "cuda":
        print("error: the 1.8B benchmark needs a CUDA GPU; use --tiny for the CPU smoke run, or --budget for the "
              "analytic memory budget", file=sys.stderr)
        return 2
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create --output_dir {args.output_dir}: {e.strerror}", file=sys.stderr)
        return 2
    if args.simulate_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.simulate_gb * 2**30 / total), device)
    cuda = device.type == "cuda"
    where = f"{torch.cuda.get_device_name(device)}" if cuda else "CPU"
    print(f"{'tiny' if args.tiny else 'Qwen1.5-1.8B'} architecture, random weights, on {where}; "
          f"{args.steps} timed steps per setting after 1 warm-up (tokens/s from the fastest)\n{budget}")

    rows = run_recipes(args, config, device)

    table = markdown_table(rows, cuda)
    goals = [line for name in args.recipes if name != BASELINE for line in goal_lines(rows, name)] if cuda else []
    trainable = {r["recipe"]: r["trainable_params"] for r in rows}
    header = (f"QLoRA benchmark on {where}, {'tiny config' if args.tiny else 'Qwen1.5-1.8B architecture'}, "
              f"chunk {args.chunk_size}; trainable params: " + ", ".join(f"{k} {v:,}" for k, v in trainable.items()))
    if cuda:
        header += ("\nPaged optimizer state lives in CUDA unified memory, outside torch's counters: add the "
                   "optimizer state column to the peaks for those recipes.")
    else:
        header += ("\nCPU: memory = weights + peak bytes of the tensors one training step creates "
                   "(benchmark_tools.py); tokens/s of a tiny model on a CPU is a smoke test, not a GPU prediction.")
    print("\n" + header + "\n\n" + table + "\n" + "\n".join(goals))
    result = {"device": where, "tiny": args.tiny, "steps": args.steps, "chunk_size": args.chunk_size,
              "memory_measure": "torch.cuda max_memory_allocated/reserved" if cuda else "CPU tensor count",
              "rows": rows, "goals": goals}
    write_atomic(args.output_dir / "results.json",
                 lambda p: p.write_text(json.dumps(result, indent=2), encoding="utf-8"))
    write_atomic(args.output_dir / "results.md", lambda p: p.write_text(
        "\n\n".join([header, table, "\n".join(goals), budget]) + "\n", encoding="utf-8"))
    write_atomic(args.output_dir / "memory.png", lambda p: save_plot(rows, p, cuda))
    print(f"results.json, results.md, memory.png -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
