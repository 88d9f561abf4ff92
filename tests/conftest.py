"""Shared test setup. Tests never reach the network, and every script runs as a user runs it:
`python phase.../script.py ...` in a subprocess, from the repo root."""

import os

# Before transformers/datasets/huggingface_hub are imported anywhere: no hub access, ever.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args, timeout: float = 600, env: dict | None = None,
               input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from the repo root; returns the finished process (text mode)."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          input=input, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model + Qwen-style tokenizer, built offline once per test session."""
    out = tmp_path_factory.mktemp("tiny") / "tiny-qwen"
    proc = run_script("phase2_lora/make_tiny_model.py", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    return out
