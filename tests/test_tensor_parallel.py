"""phase3_ddp/tensor_parallel.py: Megatron-style tensor parallelism under a real 2-process torchrun (gloo, CPU) equals
one process (outputs, input and weight gradients), and the bytes it prints match the analytic formulas."""

import importlib.util
import re

import pytest
from conftest import REPO
from test_ddp import torchrun

SCRIPT = "phase3_ddp/tensor_parallel.py"
# Sizes unlike the defaults, all different, so each formula is checked on its own numbers.
B, T, E, F, H = 3, 5, 24, 40, 6
SIZES = ["--batch_size", B, "--seq_len", T, "--embed_dim", E, "--hidden", F, "--num_heads", H]
FP32 = 4


def max_differences(log: str) -> dict[str, list[float]]:
    rows = re.findall(r"^check (\w+): max \|tensor parallel - one process\| output (\S+), input grad (\S+), "
                      r"weight grads (\S+) -> ok$", log, re.M)
    return {name: [float(x) for x in diffs] for name, *diffs in rows}


def byte_rows(log: str) -> dict[str, list[int]]:
    """{layer: [TP forward, TP backward, TP total, DP all-reduce, weights/rank TP, weights/rank DP]}"""
    number = r"\s+([\d,]+)"
    rows = re.findall(rf"^(mlp|attention)\s+([\d,]+) \+ ([\d,]+) = ([\d,]+){number * 3}$", log, re.M)
    return {name: [int(x.replace(",", "")) for x in numbers] for name, *numbers in rows}


def expected_bytes(p: int) -> dict[str, list[int]]:
    """Per rank, one step: TP all-reduces the (B, T, E) output in forward and dL/dx in backward; DP all-reduces
    every gradient. TP keeps 1/p of each weight and column-parallel bias, plus the full row-parallel bias."""
    act = B * T * E * FP32
    mlp = (E * F + F + F * E + E) * FP32  # fc1 (E -> F), fc2 (F -> E)
    attn = 4 * (E * E + E) * FP32  # q, k, v, out (E -> E)
    mlp_rank = (E * F // p + F // p + F // p * E + E) * FP32
    attn_rank = (3 * (E * E // p + E // p) + E * E // p + E) * FP32
    return {"mlp": [act, act, 2 * act, mlp, mlp_rank, mlp], "attention": [act, act, 2 * act, attn, attn_rank, attn]}


def test_two_ranks_equal_one_process_and_print_the_bytes():
    proc = torchrun(*SIZES, script=REPO / SCRIPT, timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    diffs = max_differences(proc.stdout)
    assert set(diffs) == {"mlp", "attention"}, proc.stdout
    assert max(max(d) for d in diffs.values()) <= 1e-5, diffs
    assert f"world 2, B={B} T={T} E={E} F={F} H={H}" in proc.stdout
    assert byte_rows(proc.stdout) == expected_bytes(2), proc.stdout
    # Rank 0 alone prints: one report, not two.
    assert proc.stdout.count("check mlp:") == 1


@pytest.fixture
def tensor_parallel(monkeypatch):
    """The script as a fresh module (its byte counters start at 0), run in this process as `python script` would:
    no torchrun variables, so main() makes a one-process group."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location("tensor_parallel_under_test", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_process_is_the_same_code_with_world_1(tensor_parallel, capsys):
    assert tensor_parallel.main([str(a) for a in SIZES]) == 0
    out = capsys.readouterr().out
    assert max(max(d) for d in max_differences(out).values()) <= 1e-5
    assert byte_rows(out) == expected_bytes(1)


@pytest.mark.parametrize("args, message", [
    (["--embed_dim", "30", "--num_heads", "4"], "error: --embed_dim 30 must be divisible by --num_heads 4"),
    (["--seq_len", "0"], "error: --batch_size, --seq_len, --embed_dim, --hidden and --num_heads must be positive"),
])
def test_bad_sizes_give_one_error_line(tensor_parallel, capsys, args, message):
    assert tensor_parallel.main(args) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err.strip()) == ("", message)
