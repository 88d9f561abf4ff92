"""finetune.py records the base model of an adapter (adapter_config.json's base_model_name_or_path) as an absolute
path when it is a local folder, so chat.py finds it from any working directory; a hub id is recorded as it is."""

import json
import os
import subprocess
import sys

from conftest import PERSONA_PATH, REPO, run_script

sys.path.insert(0, str(REPO / "phase2_lora"))
from finetune import absolute_if_local  # noqa: E402


def test_a_hub_id_stays_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder Qwen/ here
    assert absolute_if_local("Qwen/Qwen1.5-1.8B-Chat") == "Qwen/Qwen1.5-1.8B-Chat"
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert absolute_if_local("models/tiny") == str(tmp_path.resolve() / "models" / "tiny")


def test_relative_base_is_recorded_absolute_and_chat_runs_elsewhere(tiny_model_dir, tmp_path):
    relative = os.path.relpath(tiny_model_dir, REPO)  # finetune.py runs in REPO: given as a user types it
    out = tmp_path / "lora"
    proc = run_script("phase2_lora/finetune.py", "--model_name_or_path", relative, "--data_path", PERSONA_PATH,
                      "--output_dir", out, "--max_samples", 2, "--val_size", 0, "--max_steps", 1, "--batch_size", 2,
                      "--grad_accum", 1, "--save_steps", 1000, "--quantization", "none", "--no_cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    assert not os.path.isabs(relative) and recorded == str(tiny_model_dir.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    chat = subprocess.run([sys.executable, str(REPO / "phase2_lora" / "chat.py"), "--adapter", str(out), "--greedy",
                           "--max_new_tokens", "4", "--prompt", "你好"], cwd=elsewhere, capture_output=True, text=True,
                          timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert len(chat.stdout.splitlines()) == 1 and "found at" not in chat.stderr  # no search for a relative base
