"""evaluate.py on the tiny Qwen2 + the `trained_adapter` fixture: on the records it was trained on, the adapter
has the lower loss and answers every one exactly, the base none; JSON and Markdown are written; progress shows as
plain lines in a log; bad input exits 2 (numeric flags: tests/test_flag_values.py)."""

import json

from conftest import PERSONA_PATH, persona_records, run_script, write_json

EVALUATE = "phase2_lora/evaluate.py"


def test_adapter_beats_base_on_its_training_records(trained_adapter, tmp_path):
    data = write_json(tmp_path / "eval.json", persona_records(4))
    out = tmp_path / "report.json"
    proc = run_script(EVALUATE, "--adapter", trained_adapter, "--data_path", data, "--output", out,
                      "--max_new_tokens", 60, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))["results"]
    base, tuned = results["base"], results["base + LoRA"]
    assert tuned["exact_match"] == 1.0 and tuned["char_f1"] == 1.0
    assert base["exact_match"] == 0.0 and base["char_f1"] < 0.5
    assert tuned["eval_loss"] < 0.5 < base["eval_loss"] and tuned["target_tokens"] == base["target_tokens"] > 0
    assert abs(tuned["perplexity"] - 2.718281828 ** tuned["eval_loss"]) < 1e-6 * tuned["perplexity"]
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert proc.stdout.strip() == table.strip() and "| base + LoRA | " in table
    # stderr is a pipe, as a log file is: progress as plain lines (no carriage-return bars), to the last record
    for line in ("base: eval loss", "base: greedy answers", "base + LoRA: eval loss", "base + LoRA: greedy answers"):
        assert f"\n{line}: 4/4 (100%), " in proc.stderr, proc.stderr[-2000:]
    assert "\r" not in proc.stderr


def test_bad_input(trained_adapter, tmp_path):
    missing = tmp_path / "missing.json"
    for args, fragment in [(["--data_path", missing], "--adapter"),
                           (["--adapter", trained_adapter, "--data_path", missing], "does not exist"),
                           (["--adapter", trained_adapter, "--data_path", PERSONA_PATH, "--output",
                             tmp_path / "no" / "such" / "eval.json"], "folder")]:
        proc = run_script(EVALUATE, *args)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and fragment in proc.stderr, proc.stderr
