"""Every phase script answers --help, as a user would first try it."""

import re
import subprocess

import pytest
from conftest import REPO, run_script, selected_params, side_by_side

SCRIPTS = sorted(
    str(p.relative_to(REPO))
    for folder in ("phase1_cnn", "phase2_attention", "phase2_lora", "phase3_ddp")
    for p in (REPO / folder).glob("*.py")
    if re.search(r'^if __name__ == "__main__":', p.read_text(encoding="utf-8"), re.M)
    # A minimal (learning) file without flags has only constants to read: nothing for --help to say.
    and not (p.stem.endswith("_minimal") and "argparse" not in p.read_text(encoding="utf-8"))
)


def test_every_phase_has_scripts():
    for folder in ("phase1_cnn", "phase2_attention", "phase2_lora", "phase3_ddp"):
        assert any(s.startswith(folder) for s in SCRIPTS), f"{folder} has no runnable script"


@pytest.fixture(scope="module")
def helps(request) -> dict:
    """{script: its finished `python script --help`} for the selected scripts, side by side: each is one process that
    mostly imports (seconds for torch or transformers), on one core."""
    def run(script: str):
        try:
            return run_script(script, "--help", timeout=120)
        except subprocess.TimeoutExpired as e:  # fails that script's test alone
            return e
    return side_by_side(run, selected_params(request, "script"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, helps):
    proc = helps[script]
    if isinstance(proc, subprocess.TimeoutExpired):
        raise proc
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:"), proc.stdout[:200]
