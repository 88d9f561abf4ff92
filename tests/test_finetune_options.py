"""finetune.py around the training loop: one process on one GPU, the bf16/fp16 choice, the eval loss definition,
per-step logging, TensorBoard and the optimisation knobs."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import PERSONA_PATH, REPO, TRAINED_N, persona_records, run_script, write_json

sys.path.insert(0, str(REPO / "phase2_lora"))
import finetune  # noqa: E402
from peft import PeftModel  # noqa: E402
from qlora_model import UsageError, add_lora, compute_dtype, load_model  # noqa: E402
from sft_data import SFTCollator  # noqa: E402

SCRIPT = "phase2_lora/finetune.py"


# ---------------------------------------------------------------- one process, one GPU

@pytest.mark.parametrize("visible, pinned", [(None, "0"), ("0", "0"), ("2,3", "2"), (" 1 , 0", "1"),
                                             ("GPU-5a1b,GPU-77c0", "GPU-5a1b"), ("", "")])
def test_pin_one_gpu_keeps_the_first_visible_one(visible, pinned):
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert finetune.pin_one_gpu(env) == pinned and env["CUDA_VISIBLE_DEVICES"] == pinned


def test_the_gpu_is_pinned_before_anything_can_initialise_cuda():
    """CUDA reads CUDA_VISIBLE_DEVICES once, when it initialises, and importing bitsandbytes already does that:
    as a script, finetune.py must pin before its first non-standard-library import."""
    body = ast.parse((REPO / SCRIPT).read_text(encoding="utf-8")).body
    pin = next(i for i, node in enumerate(body) if isinstance(node, ast.If) and "pin_one_gpu(os.environ)"
               in ast.unparse(node) and "__main__" in ast.unparse(node.test))
    imported = [(i, alias.name.split(".")[0]) for i, node in enumerate(body) if isinstance(node, ast.Import)
                for alias in node.names]
    imported += [(i, node.module.split(".")[0]) for i, node in enumerate(body) if isinstance(node, ast.ImportFrom)]
    assert all(name in sys.stdlib_module_names for i, name in imported if i < pin)
    assert any(name == "torch" for i, name in imported if i > pin)
    # And it runs: as __main__, the environment the imports below see holds only the first GPU.
    code = ("import os, runpy, sys; sys.path.insert(0, 'phase2_lora'); sys.argv = ['finetune.py', '--help']\n"
            "try: runpy.run_path('phase2_lora/finetune.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print('pinned', os.environ['CUDA_VISIBLE_DEVICES'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "3,1"})
    assert proc.stdout.strip().splitlines()[-1] == "pinned 3", proc.stderr[-2000:]


def test_torchrun_is_refused_with_a_pointer_to_phase3(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"torchrun \(WORLD_SIZE=2\).*phase3_ddp/finetune_ddp.py"):
        finetune.check_one_process_one_gpu()


def test_torchrun_from_the_command_line_exits_2(tiny_model_dir, tmp_path):
    proc = run_script(SCRIPT, "--model_name_or_path", tiny_model_dir, "--data_path", PERSONA_PATH,
                      "--output_dir", tmp_path / "out", env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: finetune.py trains in one process")
    assert not (tmp_path / "out").exists()


def test_one_visible_gpu_is_named_several_are_refused(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4060")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    finetune.check_one_process_one_gpu()
    out = capsys.readouterr().out
    assert "GPU: NVIDIA GeForce RTX 4060 (CUDA_VISIBLE_DEVICES=1)" in out and "phase3_ddp/finetune_ddp.py" in out
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # CUDA initialised before finetune could pin
    with pytest.raises(UsageError, match="2 GPUs are visible .* CUDA_VISIBLE_DEVICES=0"):
        finetune.check_one_process_one_gpu()


# ---------------------------------------------------------------- bf16 or fp16

@pytest.mark.parametrize("capability, expected", [((6, 1), torch.float16), ((7, 0), torch.float16),
                                                  ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bf16_only_from_compute_capability_8(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 or V100 says too
    assert compute_dtype("cuda") == expected
    assert compute_dtype("cpu") == torch.float32
    # ... and the Trainer gets the matching flags: fp16 turns on its GradScaler, bf16 needs none.
    assert finetune.precision_and_optimizer(True, compute_dtype("cuda")) == {
        "optim": "paged_adamw_8bit", "bf16": expected == torch.bfloat16, "fp16": expected == torch.float16}
    assert finetune.precision_and_optimizer(False, torch.float32) == {"optim": "adamw_torch", "bf16": False,
                                                                      "fp16": False}


def test_an_fp16_base_trains_with_a_grad_scaler(tiny_model_dir):
    """The fp16 branch (GPUs before Ampere): fp16 base weights, fp32 LoRA weights, scaled loss. GradScaler refuses
    to unscale fp16 gradients, so this step fails unless every trainable weight is fp32."""
    model = add_lora(load_model(tiny_model_dir, "none", dtype=torch.float16), r=4, alpha=8, dropout=0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float16
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, T)
    before = [p.detach().clone() for p in trainable]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))


# ---------------------------------------------------------------- eval loss = mean over target tokens

def test_eval_loss_is_the_mean_over_target_tokens(trained_adapter, tiny_model_dir, tmp_path):
    """Two eval batches of one example each: a long trained answer (low loss) and a short untrained one (high loss).
    The mean over target tokens weighs them by length; the Trainer's own mean of batch means would not."""
    short = {"instruction": "Say one word.", "input": "", "output": "ok"}
    data = write_json(tmp_path / "eval.json", [persona_records(1)[0], short])
    args = finetune.parse_args(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data),
                                "--output_dir", str(tmp_path / "out"), "--val_size", "0", "--batch_size", "1",
                                "--no_cache"])
    tokenizer, dataset, _, _ = finetune.load_data(args)
    model = PeftModel.from_pretrained(load_model(tiny_model_dir, "4bit"), trained_adapter)
    finetune.enable_chunked_loss(model, in_eval=True)
    reported = finetune.build_trainer(args, model, tokenizer, dataset, dataset).evaluate()["eval_loss"]

    model.eval()  # the reference: full logits, F.cross_entropy summed per example
    sums, counts = [], []
    for example in dataset:
        batch = SFTCollator(tokenizer.pad_token_id)([example])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (1, T, V)
        targets = batch["labels"][:, 1:]  # position t predicts token t + 1
        sums.append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum"))
        counts.append(int((targets != -100).sum()))
    token_mean = float(sum(sums) / sum(counts))
    batch_mean = float(sum(s / c for s, c in zip(sums, counts, strict=True)) / len(sums))
    assert abs(token_mean - batch_mean) > 1.0  # the two definitions really differ on this set
    assert reported == pytest.approx(token_mean, rel=1e-3)


# ---------------------------------------------------------------- logging, TensorBoard and the knobs

def test_every_logging_step_has_tokens_per_second_and_learning_rate(trained_adapter):
    history = json.loads((trained_adapter / "metrics.json").read_text(encoding="utf-8"))["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) >= 60 // 5
    for h in steps:
        assert h["tokens_per_second"] > 0 and h["learning_rate"] >= 0, h
    # cosine schedule with 3% warmup at lr 1e-2: up, then down to near 0
    peak = max(h["learning_rate"] for h in steps)
    assert peak == pytest.approx(1e-2, rel=0.05) and steps[-1]["learning_rate"] < 0.05 * peak


def test_tensorboard_and_the_knobs(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    proc = run_script(SCRIPT, "--model_name_or_path", tiny_model_dir, "--data_path", PERSONA_PATH, "--output_dir", out,
                      "--max_samples", TRAINED_N, "--val_size", 2, "--batch_size", 2, "--grad_accum", 1,
                      "--max_steps", 3, "--eval_steps", 2, "--logging_steps", 1, "--lr", 1e-3,
                      "--report_to", "tensorboard", "--lr_scheduler", "constant", "--warmup_ratio", 0,
                      "--weight_decay", 0.1, "--max_grad_norm", 0.5, "--target_modules", "q_proj", "v_proj")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Piped into a log: plain lines, no tqdm bars (weight loading, tokenising, training steps).
    assert not re.search(r"\d+%\|", proc.stdout + proc.stderr), proc.stderr[-2000:]
    (run_dir,) = {events.parent for events in (out / "runs").glob("*/events.out.tfevents.*")}
    scalars = EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second", "eval/loss"} <= set(scalars)
    history = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["log_history"]
    assert [h["learning_rate"] for h in history if "loss" in h] == [1e-3] * 3  # constant, no warmup
    adapter = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {"q_proj", "v_proj"}
    run_args = json.loads((out / "run_args.json").read_text(encoding="utf-8"))
    assert (run_args["weight_decay"], run_args["max_grad_norm"]) == (0.1, 0.5)


def test_weight_decay_and_clipping_reach_the_trainer(tiny_model_dir, tmp_path):
    args = finetune.parse_args(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(PERSONA_PATH),
                                "--output_dir", str(tmp_path / "out"), "--max_samples", "4", "--val_size", "0",
                                "--weight_decay", "0.1", "--max_grad_norm", "0.5", "--lr_scheduler", "linear",
                                "--no_cache"])
    tokenizer, dataset, _, _ = finetune.load_data(args)
    model, _, _ = finetune.build_model(args)
    trainer = finetune.build_trainer(args, model, tokenizer, dataset, None)
    decays = {g["weight_decay"] for g in trainer.create_optimizer().param_groups if g["params"]}
    assert 0.1 in decays  # the LoRA matrices decay (biases and norms would not)
    assert (trainer.args.max_grad_norm, str(trainer.args.lr_scheduler_type)) == (0.5, "SchedulerType.LINEAR")


@pytest.mark.parametrize("flag, value, message", [
    ("--target_modules", "qq_proj", "--target_modules qq_proj: no such linear layer in the model; choose from"),
])
def test_a_bad_knob_is_one_error_line(tiny_model_dir, tmp_path, capsys, flag, value, message):
    argv = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(PERSONA_PATH), "--output_dir",
            str(tmp_path / "out"), "--max_samples", "4", "--no_cache", flag, value]
    assert finetune.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not (tmp_path / "out" / "run_args.json").exists()


@pytest.mark.parametrize("flag, value", [("--lr", "0"), ("--lr", "nan"), ("--weight_decay", "-1"),
                                         ("--max_grad_norm", "x"), ("--lora_dropout", "1"),
                                         ("--lr_scheduler", "cosine_forever"), ("--report_to", "wandb")])
def test_bad_knob_values_are_refused_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.parse_args([flag, value])
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, no usage block
    assert e.value.code == 2 and line.startswith(f"error: argument {flag}") and line.endswith("(see --help)")


def test_tensorboard_missing_is_refused_before_any_work(monkeypatch, tmp_path):
    find_spec = finetune.importlib.util.find_spec
    monkeypatch.setattr(finetune.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    args = finetune.parse_args(["--output_dir", str(tmp_path / "out"), "--report_to", "tensorboard"])
    with pytest.raises(UsageError, match="pip install tensorboard"):
        finetune.prepare_output_dir(args)
