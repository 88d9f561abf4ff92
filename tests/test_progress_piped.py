"""Issue 23 §8: progress bars belong on a terminal. Every --help-able script of the four phases (test_help.SCRIPTS),
run in its quickest real mode with stdout and stderr piped, as `python script.py ... > run.log 2>&1` runs it,
writes no carriage return: a tqdm bar in a log file is a line of `\r`-separated redraws.

The output is read as bytes: text mode (conftest.run_script) turns every `\r` into `\n` and would hide the bars.
One test runs them all, as many jobs at a time as there are cores (conftest.side_by_side; each run has one
thread): a script's quickest run is mostly its import time. Runs that need another's output (an adapter, a
checkpoint) run in order in one job.
"""

import os
import subprocess
import sys
import time

from cifar_fixtures import write_cifar_like
from conftest import PERSONA_PATH, REPO, TOKEN_CACHE_DIR, free_port, side_by_side
from test_help import SCRIPTS

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Covered by --help only (test_help.py), each with the reason its quickest real run does not belong in this test.
# Both were run piped once by hand on 2026-12-03 (the commands below, output read as bytes): no carriage return.
HELP_ONLY = {
    "phase2_lora/benchmark_data.py": "`benchmark_data.py packing --records 40 --steps 1`, its quickest real run, "
                                     "writes a corpus, learns a BPE vocabulary and trains both arms: 77 s on the "
                                     "shared 2-core machine at load 7 (575 s at load 14)",
    "phase3_ddp/benchmark.py": "`benchmark.py --steps 1 --warmup 0 --batch_size 2 --nprocs 1 --quantization none`, "
                               "its quickest real run, launches torchrun: 66 s at load 7; its ranks run "
                               "finetune_ddp.py's code, which this test runs",
}


def jobs(w, tiny) -> dict[str, list[tuple[str, list]]]:
    """name -> the runs of one job, in order: (script, argv). w: a scratch folder; tiny: the tiny Qwen2 folder."""
    cifar = write_cifar_like(w / "cifar")
    adapter = w / "qlora-minimal"
    model = ["--model_name_or_path", tiny]
    return {
        "phase1 train, evaluate": [
            ("phase1_cnn/train.py", ["--data_dir", cifar, "--output_dir", w / "p1", "--model", "lenet5",
                                     "--epochs", 1, "--batch_size", 50, "--val_size", 50]),
            ("phase1_cnn/evaluate.py", ["--checkpoint", w / "p1", "--data_dir", cifar])],
        "phase1 minimal": [("phase1_cnn/train_minimal.py", ["--data_dir", cifar, "--epochs", 1,
                                                            "--output_dir", w / "p1m"])],
        "phase1 benchmark": [("phase1_cnn/benchmark.py", [
            "--data_dir", cifar, "--steps", 1, "--warmup", 0, "--repeats", 1, "--batch_size", 10, "--num_images", 50,
            "--textbook_workers", 1, "--device", "cpu"])],
        "phase1 models": [("phase1_cnn/cifar_models.py", [])],
        "attention walkthrough": [("phase2_attention/walkthrough.py", ["--decode"])],
        "attention benchmark": [("phase2_attention/benchmark.py", [
            "--lengths", 16, 32, "--reps", 1, "--embed_dim", 16, "--num_heads", 2, "--threads", 1, "--devices", "cpu",
            "--out_dir", w / "attention"])],
        "tiny model": [("phase2_lora/make_tiny_model.py", ["--output_dir", w / "tiny"])],
        "download": [("phase2_lora/download_data.py", ["--url", PERSONA_PATH.as_uri(), "--output", w / "data.json",
                                                       "--records", 0])],
        "lora arithmetic": [("phase2_lora/lora_from_scratch.py", [])],
        "qlora minimal, chat minimal, evaluate": [
            ("phase2_lora/qlora_minimal.py", [*model, "--data_path", PERSONA_PATH, "--max_samples", 2,
                                              "--max_steps", 1, "--output_dir", adapter]),
            ("phase2_lora/chat_minimal.py", [*model, "--adapter", adapter, "--max_new_tokens", 2]),
            ("phase2_lora/evaluate.py", ["--adapter", adapter, "--data_path", PERSONA_PATH, "--max_samples", 1,
                                         "--max_new_tokens", 2, "--output", w / "eval.json"])],
        "chat": [("phase2_lora/chat.py", [*model, "--prompt", "hi", "--max_new_tokens", 2])],
        "serve": [("phase2_lora/serve.py", [*model, "--max_new_tokens", 2])],
        "benchmark serve": [("phase2_lora/benchmark_serve.py", [*model, "--max_tokens", 2, "--repeats", 1])],
        "finetune": [("phase2_lora/finetune.py", [
            *model, "--data_path", PERSONA_PATH, "--output_dir", w / "finetune", "--max_samples", 2, "--val_size", 0,
            "--max_steps", 1, "--quantization", "none", "--cache_dir", TOKEN_CACHE_DIR])],
        "one-step benchmark": [("phase2_lora/benchmark_one_step.py", ["--tiny", "--seq_lens", 64,
                                                                      "--output_dir", w / "one_step"])],
        "qlora benchmark": [("phase2_lora/benchmark.py", [
            "--tiny", "--recipes", "default", "--seq_lens", 64, "--batch_sizes", 2, "--steps", 1,
            "--output_dir", w / "benchmark"])],
        "compare methods": [("phase2_lora/compare_methods.py", [
            "--tiny", *model, "--methods", "lora", "--steps", 1, "--max_samples", 8, "--em_prompts", 1,
            "--output_dir", w / "compare"])],
        "finetune ddp": [("phase3_ddp/finetune_ddp.py", [
            *model, "--data_path", PERSONA_PATH, "--output_dir", w / "ddp", "--max_samples", 4, "--val_size", 0,
            "--max_steps", 1, "--quantization", "none", "--device", "cpu", "--cache_dir", TOKEN_CACHE_DIR])],
        "ddp minimal": [("phase3_ddp/ddp_minimal.py", [*model, "--data_path", PERSONA_PATH, "--output_dir",
                                                       w / "ddp_minimal", "--max_steps", 1, "--max_samples", 2,
                                                       "--batch_size", 1])],
        "tensor parallel": [("phase3_ddp/tensor_parallel.py", [])],
        "memory budget": [("phase3_ddp/benchmark_memory.py", ["--budget", "7b"])],
    }


def run_piped(script: str, argv: list, log_dir) -> tuple[int, bytes]:
    """(exit code, stdout + stderr as bytes) of one run with both piped. serve.py runs until it answers one request
    (its log then holds the model load and a generation); ddp_minimal.py runs as rank 0 of a world of 1, the
    environment torchrun would give it."""
    cmd, env = [sys.executable, str(REPO / script), *map(str, argv)], {**os.environ, **ONE_THREAD}
    if script == "phase3_ddp/ddp_minimal.py":
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if script != "phase2_lora/serve.py":
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, input=b"hi\n", timeout=600)
        return proc.returncode, proc.stdout + proc.stderr
    from test_serve import request  # a tiny HTTP client; imported here, as only this run needs it

    port, log_path = free_port(), log_dir / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 600
        while b"serving on" not in log_path.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        answered = proc.poll() is None and (request(port, "POST", "/v1/chat/completions", body) or [0])[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0 if answered else 1, log_path.read_bytes()


def test_no_script_writes_progress_bars_into_a_pipe(tiny_model_dir, tmp_path):
    work = jobs(tmp_path, tiny_model_dir)
    covered = [script for runs in work.values() for script, _ in runs]
    assert sorted(covered + list(HELP_ONLY)) == SCRIPTS, "cover each script of test_help.SCRIPTS exactly once"

    def run_job(name: str) -> list[tuple[str, int, bytes]]:
        return [(script, *run_piped(script, argv, tmp_path)) for script, argv in work[name]]

    results = [r for job in side_by_side(run_job, list(work)).values() for r in job]
    failed = {s: out[-1500:] for s, code, out in results if code != 0}
    assert not failed, failed
    bars = {s: out[max(0, out.find(b"\r") - 200):out.find(b"\r") + 200] for s, _, out in results if b"\r" in out}
    assert not bars, bars  # script -> the output around its first \r
