"""One optimizer step of finetune.py's recipe at Qwen1.5-1.8B's real size, measured beside the analytic budget.

    python phase2_lora/benchmark_one_step.py                      # 256 and 512 tokens, batch 1 (CPU: minutes)
    python phase2_lora/benchmark_one_step.py --seq_lens 512 1024  # on a GPU: also the <= 4 GB at 1,024 goal
    python phase2_lora/benchmark_one_step.py --tiny               # the same code path on a tiny config (seconds)

Real-size evidence without a GPU. A randomly initialised model with Qwen1.5-1.8B's exact config (hidden 2048,
24 layers, 16 heads, intermediate 5504, vocabulary 151,936, untied embeddings) is built directly in bf16 (no fp32
copy: 3.7 GB of RAM, not 7.3), saved in small shards and loaded back by finetune.py's own loader, which quantises
it to NF4 on the fly. Then finetune.py's recipe, unchanged: qlora_model.add_lora (LoRA r=16 on all linear layers,
non-reentrant gradient checkpointing, frozen embeddings and lm_head kept in the compute dtype), enable_chunked_loss,
autocast in the compute dtype (the Trainer's bf16=True), gradient clipping at 1.0 and one AdamW step (paged 8-bit
on CUDA, torch AdamW on CPU, as finetune.py chooses). The compute dtype is bf16 on CPU too, so every term has the
size it has on an RTX 4060.

Memory: on CPU, the torch profiler's memory timeline (profile_memory=True) of the second step (the first one
creates the optimizer state): peak bytes of live tensors, split by the profiler's categories; on CUDA,
torch.cuda.max_memory_allocated / max_memory_reserved. `--meter counter` counts the same bytes on CPU with
benchmark_tools.PeakMemory (tests/test_qlora_benchmark.py checks the two agree) without the profiler's records,
which take several GB of RAM at 1.8B. Time: wall time of the first step, outside any meter.
Each static term (weights, gradients, optimizer state) is also counted from the tensors themselves and set beside
the budget (memory_budget.py); the rest of the peak is set beside the budget's activations and logits.
"""

import argparse
import gc
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from benchmark_tools import PeakMemory, quant_state_tensors, tensor_bytes, write_atomic
from chunked_loss import DEFAULT_CHUNK_SIZE, enable_chunked_loss
from lora_from_scratch import QWEN_TINY, qwen_config
from memory_budget import GIB, budget_terms, parameter_counts
from qlora_model import add_lora, compute_dtype, load_model
from transformers.utils import logging as hf_logging

TINY = QWEN_TINY  # --tiny
LORA_R = 16  # finetune.py's default --lora_r (alpha 32, dropout 0.05)
STATIC = ("NF4 base weights", "embeddings + lm_head", "norms and biases (fp32)", "LoRA weights (fp32)",
          "LoRA gradients (fp32)", "Adam state")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config instead of Qwen1.5-1.8B's (a smoke test)")
    p.add_argument("--seq_lens", type=int, nargs="+", default=[256, 512], help="tokens per step, batch 1")
    p.add_argument("--chunk_size", type=int, default=None,
                   help=f"rows per logits chunk (default {DEFAULT_CHUNK_SIZE}, finetune.py's; --tiny: 32)")
    p.add_argument("--meter", choices=("profiler", "counter"), default="profiler",
                   help="CPU memory: the torch profiler's memory timeline (by category; its records take several GB "
                        "of RAM at 1.8B), or benchmark_tools.PeakMemory's tensor counter (same bytes, little RAM)")
    p.add_argument("--output_dir", type=Path, default=Path("checkpoints/qlora_one_step"),
                   help="results.json and results.md")
    args = p.parse_args(argv)
    args.chunk_size = args.chunk_size or (32 if args.tiny else DEFAULT_CHUNK_SIZE)
    if min(args.seq_lens + [args.chunk_size]) < 2:
        p.error("--seq_lens and --chunk_size must be at least 2")
    return args


# ---------------------------------------------------------------- model: finetune.py's, at full size

def build_model(config, tmp: Path, device: torch.device, dtype: torch.dtype, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Random bf16 weights written like a checkpoint, then finetune.py's loader (NF4) and add_lora."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):  # initialised in bf16 directly: no fp32 copy of 1.8B parameters
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(tmp, max_shard_size="500MB")  # small shards: the loader never holds a big one
    del model
    gc.collect()
    model = load_model(str(tmp), quantization="4bit", dtype=dtype)
    model = add_lora(model, r=LORA_R, alpha=32, dropout=0.05, target_modules="all-linear", gradient_checkpointing=True)
    enable_chunked_loss(model, chunk_size=chunk_size)
    model.train()
    return model


def make_optimizer(model, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":  # finetune.py: optim="paged_adamw_8bit" on CUDA
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=2e-4, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)  # finetune.py on CPU: adamw_torch


def train_step(model, optimizer, batch: dict, device: torch.device, dtype: torch.dtype) -> float:
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # keep the gradient buffers, as the Trainer's zero_grad does
    return loss.item()


# ---------------------------------------------------------------- measuring

def profiled_peak(step) -> dict:
    """Run step() under the torch profiler; the peak of its memory timeline (CPU tensors), split by category."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX  # the column order of the timeline
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Deprecated in favour of CUDA memory snapshots, which do not exist for CPU tensors: still the CPU tool.
        warnings.simplefilter("ignore", FutureWarning)
        prof.export_memory_timeline(str(Path(tmp) / "timeline.json"), device="cpu")  # [times, sizes per category]
        _, sizes = json.loads((Path(tmp) / "timeline.json").read_text())
    peak = max(sizes, key=sum)  # column 0 is unused; column i + 1 is category i
    names = [c.name.lower() if c is not None else "unknown" for c in _CATEGORY_TO_INDEX]
    return {"peak": sum(peak), "by_category": {n: peak[i + 1] for i, n in enumerate(names) if peak[i + 1]}}


def static_terms(model, optimizer) -> dict[str, int]:
    """Bytes of the budget's static terms, counted from the tensors themselves."""
    lm = model.get_base_model()
    vocab = [lm.get_input_embeddings(), lm.get_output_embeddings()]
    vocab_ids = {id(p) for m in vocab for p in m.parameters()}
    nf4 = [p for p in model.parameters() if p.__class__.__name__ == "Params4bit"]  # packed codes (+ block scales)
    lora = [p for p in model.parameters() if p.requires_grad]
    other = [p for p in model.parameters()
             if not p.requires_grad and id(p) not in vocab_ids and p.__class__.__name__ != "Params4bit"]
    return {"NF4 base weights": tensor_bytes(nf4, [quant_state_tensors(p.quant_state) for p in nf4]),
            "embeddings + lm_head": tensor_bytes(*vocab), "norms and biases (fp32)": tensor_bytes(other),
            "LoRA weights (fp32)": tensor_bytes(lora), "LoRA gradients (fp32)": tensor_bytes([p.grad for p in lora]),
            "Adam state": tensor_bytes(optimizer)}


def counted_peak(step, static_bytes: int) -> dict:
    """Run step() under benchmark_tools.PeakMemory: the tensors that exist before plus the peak of those it creates."""
    with PeakMemory("cpu", baseline_bytes=static_bytes) as mem:
        step()
    return {"peak": mem.allocated}


def measure(model, config, seq_len: int, device: torch.device, dtype: torch.dtype, meter: str = "profiler") -> dict:
    """Step 1 (timed; creates the optimizer state), then step 2 with memory measured."""
    gen = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=gen).to(device)  # (B=1, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = make_optimizer(model, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses = [train_step(model, optimizer, batch, device, dtype)]  # .item(): the step really ended
    seconds = time.perf_counter() - start
    row = {"seq_len": seq_len, "step_seconds": seconds}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        losses.append(train_step(model, optimizer, batch, device, dtype))
        # Paged 8-bit Adam state lives in CUDA unified memory, outside torch.cuda's counters: added to the peak.
        row.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved(),
                   peak=torch.cuda.max_memory_allocated() + tensor_bytes(optimizer))
    elif meter == "profiler":
        row.update(profiled_peak(lambda: losses.append(train_step(model, optimizer, batch, device, dtype))))
    else:
        static = tensor_bytes(model, optimizer, [p.grad for p in model.parameters() if p.grad is not None])
        row.update(counted_peak(lambda: losses.append(train_step(model, optimizer, batch, device, dtype)), static))
    row.update(losses=losses, static=static_terms(model, optimizer))
    model.zero_grad(set_to_none=True)
    gc.collect()
    return row


# ---------------------------------------------------------------- report

def compare(row: dict, budget: dict) -> list[tuple[str, float, float]]:
    """(term, budget bytes, measured bytes): the static terms one by one, then the rest of the peak against the
    budget's activations + logits, then the totals."""
    pairs = [(t, budget[t], row["static"][t]) for t in STATIC]
    transient = ("checkpointed layer inputs", "logits x3 (fp32)")
    rest = row["peak"] - sum(row["static"].values())
    pairs.append(("rest of the peak: activations, logits, workspace", sum(budget[t] for t in transient), rest))
    pairs.append(("total (peak tensor memory)", sum(budget.values()), row["peak"]))
    return pairs


def report(rows: list[dict], config, args, device: torch.device) -> str:
    counts = parameter_counts(config, LORA_R)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else "CPU"
    scale, unit = (GIB, "GiB") if not args.tiny else (2**20, "MiB")
    out = [f"finetune.py's recipe, one optimizer step, batch 1, {'tiny config' if args.tiny else 'Qwen1.5-1.8B'} "
           f"(random weights) on {where}; memory: "
           + ("torch.cuda.max_memory_allocated" if cuda else "peak of live tensors, " + (
               "torch profiler memory timeline" if args.meter == "profiler" else "benchmark_tools.PeakMemory"))]
    for row in rows:
        budget = budget_terms(counts, config, row["seq_len"], args.chunk_size, adam_bytes=2 if cuda else 8)
        out += [f"\nseq {row['seq_len']}: step {row['step_seconds']:.1f} s, loss {row['losses'][0]:.3f}"
                + (f", peak reserved {row['reserved'] / GIB:.2f} GiB" if cuda else ""),
                f"| term | budget {unit} | measured {unit} | measured / budget |", "|---|---|---|---|"]
        for term, b, m in compare(row, budget):
            out.append(f"| {term} | {b / scale:.3f} | {m / scale:.3f} | {m / b:.2f} |")
        if "by_category" in row:
            out.append("profiler categories at the peak: " + ", ".join(
                f"{k} {v / scale:.3f}" for k, v in row["by_category"].items()))
    if cuda:
        out.append("(measured total = torch.cuda.max_memory_allocated + the paged 8-bit Adam state, which lives in "
                   "CUDA unified memory outside torch.cuda's counters)")
        out += [f"goal: seq {r['seq_len']}: {r['allocated'] / GIB:.2f} GiB allocated "
                f"(reserved {r['reserved'] / GIB:.2f}) vs <= 4 GB at 1,024 tokens" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    if not sys.stderr.isatty():  # a log file: no "Writing model shards" / "Loading weights" carriage-return bars
        hf_logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where finetune.py's loader puts it
    dtype = compute_dtype(device) if device.type == "cuda" else torch.bfloat16  # the RTX 4060's compute dtype
    config = qwen_config(**TINY) if args.tiny else qwen_config()
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create --output_dir {args.output_dir}: {e.strerror}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(config, Path(tmp), device, dtype, args.chunk_size)
    print(f"model built, quantised and wrapped in {time.perf_counter() - start:.0f} s")
    rows = [measure(model, config, seq_len, device, dtype, args.meter) for seq_len in args.seq_lens]
    text = report(rows, config, args, device)
    print(text)
    write_atomic(args.output_dir / "results.json", lambda p: p.write_text(json.dumps(rows, indent=2)))
    write_atomic(args.output_dir / "results.md", lambda p: p.write_text(text + "\n", encoding="utf-8"))
    print(f"results.json, results.md -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
