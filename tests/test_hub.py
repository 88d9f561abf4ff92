"""--hub / USE_MODELSCOPE_HUB (model_names.py): a model id is downloaded from ModelScope, or left to transformers
(Hugging Face, or the mirror HF_ENDPOINT names), and a ModelScope download still counts as the same base model.

The network is never touched: a fake `modelscope` module (in sys.modules, or a stub package on PYTHONPATH for the
scripts) records what it is asked for and returns a local folder, and another stub behaves as if modelscope were
not installed. The last tests run the real scripts, so they check each one's wiring of --hub."""

import argparse
import json
import os
import sys
from types import SimpleNamespace

import pytest
from conftest import PERSONA_PATH, REPO, free_port, run_script

sys.path.insert(0, str(REPO / "phase2_lora"))
from model_names import (  # noqa: E402
    add_hub_flag,
    default_hub,
    model_name,
    modelscope_id,
    resolve_model,
    same_base,
)


class UsageError(Exception):
    """The scripts pass their own qlora_model.UsageError; any class will do here (and torch stays unimported)."""


QWEN = "Qwen/Qwen1.5-1.8B-Chat"  # Hugging Face's id; ModelScope's is qwen/Qwen1.5-1.8B-Chat
CACHE_FOLDERS = (  # where each hub library puts QWEN (relative to its cache root), and a plain download of it
    "models/qwen--Qwen1.5-1.8B-Chat/snapshots/master",      # modelscope >= 1.38
    "hub/models/qwen/Qwen1___5-1___8B-Chat",                # older modelscope: dots written as ___
    "models--Qwen--Qwen1.5-1.8B-Chat/snapshots/7b8f4bd9",   # huggingface_hub
    "models/Qwen1.5-1.8B-Chat",                             # modelscope download --local_dir, git clone
)


@pytest.fixture
def fake_modelscope(monkeypatch, tmp_path):
    """A modelscope module whose snapshot_download records the id and returns (after creating) the folder
    modelscope >= 1.38 would download it into. Returns the list of ids asked for."""
    calls = []

    def snapshot_download(model_id, **kwargs):
        calls.append(model_id)
        folder = tmp_path / "modelscope" / "models" / f"{model_id.replace('/', '--')}" / "snapshots" / "master"
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)
    monkeypatch.setitem(sys.modules, "modelscope", SimpleNamespace(snapshot_download=snapshot_download))
    return calls


def test_modelscope_downloads_the_modelscope_id_and_returns_its_folder(fake_modelscope, tmp_path):
    folder = resolve_model(QWEN, "modelscope", UsageError)
    assert fake_modelscope == ["qwen/Qwen1.5-1.8B-Chat"]
    assert folder == str(tmp_path / "modelscope/models/qwen--Qwen1.5-1.8B-Chat/snapshots/master")
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct", "modelscope", UsageError).endswith(
        "Qwen--Qwen2.5-0.5B-Instruct/snapshots/master")  # later Qwen generations: the same id on both hubs


def test_local_folders_and_huggingface_ids_never_reach_modelscope(fake_modelscope, tmp_path, monkeypatch):
    (tmp_path / "Qwen" / "Qwen1.5-1.8B-Chat").mkdir(parents=True)  # a folder that reads like a hub id too
    for folder in (str(tmp_path), str(tmp_path / "Qwen" / "Qwen1.5-1.8B-Chat")):
        assert resolve_model(folder, "modelscope", UsageError) == folder
    monkeypatch.chdir(tmp_path)  # the relative path "Qwen/Qwen1.5-1.8B-Chat" is now that folder: loaded as it is
    assert resolve_model(QWEN, "modelscope", UsageError) == QWEN
    assert resolve_model(QWEN, "huggingface", UsageError) == QWEN  # transformers downloads it (HF_ENDPOINT)
    for not_an_id in ("./checkpoints/gone", "/no/such/model", "a/b/c"):  # the loader says it is not there
        assert resolve_model(not_an_id, "modelscope", UsageError) == not_an_id
    assert fake_modelscope == []


@pytest.mark.parametrize("module, expected", [
    (None, "needs the modelscope package: pip install modelscope (or use --hub huggingface, with "
           "HF_ENDPOINT=https://hf-mirror.com for a mirror)"),      # None in sys.modules: `import` fails
    (SimpleNamespace(), "it is installed but fails to import (cannot import name 'snapshot_download'"),
], ids=["not-installed", "broken"])
def test_without_a_working_modelscope_one_line_says_how_to_install_it(monkeypatch, module, expected):
    monkeypatch.setitem(sys.modules, "modelscope", module)
    with pytest.raises(UsageError) as e:
        resolve_model(QWEN, "modelscope", UsageError)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_failed_download_is_one_line_naming_the_id_and_the_cause(monkeypatch):
    def snapshot_download(model_id, **kwargs):
        raise ConnectionError("HTTPSConnectionPool(host='www.modelscope.cn', port=443): Max retries exceeded\n"
                              "Caused by NewConnectionError: [Errno -2] Name or service not known")
    monkeypatch.setitem(sys.modules, "modelscope", SimpleNamespace(snapshot_download=snapshot_download))
    with pytest.raises(UsageError) as e:
        resolve_model(QWEN, "modelscope", UsageError)
    assert str(e.value).startswith("cannot download qwen/Qwen1.5-1.8B-Chat from ModelScope (ConnectionError: "
                                   "HTTPSConnectionPool(host='www.modelscope.cn', port=443): Max retries exceeded)")
    assert "\n" not in str(e.value)


def test_an_unknown_hub_is_refused():
    with pytest.raises(UsageError, match="--hub must be one of huggingface, modelscope, got 'hf'"):
        resolve_model(QWEN, "hf", UsageError)


@pytest.mark.parametrize("value, hub", [
    (None, "huggingface"), ("0", "huggingface"), ("", "huggingface"), ("false", "huggingface"),
    ("1", "modelscope"), ("true", "modelscope"), ("TRUE", "modelscope"), ("y", "modelscope"),
])
def test_use_modelscope_hub_sets_the_default_as_in_llama_factory(monkeypatch, value, hub):
    if value is None:
        monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    else:
        monkeypatch.setenv("USE_MODELSCOPE_HUB", value)
    assert default_hub() == hub
    p = argparse.ArgumentParser()
    add_hub_flag(p)
    assert p.parse_args([]).hub == hub
    assert p.parse_args(["--hub", "huggingface"]).hub == "huggingface"  # the flag beats the variable
    assert p.parse_args(["--hub", "modelscope"]).hub == "modelscope"


def test_modelscope_ids():
    assert modelscope_id(QWEN) == "qwen/Qwen1.5-1.8B-Chat"
    assert modelscope_id("Qwen/Qwen1.5-1.8B") == "qwen/Qwen1.5-1.8B"
    for same in ("Qwen/Qwen2.5-7B-Instruct", "qwen/Qwen1.5-1.8B-Chat", "deepseek-ai/deepseek-llm-7b-chat"):
        assert modelscope_id(same) == same


@pytest.mark.parametrize("relative", CACHE_FOLDERS)
def test_a_hub_download_is_the_same_base_as_its_id(tmp_path, relative):
    """An adapter trained on ModelScope's download records that folder; chat.py --model_name_or_path QWEN (and
    finetune.py's output-dir check) must accept it, on this machine or, with the folder gone, on another."""
    folder = tmp_path / relative
    folder.mkdir(parents=True)
    assert model_name(str(folder)) == model_name(str(folder) + "/") == "Qwen1.5-1.8B-Chat"
    for recorded, given in ((str(folder), QWEN), ("qwen/Qwen1.5-1.8B-Chat", str(folder))):
        assert same_base(recorded, given) and same_base(given, recorded)
    assert not same_base(str(folder), "Qwen/Qwen1.5-0.5B-Chat")
    elsewhere = f"/home/someone/.cache/{relative}"  # recorded on another machine: no such folder here
    assert same_base(elsewhere, QWEN) and not same_base(elsewhere, "Qwen/Qwen1.5-0.5B-Chat")


def test_same_base_for_two_ids_and_two_folders(tmp_path):
    assert same_base(QWEN, "qwen/Qwen1.5-1.8B-Chat")  # the hubs are case-insensitive
    assert not same_base(QWEN, "someone/Qwen1.5-1.8B-Chat")  # another owner: maybe a fine-tuned copy
    a, b = tmp_path / "a" / "Qwen1.5-1.8B-Chat", tmp_path / "b" / "Qwen1.5-1.8B-Chat"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    (tmp_path / "link").symlink_to(a)
    assert same_base(str(a), str(tmp_path / "link")) and not same_base(str(a), str(b))


# ---------------------------------------------------------------- the scripts' wiring (real processes)

@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """Two stub `modelscope` packages for PYTHONPATH: `ok` (snapshot_download appends the id to
    $FAKE_MODELSCOPE_LOG and returns $FAKE_MODELSCOPE_DIR) and `missing` (importing it fails as when the
    package is not installed, whether or not the real one is)."""
    root = tmp_path_factory.mktemp("stubs")
    for name, code in {
        "ok": "import json, os\n\n\ndef snapshot_download(model_id, **kwargs):\n"
              "    with open(os.environ['FAKE_MODELSCOPE_LOG'], 'a') as f:\n"
              "        f.write(json.dumps(model_id) + '\\n')\n"
              "    return os.environ['FAKE_MODELSCOPE_DIR']\n",
        "missing": "raise ModuleNotFoundError(\"No module named 'modelscope'\", name='modelscope')\n",
    }.items():
        (root / name / "modelscope").mkdir(parents=True)
        (root / name / "modelscope" / "__init__.py").write_text(code, encoding="utf-8")
    return root


def stub_env(stubs, which: str, **extra) -> dict:
    path = os.pathsep.join(filter(None, [str(stubs / which), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, **extra}


def test_chat_answers_with_a_model_from_modelscope(stubs, tiny_model_dir, tmp_path):
    """chat.py --hub modelscope QWEN: the stub is asked for ModelScope's id and its folder is loaded (the hub id
    itself cannot be: tests run with HF_HUB_OFFLINE=1 and no network)."""
    log = tmp_path / "calls.jsonl"
    env = stub_env(stubs, "ok", FAKE_MODELSCOPE_LOG=str(log), FAKE_MODELSCOPE_DIR=str(tiny_model_dir))
    proc = run_script("phase2_lora/chat.py", "--hub", "modelscope", "--model_name_or_path", QWEN, "--prompt", "你好",
                      "--greedy", "--max_new_tokens", 4, "--quantization", "none", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(line) for line in log.read_text().splitlines()] == ["qwen/Qwen1.5-1.8B-Chat"]
    assert isinstance(json.loads(proc.stdout), str)  # one answer line


@pytest.mark.parametrize("script, args, env", [
    ("phase2_lora/finetune.py", [], {"USE_MODELSCOPE_HUB": "1"}),  # the variable alone, no flag
    ("phase3_ddp/finetune_ddp.py", ["--hub", "modelscope"], {}),
    ("phase2_lora/serve.py", ["--hub", "modelscope", "--port", "PORT"], {}),
])
def test_each_script_says_how_to_install_modelscope(stubs, tmp_path, script, args, env):
    args = [str(free_port()) if a == "PORT" else a for a in args]
    if "finetune" in script:  # a data file that exists: finetune_ddp.py checks it before anything else loads
        args += ["--output_dir", tmp_path / "out", "--data_path", PERSONA_PATH]
    proc = run_script(script, *args, "--model_name_or_path", QWEN, env=stub_env(stubs, "missing", **env),
                      timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "needs the modelscope package: pip install modelscope" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
