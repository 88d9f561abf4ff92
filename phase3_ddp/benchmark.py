"""DDP scaling benchmark: training samples/s of finetune_ddp.py with 1 process and with 2, in one run.

    python phase2_lora/make_tiny_model.py --output_dir checkpoints/tiny-qwen   # once (offline, ~6 s)
    python phase3_ddp/benchmark.py                                            # CPU: gloo, 1 thread per process
    python phase3_ddp/benchmark.py --model_name_or_path Qwen/Qwen1.5-1.8B-Chat --quantization 4bit  # 2 GPUs: NCCL

Both runs launch the real script under torchrun with the same per-rank batch (weak scaling: 2 processes
do twice the work per step) on the same synthetic data, and time optimizer steps after a warm-up.
Scaling efficiency = throughput_2 / (2 x throughput_1): 1.0 means the all-reduce costs nothing. On CPU
each process gets one thread (OMP_NUM_THREADS=1), so 2 processes use 2 cores and 1 process uses 1: the
comparison is between equal cores per process, not a bigger machine against a smaller one.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORDS = ["data", "parallel", "replica", "gradient", "all", "reduce", "bucket", "overlap", "rank", "world", "node",
         "shard", "optimizer", "state"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default="checkpoints/tiny-qwen",
                   help="model to train (build the default with phase2_lora/make_tiny_model.py)")
    p.add_argument("--quantization", choices=("4bit", "8bit", "none"), default="none")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA if available")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--answer_words", type=int, default=48, help="words per synthetic answer (sets sequence length)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = p.parse_args(argv)
    if min(args.batch_size, args.answer_words, args.steps, *args.nprocs) < 1 or args.warmup < 0:
        p.error("--batch_size, --answer_words, --steps and --nprocs must be >= 1, --warmup >= 0")
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
           "--save_steps", "0", "--logging_steps", str(10**9), "--lora_dropout", "0", "--max_seq_len", "1024"]
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


def main(argv=None) -> int:
    args = parse_args(argv)
    model = args.model_name_or_path
    if not Path(model).is_dir() and (model.count("/") != 1 or model.startswith((".", "/", "checkpoints"))):
        print(f"error: no model in {args.model_name_or_path}; build one with "
              f"python phase2_lora/make_tiny_model.py --output_dir {args.model_name_or_path}", file=sys.stderr)
        return 2
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
