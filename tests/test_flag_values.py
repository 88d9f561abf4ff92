"""Every numeric flag of chat.py, serve.py, evaluate.py, benchmark_serve.py and compare_methods.py (and finetune.py's
seed and --val_size, issue 23 §4), given inf, nan,
a negative number and a huge one: a bad value gets one line `error: ...` naming the flag and exit 2, before
anything loads; a huge value that means something (more samples than there are, a context longer than the model's)
passes, and is capped where it is used. In this process: each script's own parse_args and cheap checks."""

import sys

import pytest
from conftest import REPO, write_json

sys.path.insert(0, str(REPO / "phase2_lora"))
import benchmark_serve  # noqa: E402
import chat  # noqa: E402
import compare_methods  # noqa: E402
import evaluate  # noqa: E402
import finetune  # noqa: E402
import serve  # noqa: E402

HUGE = str(10**30)
BAD = ("inf", "nan", "-1")  # always refused
MODEL = ["--model_name_or_path", "some/model"]  # not loaded: the checks come first
# (flag, whether HUGE is valid) per flag family
MODEL_FLAGS = [("--max_new_tokens", True), ("--max_context", True), ("--top_k", True), ("--temperature", True),
               ("--top_p", False), ("--repetition_penalty", False)]


def chat_check(argv):
    chat.check_args(chat.parse_args(MODEL + argv))


def serve_check(argv):
    serve.check_model_args(serve.parse_args(MODEL + argv))


def benchmark_check(argv):
    benchmark_serve.check_model_args(benchmark_serve.parse_args(MODEL + argv))


def finetune_check(argv):
    finetune.parse_args(MODEL + argv)


def compare_check(argv):
    compare_methods.parse_args(["--tiny", *argv])


@pytest.fixture
def evaluate_check(tmp_path):
    adapter = tmp_path / "adapter"  # enough of an adapter for the checks that run before anything loads
    adapter.mkdir()
    write_json(adapter / "adapter_config.json", {"base_model_name_or_path": "some/model"})
    (adapter / "adapter_model.safetensors").touch()
    data = write_json(tmp_path / "data.json", [])
    return lambda argv: evaluate.check_model_args(evaluate.parse_args(
        ["--adapter", str(adapter), "--data_path", str(data), *argv]))


CASES = [  # (check, flag, whether HUGE is valid)
    *[(chat_check, flag, huge) for flag, huge in [*MODEL_FLAGS, ("--seed", False)]],
    *[(serve_check, flag, huge) for flag, huge in [*MODEL_FLAGS, ("--port", False)]],
    ("evaluate", "--max_samples", True), ("evaluate", "--max_seq_len", True), ("evaluate", "--max_new_tokens", True),
    (benchmark_check, "--max_tokens", True), (benchmark_check, "--repeats", True),
    *[(compare_check, flag, True) for flag in ("--steps", "--batch_size", "--max_seq_len", "--max_samples",
                                               "--em_prompts", "--lr_scale")],
    (compare_check, "--val_size", False), (compare_check, "--seed", False),
    *[(finetune_check, flag, huge) for flag, huge in [("--val_size", False), ("--seed", False), ("--lr", True),
                                                      ("--batch_size", True), ("--max_seq_len", True)]],
]


@pytest.mark.parametrize("check, flag, huge_is_valid", CASES,
                         ids=[f"{c if isinstance(c, str) else c.__name__}{f}" for c, f, _ in CASES])
def test_numeric_flag_values(check, flag, huge_is_valid, capsys, request):
    if check == "evaluate":
        check = request.getfixturevalue("evaluate_check")
    for value in (*BAD, *(() if huge_is_valid else (HUGE,))):
        with pytest.raises(SystemExit) as exit_:
            check([flag, value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (value, err)
        assert flag in err, (value, err)
    if huge_is_valid:
        check([flag, HUGE])  # no exit
