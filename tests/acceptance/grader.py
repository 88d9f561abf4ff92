"""The grader's helpers (the `impl_path` fixture and the contract names live in tests/conftest.py).

    python -m pytest tests/acceptance                                     # grade this repo's minimal files
    python -m pytest tests/acceptance --impl train_minimal=my_train.py   # grade your rewrite instead (repeatable)

A failing check says what is wrong and the likely mistake, in one message (`fail_with`). docs/STUDY.md holds each
phase's contract: the few names, flags and outputs a rewrite from memory must keep.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

HOOKED_RUN = Path(__file__).with_name("hooked_run.py")


def import_file(path: Path, name: str):
    """Import a single-file rewrite as a module (its main() stays behind `if __name__ == "__main__":`)."""
    spec = importlib.util.spec_from_file_location(f"graded_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fail_with(message: str):
    """Fail the check with one message for the learner: what is wrong and the likely mistake."""
    pytest.fail(message, pytrace=False)


def run_hooked(hooks: str, script: Path, *args, record: Path, launcher: list[str] | None = None,
               timeout: float = 600, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `script args` as a user would (`python script ...`, or under `launcher`, e.g. torchrun's argv up to the
    script), with the grader's observer module `tests/acceptance/<hooks>.py` imported first: it patches what it
    watches (e.g. whether evaluation runs in eval mode) and appends its observations as JSON lines to `record`;
    `input` is piped to its stdin."""
    cmd = [*(launcher or [sys.executable]), str(HOOKED_RUN), hooks, str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, input=input,
                          env={**os.environ, **(env or {}), "GRADER_RECORD": str(record)})
