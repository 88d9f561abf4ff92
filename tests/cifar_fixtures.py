"""CIFAR-10-format data sets written by tests: the official python-version layout (Python-2 pickles, bytes keys,
uint8 (N, 3072) pixels in R,G,B planes), filled with ten classes of easily learnable patterns. Used by
tests/test_phase1_cnn.py, tests/test_phase1_inputs.py and the grader tests/acceptance/test_grade_train_minimal.py.

The end of the file holds what both test_phase1_*.py files share: the phase-1 helpers and two fixtures. Those files
register this module as a plugin (pytest_plugins), so its session-scoped fixtures exist once and the two files share
one trained run instead of training it twice.
PYTEST_DONT_REWRITE: those files import it before pytest registers it, too late for assert rewriting; the marker
silences pytest's warning about that (the one assert here carries its own message)."""

import importlib.util
import struct
import sys

import numpy as np
import pytest
from conftest import REPO, run_script

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def py2_pickle(obj) -> bytes:
    """obj pickled the way the official CIFAR-10 files were (Python 2, protocol 2): bytes as SHORT_BINSTRING/BINSTRING,
    a numpy array as numpy.core.multiarray._reconstruct + ndarray.__setstate__ with its raw bytes. Python 3's pickle
    would write bytes through _codecs.encode and numpy 2's module path, which the loader rightly refuses.
    Handles what a batch holds: dict, list, int, bytes, ndarray."""
    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def enc(o) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(map(enc, o)) + b"e"
        if isinstance(o, tuple):  # TUPLE1..3 for short ones, as Python 2 wrote them
            return b"".join(map(enc, o)) + b"\x85\x86\x87"[len(o) - 1:len(o)] if 1 <= len(o) <= 3 else (
                b"(" + b"".join(map(enc, o)) + b"t")
        if isinstance(o, bytes):
            return string(o)
        if isinstance(o, int):
            return (b"K" + bytes([o]) if 0 <= o < 256 else b"M" + struct.pack("<H", o) if 0 <= o < 65536
                    else b"J" + struct.pack("<i", o))
        assert isinstance(o, np.ndarray), type(o)
        order, kind = o.dtype.str[:1].encode(), o.dtype.str[1:].encode()  # "|u1" -> b"|", b"u1"; "<f4"
        dtype = (b"cnumpy\ndtype\n" + string(kind) + b"K\x00K\x01\x87R(K\x03" + string(order)
                 + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01"
                + enc(tuple(o.shape)) + dtype + b"\x89" + string(np.ascontiguousarray(o).tobytes()) + b"tb")

    return b"\x80\x02" + enc(obj) + b"."


def write_cifar_like(root, n_per_file: int = 50, n_test: int = 100, seed: int = 0, test_label_shift: int = 0):
    """root/cifar-10-batches-py/ as in the official archive (Python-2 pickles, bytes keys, data uint8 (N, 3072) in
    R,G,B planes, labels a list of ints, batches.meta with label_names), with ten classes of distinct patterns: a
    class colour modulated by stripes at a class angle, random phase, pixel noise.
    test_label_shift: test_batch's labels are written as (class + shift) % 10, so that a model which learned the
    patterns scores near 0 on the test set (the grader's trap for a model chosen on the test set)."""
    rng = np.random.default_rng(seed)
    palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]], np.float32)
    yy, xx = np.mgrid[0:32, 0:32]

    def images(labels):
        out = np.empty((len(labels), 3, 32, 32), np.float32)
        for i, c in enumerate(labels):
            angle = np.pi * c / 10
            phase = rng.uniform(0, 2 * np.pi)
            stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / 8 + phase)  # (32, 32)
            out[i] = palette[c][:, None, None] * (0.75 + 0.25 * stripes) + rng.normal(0, 20, (3, 32, 32))
        return out.clip(0, 255).astype(np.uint8).reshape(len(labels), 3072)  # planes R, G, B

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [*((f"data_batch_{i}", n_per_file) for i in range(1, 6)), ("test_batch", n_test)]:
        labels = rng.integers(0, 10, n).tolist()
        shift = test_label_shift if name == "test_batch" else 0
        batch = {b"batch_label": name.encode(), b"data": images(labels), b"labels": [(c + shift) % 10 for c in labels],
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(py2_pickle(batch))
    meta = {b"num_cases_per_batch": n_per_file, b"label_names": [n.encode() for n in CLASS_NAMES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return root


# ---------------------------------------------------------------- phase 1, shared by tests/test_phase1_*.py

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


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    return write_cifar_like(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def cnn_run(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn_run")
    proc = train(cifar_dir, out, *CNN_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
