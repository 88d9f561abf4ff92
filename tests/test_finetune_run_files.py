"""run_files: complete-checkpoint detection, same-base check, run_args.json and the --resume settings check."""

import json
import sys

import pytest
from conftest import REPO, write_json

sys.path.insert(0, str(REPO / "phase2_lora"))
from qlora_model import UsageError  # noqa: E402
from run_files import (  # noqa: E402
    check_output_dir,
    check_resume_args,
    data_fingerprint,
    latest_checkpoint,
    save_loss_curve,
    write_run_args,
)

RESUME_KEYS = ["data_path", "max_seq_len", "lr", "batch_size", "grad_accum", "lora_r"]


def make_checkpoint(out, step, complete=True, marker="trainer_state.json", base="tiny"):
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    write_json(ckpt / "adapter_config.json", {"base_model_name_or_path": base})
    if complete:
        write_json(ckpt / marker, {"global_step": step})
    return ckpt


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    make_checkpoint(tmp_path, 9)
    make_checkpoint(tmp_path, 10)               # numerically newer than 9, although "10" < "9" as text
    make_checkpoint(tmp_path, 11, complete=False)  # a save cut short: no marker
    (tmp_path / "checkpoint-last").mkdir()      # not a step number
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    make_checkpoint(tmp_path, 12, marker="state.json")
    assert latest_checkpoint(tmp_path, marker="state.json").name == "checkpoint-12"


def test_check_output_dir(tmp_path, capsys):
    assert check_output_dir(tmp_path, "tiny", resume=True) is None
    assert "starting from scratch" in capsys.readouterr().out
    make_checkpoint(tmp_path, 5)
    assert check_output_dir(tmp_path, "tiny", resume=True).name == "checkpoint-5"
    with pytest.raises(UsageError, match="pass --resume"):
        check_output_dir(tmp_path, "tiny", resume=False)
    with pytest.raises(UsageError, match="base model 'tiny', not 'other'"):
        check_output_dir(tmp_path, "other", resume=True)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_broken_adapter_config_is_a_usage_error(tmp_path, text):
    (tmp_path / "adapter_config.json").write_text(text, encoding="latin-1")
    with pytest.raises(UsageError, match="not a valid adapter config"):
        check_output_dir(tmp_path, "tiny", resume=False)


def test_resume_refuses_changed_settings_and_names_each(tmp_path):
    args = {"data_path": ["a.json"], "max_seq_len": 512, "lr": 2e-4, "batch_size": 4, "grad_accum": 4, "lora_r": 16,
            "max_steps": 100, "epochs": 1.0}
    write_run_args(tmp_path, args)
    assert json.loads((tmp_path / "run_args.json").read_text(encoding="utf-8")) == args
    check_resume_args(tmp_path, {**args, "max_steps": 200, "epochs": 3.0}, RESUME_KEYS)  # training longer is fine
    check_resume_args(tmp_path, {**args, "data_path": ("a.json",)}, RESUME_KEYS)  # a tuple equals its JSON list
    with pytest.raises(UsageError) as e:
        check_resume_args(tmp_path, {**args, "lr": 1e-3, "data_path": ["b.json"], "lora_r": 8}, RESUME_KEYS)
    msg = str(e.value)
    for part in ("--lr 0.0002 -> 0.001", "--data_path a.json -> b.json", "--lora_r 16 -> 8"):
        assert part in msg
    assert "--batch_size" not in msg and "--max_steps" not in msg


def test_resume_without_run_args_or_with_older_ones(tmp_path, capsys):
    check_resume_args(tmp_path, {"lr": 1.0}, ["lr"])  # no run_args.json: nothing to compare
    assert "cannot check" in capsys.readouterr().out
    write_run_args(tmp_path, {"lr": 1.0})
    check_resume_args(tmp_path, {"lr": 1.0, "lora_r": 8}, ["lr", "lora_r"])  # lora_r not recorded: not compared
    (tmp_path / "run_args.json").write_text("[]", encoding="utf-8")
    with pytest.raises(UsageError, match="not a valid run_args.json"):
        check_resume_args(tmp_path, {"lr": 1.0}, ["lr"])


def test_save_loss_curve_writes_a_png(tmp_path):
    path = tmp_path / "loss_curve.png"
    save_loss_curve([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval_loss": 1.5}], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loss_curve.png"]  # no temp file left behind


def test_an_edited_data_file_is_a_different_data_set(tmp_path):
    """--resume compares the data files' content, not just their paths (both phases record data_sha256)."""
    data = write_json(tmp_path / "a.json", [{"instruction": "hi", "output": "hello"}])
    before = data_fingerprint([data])
    assert data_fingerprint([data]) == before and len(before) == 16
    write_json(data, [{"instruction": "hi", "output": "hello!"}])  # same path, one byte more
    assert data_fingerprint([data]) != before
    write_run_args(tmp_path / "run", {"data_path": [str(data)], "data_sha256": before})
    with pytest.raises(UsageError, match=r"content of the --data_path files \(sha256\) \w+ -> \w+"):
        check_resume_args(tmp_path / "run", {"data_path": [str(data)], "data_sha256": data_fingerprint([data])},
                          ["data_path", "data_sha256"])
    with pytest.raises(UsageError) as e:  # a changed flag explains the new hash: only the flag is named
        check_resume_args(tmp_path / "run", {"data_path": ["b.json"], "data_sha256": "0" * 16},
                          ["data_path", "data_sha256"])
    assert "--data_path" in str(e.value) and "sha256" not in str(e.value)
    with pytest.raises(UsageError, match="data file not found"):
        data_fingerprint([tmp_path / "missing.json"])
    import finetune
    assert "data_sha256" in finetune.RESUME_KEYS
