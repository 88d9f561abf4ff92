"""phase3_ddp/finetune_ddp.py across "two machines" on this one: two torchrun launchers with one process each,
`--nnodes=2` and a c10d rendezvous on 127.0.0.1, train the same adapter as two processes under one launcher.

This is the command a user runs on two servers (with the first server's address as the endpoint): the script
changes nothing for it, the launcher's rendezvous gives every process its RANK and WORLD_SIZE.
The one-launcher run is the `ddp` session fixture (conftest.py, shared with test_ddp.py): the two launchers repeat
its flags."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import DDP_SCRIPT, DDP_STEPS, REPO, THREADS, finished, free_port, train_flags
from test_ddp import max_abs_diff


def two_node_launch(flags: list[str]) -> subprocess.CompletedProcess:
    """Node 0 and node 1, one process each, meeting at a c10d rendezvous; their logs joined into one result."""
    endpoint = f"127.0.0.1:{free_port()}"
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=multinode-test", "--max-restarts=0",
         str(REPO / DDP_SCRIPT), *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **THREADS}, start_new_session=True) for node in (0, 1)]
    try:
        logs = [launcher.communicate(timeout=300) for launcher in launchers]
    finally:
        for launcher in launchers:  # a hung rendezvous must not outlive the test: the launcher and its worker
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(
        "two launchers", max(launcher.returncode for launcher in launchers),
        "".join(out for out, _ in logs), "".join(err for _, err in logs))


def test_two_launchers_of_one_process_equal_one_launcher_of_two(ddp, tiny_model_dir, sft_json, tmp_path):
    out = tmp_path / "two_launchers"
    two = finished(two_node_launch(train_flags(tiny_model_dir, sft_json, out, batch_size=2, report_to="tensorboard")),
                   out)
    assert two["metrics"]["world_size"] == ddp["metrics"]["world_size"] == 2
    assert "global batch = 2 per rank x 2 accumulation x 2 ranks = 8 sequences" in two["log"]
    assert max(v.abs().max().item() for k, v in two["adapter"].items() if "lora_B" in k) > 1e-4  # it trained
    assert max_abs_diff(two["adapter"], ddp["adapter"]) < 1e-5
    losses = [[h["loss"] for h in run["metrics"]["log_history"] if "loss" in h] for run in (ddp, two)]
    assert len(losses[0]) == DDP_STEPS and losses[1] == pytest.approx(losses[0], rel=1e-5)
