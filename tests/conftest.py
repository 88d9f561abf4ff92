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
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
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


# The longest test files (90-180 s each when run alone: many scripts graded, run or launched with torchrun) start
# first, so that under `-n 2 --dist loadscope` (pytest-xdist: each file stays on one worker) none of them is left
# running on one worker at the end while the other idles.
LONGEST_FIRST = ("test_planted_bugs.py", "test_progress_piped.py", "test_ddp.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FIRST). Tests marked `gpu` run only where CUDA is available; elsewhere they
    are skipped with the reason."""
    given_impls(config)  # a bad --impl is a usage error before any test runs
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # a stable sort: otherwise in file order
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


def selected_params(request, argname: str) -> list:
    """The values of the parametrized argument `argname` in the tests of the requesting module that this run
    selected (-k, node ids): what a module fixture doing all of their work at once (`side_by_side`) has to do."""
    return [item.callspec.params[argname] for item in request.session.items
            if getattr(item, "module", None) is request.module
            and argname in getattr(getattr(item, "callspec", None), "params", {})]


def side_by_side(run, keys) -> dict:
    """{key: run(key)}, as many runs at a time as there are cores: for independent subprocesses that each mostly
    import libraries on one core, so the suite does not leave the other cores idle."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return dict(zip(keys, pool.map(run, keys), strict=True))


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


TINY_MODEL_ENV = "TESTS_TINY_MODEL_DIR"  # set for the pytest runs a test starts (test_planted_bugs.py)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model + Qwen-style tokenizer, built offline once per test session; a pytest run started
    by a test gets the starting session's model through $TESTS_TINY_MODEL_DIR instead of building its own."""
    if os.environ.get(TINY_MODEL_ENV):
        return Path(os.environ[TINY_MODEL_ENV])
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


# ---------------------------------------------------------------- phase 3 DDP: runs shared by several test files

DDP_SCRIPT = "phase3_ddp/finetune_ddp.py"
THREADS = {"OMP_NUM_THREADS": "1"}  # one thread per process: 2 ranks on 2 cores, no oversubscription
DDP_STEPS, DDP_SAVE_STEPS = 6, 3  # train_flags' defaults: 5 steps per epoch on sft_json, checkpoints at 3 and 6


def torchrun(*args, nproc: int = 2, max_restarts: int = 0, timeout: float = 300, env: dict | None = None,
             script=REPO / DDP_SCRIPT) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free rendezvous port per launch) with the given script arguments."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **THREADS, **(env or {})})


@pytest.fixture(scope="session")
def sft_json(tmp_path_factory):
    """40 Alpaca records with answers of 1..24 words (ranks hold very different token counts), plus one
    invalid and one <nooutput> record that must be skipped."""
    words = ["alpha", "beta", "gamma", "delta", "apple", "banana", "cherry", "river", "mountain", "ocean", "cloud",
             "rain", "sun", "moon", "star"]
    records = [{"instruction": f"Say item {i}", "input": "" if i % 3 else "with some input",
                "output": " ".join(words[(i * 7 + j) % len(words)] for j in range(1 + (i * 11) % 24))}
               for i in range(40)]
    records += [{"instruction": "draw a cat", "input": "", "output": "<nooutput>"}, {"instruction": "", "output": "x"}]
    return write_json(tmp_path_factory.mktemp("ddp_data") / "sft.json", records)


def train_flags(model, data, out, **overrides) -> list[str]:
    """finetune_ddp.py's flags for a run on sft_json (33 training examples, 7 held out); overrides win."""
    flags = {"model_name_or_path": model, "data_path": data, "output_dir": out, "max_steps": DDP_STEPS,
             "grad_accum": 2, "val_size": 7, "save_steps": DDP_SAVE_STEPS, "lr": 1e-3, "lora_dropout": 0,
             "quantization": "4bit", "device": "cpu", "cache_dir": Path(data).parent / "cache",
             **overrides}  # gloo on CPU, also on a GPU machine
    return [str(x) for k, v in flags.items() for x in (f"--{k}", v)]


def finished(proc: subprocess.CompletedProcess, out) -> dict:
    """A finished finetune_ddp.py run: {dir, log (stdout + stderr), adapter (its tensors), metrics}."""
    from safetensors.torch import load_file

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {"dir": out, "log": proc.stdout + proc.stderr, "adapter": load_file(out / "adapter_model.safetensors"),
            "metrics": json.loads((out / "metrics.json").read_text(encoding="utf-8"))}


@pytest.fixture(scope="session")
def single(tiny_model_dir, sft_json, tmp_path_factory):
    """`python finetune_ddp.py`, 1 process x batch 4 x 2 accumulation: the reference for `ddp` (same global batch)."""
    out = tmp_path_factory.mktemp("single") / "adapter"
    proc = run_script(DDP_SCRIPT, *train_flags(tiny_model_dir, sft_json, out, batch_size=4), env=THREADS, timeout=300)
    return finished(proc, out)


@pytest.fixture(scope="session")
def ddp(tiny_model_dir, sft_json, tmp_path_factory):
    """torchrun, 2 ranks x batch 2 x 2 accumulation, dropout 0, TensorBoard: must equal `single`. Treat as read-only:
    test_ddp.py and test_ddp_multinode.py (two launchers of one process each) compare against it."""
    out = tmp_path_factory.mktemp("ddp") / "adapter"
    return finished(torchrun(*train_flags(tiny_model_dir, sft_json, out, batch_size=2, report_to="tensorboard")), out)
