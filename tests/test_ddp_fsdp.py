"""phase3_ddp/finetune_ddp.py --fsdp (ZeRO-3 with FSDP2 fully_shard) against DDP, under a REAL 2-process torchrun
(gloo on CPU) on the tiny Qwen2, QLoRA (NF4 4-bit base) as finetune_ddp.py's default.

Two training launches of its own, compared with conftest's `ddp` run (2 ranks x batch 2, the same flags):
  fsdp       torchrun 2 ranks, --fsdp, also evaluating at step 3 -> ddp's adapter, losses, gradient norms, eval loss;
                                                                    each rank holds half the model
  resumed    --fsdp --resume from fsdp's checkpoint-3            -> fsdp's adapter (optimizer state re-sharded)
The bad-input runs stop before training. The gpu test compares FSDP with DDP on 2 GPUs (NCCL).
"""

import re
import shutil

import pytest
import torch
from conftest import DDP_SAVE_STEPS, DDP_SCRIPT, DDP_STEPS, THREADS, finished, run_script, torchrun, train_flags
from safetensors.torch import load_file
from test_ddp import error_messages, max_abs_diff


def fsdp_flags(model, data, out, **overrides) -> list[str]:
    """ddp's flags (train_flags, batch 2 per rank) and --fsdp; evaluation at the checkpoint too, so training
    continues after a forward-only pass (which leaves FSDP's root unit gathered until fsdp_shard.release)."""
    return [*train_flags(model, data, out, **{"batch_size": 2, "eval_steps": DDP_SAVE_STEPS, **overrides}), "--fsdp"]


@pytest.fixture(scope="module")
def fsdp(tiny_model_dir, sft_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "adapter"
    return finished(torchrun(*fsdp_flags(tiny_model_dir, sft_json, out)), out)


def history(run, key: str) -> list[float]:
    return [h[key] for h in run["metrics"]["log_history"] if key in h]


def test_fsdp_equals_ddp(ddp, fsdp):
    assert fsdp["metrics"]["fsdp"] and not ddp["metrics"]["fsdp"]
    assert max(v.abs().max().item() for k, v in fsdp["adapter"].items() if "lora_B" in k) > 1e-4  # it trained
    assert max_abs_diff(fsdp["adapter"], ddp["adapter"]) < 1e-5
    for key in ("loss", "grad_norm"):
        assert len(history(ddp, key)) == DDP_STEPS
        torch.testing.assert_close(torch.tensor(history(fsdp, key)), torch.tensor(history(ddp, key)), rtol=1e-5, atol=0)
    assert len(history(fsdp, "eval_loss")) == 2  # at the checkpoint and at the end; ddp evaluates at the end only
    assert fsdp["metrics"]["eval_loss"] == pytest.approx(ddp["metrics"]["eval_loss"], rel=1e-5)
    assert fsdp["metrics"]["total_params"] == ddp["metrics"]["total_params"]  # NF4 weights counted as such


def test_each_fsdp_rank_holds_half_the_parameters_and_optimizer_state(ddp, fsdp):
    """DDP: every rank a full replica of the (4-bit) base and the LoRA weights. FSDP: each rank 1/2 of every
    parameter (rows of each matrix; padding makes uneven splits a few bytes larger) and of the Adam moments."""
    whole = ddp["metrics"]["parameter_bytes_unsharded"]
    assert whole == fsdp["metrics"]["parameter_bytes_unsharded"] > 0
    assert ddp["metrics"]["parameter_bytes_per_rank"] == [whole, whole]
    assert all(0.45 * whole < n < 0.55 * whole for n in fsdp["metrics"]["parameter_bytes_per_rank"])
    full_state = ddp["metrics"]["optimizer_state_bytes_per_rank"]
    shards = fsdp["metrics"]["optimizer_state_bytes_per_rank"]
    assert full_state[0] == full_state[1] > 0 and max(shards) < 0.55 * full_state[0]
    # Adam's moments split in two; each rank keeps its own copy of each parameter's step count (a 4-byte scalar)
    assert sum(shards) == full_state[0] + 4 * len(fsdp["adapter"])
    assert re.search(r"^rank 1: parameters [\d.]+ MiB \(FSDP shard; [\d.]+ MiB without\)$", fsdp["log"], re.M)
    assert re.search(r"^rank 1: parameters [\d.]+ MiB \(full replica; --fsdp would keep about [\d.]+ MiB\)$",
                     ddp["log"], re.M)


def test_fsdp_adapter_is_a_normal_peft_adapter(ddp, fsdp, tiny_model_dir):
    """The final adapter and each checkpoint's are gathered from the shards into peft's own files: loaded by
    PeftModel.from_pretrained, the FSDP adapter gives the DDP adapter's logits (test_ddp.py checks that one
    against the saved tensors), not the base model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = fsdp["dir"]
    assert not list(out.glob(".*tmp*")), "temp files left behind"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (DDP_SAVE_STEPS, DDP_STEPS)]
    assert max_abs_diff(load_file(out / f"checkpoint-{DDP_STEPS}" / "adapter_model.safetensors"), fsdp["adapter"]) == 0
    ids = torch.tensor([[1, 17, 42, 99, 300]])  # (B, T) token ids of the tiny vocabulary
    logits = {}
    with torch.no_grad():
        for name, run in (("ddp", ddp), ("fsdp", fsdp)):
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run["dir"])
            logits[name] = model(ids).logits  # (B, T, V)
        with model.disable_adapter():
            base_logits = model(ids).logits
    torch.testing.assert_close(logits["fsdp"], logits["ddp"], rtol=0, atol=1e-4)
    assert (logits["fsdp"] - base_logits).abs().max() > 1e-4  # the adapter is applied


def test_fsdp_resume_reproduces_the_uninterrupted_run(fsdp, tiny_model_dir, sft_json, tmp_path):
    out = tmp_path / "adapter"
    shutil.copytree(fsdp["dir"] / f"checkpoint-{DDP_SAVE_STEPS}", out / f"checkpoint-{DDP_SAVE_STEPS}")
    shutil.copy(fsdp["dir"] / "run_args.json", out)
    resumed = finished(torchrun(*fsdp_flags(tiny_model_dir, sft_json, out), "--resume"), out)
    assert f"resumed from step {DDP_SAVE_STEPS}" in resumed["log"]
    assert max_abs_diff(resumed["adapter"], fsdp["adapter"]) < 1e-6  # LoRA weights and Adam moments re-sharded
    assert history(resumed, "loss") == pytest.approx(history(fsdp, "loss"), rel=1e-6)


def test_fsdp_bad_input_is_one_line_on_every_rank(fsdp, tiny_model_dir, sft_json, tmp_path):
    """--fsdp with --zero: each rank's own line, exit 2, before the heavy imports. A resume that switches between
    --fsdp and DDP (the optimizer state is keyed by name in one, by index in the other): refused by run_args.json
    (and by the checkpoint itself where run_args.json is older than --fsdp: test_ddp_knobs.py)."""
    proc = torchrun(*fsdp_flags(tiny_model_dir, sft_json, tmp_path / "out"), "--zero", timeout=120)
    assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]  # torchrun: a worker failed
    errors = error_messages(proc.stderr)  # torchrun may kill one rank before it prints: 1 or 2 lines
    assert 1 <= len(errors) <= 2 and set(errors) == {
        "error: --fsdp already shards the optimizer state (ZeRO-3 includes ZeRO-1): drop --zero"}, proc.stderr[-3000:]
    assert not re.search(r'phase3_ddp/\w+\.py", line', proc.stderr) and not (tmp_path / "out").exists()
    out = tmp_path / "adapter"
    shutil.copytree(fsdp["dir"] / f"checkpoint-{DDP_SAVE_STEPS}", out / f"checkpoint-{DDP_SAVE_STEPS}")
    shutil.copy(fsdp["dir"] / "run_args.json", out)
    proc = run_script(DDP_SCRIPT, *train_flags(tiny_model_dir, sft_json, out, batch_size=4), "--resume", env=THREADS,
                      timeout=120)  # 1 process x 4 = the global micro-batch of 2 x 2: only --fsdp differs
    assert proc.returncode == 2 and error_messages(proc.stderr) == [
        f"error: --resume with settings that differ from the checkpoints' ({out / 'run_args.json'}): --fsdp True -> "
        "False. Resume with the old values, or choose another --output_dir"], proc.stderr[-3000:]
    assert not re.search(r'phase3_ddp/\w+\.py", line', proc.stderr)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over NCCL needs 2 CUDA GPUs")
def test_fsdp_qlora_on_two_gpus(tiny_model_dir, sft_json, tmp_path):
    """FSDP-QLoRA where it matters: NCCL, the NF4 base sharded on 2 GPUs, bf16 (or fp16) autocast. torch AdamW on
    both sides (--optim auto is bitsandbytes' 8-bit AdamW under DDP, which FSDP cannot take); losses agree to
    half-precision accuracy."""
    runs = {}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        out = tmp_path / name
        # 5 validation examples at batch 2: rank 1 has 1 batch of its own to rank 0's 2, so under FSDP it runs a
        # stand-in (every forward a collective) that must not count: eval losses equal, and no hang
        flags = train_flags(tiny_model_dir, sft_json, out, batch_size=2, device="cuda", optim="adamw_torch",
                            val_size=5, eval_steps=DDP_SAVE_STEPS, save_steps=0)
        runs[name] = finished(torchrun(*flags, *extra), out)
    metrics = runs["fsdp"]["metrics"]
    assert (metrics["backend"], metrics["optimizer"], metrics["fsdp"]) == ("nccl", "AdamW", True)
    whole = metrics["parameter_bytes_unsharded"]
    assert all(0.45 * whole < n < 0.55 * whole for n in metrics["parameter_bytes_per_rank"])
    assert max(v.abs().max().item() for k, v in runs["fsdp"]["adapter"].items() if "lora_B" in k) > 1e-4
    assert history(runs["fsdp"], "loss") == pytest.approx(history(runs["ddp"], "loss"), rel=2e-2)
    assert history(runs["fsdp"], "eval_loss") == pytest.approx(history(runs["ddp"], "eval_loss"), rel=2e-2)
