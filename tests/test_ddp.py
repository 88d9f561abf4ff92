"""phase3_ddp: finetune_ddp.py under a REAL 2-process torchrun (gloo on CPU) on the tiny Qwen2.

Four training launches, shared by the tests through fixtures (single and ddp: session fixtures in conftest.py,
test_ddp_multinode.py compares against ddp too):
  single   python finetune_ddp.py, 1 process, batch 4            } same global batch of 8 per step:
  ddp      torchrun 2 ranks, batch 2 per rank, TensorBoard       } adapters must match (dropout 0)
  ddp_dropout   torchrun 2 ranks, lora_dropout 0.1, 8-bit AdamW  } a crash of rank 1 and a restart must
  crashed  the same + --zero + crash of rank 1 after step 5      } give the same adapter (RNG restored too)
The crash is injected from here: a launcher script wraps ddp_train.train_step, so the training code carries no
test-only flag. Other tests launch their own runs: --packing (1 vs 2 ranks), bad input, --resume with changed
settings, the benchmark, and one NCCL rank on CUDA (marked gpu).
"""

import json
import math
import re
import shutil
import time

import pytest
import torch
from conftest import DDP_SAVE_STEPS as SAVE_STEPS
from conftest import DDP_SCRIPT as SCRIPT
from conftest import DDP_STEPS as STEPS
from conftest import REPO, THREADS, finished, run_script, torchrun, train_flags  # noqa: F401 (torchrun: re-exported)

CRASH_AT = 5  # 5 steps per epoch: checkpoint at SAVE_STEPS = 3, crash at 5, resume crosses an epoch
# 33 training examples (40 records - 7 held out), 2 x 2 per global micro-batch: 8 full ones and one of a single
# example (rank 1 runs a masked copy), 2 micro-batches per step: 5 steps, the last with one micro-batch. Nothing is
# dropped, and the size is not a multiple of the global batch.
STEPS_PER_EPOCH, N_TRAIN = 5, 33
# Runs finetune_ddp.py with train_step wrapped: the last rank dies after step CRASH_AT of the first attempt.
CRASH_LAUNCHER = f"""
import os, sys
sys.path.insert(0, {str(REPO / "phase3_ddp")!r})
import ddp_train, finetune_ddp
real_train_step, done = ddp_train.train_step, []
def train_step(*args, **kwargs):
    result = real_train_step(*args, **kwargs)
    done.append(1)
    if len(done) == {CRASH_AT} and ddp_train.RESTART_COUNT == 0 and finetune_ddp.RANK == finetune_ddp.WORLD_SIZE - 1:
        print(f"rank {{finetune_ddp.RANK}}: injected crash after step {{len(done)}}", file=sys.stderr, flush=True)
        os._exit(13)  # like a segfault or an OOM kill: no cleanup, no exception handling
    return result
ddp_train.train_step = train_step
finetune_ddp.main()
"""

# Holds rank HELD back until torchrun kills it: the other rank fails first, so only its own line can show.
HELD_BACK_LAUNCHER = """
import os, sys, time
sys.path.insert(0, {phase3!r})
if os.environ["RANK"] == "{held}":
    time.sleep(20)
import finetune_ddp
finetune_ddp.main()
"""


@pytest.fixture(scope="module")
def ddp_dropout(tiny_model_dir, sft_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_dropout") / "adapter"
    flags = train_flags(tiny_model_dir, sft_json, out, batch_size=2, lora_dropout=0.1, optim="paged_adamw_8bit")
    return finished(torchrun(*flags), out)


@pytest.fixture(scope="module")
def crashed(tiny_model_dir, sft_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("crashed") / "adapter"
    launcher = out.parent / "crash_launcher.py"
    launcher.write_text(CRASH_LAUNCHER, encoding="utf-8")
    flags = train_flags(tiny_model_dir, sft_json, out, batch_size=2, lora_dropout=0.1, optim="paged_adamw_8bit")
    return finished(torchrun(*flags, "--zero", max_restarts=1, script=launcher), out)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_ranks_match_one_process_with_twice_the_batch(single, ddp):
    assert "global batch = 2 per rank x 2 accumulation x 2 ranks = 8 sequences" in ddp["log"]
    assert "global batch = 4 per rank x 2 accumulation x 1 ranks = 8 sequences" in single["log"]
    assert ddp["metrics"]["data"] == single["metrics"]["data"]
    assert (ddp["metrics"]["data"]["invalid"], ddp["metrics"]["data"]["nooutput"]) == (1, 1)
    # Training moved the weights (B starts at 0) far more than the tolerance ...
    assert max(v.abs().max().item() for k, v in ddp["adapter"].items() if "lora_B" in k) > 1e-3
    # ... and 2 ranks x 2 sequences reproduce 1 process x 4 sequences: same samples per step, same
    # global token-mean loss. (Per-rank token means averaged by DDP would miss this by ~1e-3.)
    assert max_abs_diff(ddp["adapter"], single["adapter"]) < 1e-5
    # The gradients themselves, from the first step on: AdamW nearly hides a uniform gradient scale (a loss not
    # multiplied by W) in the adapter; the gradient norm (before clipping) does not.
    norms = [[h["grad_norm"] for h in run["metrics"]["log_history"] if "loss" in h] for run in (single, ddp)]
    assert norms[0][0] > 0
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=1e-5, atol=0)
    losses = [[h["loss"] for h in run["metrics"]["log_history"] if "loss" in h] for run in (single, ddp)]
    assert len(losses[0]) == STEPS
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0)
    assert ddp["metrics"]["eval_loss"] == pytest.approx(single["metrics"]["eval_loss"], rel=1e-5)


def test_every_example_is_trained_once_per_epoch(single, ddp):
    """33 examples are no multiple of the global batch of 8 (nor of the global micro-batch of 4): the short micro-batch
    and the short last step are trained, not dropped, and the start-up line says how."""
    assert ("every one of the 33 training examples is trained once per epoch; one global micro-batch holds 1 of 4 "
            "(1 rank(s) run a masked copy: no loss, no tokens); the last step of an epoch has 1 of 2 micro-batches"
            ) in ddp["log"]
    for run in (single, ddp):
        epoch0 = [h["tokens"] for h in run["metrics"]["log_history"] if h.get("epoch") == 0 and "loss" in h]
        assert len(epoch0) == STEPS_PER_EPOCH and run["metrics"]["data"]["train"] == N_TRAIN
        assert sum(epoch0) == run["metrics"]["data"]["target_tokens"] > 0  # every answer token, once


def test_logs_get_plain_lines_not_progress_bars(ddp):
    """stderr is a pipe here, as in CI or `> train.log`: plain log lines, no carriage-return bar updates."""
    assert not re.search(r"\d+%\|", ddp["log"])  # a tqdm bar: "train:  17%|█▋  | 1/6 [...]" (text mode turns \r to \n)
    assert re.search(r"^step 1/6 \| loss [\d.]+ \| lr [\d.e+-]+ \| \d+ tokens/s$", ddp["log"], re.M), ddp["log"]


def test_packed_rows_two_ranks_match_one_process(tiny_model_dir, sft_json, tmp_path):
    """--packing (several examples per row, position ids restarting at each) keeps the rank-exact equivalence."""
    runs = []
    for nproc, batch_size in ((1, 2), (2, 1)):
        out = tmp_path / f"packed{nproc}"
        flags = train_flags(tiny_model_dir, sft_json, out, batch_size=batch_size, grad_accum=1, max_steps=3,
                            save_steps=0, max_seq_len=128)
        runs.append(finished(torchrun(*flags, "--packing", nproc=nproc), out))
    assert "packed into 28 rows" in runs[0]["log"]  # 33 examples of up to 128 tokens
    assert max_abs_diff(runs[0]["adapter"], runs[1]["adapter"]) < 1e-5
    losses = [[h["loss"] for h in run["metrics"]["log_history"] if "loss" in h] for run in runs]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0)


def test_every_epoch_reads_a_new_order(ddp):
    """Without the sampler's set_epoch every epoch would repeat the first one's batches, and both sides of the
    other tests would repeat them alike. Target tokens per step differ between the examples of each step."""
    tokens = [h["tokens"] for h in ddp["metrics"]["log_history"] if "loss" in h]
    assert [h["epoch"] for h in ddp["metrics"]["log_history"] if "loss" in h] == [0] * STEPS_PER_EPOCH + [1]
    assert tokens[STEPS_PER_EPOCH] != tokens[0], tokens  # step 6 (epoch 1) against step 1 (epoch 0)


def test_crashed_rank_is_restarted_and_resumes_to_the_same_adapter(ddp_dropout, crashed):
    log = crashed["log"]
    assert f"rank 1: injected crash after step {CRASH_AT}" in log
    assert f"resumed from step {SAVE_STEPS} (restart 1)" in log
    # Same LoRA weights as the uninterrupted run, with dropout on: adapter, AdamW state (ZeRO shards
    # consolidated and re-sharded), schedule, data position and every rank's RNG were restored.
    assert max_abs_diff(crashed["adapter"], ddp_dropout["adapter"]) < 1e-6
    assert [h["loss"] for h in crashed["metrics"]["log_history"] if "loss" in h] == pytest.approx(
        [h["loss"] for h in ddp_dropout["metrics"]["log_history"] if "loss" in h], rel=1e-6)
    assert sorted(p.name for p in crashed["dir"].glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    # ZeRO-1: each rank holds a shard of the optimizer state; together they are the full replica.
    full = ddp_dropout["metrics"]["optimizer_state_bytes_per_rank"]
    shards = crashed["metrics"]["optimizer_state_bytes_per_rank"]
    assert full[0] == full[1] > 0 and sum(shards) == full[0] and max(shards) < 0.75 * full[0]
    assert re.search(r"rank 1: optimizer state [\d.]+ MiB \(ZeRO-1 shard; [\d.]+ MiB without\)", log)


def test_tensorboard_events_hold_the_logged_numbers(ddp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ddp["dir"] / "runs"))  # rank 0 alone writes them
    events.Reload()
    history = ddp["metrics"]["log_history"]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("eval/eval_loss", "eval_loss")):
        assert [e.step for e in events.Scalars(tag)] == [h["step"] for h in history if key in h], tag
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([h[key] for h in history if key in h])
    assert len(events.Scalars("train/tokens_per_second")) == STEPS


def test_resume_refuses_changed_settings(single, tiny_model_dir, sft_json, tmp_path):
    """run_args.json is written at the start; --resume with other training settings names each changed flag, the
    optimizer and the device as they were resolved (--optim auto is 8-bit AdamW on CUDA, torch AdamW on CPU: their
    states do not load into each other). Longer training (--max_steps) stays allowed. Nothing is written: the check
    runs before any work."""
    out = shutil.copytree(single["dir"], tmp_path / "adapter")
    run_args = json.loads((out / "run_args.json").read_text(encoding="utf-8"))
    assert (run_args["optim"], run_args["device"]) == ("adamw_torch", "cpu")  # resolved, not "auto"
    run_args.update(optim="paged_adamw_8bit", device="cuda")  # what a run with --optim auto records on a GPU
    (out / "run_args.json").write_text(json.dumps(run_args), encoding="utf-8")
    before = sorted(p.name for p in out.iterdir())
    flags = train_flags(tiny_model_dir, sft_json, out, batch_size=4, lr=5e-4, grad_accum=1, max_steps=9)
    proc = run_script(SCRIPT, *flags, "--resume", env=THREADS, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_messages(proc.stderr) == [
        f"error: --resume with settings that differ from the checkpoints' ({out / 'run_args.json'}): "
        "--lr 0.001 -> 0.0005; --grad_accum 2 -> 1; --optim paged_adamw_8bit -> adamw_torch; --device cuda -> cpu. "
        "Resume with the old values, or choose another --output_dir"]
    assert sorted(p.name for p in out.iterdir()) == before


def test_resume_on_another_number_of_ranks_from_a_moved_data_file(ddp, tiny_model_dir, sft_json, tmp_path):
    """2 ranks x batch 2, checkpointed at step 3, resumed by 1 process x batch 4: the same global micro-batch, hence
    the same data order, so the uninterrupted 2-rank run's adapter. The data file has moved meanwhile (same bytes)."""
    out = tmp_path / "adapter"
    shutil.copytree(ddp["dir"] / f"checkpoint-{SAVE_STEPS}", out / f"checkpoint-{SAVE_STEPS}")
    shutil.copy(ddp["dir"] / "run_args.json", out)
    moved = shutil.copy(sft_json, tmp_path / "moved.json")
    flags = train_flags(tiny_model_dir, moved, out, batch_size=4)
    run = finished(run_script(SCRIPT, *flags, "--resume", env=THREADS, timeout=300), out)
    assert f"resumed from step {SAVE_STEPS}" in run["log"]
    assert "resume: checkpoint has 2 ranks, now 1: the same data order" in run["log"]
    assert max_abs_diff(run["adapter"], ddp["adapter"]) < 1e-5


def test_adapter_loads_with_peft(ddp, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = ddp["dir"]
    for name in ("adapter_config.json", "run_args.json", "loss_curve.png", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*tmp*")), "temp files left behind"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = AutoTokenizer.from_pretrained(out)("Say item 3", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base(ids).logits
        model = PeftModel.from_pretrained(base, out)
        lora_logits = model(ids).logits
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(ddp["adapter"]) > 0
    for key, saved in ddp["adapter"].items():
        torch.testing.assert_close(loaded[key.replace(".weight", ".default.weight")], saved)
    assert (lora_logits - base_logits).abs().max() > 1e-4  # the adapter is applied


def test_phase2_chat_loads_the_ddp_adapter(ddp):
    proc = run_script("phase2_lora/chat.py", "--adapter", ddp["dir"], "--prompt", "hi", "--greedy",
                      "--max_new_tokens", "5", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert isinstance(json.loads(proc.stdout.strip().splitlines()[-1]), str)


def error_messages(stderr: str) -> list[str]:
    """The `error: ...` lines, without the `[rankN]: ` prefix each rank of a torchrun launch puts before its own."""
    return [m[1] for m in re.finditer(r"^(?:\[rank\d+\]: )?(error: .*)$", stderr, re.M)]


WRONG_LAUNCH = "error: 2 process(es) on this machine but 0 CUDA GPU(s) visible"


@pytest.mark.parametrize("case", ["missing_data", "more_processes_than_gpus", "rank0_killed_first",
                                  "rank1_killed_first", "bad_flag"])
def test_bad_input_fails_fast_on_every_rank(case, tiny_model_dir, tmp_path):
    flags = train_flags(tiny_model_dir, tmp_path / "missing.json" if case == "missing_data" else "x.json",
                        tmp_path / "out")
    expected = {"missing_data": "error: data file not found", "more_processes_than_gpus": WRONG_LAUNCH,
                "rank0_killed_first": WRONG_LAUNCH, "rank1_killed_first": WRONG_LAUNCH,
                "bad_flag": "error: argument --batch_size: expected a whole number in [1, 2147483647], got '0'"}[case]
    # torchrun kills the other ranks when one exits, so a line printed by rank 0 alone could be lost: every
    # rank prints its own. Which rank fails first is a race; the *_killed_first cases make each order certain
    # (the held-back rank dies before it can print), where repeated plain launches would only sample it.
    start = time.perf_counter()
    if case == "bad_flag":
        proc = run_script(SCRIPT, *flags, "--batch_size", "0", env=THREADS, timeout=120)
        assert proc.returncode == 2
    else:
        gpuless = {"CUDA_VISIBLE_DEVICES": ""}  # 0 GPUs for 2 processes, whatever the machine has
        extra, env = (["--device", "cuda"], gpuless) if case != "missing_data" else ([], None)
        script = REPO / SCRIPT
        if case.endswith("_killed_first"):
            script = tmp_path / "held_back.py"
            script.write_text(HELD_BACK_LAUNCHER.format(phase3=str(REPO / "phase3_ddp"), held=case[4]),
                              encoding="utf-8")
        proc = torchrun(*flags, *extra, timeout=120, env=env, script=script)  # a hung rank would time out
        # torchrun itself exits 1 whenever a worker fails; its report (after its own traceback) names the
        # first failing rank, that rank's exit code 2 and, from the error file fail() writes, its error line.
        assert proc.returncode == 1, proc.stderr[-3000:]
        root_cause = proc.stderr[proc.stderr.index("Root Cause"):]
        assert "exitcode  : 2" in root_cause and f"traceback : {expected}" in root_cause, root_cause
        if case.endswith("_killed_first"):  # the rank not held back failed first
            assert f"rank      : {1 - int(case[4])} " in root_cause, root_cause
    assert time.perf_counter() - start < 120
    errors = error_messages(proc.stderr)
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, proc.stderr[-3000:]  # one line per rank at most
    assert errors[0].startswith(expected), proc.stderr[-3000:]
    assert not re.search(r'phase3_ddp/\w+\.py", line', proc.stderr)  # no traceback through our code
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_one_nccl_rank_on_cuda(tiny_model_dir, sft_json, tmp_path):
    """The CUDA path CPU cannot reach: NCCL, paged 8-bit AdamW, bf16 at compute capability >= 8.0 (else fp16 with a
    GradScaler), the chunked loss with the frozen vocabulary matrices kept in that dtype."""
    out = tmp_path / "adapter"
    run = finished(torchrun(*train_flags(tiny_model_dir, sft_json, out, batch_size=4, device="cuda"), nproc=1), out)
    metrics, dtype = run["metrics"], "bfloat16" if torch.cuda.get_device_capability(0)[0] >= 8 else "float16"
    assert (metrics["backend"], metrics["optimizer"]) == ("nccl", "PagedAdamW8bit")
    assert metrics["precision"] == metrics["vocab_dtype"] == dtype
    assert 0 < metrics["peak_gpu_memory_gb_per_rank"][0] < 1  # a tiny model: no (B, T, V) logits anywhere
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert len(losses) == STEPS and all(map(math.isfinite, losses)), losses
    assert max(v.abs().max().item() for k, v in run["adapter"].items() if "lora_B" in k) > 1e-3  # it trained


def test_benchmark_reports_scaling_efficiency(tiny_model_dir):
    proc = run_script("phase3_ddp/benchmark.py", "--model_name_or_path", tiny_model_dir, "--steps", "2",
                      "--warmup", "1", "--batch_size", "4", "--device", "cpu", env=THREADS, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rates = [float(x) for x in re.findall(r"process\(es\) \[gloo.*-> ([\d.]+) samples/s", proc.stdout)]
    eff = re.search(r"scaling efficiency 1 -> 2 processes: ([\d.]+) / \(2 x ([\d.]+)\) = ([\d.]+)", proc.stdout)
    assert len(rates) == 2 and all(r > 0 for r in rates) and eff, proc.stdout
    assert float(eff[3]) == pytest.approx(rates[1] / (2 * rates[0]), rel=0.01)
