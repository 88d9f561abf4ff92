"""How attention's cost grows with sequence length T: forward+backward time and peak memory, measured side by side for
our math path, our sdpa path and torch.nn.MultiheadAttention in one run, with the fitted exponent of time ~ T^k.

nn.MultiheadAttention runs two different algorithms, so it appears twice and each of ours is compared to its twin:
  torch-weights  need_weights=True (its default): explicit (B, H, T, T) weights, like our math path;
  torch-sdpa     need_weights=False: F.scaled_dot_product_attention inside, like our sdpa path.

Time: the best of --reps interleaved rounds (each round runs every implementation once, so load from other processes
hits all of them alike; contention only ever adds time, so the minimum is the least noisy estimate).
Peak memory: the most bytes of tensors alive at any moment during one forward+backward, minus what was alive before
it (inputs and weights excluded; activations, temporaries, output and gradients included). On CUDA this is
torch.cuda.max_memory_allocated; on CPU there is no allocator counter, so the step runs once under
torch.profiler(profile_memory=True) and the peak is the running sum of its allocation/free events (the same events
torch's own memory timeline uses). Neither counts the allocator's cache or the process's RSS.

    python phase2_attention/benchmark.py                      # T = 128 .. 4096, CPU (and CUDA when present)
    python phase2_attention/benchmark.py --lengths 64 128 --reps 2 --out_dir /tmp/bench
"""

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from attention import MultiHeadAttention
from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend, safe on headless machines
from matplotlib.ticker import NullLocator
from torch import nn
from torch._C._profiler import _EventType
from tqdm import tqdm

IMPLS = ("ours-math", "ours-sdpa", "torch-weights", "torch-sdpa")
TWIN = {"ours-math": "torch-weights", "ours-sdpa": "torch-sdpa"}  # same algorithm, so the fair comparison
GOALS = {"ours-math": 1.3, "ours-sdpa": 1.05}  # time ratio to the twin at T = 1024 on CPU


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096],
                   help="sequence lengths T (self-attention, L = S = T)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--embed_dim", type=int, default=256)
    p.add_argument("--num_heads", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="timed rounds per length (after one warm-up round)")
    p.add_argument("--causal", action="store_true", help="causal self-attention (torch gets the mask + the hint)")
    p.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                   help="default: cpu, plus cuda when available")
    p.add_argument("--fit_from", type=int, default=512,
                   help="fit the exponent on lengths >= this (where the T^2 terms dominate)")
    p.add_argument("--out_dir", type=Path, default=Path("checkpoints/attention_benchmark"),
                   help="where benchmark.json and benchmark.png go")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def usage_problem(args) -> str | None:
    """What is wrong with the arguments, in one line (None when they are fine); fills in the default devices."""
    if min(*args.lengths, args.batch, args.reps, args.embed_dim, args.num_heads) <= 0 or args.threads < 0:
        return "--lengths, --batch, --reps, --embed_dim and --num_heads must be positive, --threads >= 0"
    if args.embed_dim % args.num_heads:
        return f"--embed_dim ({args.embed_dim}) must be divisible by --num_heads ({args.num_heads})"
    args.devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in args.devices and not torch.cuda.is_available():
        return "--devices cuda: torch sees no CUDA device; drop it or install a CUDA build of torch"
    return None


def make_steps(args, device: str, T: int):
    """One forward+backward closure per implementation, all holding the same weights and input x (B, T, E)."""
    torch.manual_seed(args.seed)
    mha = nn.MultiheadAttention(args.embed_dim, args.num_heads, batch_first=True, device=device)
    math_path = MultiHeadAttention.from_torch(mha, impl="math")
    sdpa_path = MultiHeadAttention.from_torch(mha, impl="sdpa")
    x = torch.randn(args.batch, T, args.embed_dim, device=device, requires_grad=True)  # (B, T, E)
    # torch treats is_causal as a hint that needs the mask too; ours builds the mask from the flag.
    future = torch.ones(T, T, dtype=torch.bool, device=device).triu(1) if args.causal else None  # (T, T)
    calls = {
        "ours-math": lambda: math_path(x, x, x, is_causal=args.causal),
        "ours-sdpa": lambda: sdpa_path(x, x, x, is_causal=args.causal),
        "torch-weights": lambda: mha(x, x, x, attn_mask=future, is_causal=args.causal, need_weights=True),
        "torch-sdpa": lambda: mha(x, x, x, attn_mask=future, is_causal=args.causal, need_weights=False),
    }
    modules = [mha, math_path, sdpa_path]

    def step(call):
        def run():
            x.grad = None  # every step allocates its gradients afresh, so all steps (and all impls) cost the same
            for m in modules:
                m.zero_grad(set_to_none=True)
            call()[0].sum().backward()
        return run

    return {name: step(call) for name, call in calls.items()}


@contextlib.contextmanager
def silenced_stderr():
    """The profiler's C++ side (kineto) prints start/stop lines on fd 2; hide them for the measured step only."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_bytes(run) -> int:
    """Peak of live tensor bytes during run(), above the level at its start, from the profiler's allocation events
    (alloc_size > 0 for an allocation, < 0 for a free), replayed in time order."""
    with silenced_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True) as prof:
        run()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.typed[0] == _EventType.Allocation:
            events.append((e.start_time_ns, e.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(run) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(args, device: str) -> list[dict]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows, tty = [], sys.stderr.isatty()
    # A bar on a terminal; in a log file (stderr not a TTY) one plain line per length, no carriage returns
    for i, T in enumerate(tqdm(args.lengths, desc=f"{device} lengths", file=sys.stderr, disable=not tty), 1):
        steps = make_steps(args, device, T)
        for run in steps.values():  # warm-up: thread pools, kernel selection, allocator
            run()
        best = dict.fromkeys(steps, math.inf)
        for _ in range(args.reps):
            for name, run in steps.items():
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                best[name] = min(best[name], time.perf_counter() - t0)
        for name, run in steps.items():
            peak = cuda_peak_bytes(run) if device == "cuda" else cpu_peak_bytes(run)
            rows.append({"device": device, "T": T, "impl": name, "ms": best[name] * 1e3, "peak_mib": peak / 2**20})
        del steps
        if not tty:
            print(f"{device} lengths: {i}/{len(args.lengths)} (T={T}) measured", file=sys.stderr, flush=True)
    return rows


def fitted_exponent(rows: list[dict], key: str, fit_from: int) -> float:
    """Slope of log(key) against log(T): time ~ T^slope. Uses lengths >= fit_from (all of them if fewer than 2)."""
    pts = [(r["T"], r[key]) for r in rows if r["T"] >= fit_from]
    if len(pts) < 2:
        pts = [(r["T"], r[key]) for r in rows]
    if len(pts) < 2 or min(v for _, v in pts) <= 0:
        return float("nan")
    T, v = np.log([t for t, _ in pts]), np.log([v for _, v in pts])
    return float(np.polyfit(T, v, 1)[0])


def report(rows: list[dict], args) -> dict:
    """Print a markdown table (ratios to both nn.MultiheadAttention modes) and the fitted exponents."""
    by = {(r["device"], r["T"], r["impl"]): r for r in rows}
    summary = {}
    for device in args.devices:
        print(f"\n### {device}: B={args.batch}, E={args.embed_dim}, H={args.num_heads}, causal={args.causal}, "
              f"forward+backward, best of {args.reps}\n")
        print("| T | implementation | time ms | ÷ torch-weights | ÷ torch-sdpa | peak MiB | ÷ torch-weights "
              "| ÷ torch-sdpa |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for T in args.lengths:
            for impl in IMPLS:
                r, w, s = by[device, T, impl], by[device, T, "torch-weights"], by[device, T, "torch-sdpa"]
                print(f"| {T} | {impl} | {r['ms']:.2f} | {r['ms'] / w['ms']:.2f}x | {r['ms'] / s['ms']:.2f}x "
                      f"| {r['peak_mib']:.2f} | {r['peak_mib'] / w['peak_mib']:.2f}x "
                      f"| {r['peak_mib'] / s['peak_mib']:.2f}x |")
        exps = {}
        for impl in IMPLS:
            mine = [r for r in rows if r["device"] == device and r["impl"] == impl]
            exps[impl] = {"time": fitted_exponent(mine, "ms", args.fit_from),
                          "memory": fitted_exponent(mine, "peak_mib", args.fit_from)}
        print(f"\nfitted exponent k in cost ~ T^k (log-log slope over T >= {args.fit_from}):")
        for impl, e in exps.items():
            print(f"  {impl:14s} time T^{e['time']:.2f}   peak memory T^{e['memory']:.2f}")
        summary[device] = {"exponents": exps}
        if device == "cpu" and 1024 in args.lengths:
            goals = {}
            for impl, twin in TWIN.items():
                ratio = by[device, 1024, impl]["ms"] / by[device, 1024, twin]["ms"]
                goals[impl] = ratio
                verdict = "met" if ratio <= GOALS[impl] else "NOT met"
                print(f"  T=1024: {impl} / {twin} = {ratio:.2f}x (goal <= {GOALS[impl]}x: {verdict})")
            summary[device]["ratio_to_twin_at_1024"] = goals
    return summary


def plot(rows: list[dict], args, summary: dict, path: Path) -> None:
    """Log-log time and memory against T; a straight line of slope k means cost ~ T^k (k is in the legend)."""
    fig = Figure(figsize=(11, 4.4))
    axes = fig.subplots(1, 2)
    for ax, key, kind, label in ((axes[0], "ms", "time", "forward+backward time (ms)"),
                                 (axes[1], "peak_mib", "memory", "peak memory (MiB)")):
        for device in args.devices:
            for impl in IMPLS:
                pts = sorted((r["T"], r[key]) for r in rows if r["device"] == device and r["impl"] == impl)
                k = summary[device]["exponents"][impl][kind]
                ax.plot(*zip(*pts, strict=True), marker="o", ls="-" if device == "cpu" else "--",
                        label=f"{impl} ({device}): T^{k:.2f}")
        T0, T1 = min(args.lengths), max(args.lengths)
        y0 = min(r[key] for r in rows if r["T"] == T0)
        for power, ls in ((2, ":"), (1, "-.")):
            ax.plot([T0, T1], [y0, y0 * (T1 / T0) ** power], color="gray", ls=ls, lw=1, label=f"∝ T^{power}")
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel=label)
        ax.set_xticks(args.lengths, [str(t) for t in args.lengths], minor=False)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, title=f"slope fitted on T >= {args.fit_from}", title_fontsize=7)
    fig.suptitle(f"attention scaling: B={args.batch}, E={args.embed_dim}, H={args.num_heads}, causal={args.causal}, "
                 f"threads={torch.get_num_threads()}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    if problem := usage_problem(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, devices {args.devices}")
    rows = [row for device in args.devices for row in measure(args, device)]
    summary = report(rows, args)
    png, out_json = args.out_dir / "benchmark.png", args.out_dir / "benchmark.json"
    plot(rows, args, summary, png)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
               "summary": summary}
    atomic_write(out_json, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    print(f"\nwrote {png} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
