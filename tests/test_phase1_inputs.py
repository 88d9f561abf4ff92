"""Phase 1's bad input: broken or hostile data files, wrong run settings and checkpoints, every numeric flag's
refused values, huge counts. The cases call main() in-process (same code path, without paying torch's import time per
case), plus one real subprocess to show the CLI's exit code and single stderr line. Shared helpers and the trained
run (cnn_run) come from tests/cifar_fixtures.py."""

import hashlib
import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch
from cifar_fixtures import LENET_ARGS, load_phase1, py2_pickle, train

pytest_plugins = ["cifar_fixtures"]  # the session fixtures cifar_dir and cnn_run, shared with test_phase1_cnn.py


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


class RunsCode:
    """A pickle that would call os.makedirs(marker) when loaded by a plain pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def bad_batch(data, labels) -> bytes:
    return py2_pickle({b"data": data, b"labels": labels})


BAD_FILES = {  # case: (file to replace, new content or None to delete, expected message)
    "missing": ("data_batch_3", None,
                "data_batch_3 is missing: run with --download, or unpack the CIFAR-10 python archive there"),
    "corrupt": ("data_batch_2", b"\x80\x02this is not a pickle", "data_batch_2 is not a readable CIFAR-10 pickle"),
    "shape": ("data_batch_1", bad_batch(np.zeros((5, 1024), np.uint8), [0] * 5),
              "data has shape (5, 1024), expected (N, 3072)"),
    "dtype": ("test_batch", bad_batch(np.zeros((5, 3072), np.float32), [0] * 5),
              "data has dtype float32, expected uint8"),
    "labels": ("data_batch_4", bad_batch(np.zeros((5, 3072), np.uint8), [0, 1, 12, 3, 4]),
               "labels must be in 0..9, found 12"),
    "count": ("data_batch_5", bad_batch(np.zeros((5, 3072), np.uint8), [0, 1]), "5 images but 2 labels"),
    "meta": ("batches.meta", py2_pickle({b"label_names": [b"cat"]}), "expected 'label_names' with 10 entries"),
}


@pytest.fixture
def guarded_run(cnn_run, tmp_path):
    """A copy of a finished run's outputs; every bad-input case points at it, and none may change it."""
    out = tmp_path / "guarded"
    shutil.copytree(cnn_run, out)
    before = digest(out)
    yield out
    assert digest(out) == before, "a failed run touched existing outputs"


def expect_bad_input(capsys, module_name: str, argv: list, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_phase1(module_name).main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_data_file(case, cifar_dir, guarded_run, tmp_path, capsys):
    data_dir = tmp_path / "data"
    shutil.copytree(cifar_dir, data_dir)
    name, content, message = BAD_FILES[case]
    target = data_dir / "cifar-10-batches-py" / name
    target.unlink() if content is None else target.write_bytes(content)
    expect_bad_input(capsys, "train", ["--data_dir", data_dir, "--output_dir", guarded_run, "--overwrite",
                                       *LENET_ARGS], message)


def test_pickle_cannot_run_code(cifar_dir, guarded_run, tmp_path, capsys):
    data_dir, marker = tmp_path / "data", tmp_path / "pwned"
    shutil.copytree(cifar_dir, data_dir)
    (data_dir / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": RunsCode(str(marker))}))
    expect_bad_input(capsys, "train", ["--data_dir", data_dir, "--output_dir", guarded_run, "--overwrite"],
                     "refusing to load")
    assert not marker.exists()


def test_bad_run_settings_and_checkpoints(cifar_dir, guarded_run, tmp_path, capsys):
    common = ["--data_dir", cifar_dir]
    expect_bad_input(capsys, "train", [*common, "--output_dir", guarded_run, *LENET_ARGS],
                     "already holds a run")
    expect_bad_input(capsys, "train", [*common, "--output_dir", guarded_run, "--resume", "--model", "lenet5"],
                     "last.pt was trained with --model resnet9, not lenet5")
    expect_bad_input(capsys, "train", [*common, "--output_dir", tmp_path / "empty", "--resume"],
                     "last.pt not found: nothing to resume")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    expect_bad_input(capsys, "evaluate", [*common, "--checkpoint", tmp_path / "junk.pt"],
                     "junk.pt is not a checkpoint: point to best.pt or last.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:  # a zip archive, but not one torch.save wrote
        z.writestr("notes.txt", "hello")
    expect_bad_input(capsys, "evaluate", [*common, "--checkpoint", tmp_path / "other.zip"],
                     "other.zip is not a readable checkpoint")
    expect_bad_input(capsys, "evaluate", [*common, "--checkpoint", tmp_path / "missing.pt"],
                     "missing.pt not found: train one first")
    expect_bad_input(capsys, "train", [*common, "--output_dir", tmp_path / "empty", "--cutout", 40],
                     "argument --cutout: expected a whole number in 0..32, got '40' (see --help)")
    expect_bad_input(capsys, "evaluate", [*common, "--checkpoint", guarded_run / "best.pt", "--batch_size", 0],
                     "argument --batch_size: expected a whole number >= 1, got '0'")
    assert not (tmp_path / "empty").exists()


def test_evaluate_takes_a_run_folder_and_names_a_file_that_is_no_checkpoint(cnn_run, cifar_dir, tmp_path, capsys):
    """--checkpoint <folder> evaluates the folder's best.pt; --checkpoint metrics.json says in one line that it is
    not a checkpoint (it used to print PyTorch's long weights_only message)."""
    run = tmp_path / "run"
    shutil.copytree(cnn_run, run)
    (run / "eval.json").unlink(missing_ok=True)  # written when an earlier test evaluated the run
    load_phase1("evaluate").main(["--checkpoint", str(run), "--data_dir", str(cifar_dir)])
    assert f"{run / 'best.pt'} (epoch" in capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    assert report["checkpoint"] == str(run / "best.pt") and report["epoch"] == torch.load(
        run / "best.pt", weights_only=True)["epoch"]
    expect_bad_input(capsys, "evaluate", ["--checkpoint", run / "metrics.json", "--data_dir", cifar_dir],
                     f"{run / 'metrics.json'} is not a checkpoint: point to best.pt or last.pt")


HUGE = str(10**30)
# Flags that take a huge value (phase 2's policy, tests/test_flag_values.py): counts past the data are capped where
# they are used (--batch_size, --val_size, --max_train_samples, --num_images, --steps), lengths are merely long
# (--epochs, --repeats), --lr is a finite float. Every other flag has a natural bound that a huge value is past:
# a fraction in [0, 1), --cutout within the 32-pixel image, --seed within numpy's uint32, and the model width and
# worker counts, which size what is allocated or spawned before the first step.
HUGE_OK = {
    "train": {"--epochs", "--batch_size", "--lr", "--val_size", "--max_train_samples", "--save_every",
              "--stop_after_epoch"},
    "evaluate": {"--batch_size"},
    "benchmark": {"--batch_size", "--steps", "--warmup", "--repeats", "--num_images"},
}


@pytest.mark.parametrize("script", ["train", "evaluate", "benchmark"])
def test_every_numeric_flag_refuses_what_cannot_work_in_one_line(script, capsys):
    """Each numeric flag, walked from the script's own parser: inf, nan and -1 each get one line,
    `error: argument --flag: ... (see --help)`, and exit 2, before any work (no traceback, no OverflowError); a huge
    value too, unless the flag is in HUGE_OK, where it parses."""
    module = load_phase1(script)
    actions = [a for a in module.build_parser()._actions if a.option_strings and a.type is not None]
    assert all(hasattr(a.type, "checked_range") for a in actions), [a.dest for a in actions]  # no bare int/float
    flags = {a.option_strings[0] for a in actions}
    assert HUGE_OK[script] < flags and len(flags - HUGE_OK[script]) >= 1
    for flag in sorted(flags):
        for value in ("inf", "nan", "-1", *(() if flag in HUGE_OK[script] else (HUGE,))):
            with pytest.raises(SystemExit) as exit_info:
                module.build_parser().parse_args([flag, value])
            err = capsys.readouterr().err.strip()
            assert exit_info.value.code == 2 and len(err.splitlines()) == 1, (flag, value, err)
            assert err.startswith(f"error: argument {flag}: expected ") and err.endswith(
                f"got {value!r} (see --help)"), err
        if flag in HUGE_OK[script]:
            parsed = getattr(module.build_parser().parse_args([flag, HUGE]), flag[2:])
            assert parsed == (float(HUGE) if flag == "--lr" else int(HUGE)), (flag, parsed)


def test_huge_counts_are_capped_and_a_huge_run_resumes(cifar_dir, tmp_path, capsys):
    """A run with every count flag at 10**30: the batch is the whole training set (one step an epoch), validation
    holds out its fifth, every image trains; the checkpoint (10**30 in its settings) resumes; evaluate takes a huge
    batch. Issue 23's cases are refused in one line through main()."""
    train_py, out = load_phase1("train"), tmp_path / "huge"
    argv = ["--data_dir", cifar_dir, "--output_dir", out, "--model", "lenet5", "--epochs", HUGE, "--batch_size", HUGE,
            "--val_size", HUGE, "--max_train_samples", HUGE, "--save_every", HUGE]
    train_py.main([str(a) for a in [*argv, "--stop_after_epoch", 1]])
    printed = capsys.readouterr().out
    assert "holding out 50" in printed and "data: 200 train / 50 val / 100 test" in printed, printed
    train_py.main([str(a) for a in [*argv, "--resume", "--stop_after_epoch", 2]])
    printed = capsys.readouterr().out
    assert f"resuming {out / 'last.pt'} after epoch 1 of {HUGE}" in printed and f"epoch   2/{HUGE}" in printed, printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["epochs"] == 10**30 and len(metrics["history"]) == 2
    load_phase1("evaluate").main(["--checkpoint", str(out), "--data_dir", str(cifar_dir), "--batch_size", HUGE])
    assert "test accuracy" in capsys.readouterr().out
    safe = ["--data_dir", tmp_path / "none", "--output_dir", tmp_path / "out"]
    expect_bad_input(capsys, "train", [*safe, "--val_size", "inf"], "argument --val_size: expected a whole")
    expect_bad_input(capsys, "train", [*safe, "--seed", 2**32], f"expected a whole number in 0..{2**32 - 1}")
    expect_bad_input(capsys, "train", [*safe, "--seed", -1], f"expected a whole number in 0..{2**32 - 1}")
    assert train_py.parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1  # the range is numpy's [0, 2**32)
    expect_bad_input(capsys, "benchmark", ["--synthetic", "--num_images", 100, "--batch_size", HUGE],
                     "100 images give too few batches")


def test_reader_admits_what_pickle_dump_writes_under_numpy_2(tmp_path):
    """A user's own images in the official layout, written with pickle.dump under the installed numpy (numpy 2 names
    numpy._core.multiarray._reconstruct), read back exactly. No new capability: protocol 5 names numpy's
    _frombuffer, still refused, with the fix in the message."""
    data = load_phase1("cifar_data")
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({"data": pixels, "labels": [0, 3, 9, 1]}, f, protocol=4)
    if int(np.__version__.split(".")[0]) >= 2:
        assert b"numpy._core.multiarray" in path.read_bytes()
    images, labels = data.read_batch_file(str(path))
    assert torch.equal(images, torch.from_numpy(pixels).view(4, 3, 32, 32)) and labels.tolist() == [0, 3, 9, 1]
    with open(path, "wb") as f:
        pickle.dump({"data": pixels, "labels": [0, 3, 9, 1]}, f, protocol=5)
    with pytest.raises(data.BadInput, match=r"refusing to load numpy\._core\.numeric\._frombuffer, .*protocol=4"):
        data.read_batch_file(str(path))


def test_cli_device_cuda_without_cuda(cifar_dir, guarded_run):
    """The real command line: exit code 2, one line on stderr, no traceback (CUDA hidden even on a GPU machine)."""
    proc = train(cifar_dir, guarded_run, "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --device cuda was asked for, but torch sees no CUDA GPU (CPU-only torch build or no driver): "
        "install a CUDA build of torch (see README), or use --device cpu"]
