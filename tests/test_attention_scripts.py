"""phase2_attention scripts as a user runs them: the shape walkthrough and a tiny run of the scaling benchmark."""

import ast
import json
import re

import pytest
from conftest import REPO, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny tensors: a second thread only spins on a busy machine


def step_shapes(stdout: str) -> dict[str, str]:
    """'code' -> 'shape' for each printed step line (the last occurrence wins)."""
    steps = {}
    for line in stdout.splitlines():
        m = re.match(r"\s+\d+\s+(.+?)\s{2,}(\(.*?\)(?:, (?:\(.*?\)|None))?)\s{2,}", line)
        if m:
            steps[m.group(1)] = m.group(2)
    return steps


def test_attention_module_does_not_import_its_demo():
    """walkthrough.py imports attention.py, never the reverse: running the library module runs no demo."""
    tree = ast.parse((REPO / "phase2_attention" / "attention.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "torch"}
    proc = run_script("phase2_attention/attention.py", timeout=120, env=ONE_THREAD)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout[:200] + proc.stderr


def test_walkthrough_prints_every_step_with_its_shape():
    proc = run_script("phase2_attention/walkthrough.py", "--decode", timeout=120, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    main, decode = proc.stdout.split("one decode step")
    steps = step_shapes(main)  # B=2, L=S=5, E=8, H=2, D=4
    assert steps["q = self.q_proj(query)"] == "(2, 5, 8)"
    assert steps["q = q.view(B, L, H, D).transpose(1, 2)"] == "(2, 2, 5, 4)"
    assert steps["scores = q @ k.transpose(-2, -1)"] == "(2, 2, 5, 5)"
    assert steps["out = weights @ v"] == "(2, 2, 5, 4)"
    assert steps["out = out.transpose(1, 2).reshape(B, L, E)"] == "(2, 5, 8)"
    assert "(B, H, L, S)  each row is a distribution over the S keys" in main  # meanings come from the comments
    diff = float(re.search(r"max \|ours - torch\| = (\S+)", main).group(1))
    assert diff < 1e-5
    steps = step_shapes(decode)  # one new token against 5 cached ones
    assert steps["k, v = kv_cache.append(k, v)"] == "(2, 2, 6, 4), (2, 2, 6, 4)"
    assert steps["scores = q @ k.transpose(-2, -1)"] == "(2, 2, 1, 6)"


def test_walkthrough_cross_attention_with_gqa():
    proc = run_script("phase2_attention/walkthrough.py", "--src_len", 7, "--kdim", 6, "--num_kv_heads", 1,
                      timeout=120, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    steps = step_shapes(proc.stdout)
    assert steps["k = self.k_proj(key)"] == "(2, 7, 4)"  # one K/V head of D=4 features
    assert steps["k = repeat_kv(k, groups)"] == "(2, 2, 7, 4)"  # shared by both query heads
    assert steps["scores = q @ k.transpose(-2, -1)"] == "(2, 2, 5, 7)"  # L=5 queries x S=7 keys


@pytest.mark.parametrize("script,args,message", [
    ("walkthrough.py", ["--num_heads", 3], "embed_dim (8) must be divisible by num_heads (3)"),
    ("benchmark.py", ["--embed_dim", 30, "--num_heads", 4, "--out_dir", "OUT"],
     "--embed_dim (30) must be divisible by --num_heads (4)"),
    ("benchmark.py", ["--num_heads", 0, "--out_dir", "OUT"], "--lengths, --batch, --reps, --embed_dim and --num_heads"),
])
def test_bad_arguments_give_one_error_line(script, args, message, tmp_path):
    out_dir = tmp_path / "out"
    proc = run_script(f"phase2_attention/{script}", *[out_dir if a == "OUT" else a for a in args], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1 and not out_dir.exists()


def test_tiny_benchmark(tmp_path):
    proc = run_script("phase2_attention/benchmark.py", "--lengths", 64, 128, "--reps", 1, "--embed_dim", 32,
                      "--num_heads", 4, "--threads", 1, "--devices", "cpu", "--out_dir", tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "| T | implementation | time ms | ÷ torch-weights |" in proc.stdout
    assert "fitted exponent" in proc.stdout
    assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "benchmark.json").read_text())
    peak = {(r["impl"], r["T"]): r["peak_mib"] for r in result["rows"]}
    assert len(peak) == 8 and all(r["ms"] > 0 for r in result["rows"])
    # The memory counter sees the (B, H, T, T) weights: ~4x from T=64 to 128 for the explicit-weights paths,
    # ours equal to torch's twin, and SDPA's flash kernel far below (it never stores T x T).
    for impl in ("ours-math", "torch-weights"):
        assert peak[impl, 128] > 2.5 * peak[impl, 64]
    assert abs(peak["ours-math", 128] / peak["torch-weights", 128] - 1) < 0.25
    assert abs(peak["ours-sdpa", 128] / peak["torch-sdpa", 128] - 1) < 0.25
    assert peak["ours-sdpa", 128] < 0.5 * peak["ours-math", 128]
    assert 1.5 < result["summary"]["cpu"]["exponents"]["ours-math"]["memory"] < 2.2
