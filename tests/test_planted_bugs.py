"""The grader (tests/acceptance) must fail every planted bug in tests/acceptance/broken/, naming the mistake.

Each bug file holds TARGET (a minimal file's contract name), REPLACE (a list of (old, new) line edits that plant the
bug in that minimal file; each old text must occur exactly once, so a later edit of the minimal file cannot silently
make the bug a no-op) and EXPECT (text the grader's report must contain). The mutated copy is graded with
`python -m pytest tests/acceptance/test_grade_TARGET.py --impl TARGET=copy`, as a learner would grade a rewrite
(the other graders would only skip), on this session's tiny model (built once, not once per bug); the bugs are
graded side by side, one per core."""

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import MINIMAL, REPO, TINY_MODEL_ENV, selected_params, side_by_side

BROKEN = REPO / "tests" / "acceptance" / "broken"
BUGS = sorted(p for p in BROKEN.glob("*.py") if not p.name.startswith("_"))


def load_bug(path):
    spec = importlib.util.spec_from_file_location(f"bug_{path.stem}", path)
    bug = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bug)
    return bug


def test_every_required_bug_is_planted():
    required = {"train_best_on_test", "train_no_eval_mode", "mha_no_scale", "mha_merge_without_transpose",
                "lora_no_alpha_scaling", "qlora_prompt_in_labels", "ddp_no_set_epoch", "ddp_loss_not_averaged"}
    assert required <= {p.stem for p in BUGS}, sorted(required - {p.stem for p in BUGS})


def grade(bug_file, tmp, tiny_model_dir):
    """(the bug module, the grader's finished pytest process on the mutated minimal file, or why it was not run)."""
    bug = load_bug(bug_file)
    source = MINIMAL[bug.TARGET].read_text(encoding="utf-8")
    for old, new in bug.REPLACE:
        if source.count(old) != 1:
            return bug, f"{bug_file.name}: {old!r} occurs {source.count(old)} times in the minimal file"
        source = source.replace(old, new)
    mutated = tmp / MINIMAL[bug.TARGET].name
    mutated.write_text(source, encoding="utf-8")
    grader = f"tests/acceptance/test_grade_{bug.TARGET}.py"
    env = {**os.environ, TINY_MODEL_ENV: str(tiny_model_dir), **getattr(bug, "ENV", {})}
    return bug, subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", grader,
                                "--impl", f"{bug.TARGET}={mutated}", "--basetemp", tmp / "pytest"], cwd=REPO,
                               capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def grades(request, tiny_model_dir, tmp_path_factory) -> dict:
    """{bug file: grade(bug file)} for the selected bugs, graded side by side (most of each grader's pytest process
    is imports and one-process runs)."""
    return side_by_side(lambda bug_file: grade(bug_file, tmp_path_factory.mktemp(bug_file.stem), tiny_model_dir),
                        selected_params(request, "bug_file"))


@pytest.mark.parametrize("bug_file", BUGS, ids=lambda p: p.stem)
def test_grader_names_the_planted_bug(bug_file, grades):
    bug, proc = grades[bug_file]
    assert not isinstance(proc, str), proc
    report = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"the grader passed the planted bug {bug_file.stem}:\n{report[-3000:]}"
    assert bug.EXPECT in report, f"the grader failed without naming the mistake ({bug.EXPECT!r}):\n{report[-3000:]}"
