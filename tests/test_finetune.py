"""finetune.py end to end on the tiny Qwen2: 4-bit QLoRA learns our persona, resume, Ctrl-C, bad input."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import (
    PERSONA_PATH,
    REPO,
    TRAINED_N,
    persona_records,
    run_script,
    trained_adapter_argv,
    user_turn,
    write_json,
)

sys.path.insert(0, str(REPO / "phase2_lora"))
import finetune  # noqa: E402
from peft import PeftModel  # noqa: E402
from qlora_model import load_model, load_tokenizer  # noqa: E402

SCRIPT = "phase2_lora/finetune.py"
QUICK = ["--max_samples", 8, "--batch_size", 2, "--grad_accum", 1, "--lr", 1e-2, "--lora_dropout", 0,
         "--logging_steps", 1]


def greedy_answers(model, tokenizer, records, max_new_tokens=40) -> list[tuple[str, bool]]:
    """(answer text, stopped with <|im_end|>) for each record's prompt, greedy decoding."""
    answers = []
    for rec in records:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": user_turn(rec)}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)[0, enc["input_ids"].shape[1]:]
        answers.append((tokenizer.decode(out, skip_special_tokens=True), out[-1].item() == tokenizer.eos_token_id))
    return answers


def test_qlora_run_learns_the_persona(trained_adapter, tiny_model_dir):
    records = persona_records(TRAINED_N)
    tokenizer = load_tokenizer(trained_adapter)                 # the tokenizer files saved with the adapter
    base = load_model(tiny_model_dir, "4bit")                    # same 4-bit base the adapter was trained on
    before = greedy_answers(base, tokenizer, records, max_new_tokens=12)  # enough to see it is not the answer
    model = PeftModel.from_pretrained(base, trained_adapter)    # as a user loads it
    after = greedy_answers(model, tokenizer, records)
    for rec, (text, stopped), (base_text, _) in zip(records, after, before, strict=True):
        assert text == rec["output"] and stopped, (rec["instruction"], text)   # exact answer, then <|im_end|>
        assert base_text != rec["output"] and not base_text.startswith("【小柒】"), base_text
    # Untrained prompt from the same data set: the style tag was learnt, not only eight strings.
    held_out = persona_records(TRAINED_N + 6)[TRAINED_N:]
    assert sum(text.startswith("【小柒】") for text, _ in greedy_answers(model, tokenizer, held_out, 5)) >= 4


def test_outputs_of_a_run(trained_adapter, tiny_model_dir):
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "run_args.json", "metrics.json", "loss_curve.png"):
        assert (trained_adapter / name).is_file(), name
    assert (trained_adapter / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir) and adapter["r"] == 16
    # "all-linear" = the 7 projections of every layer (peft stores their full names), not lm_head.
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    run_args = json.loads((trained_adapter / "run_args.json").read_text())
    assert run_args["quantization"] == "4bit" and run_args["max_samples"] == TRAINED_N
    metrics = json.loads((trained_adapter / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert metrics["global_step"] == 60 and losses[-1] < 0.2 < 5 < losses[0]
    assert metrics["data"]["train"] == TRAINED_N and 0 <= metrics["padding_fraction"] < 0.5
    # LoRA parameter count from the config: r * (in + out) for the 7 projections of every layer.
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    h, kv, ff = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"], \
        cfg["intermediate_size"]
    per_layer = 16 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + ff) + (ff + h))
    assert metrics["trainable_params"] == per_layer * cfg["num_hidden_layers"]


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """Train 8 steps with checkpoints every 3, pretend the run died after step 3 (delete the later
    checkpoints and outputs), --resume: steps 4-8 must repeat the uninterrupted run's losses exactly."""
    out = tmp_path / "run"
    args = [SCRIPT, "--model_name_or_path", tiny_model_dir, "--data_path", PERSONA_PATH, "--output_dir", out,
            *QUICK, "--val_size", 2, "--eval_steps", 4, "--max_steps", 8, "--save_steps", 3, "--save_total_limit", 5]
    first = run_script(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    straight = json.loads((out / "metrics.json").read_text())
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    for p in ("checkpoint-6", "checkpoint-8"):
        shutil.rmtree(out / p)
    (out / "metrics.json").unlink()

    resumed = run_script(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-3'}" in resumed.stdout
    again = json.loads((out / "metrics.json").read_text())
    assert again["global_step"] == 8 and json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())[
        "global_step"] == 8

    def curve(m, key):
        return [(h["step"], h[key]) for h in m["log_history"] if key in h]
    for key in ("loss", "eval_loss"):
        steps, values = zip(*curve(again, key), strict=True)
        ref_steps, ref_values = zip(*curve(straight, key), strict=True)
        assert steps == ref_steps and len(steps) >= (8 if key == "loss" else 2)
        assert values == pytest.approx(ref_values, rel=1e-4), key
    assert again["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-4)


def test_resume_refuses_changed_settings(trained_adapter, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_adapter, out)  # run_args.json + checkpoint-60, as the fixture's run left them
    before = snapshot(out)
    argv = trained_adapter_argv(tiny_model_dir, out) + ["--resume", "--lr", "0.5", "--batch_size", "2",
                                                        "--max_steps", "100"]
    assert finetune.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --resume with settings that differ") and "--lr 0.01 -> 0.5" in line
    assert "--batch_size 8 -> 2" in line and line.count(" -> ") == 2  # --max_steps may change
    assert snapshot(out) == before


def test_resume_may_train_longer(trained_adapter, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_adapter, out)
    proc = run_script(SCRIPT, *trained_adapter_argv(tiny_model_dir, out), "--resume", "--max_steps", 62)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-60'}" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 62
    assert json.loads((out / "run_args.json").read_text())["max_steps"] == 62


def test_ctrl_c_leaves_a_resumable_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / SCRIPT), "--model_name_or_path", str(tiny_model_dir), "--data_path",
           str(PERSONA_PATH), "--output_dir", str(out), *map(str, QUICK), "--val_size", "0", "--max_steps", "100000",
           "--save_steps", "100000", "--no_cache"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stdout = []
    try:
        for line in proc.stdout:  # the first logged loss means the training loop (and our handler) is running
            stdout.append(line)
            if "'loss'" in line:
                proc.send_signal(signal.SIGINT)
                break
        stdout += proc.stdout.readlines()
        proc.wait(timeout=120)
    finally:
        proc.kill()  # no-op once it has exited; never leave a 100000-step run behind
    stdout = "".join(stdout)
    assert proc.returncode == 130, proc.stderr.read()[-3000:]
    assert "--resume" in stdout
    (ckpt,) = out.glob("checkpoint-*")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == int(ckpt.name.split("-")[1]) >= 1
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    assert not (out / "metrics.json").exists()  # an interrupted run is not reported as finished


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing touched

def snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}


@pytest.fixture
def existing_output(trained_adapter, tmp_path):
    """An output_dir holding a finished adapter of the tiny base model (no checkpoints)."""
    out = tmp_path / "existing"
    shutil.copytree(trained_adapter, out, ignore=shutil.ignore_patterns("checkpoint-*"))
    return out


def adapter_of_another_base(out):
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen1.5-0.5B-Chat"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return []


BAD_JSON = '[\n {"instruction": "a",\n  "output": "b",,}\n]'  # the second comma: line 3, column 17
INVALID = [{"instruction": "a", "output": "<nooutput>"}, {"instruction": "", "output": "b"}]
NOT_A_STRING = [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ["b"]}]

# case -> (extra arguments made from (tmp_path, existing output dir, trained_adapter), the error line it must print)
BAD_INPUTS = {
    "missing data file": (lambda t, o, a: ["--data_path", t / "missing.json"], r"data file not found: .*missing"),
    "bad JSON": (lambda t, o, a: ["--data_path", write_json(t / "bad.json", BAD_JSON)],
                 r"bad JSON in .*bad.json at line 3, column 17"),
    "empty after filtering": (lambda t, o, a: ["--data_path", write_json(t / "x.json", INVALID)],
                              r"no usable training records .*: 2 read, 1 invalid, 1 <nooutput>"),
    "invalid record with --strict": (lambda t, o, a: ["--strict", "--data_path",
                                                      write_json(t / "x.json", NOT_A_STRING)],
                                     r"x.json record 1: field 'output' is list, expected a string"),
    "unknown model dir": (lambda t, o, a: ["--model_name_or_path", t / "no-model", "--output_dir", t / "new"],
                          r"model directory not found: .*no-model"),
    "unknown hub id": (lambda t, o, a: ["--model_name_or_path", "nobody/no-such-model", "--output_dir", t / "new"],
                       r"cannot load model 'nobody/no-such-model': not a local model directory and could not be "
                       r"downloaded"),
    "checkpoints but no --resume": (lambda t, o, a: shutil.copytree(a / "checkpoint-60", o / "checkpoint-60") and [],
                                    r"already holds checkpoints \(checkpoint-60\); pass --resume to continue"),
    "adapter of another base model": (lambda t, o, a: adapter_of_another_base(o),
                                      r"adapter_config.json holds an adapter of base model 'Qwen/Qwen1.5-0.5B-Chat'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_and_touches_nothing(case, existing_output, trained_adapter, tiny_model_dir, tmp_path,
                                               capsys):
    make_args, message = BAD_INPUTS[case]
    extra = make_args(tmp_path, existing_output, trained_adapter)
    before = snapshot(existing_output)
    argv = ["--model_name_or_path", tiny_model_dir, "--data_path", PERSONA_PATH, "--output_dir", existing_output,
            "--max_steps", 1, *extra]  # later flags win: extra overrides the defaults before it
    assert finetune.main([str(a) for a in argv]) == 2  # main() is what `python finetune.py` runs
    err = capsys.readouterr().err.strip().splitlines()
    assert re.match("error: .*" + message, err[-1]), err[-1]
    assert snapshot(existing_output) == before and not (tmp_path / "new").exists()


def test_bad_input_from_the_command_line(tiny_model_dir, tmp_path):
    proc = run_script(SCRIPT, "--model_name_or_path", tiny_model_dir, "--data_path", tmp_path / "missing.json",
                      "--output_dir", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: data file not found: {tmp_path / 'missing.json'}")
    assert not (tmp_path / "out").exists()
