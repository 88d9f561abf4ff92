"""Every phase script answers --help, as a user would first try it."""

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPTS = sorted(
    str(p.relative_to(REPO))
    for folder in ("phase1_cnn", "phase2_attention", "phase2_lora", "phase3_ddp")
    for p in (REPO / folder).glob("*.py")
    if re.search(r'^if __name__ == "__main__":', p.read_text(encoding="utf-8"), re.M)
    # A minimal (learning) file without flags has only constants to read: nothing for --help to say.
    and not (p.stem.endswith("_minimal") and "argparse" not in p.read_text(encoding="utf-8"))
)

# `python SCRIPT --help` for every script, in ONE interpreter: runpy.run_path(run_name="__main__") with the script's
# folder first on sys.path is what `python SCRIPT` does, and torch, transformers and peft are imported once instead
# of once per script (this file: 56 s -> 11 s on 2 cores). Each folder's sibling modules are dropped between scripts, so
# every script imports its own folder's copies (phase 2 and phase 3 hold modules of the same names).
HELP_ALL = r"""
import contextlib, io, json, runpy, sys, traceback
from pathlib import Path
repo, out_file, scripts = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
siblings = {p.stem for s in scripts for p in (repo / s).parent.glob("*.py")}
results = {}
for script in scripts:
    for name in siblings & set(sys.modules):
        del sys.modules[name]
    path = repo / script
    sys.argv, sys.path[0] = [str(path), "--help"], str(path.parent)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[script] = {"returncode": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
Path(out_file).write_text(json.dumps(results))
"""


def test_every_phase_has_scripts():
    for folder in ("phase1_cnn", "phase2_attention", "phase2_lora", "phase3_ddp"):
        assert any(s.startswith(folder) for s in SCRIPTS), f"{folder} has no runnable script"


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict:
    """{script: {returncode, stdout, stderr}} of its --help, every script in one interpreter (HELP_ALL)."""
    out = tmp_path_factory.mktemp("help") / "helps.json"
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, str(REPO), str(out), *SCRIPTS], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, helps):
    proc = helps[script]
    assert proc["returncode"] == 0, proc["stderr"]
    assert proc["stdout"].startswith("usage:"), proc["stdout"][:200]
