"""Shared test setup. Tests never reach the network, and every script runs as a user runs it:
`python phase.../script.py ...` in a subprocess, from the repo root."""

import os

# Before transformers/datasets/huggingface_hub are imported anywhere: no hub access, ever.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import atexit  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The fine-tuning scripts cache tokenised data in data/cache/ by default; tests keep that cache out of the repo.
TOKEN_CACHE_SCRIPTS = ("phase2_lora/finetune.py", "phase3_ddp/finetune_ddp.py")
TOKEN_CACHE_DIR = Path(tempfile.mkdtemp(prefix="test-sft-cache-"))
atexit.register(shutil.rmtree, TOKEN_CACHE_DIR, ignore_errors=True)


def pytest_addoption(parser):
    """`--impl NAME=PATH`: tests/acceptance grades the learner's rewrite PATH in place of the minimal file NAME."""
    parser.addoption("--impl", action="append", default=[], metavar="NAME=PATH",
                     help="grade a rewrite from memory: tests/acceptance checks PATH in place of the minimal file "
                          "NAME (train_minimal, mha_minimal, lora_minimal, qlora_minimal, chat_minimal, ddp_minimal); "
                          "repeatable. With --impl, only the named files are graded")


# ---------------------------------------------------------------- the grader for rewrites (tests/acceptance)

MINIMAL = {  # the contract's NAME (docs/STUDY.md) -> this repository's minimal file, graded unless --impl replaces it
    "train_minimal": REPO / "phase1_cnn" / "train_minimal.py",
    "mha_minimal": REPO / "phase2_attention" / "mha_minimal.py",
    "lora_minimal": REPO / "phase2_lora" / "lora_minimal.py",  # LoRALinear by hand, equal to peft's layer
    "qlora_minimal": REPO / "phase2_lora" / "qlora_minimal.py",
    "chat_minimal": REPO / "phase2_lora" / "chat_minimal.py",
    "ddp_minimal": REPO / "phase3_ddp" / "ddp_minimal.py",
}


def given_impls(config) -> dict[str, Path]:
    """--impl NAME=PATH options as {NAME: absolute PATH}; a bad one is a usage error, reported before any test."""
    impls = {}
    for option in config.getoption("--impl"):
        name, sep, path = option.partition("=")
        if not sep or name not in MINIMAL:
            raise pytest.UsageError(f"--impl {option}: expected NAME=PATH with NAME one of {', '.join(MINIMAL)}")
        file = Path(path).expanduser().resolve()
        if not file.is_file():
            raise pytest.UsageError(f"--impl {option}: {file} is not a file")
        impls[name] = file
    return impls


@pytest.fixture(scope="session")
def impl_path(request):
    """impl_path("NAME") -> the file to grade: the learner's rewrite if --impl named it, else this repo's minimal
    file when no --impl was given; when --impl names only other files, the asking test is skipped."""
    impls = given_impls(request.config)

    def path(name: str) -> Path:
        if name in impls:
            return impls[name]
        if impls:
            pytest.skip(f"{name} is not graded: --impl named only {', '.join(impls)}")
        return MINIMAL[name]
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is available; elsewhere they are skipped with the reason."""
    given_impls(config)  # a bad --impl is a usage error before any test runs
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in gpu_tests:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a server or a torchrun rendezvous the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, *args, timeout: float = 600, env: dict | None = None,
               input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from the repo root; returns the finished process (text mode).
    The fine-tuning scripts get a temporary --cache_dir unless the test chooses its own cache flags."""
    args = [str(a) for a in args]
    if script in TOKEN_CACHE_SCRIPTS and not {"--cache_dir", "--no_cache"} & set(args):
        args += ["--cache_dir", str(TOKEN_CACHE_DIR)]
    cmd = [sys.executable, str(REPO / script), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          input=input, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model + Qwen-style tokenizer, built offline once per test session."""
    out = tmp_path_factory.mktemp("tiny") / "tiny-qwen"
    proc = run_script("phase2_lora/make_tiny_model.py", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    return out


# ---------------------------------------------------------------- phase 2 LoRA: a trained tiny adapter

PERSONA_PATH = REPO / "data" / "persona_zh.json"  # our own persona/style data set (Alpaca JSON list)
TRAINED_N = 8  # trained_adapter memorises exactly the first TRAINED_N records of PERSONA_PATH


def user_turn(rec: dict) -> str:
    """The user message finetune.py builds from an Alpaca record: instruction, then input after a blank line."""
    return rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")


def write_json(path: Path, obj) -> Path:
    """Write obj as UTF-8 JSON (a str is written as it is, e.g. deliberately broken JSON); returns path."""
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def persona_records(n: int = TRAINED_N) -> list[dict]:
    """The first n records of PERSONA_PATH: the ones trained_adapter was trained on (for n <= TRAINED_N)."""
    return json.loads(PERSONA_PATH.read_text(encoding="utf-8"))[:n]


@pytest.fixture(scope="session")
def trained_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter trained by `phase2_lora/finetune.py` on tiny_model_dir, once per test session.

    4-bit NF4 QLoRA on CPU, on the first TRAINED_N records of PERSONA_PATH (`--max_samples 8 --val_size 0`,
    default system prompt, no `--system`), dropout 0, 60 full-batch steps at lr 1e-2: training loss ends near
    0.05 and greedy decoding of each trained prompt (`persona_records()`, rendered with the tokenizer's chat
    template, add_generation_prompt=True) reproduces its `output` exactly; the untrained base model does not.
    Returns the output dir: adapter_config.json + adapter_model.safetensors (load with
    `PeftModel.from_pretrained(base, dir)`, base = tiny_model_dir), tokenizer files, run_args.json,
    metrics.json, loss_curve.png and checkpoint-60/. Treat it as read-only: it is shared by all tests.
    """
    out = tmp_path_factory.mktemp("lora") / "tiny-persona-lora"
    proc = run_script("phase2_lora/finetune.py", *trained_adapter_argv(tiny_model_dir, out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def trained_adapter_argv(model_dir: Path, output_dir: Path) -> list[str]:
    """finetune.py's arguments for trained_adapter (tests that --resume a copy of it reuse them)."""
    return [str(a) for a in (
        "--model_name_or_path", model_dir, "--data_path", PERSONA_PATH, "--output_dir", output_dir,
        "--quantization", "4bit", "--max_samples", TRAINED_N, "--val_size", 0, "--max_steps", 60,
        "--batch_size", TRAINED_N, "--grad_accum", 1, "--lr", 1e-2, "--lora_dropout", 0, "--logging_steps", 5,
        "--save_steps", 1000, "--no_cache")]
