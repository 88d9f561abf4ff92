"""phase2_lora/compare_methods.py: every PEFT method trains on the same data and lands in one table."""

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_script
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(REPO / "phase2_lora"))
import compare_methods  # noqa: E402

NUM_VIRTUAL = compare_methods.NUM_VIRTUAL_TOKENS


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    proc = run_script("phase2_lora/compare_methods.py", "--tiny", "--model_name_or_path", tiny_model_dir,
                      "--steps", "3", "--max_samples", "24", "--em_prompts", "1", "--output_dir", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "compare_methods.json").read_text(encoding="utf-8")), out, proc.stderr


def test_every_method_is_in_the_table(report):
    data, out, _ = report
    assert [r["method"] for r in data["rows"]] == list(compare_methods.METHOD_LR)
    table = (out / "compare_methods.md").read_text(encoding="utf-8")
    assert all(f"| {name} |" in table for name in compare_methods.METHOD_LR)
    assert (out / "compare_methods.png").stat().st_size > 1000
    for r in data["rows"]:
        losses = (r["train_loss_before"], r["train_loss"], r["eval_loss"], *r["step_losses"])
        assert all(math.isfinite(x) for x in losses)
        assert len(r["step_losses"]) == 3 and 0 <= r["exact_match"] <= 1
        assert r["peak_memory_mib"] > 0 and r["seconds"] > 0 and 0 < r["trainable_params"] < r["total_params"]


def test_progress_shows_in_a_log_as_plain_lines(report):
    """stderr is a pipe, as a log file is: a line per method and per training step (3 here), no carriage returns."""
    stderr, methods = report[2], list(compare_methods.METHOD_LR)
    lines = stderr.split("\n")
    for i, name in enumerate(methods, 1):
        assert f"[{i}/{len(methods)}] {name}" in lines, stderr[-2000:]
        assert all(any(line.startswith(f"{name}: train steps: {n}/3 ({100 * n // 3}%), ") for line in lines)
                   for n in (1, 2, 3)), stderr[-2000:]
    assert "\r" not in stderr


def test_trainable_counts_are_the_methods_own(report, tiny_model_dir):
    rows = {r["method"]: r for r in report[0]["rows"]}
    peft_lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert rows["lora"]["trainable_params"] == rows["qlora"]["trainable_params"] == \
        peft_lora.get_nb_trainable_parameters()[0]
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    kv_dim = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    assert rows["prompt"]["trainable_params"] == NUM_VIRTUAL * cfg.hidden_size               # n x d embeddings
    assert rows["prefix"]["trainable_params"] == NUM_VIRTUAL * cfg.num_hidden_layers * 2 * kv_dim  # K and V per layer
    assert rows["ptuning"]["trainable_params"] > rows["prompt"]["trainable_params"]        # + the MLP encoder
    assert rows["ia3"]["trainable_params"] < rows["prompt"]["trainable_params"]            # vectors, not matrices


def test_lora_learns(report):
    rows = {r["method"]: r for r in report[0]["rows"]}
    for name in ("lora", "qlora"):
        assert rows[name]["train_loss"] < rows[name]["train_loss_before"] - 1e-3
    # LoRA on full-precision and on NF4 weights start from (almost) the same model: the same loss.
    assert abs(rows["lora"]["train_loss_before"] - rows["qlora"]["train_loss_before"]) < 0.05


def test_bad_data_path_is_one_line(tiny_model_dir, capsys):
    assert compare_methods.main(["--model_name_or_path", str(tiny_model_dir), "--data_path", "nope.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data file not found: nope.json") and err.count("\n") == 1


class NextTokenLM(torch.nn.Module):
    """A stand-in causal LM whose greedy next token is always (last token + 1) mod V; counts its calls."""

    def __init__(self, vocab: int = 10):
        super().__init__()
        self.vocab, self.calls, self.weight = vocab, 0, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return SimpleNamespace(logits=F.one_hot((input_ids + 1) % self.vocab, self.vocab).float())  # (B, T, V)


def test_greedy_exact_match_stops_at_the_first_wrong_token():
    lm = NextTokenLM()
    assert compare_methods.greedy_reproduces(lm, [3], [4, 5, 6]) and lm.calls == 3
    lm.calls = 0
    assert not compare_methods.greedy_reproduces(lm, [3], [4, 6, 7, 8]) and lm.calls == 2  # 6 != 5: stop
    examples = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},   # prompt [1, 2] -> 3, 4: hit
                {"input_ids": [1, 2, 5, 6], "labels": [-100, -100, 5, 6]}]   # 2 -> 3, not 5: miss
    assert compare_methods.exact_match(lm, examples) == 0.5
