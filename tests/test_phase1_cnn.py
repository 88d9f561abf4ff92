"""Phase 1: the CIFAR-10 trainer on a small learnable data set written in the real CIFAR-10 pickle format.

Training runs as a user runs it (subprocess). The bad-input cases are in tests/test_phase1_inputs.py; the helpers and
fixtures both files share are in tests/cifar_fixtures.py."""

import itertools
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cifar_fixtures import CLASS_NAMES, CNN_ARGS, LENET_ARGS, load_phase1, run_phase1, train

pytest_plugins = ["cifar_fixtures"]  # the session fixtures cifar_dir and cnn_run, shared with test_phase1_inputs.py


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
