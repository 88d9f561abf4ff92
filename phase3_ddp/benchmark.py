"""Phase 3 benchmarks, each measuring its baseline side by side in the same run.

    python phase2_lora/make_tiny_model.py --output_dir checkpoints/tiny-qwen   # once (offline, ~6 s)
    python phase3_ddp/benchmark.py                                            # CPU: gloo, 1 thread per process
    python phase3_ddp/benchmark.py --model_name_or_path Qwen/Qwen1.5-1.8B-Chat --quantization 4bit  # 2 GPUs: NCCL
    python phase3_ddp/benchmark.py --memory                                   # peak RSS: DDP vs finetune.py

Default mode, DDP scaling: training samples/s of finetune_ddp.py with 1 process and with 2.

Both runs launch the real script under torchrun with the same per-rank batch (weak scaling: 2 processes
do twice the work per step) on the same synthetic data, and time optimizer steps after a warm-up.
Scaling efficiency = throughput_2 / (2 x throughput_1): 1.0 means the all-reduce costs nothing. On CPU
each process gets one thread (OMP_NUM_THREADS=1), so 2 processes use 2 cores and 1 process uses 1: the
comparison is between equal cores per process, not a bigger machine against a smaller one.

--memory: peak resident memory (RSS) of phase2_lora/finetune.py (the baseline: the 8 GB recipe with the HF
Trainer) and of finetune_ddp.py, one process each, on the same data: batch 4 x 512 tokens, --quantization none,
2 optimizer steps, on a copy of the tiny model with Qwen's real vocabulary (151,936 tokens, random weights;
the tokenizer stays the tiny one), where the (B, T, V) logits dominate. A smoke test of the code path on a tiny
body, not a figure for the 1.8B model; CPU and Linux (ru_maxrss of each child process).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from finetune_ddp import FailingArgumentParser, number, whole_number  # one-line errors, the same checks

HERE = Path(__file__).resolve().parent
WORDS = ["data", "parallel", "replica", "gradient", "all", "reduce", "bucket", "overlap", "rank", "world", "node",
         "shard", "optimizer", "state"]


def build_parser() -> argparse.ArgumentParser:
    p = FailingArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default="checkpoints/tiny-qwen",
                   help="model to train (build the default with phase2_lora/make_tiny_model.py)")
    p.add_argument("--quantization", choices=("4bit", "8bit", "none"), default="none")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA if available")
    p.add_argument("--batch_size", type=whole_number(1), default=8, help="sequences per rank per step")
    p.add_argument("--answer_words", type=whole_number(1, 100_000), default=48,
                   help="words per synthetic answer (sets sequence length)")
    p.add_argument("--steps", type=whole_number(1, 1_000_000), default=20, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=whole_number(0, 1_000_000), default=3, help="untimed optimizer steps first")
    p.add_argument("--nprocs", type=whole_number(1, 1024), nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--timeout", type=number(0, 30 * 86400, low_open=True), default=900, help="seconds per run")
    p.add_argument("--memory", action="store_true",
                   help="instead: peak RSS of finetune_ddp.py against phase2_lora/finetune.py (real vocabulary)")
    p.add_argument("--vocab_size", type=whole_number(2, 1_000_000), default=151_936,
                   help="--memory: vocabulary of the model copy")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.nprocs = sorted(set(args.nprocs))  # the smallest run is the baseline of the efficiency ratio
    return args


def write_data(path: Path, n: int, answer_words: int) -> None:
    """n Alpaca records of equal word count, so every sample costs about the same."""
    records = [{"instruction": f"Repeat pattern {i}.", "input": "",
                "output": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(answer_words))} for i in range(n)]
    path.write_text(json.dumps(records), encoding="utf-8")


def run(nproc: int, args, data: Path, out: Path) -> dict:
    """One torchrun launch; returns the throughput measured from the per-step wall times rank 0 logged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "finetune_ddp.py"), "--model_name_or_path", args.model_name_or_path,
           "--data_path", str(data), "--output_dir", str(out), "--quantization", args.quantization,
           "--device", args.device, "--batch_size", str(args.batch_size), "--grad_accum", "1",
           "--max_steps", str(args.warmup + args.steps), "--warmup_ratio", "0", "--val_size", "0",
           "--save_steps", "0", "--logging_steps", str(10**9), "--lora_dropout", "0", "--max_seq_len", "1024",
           "--no_cache"]  # throughput only: nothing to reuse, nothing to leave in the user's data/cache
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process (torchrun's default, made explicit)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"error: the {nproc}-process run took over {args.timeout:g} s; "
                         f"raise --timeout or lower --steps") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"error: the {nproc}-process run failed (exit {proc.returncode}):\n{tail}")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    timed = [h for h in metrics["log_history"] if "loss" in h][args.warmup:]
    seconds = sum(h["seconds"] for h in timed)
    return {"nproc": nproc, "global_batch": metrics["global_batch"], "steps": len(timed), "seconds": seconds,
            "samples_per_second": metrics["global_batch"] * len(timed) / seconds}


# ---------------------------------------------------------------- --memory

def real_vocab_copy(tiny: Path, out: Path, vocab_size: int) -> None:
    """The tiny model's config with Qwen's vocabulary size, random weights, and the tiny tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(tiny)
    config.vocab_size = vocab_size
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)  # safetensors
    for f in tiny.iterdir():
        if f.is_file() and not (out / f.name).exists():  # tokenizer and chat template
            shutil.copy(f, out / f.name)


def peak_rss(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run cmd to the end; (peak RSS in bytes of that process, seconds). os.wait4 reports the rusage of that one
    child (getrusage(RUSAGE_CHILDREN) would give the largest of all children so far)."""
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        killer.cancel()
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "\n".join(log.read_text(encoding="utf-8").strip().splitlines()[-15:])
        raise SystemExit(f"error: {Path(cmd[1]).name} failed (exit {os.waitstatus_to_exitcode(status)}):\n{tail}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # Linux reports kilobytes


def memory(args) -> int:
    """Peak RSS of finetune.py and finetune_ddp.py on the same batches; prints the ratio."""
    words = 600  # > 512 tokens per example with the tiny tokenizer: every row is truncated to 512
    flags = ["--data_path", "DATA", "--quantization", "none", "--batch_size", "4", "--grad_accum", "1", "--max_steps",
             "2", "--max_seq_len", "512", "--val_size", "0", "--logging_steps", "1", "--lora_dropout", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "real-vocab"
        real_vocab_copy(Path(args.model_name_or_path), model, args.vocab_size)
        write_data(tmp / "long.json", 16, words)
        flags = [str(tmp / "long.json") if f == "DATA" else f for f in flags] + ["--model_name_or_path", str(model)]
        runs = {"phase2_lora/finetune.py": ["--save_steps", "1000"],
                "phase3_ddp/finetune_ddp.py": ["--save_steps", "0", "--device", "cpu", "--cache_dir", ""]}
        peaks = {}
        for i, (script, extra) in enumerate(runs.items()):
            cmd = [sys.executable, str(HERE.parent / script), *flags, "--output_dir", str(tmp / f"out{i}"), *extra]
            peaks[script], seconds = peak_rss(cmd, tmp / f"log{i}.txt", args.timeout)
            print(f"{script}: peak RSS {peaks[script] / 2**30:.2f} GiB ({seconds:.0f} s; vocabulary "
                  f"{args.vocab_size:,}, batch 4 x 512 tokens, --quantization none, 2 steps, 1 process)", flush=True)
    base, ddp = peaks.values()
    print(f"peak RSS finetune_ddp.py / finetune.py = {ddp / 2**30:.2f} / {base / 2**30:.2f} GiB = {ddp / base:.3f} "
          f"(goal <= 1.10: {'met' if ddp <= 1.1 * base else 'NOT met'})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    model = args.model_name_or_path
    hub_id = not args.memory and model.count("/") == 1 and not model.startswith((".", "/", "checkpoints"))
    if not Path(model).is_dir() and not hub_id:
        print(f"error: no model in {args.model_name_or_path}; build one with "
              f"python phase2_lora/make_tiny_model.py --output_dir {args.model_name_or_path}", file=sys.stderr)
        return 2
    if args.memory:
        return memory(args)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.device_count() < max(args.nprocs):
        print(f"error: {max(args.nprocs)} processes need {max(args.nprocs)} GPUs, {torch.cuda.device_count()} "
              f"visible; use --nprocs 1 or --device cpu", file=sys.stderr)
        return 2
    backend = "NCCL" if cuda else "gloo, 1 thread per process"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bench.json"
        # Enough records that no rank wraps around an epoch within the run (it would still work, just re-shuffle).
        write_data(data, args.batch_size * max(args.nprocs) * (args.warmup + args.steps), args.answer_words)
        for nproc in args.nprocs:
            results.append(run(nproc, args, data, Path(tmp) / f"out{nproc}"))
            r = results[-1]
            print(f"{nproc} process(es) [{backend}]: global batch {r['global_batch']}, {r['steps']} steps in "
                  f"{r['seconds']:.2f} s -> {r['samples_per_second']:.2f} samples/s", flush=True)
    base = results[0]
    for r in results[1:]:
        eff = r["samples_per_second"] / (r["nproc"] / base["nproc"] * base["samples_per_second"])
        print(f"scaling efficiency {base['nproc']} -> {r['nproc']} processes: {r['samples_per_second']:.2f} / "
              f"({r['nproc'] / base['nproc']:g} x {base['samples_per_second']:.2f}) = {eff:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
