"""Phase 1: the CIFAR-10 trainer on a small learnable data set written in the real CIFAR-10 pickle format.

Training runs as a user runs it (subprocess); the bad-input cases call main() in-process (same code path, without
paying torch's import time per case), plus one real subprocess to show the CLI's exit code and single stderr line."""

import hashlib
import importlib.util
import itertools
import json
import os
import pickle
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cifar_fixtures import CLASS_NAMES, py2_pickle, write_cifar_like
from conftest import REPO, run_script

PHASE = REPO / "phase1_cnn"
# Small budgets that still learn the data below well above chance (0.1) on a CPU in a few seconds.
LENET_ARGS = ["--model", "lenet5", "--epochs", "12", "--batch_size", "20", "--lr", "0.01", "--val_size", "50"]
CNN_ARGS = ["--model", "resnet9", "--width", "16", "--epochs", "4", "--batch_size", "25", "--lr", "0.2",
            "--val_size", "50"]


def load_phase1(name: str):
    """Import phase1_cnn/<name>.py in-process under a unique module name; siblings resolve via sys.path."""
    if str(PHASE) not in sys.path:
        sys.path.append(str(PHASE))  # appended: never shadows an installed package
    spec = importlib.util.spec_from_file_location(f"phase1_{name}", PHASE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Tiny models gain nothing from intra-op threads, and on a busy machine spinning OpenMP threads slow them 5x.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_phase1(script: str, *args, env: dict | None = None):
    return run_script(f"phase1_cnn/{script}", *args, env={**ONE_THREAD, **(env or {})})


def train(data_dir, out_dir, *args, **kw):
    return run_phase1("train.py", "--data_dir", data_dir, "--output_dir", out_dir, *args, **kw)


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_cifar_like(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def cnn_run(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn_run")
    proc = train(cifar_dir, out, *CNN_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def check_trained_run(out, data_dir, tta: bool = False):
    """Accuracy far above chance, best.pt chosen on validation, evaluate.py reproducing the recorded test accuracy
    (and with tta, evaluate.py --tta also far above chance)."""
    metrics = json.loads((out / "metrics.json").read_text())
    val_accs = [h["val_acc"] for h in metrics["history"]]
    assert metrics["best"]["val_acc"] == max(val_accs) >= 0.8, val_accs
    assert metrics["test"]["accuracy"] >= 0.8, metrics["test"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == metrics["best"]["epoch"] == val_accs.index(max(val_accs)) + 1  # first epoch at the max
    assert best["class_names"] == CLASS_NAMES and {"optimizer", "scheduler", "args"} <= best.keys()

    proc = run_phase1("evaluate.py", "--checkpoint", out / "best.pt", "--data_dir", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["test_accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-9)
    confusion = np.array(report["confusion_matrix"])
    assert confusion.sum() == report["num_images"] == 100
    assert np.trace(confusion) / confusion.sum() == pytest.approx(report["test_accuracy"])
    assert list(report["per_class_accuracy"]) == CLASS_NAMES
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "ship" in proc.stdout and "test accuracy" in proc.stdout and not report["tta"]
    if not tta:
        return
    proc = run_phase1("evaluate.py", "--checkpoint", out / "best.pt", "--data_dir", data_dir, "--tta")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["tta"] and report["test_accuracy"] >= 0.8 and "(flip TTA)" in proc.stdout


def test_reader_and_batch_augmentation_match_references(cifar_dir):
    """The reader undoes the R,G,B-plane layout; crop_flip equals F.pad(reflect) + slicing + flip; normalize equals
    (x/255 - mean)/std."""
    data = load_phase1("cifar_data")
    images, labels, names = data.load_cifar10(str(cifar_dir), "train")
    raw = pickle.loads((cifar_dir / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="bytes")
    assert images.shape == (250, 3, 32, 32) and images.dtype == torch.uint8 and names == CLASS_NAMES
    assert torch.equal(images[7], torch.from_numpy(raw[b"data"][7]).view(3, 32, 32))
    assert labels[:50].tolist() == raw[b"labels"]

    x = images[:64]
    out = data.crop_flip(x, torch.Generator().manual_seed(3), pad=4)
    gen = torch.Generator().manual_seed(3)  # replay the same draws
    dy, dx = torch.randint(0, 9, (2, 64, 1), generator=gen)
    flip = torch.rand(64, 1, generator=gen) < 0.5
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")  # (64, 3, 40, 40)
    for i in range(64):
        ref = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i].float(), ref.flip(-1) if flip[i] else ref), i
    assert flip.any() and not flip.all() and len(set(dy.flatten().tolist())) > 3

    mean, std = torch.tensor(data.CIFAR_MEAN).view(3, 1, 1), torch.tensor(data.CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(data.normalize(x), (x.float() / 255 - mean) / std)


def test_lenet5_learns_and_evaluate_reproduces(cifar_dir, tmp_path):
    proc = train(cifar_dir, tmp_path, *LENET_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch  12/12 | train loss" in proc.stdout and "62,006 parameters" in proc.stdout
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr  # stderr is a pipe: no progress bars in the log
    check_trained_run(tmp_path, cifar_dir)


def test_cnn_learns_and_evaluate_reproduces(cnn_run, cifar_dir):
    check_trained_run(cnn_run, cifar_dir, tta=True)


def test_resume_ends_where_the_uninterrupted_run_ends(cnn_run, cifar_dir, tmp_path):
    stopped = train(cifar_dir, tmp_path, *CNN_ARGS, "--stop_after_epoch", "2")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    # Every setting comes from last.pt ('cnn' is resnet9's old name); the batches now come from tensors indexed
    # directly instead of the DataLoader: the same batches, so still the same run.
    resumed = train(cifar_dir, tmp_path, "--resume", "--model", "cnn", "--loader", "device")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "batches from tensors on cpu" in resumed.stdout
    assert "resuming" in resumed.stdout and "epoch   3/4" in resumed.stdout and "epoch   1/4" not in resumed.stdout

    ref, got = (torch.load(d / "last.pt", weights_only=True) for d in (cnn_run, tmp_path))
    assert ref["model"].keys() == got["model"].keys()
    for name, tensor in ref["model"].items():  # weights and BatchNorm running statistics
        assert torch.equal(tensor, got["model"][name]), name
    for ref_state, got_state in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values(),
                                    strict=True):
        assert torch.equal(ref_state["momentum_buffer"], got_state["momentum_buffer"])
    drop_time = lambda run: [{k: v for k, v in h.items() if k != "seconds"} for h in run["history"]]
    assert drop_time(got) == drop_time(ref)
    ref_metrics, got_metrics = (json.loads((d / "metrics.json").read_text()) for d in (cnn_run, tmp_path))
    assert got_metrics["test"] == ref_metrics["test"]


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


def test_benchmark_prints_every_pipeline_row():
    """The table's shape, not its numbers: a header, one row per pipeline with a positive rate and its ratio to the
    textbook default, the padding caveat."""
    proc = run_phase1("benchmark.py", "--synthetic", "--num_images", "512", "--batch_size", "64",
                      "--steps", "3", "--warmup", "1", "--textbook_workers", "1", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("pipeline"))
    assert lines[header].split()[1:] == ["images/s", "x", "textbook"]
    rows = [ln.rsplit(maxsplit=2) for ln in lines[header + 1:header + 6]]
    assert [r[0].split(" (")[0] for r in rows] == [
        "textbook", "textbook + 1 workers", "ours", "ours, no DataLoader", "model only"], rows
    assert all(float(rate) > 0 and ratio.endswith("x") for _, rate, ratio in rows)
    assert rows[0][2] == "1.00x"
    assert "pads with zeros" in proc.stdout


def test_cutout_zeroes_one_square_of_size_squared_pixels_inside_each_image():
    data = load_phase1("cifar_data")
    x = torch.rand(64, 3, 32, 32) + 1  # no pixel is zero before cutout
    for size in (1, 8, 32):
        out = data.cutout(x, torch.Generator().manual_seed(size), size)
        holes = out == 0  # (64, 3, 32, 32)
        assert torch.equal(holes, holes[:, :1].expand_as(holes)), "the hole spans all channels"
        holes = holes[:, 0]  # (64, 32, 32)
        assert holes.sum((1, 2)).tolist() == [size * size] * 64  # never clipped at the border
        rows, cols = holes.any(2), holes.any(1)  # (64, 32) each
        assert rows.sum(1).tolist() == cols.sum(1).tolist() == [size] * 64  # a size x size square
        assert torch.equal(out[~holes[:, None].expand_as(out)], x[~holes[:, None].expand_as(x)])
        if size == 8:
            assert len({int(r.nonzero()[0]) for r in rows}) > 5  # positions vary


def test_learning_rate_schedule_as_the_optimizer_sees_it():
    """ResNet-9 recipe, 24 epochs of 10 steps: warm-up over ceil(5/24 * 240) = 50 steps to the peak 0.4 at the last
    warm-up step (step 49), used once, then linearly down to 0.4/191 at the last step (and 0 after it)."""
    train = load_phase1("train")
    run = {**train.COMMON, **train.RECIPES["resnet9"], "width": 4}
    t = train.build_training(run, torch.device("cpu"), steps_per_epoch=10, compile_model=False)
    lrs = []
    for _ in range(240):
        lrs.append(t.optimizer.param_groups[0]["lr"])  # the rate the next optimizer.step() uses
        t.optimizer.step()
        t.scheduler.step()
    assert lrs[0] == pytest.approx(0.4 / 50) and lrs[49] == pytest.approx(0.4) == max(lrs)
    assert lrs[50] == pytest.approx(0.4 * 190 / 191) and lrs[-1] == pytest.approx(0.4 / 191)
    assert t.optimizer.param_groups[0]["lr"] == 0
    assert all(a < b for a, b in itertools.pairwise(lrs[:50])) and all(a > b for a, b in itertools.pairwise(lrs[49:]))


def test_device_batches_are_the_dataloader_batches():
    """The GPU path's batches (tensors indexed by a per-epoch permutation, no DataLoader) equal the DataLoader's,
    shuffled and in order, run on the CPU here. Each epoch reseeds the generator, as train.py does."""
    data = load_phase1("cifar_data")
    images, labels = torch.randint(0, 256, (103, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (103,))
    cpu = torch.device("cpu")
    for shuffle in (True, False):
        gens = [torch.Generator().manual_seed(5) if shuffle else None for _ in range(2)]
        loader = data.make_batches(images, labels, 10, gens[0], cpu, on_device=False)
        direct = data.make_batches(images, labels, 10, gens[1], cpu, on_device=True)
        assert isinstance(direct, data.DeviceBatches) and len(direct) == len(loader) == (10 if shuffle else 11)
        orders = []
        for epoch in range(2):  # a second epoch has a new order, the same in both
            for gen in gens if shuffle else []:
                gen.manual_seed(epoch)
            got, ref = list(direct), list(loader)
            for (x, y), (rx, ry) in zip(got, ref, strict=True):
                assert torch.equal(x, rx) and torch.equal(y, ry)
            orders.append(torch.cat([y for _, y in got]))
        assert shuffle != torch.equal(orders[0], labels[:len(orders[0])]) and shuffle != torch.equal(*orders)


def test_flip_tta_averages_an_image_and_its_mirror():
    loops, models = load_phase1("cifar_loops"), load_phase1("cifar_models")
    torch.manual_seed(0)
    model, cpu = models.build_model("lenet5").eval(), torch.device("cpu")
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        plain, tta = loops.predict(model, x, cpu), loops.predict(model, x, cpu, tta=True)
        torch.testing.assert_close(tta, loops.predict(model, x.flip(-1), cpu, tta=True))  # left-right invariant
        torch.testing.assert_close(tta, (plain + model(x.flip(-1))) / 2)
    assert not torch.allclose(tta, plain)


def test_overwrite_deletes_the_old_run_before_training(cnn_run, cifar_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(cnn_run, out)
    (out / "eval.json").write_text("{}")
    (out / "confusion_matrix.png").write_bytes(b"old")
    load_phase1("train").main([str(a) for a in ("--data_dir", cifar_dir, "--output_dir", out, "--overwrite",
                                                *LENET_ARGS, "--stop_after_epoch", 1)])  # in-process: no start-up
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.json"]
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert ckpt["args"]["model"] == "lenet5" and ckpt["epoch"] == 1
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1]


@pytest.mark.gpu
def test_gpu_training_step_never_waits_then_resume_and_evaluate(cifar_dir, tmp_path):
    """CUDA: 2 epochs with every host<->device sync inside the training loop turned into an error (--check_sync), on
    the default GPU path (uint8 data on the device), then --resume to the end, then evaluate.py with flip TTA."""
    args = [*CNN_ARGS, "--device", "cuda", "--check_sync"]
    first = train(cifar_dir, tmp_path, *args, "--stop_after_epoch", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "batches from tensors on cuda" in first.stdout and "autocast, channels_last" in first.stdout
    resumed = train(cifar_dir, tmp_path, "--resume", "--device", "cuda", "--check_sync", "--tta")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch   3/4" in resumed.stdout and "(flip TTA)" in resumed.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.5 and metrics["test"]["tta"]
    proc = run_phase1("evaluate.py", "--checkpoint", tmp_path / "best.pt", "--data_dir", cifar_dir, "--tta")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["test_accuracy"] == pytest.approx(
        metrics["test"]["accuracy"], abs=0.02)  # cuDNN autotuning: equal only up to float noise


@pytest.mark.gpu
def test_gpu_compile(cifar_dir, tmp_path):
    proc = train(cifar_dir, tmp_path, *CNN_ARGS, "--device", "cuda", "--compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.compile" in proc.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["test"]["accuracy"] >= 0.5
