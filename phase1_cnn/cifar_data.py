"""CIFAR-10 data: read and validate the python-version pickles, an in-memory synthetic set, a train/val split,
a hand-written Dataset + DataLoader, and whole-batch augmentation on uint8 tensors (on the GPU when there is one).

Images stay uint8 (N, 3, 32, 32) until the last moment: 4x less memory and host->GPU traffic than float32, and one
batched gather does crop + flip for the whole batch instead of per-image PIL calls."""

import argparse
import functools
import math
import os
import pickle
import sys

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
# Per-channel statistics of the 50k CIFAR-10 training images (0..1 scale).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10


class BadInput(Exception):
    """Something the user can fix (a file, a flag). main() hands it to exit_bad_input."""


def exit_bad_input(error: BadInput):
    """One line on stderr saying what is wrong and how to fix it, exit code 2, no traceback."""
    print("error: " + " ".join(str(error).splitlines()), file=sys.stderr)
    sys.exit(2)


class OneLineArgumentParser(argparse.ArgumentParser):
    """A bad flag value gets one line, `error: ... (see --help)`, and exit 2, like every other bad input: no usage
    block. Every numeric flag is typed with `whole` or `real`, so its range is checked here, before any work."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _flag_type(convert, ok, expected: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # nan fails every comparison, so it lands here too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.checked_range = expected  # marks a range-checked flag (tests walk them)
    return parse


def whole(lo: int, hi: int | None = None):
    """argparse type: a whole number in lo..hi. The policy of both phases: refuse what cannot work (not a number,
    inf, nan, below lo, past a flag's natural bound such as the 32-pixel image for --cutout or numpy's 2**32 seeds)
    and accept what is merely big (hi=None): a count past the data is capped where it is used, a long run is long.
    Python ints do not overflow, and the code caps such values before they reach a tensor."""
    if hi is None:
        return _flag_type(int, lambda v: lo <= v, f"a whole number >= {lo}")
    return _flag_type(int, lambda v: lo <= v <= hi, f"a whole number in {lo}..{hi}")


def real(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite number between lo and hi, each bound included unless marked open (hi=inf: any
    finite number above lo)."""
    ok = lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open or hi == math.inf else v <= hi)
    if hi == math.inf:
        return _flag_type(float, ok, f"a finite number {'>' if lo_open else '>='} {lo}")
    return _flag_type(float, ok, f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


# ----------------------------------------------------------------------------- reading the pickles

class _Refused(pickle.UnpicklingError):
    """A pickle names a global the reader does not admit."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 ships as pickles, and unpickling runs whatever a file names. Allow exactly the three globals a batch
    needs for its one numpy array (data): the array rebuilder, the array class and its dtype. Everything else in a
    batch (dict, bytes, str, ints, lists) needs no global at all. The rebuilder goes by two names: numpy 1's
    numpy.core.multiarray (the official files) and numpy 2's numpy._core.multiarray (what pickle.dump writes under
    numpy 2, e.g. a user's own images in the official layout): the same function, no new capability."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise BadInput(f"{path} is missing: run with --download, or unpack the CIFAR-10 python archive there")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()  # the originals were pickled by Python 2
    except _Refused as e:
        raise BadInput(f"{path}: {e}, which a CIFAR-10 batch never needs (unpickling it could run code). If you "
                       "wrote this file, pickle a dict of a uint8 numpy array 'data' and a list 'labels' with "
                       "pickle.dump(batch, f, protocol=4)") from None
    except Exception as e:
        raise BadInput(f"{path} is not a readable CIFAR-10 pickle ({type(e).__name__}: {e}): "
                       "delete it and run with --download, or unpack the archive again") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path} holds a {type(obj).__name__}, not a CIFAR-10 batch dict: unpack the archive again")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}  # b"data" -> "data"


def read_batch_file(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file -> images uint8 (N, 3, 32, 32), labels int64 (N,). Any N >= 1."""
    batch = _read_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise BadInput(f"{path} has no 'data'/'labels' entries (keys: {list(batch)}): it is not a CIFAR-10 batch")
    data, labels = batch["data"], batch["labels"]
    dtype, shape = getattr(data, "dtype", type(data).__name__), getattr(data, "shape", None)
    if str(dtype) != "uint8":
        raise BadInput(f"{path}: data has dtype {dtype}, expected uint8 pixels 0..255")
    if shape is None or len(shape) != 2 or shape[1] != 3 * 32 * 32 or shape[0] == 0:
        raise BadInput(f"{path}: data has shape {shape}, expected (N, 3072) = N images of 3x32x32 in R,G,B planes")
    try:
        labels = torch.as_tensor(labels)  # the originals hold a list of Python ints
    except (TypeError, ValueError, RuntimeError):
        labels = None
    if labels is None or labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise BadInput(f"{path}: labels must be a flat list of integer class ids")
    labels = labels.long()
    if labels.shape != (shape[0],):
        raise BadInput(f"{path}: {shape[0]} images but {labels.numel()} labels")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)][0].item()
        raise BadInput(f"{path}: labels must be in 0..{NUM_CLASSES - 1}, found {bad}")
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)  # (N, 3072) planes -> (N, 3, 32, 32)
    return images, labels


def read_class_names(folder: str) -> list[str]:
    meta_path = os.path.join(folder, "batches.meta")
    names = _read_pickle(meta_path).get("label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise BadInput(f"{meta_path}: expected 'label_names' with {NUM_CLASSES} entries: unpack the archive again")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar10(data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """split 'train' (data_batch_1..5) or 'test' (test_batch) -> images uint8 (N,3,32,32), labels (N,), class names."""
    folder = os.path.join(data_dir, CIFAR_FOLDER)
    files = TRAIN_FILES if split == "train" else TEST_FILES
    class_names = read_class_names(folder)
    parts = [read_batch_file(os.path.join(folder, name)) for name in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), class_names


def download_cifar10(data_dir: str) -> None:
    """Fetch and unpack the official archive (needs internet) unless every file is already there."""
    folder = os.path.join(data_dir, CIFAR_FOLDER)
    if all(os.path.isfile(os.path.join(folder, f)) for f in [*TRAIN_FILES, *TEST_FILES, "batches.meta"]):
        return
    from torchvision.datasets.utils import download_and_extract_archive  # only this flag needs torchvision
    try:
        download_and_extract_archive(CIFAR_URL, download_root=data_dir, md5=CIFAR_MD5)
    except Exception as e:
        raise BadInput(f"downloading {CIFAR_URL} failed ({type(e).__name__}: {e}): download it by hand and "
                       f"unpack it into {data_dir}/") from None


# ----------------------------------------------------------------------------- synthetic data (offline demo)

def make_synthetic(n_train: int = 10000, n_test: int = 2000, seed: int = 0):
    """A learnable stand-in for CIFAR-10: each class is a fixed random low-contrast 4x4 colour template blown up to
    32x32; every image is its template shifted by up to 4 px (and maybe mirrored) under heavy pixel noise, so a model
    has to pool evidence over space. Returns train images, train labels, test images, test labels, class names."""
    gen = torch.Generator().manual_seed(seed)
    templates = 128 + 10 * torch.randn(NUM_CLASSES, 3, 4, 4, generator=gen)
    templates = templates.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # (10, 3, 32, 32)

    def draw(n):
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        images = crop_flip(templates[labels], gen, pad=4)  # (n, 3, 32, 32)
        images = images + 80 * torch.randn(images.shape, generator=gen)
        return images.clamp_(0, 255).to(torch.uint8), labels

    (train_x, train_y), (test_x, test_y) = draw(n_train), draw(n_test)
    return train_x, train_y, test_x, test_y, [f"pattern_{c}" for c in range(NUM_CLASSES)]


# ----------------------------------------------------------------------------- split, Dataset, DataLoader

def split_train_val(images, labels, val_size: int, seed: int):
    """Hold out val_size random training images (fixed by seed). Returns train_x, train_y, val_x, val_y."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


class CifarDataset(Dataset):
    """Images kept as one uint8 tensor in memory (CIFAR-10 train is 150 MB); an item is (uint8 (3,32,32), label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32), images.shape
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def make_loader(dataset: CifarDataset, batch_size: int, shuffle_gen: torch.Generator | None, device: torch.device,
                num_workers: int = 0) -> DataLoader:
    """shuffle_gen=None -> fixed order (evaluation). Otherwise the sampler draws each epoch's order from shuffle_gen,
    which the trainer reseeds per epoch so that a resumed run sees the same order."""
    sampler = SequentialSampler(dataset) if shuffle_gen is None else RandomSampler(dataset, generator=shuffle_gen)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler,
        # Training drops a ragged last batch (BatchNorm dislikes tiny ones) unless the set is smaller than a batch.
        drop_last=shuffle_gen is not None and len(dataset) > batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # Windows spawns workers: don't pay the start-up every epoch
        pin_memory=device.type == "cuda",  # page-locked host memory -> async copies with non_blocking=True
        # Workers draw their base seed from this generator; a private one leaves the global torch RNG alone.
        generator=torch.Generator().manual_seed(0),
    )


class DeviceBatches:
    """The GPU path (airbench style): the whole uint8 set lives on the device (CIFAR-10 train: 154 MB at most) and
    a batch is one index into it: no step waits for a host->device copy or a worker. The textbook Dataset +
    DataLoader above stays the CPU default: there the data is in host memory already, and that path is the one to
    learn from. Same batches as make_loader: the epoch's order is the very randperm RandomSampler draws from
    shuffle_gen (which the trainer reseeds every epoch), so either path trains the same run, and --resume works
    across them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 shuffle_gen: torch.Generator | None, device: torch.device):
        self.images, self.labels = images.to(device), labels.to(device)  # once, before training
        self.batch_size, self.shuffle_gen = batch_size, shuffle_gen
        self.drop_last = shuffle_gen is not None and len(labels) > batch_size  # as make_loader

    def __len__(self):
        n, b = len(self.labels), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        """The epoch's order is drawn and moved now, when iter() is called: a blocking copy, but one per epoch."""
        order = None  # evaluation: contiguous slices, views without a copy
        if self.shuffle_gen is not None:  # drawn on the CPU like RandomSampler, moved once per epoch (400 kB)
            order = torch.randperm(len(self.labels), generator=self.shuffle_gen).to(self.images.device)
        return self._batches(order)

    def _batches(self, order):
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = slice(start, start + self.batch_size) if order is None else order[start:start + self.batch_size]
            yield self.images[idx], self.labels[idx]  # (B, 3, 32, 32) uint8, (B,) int64, already on the device


def make_batches(images, labels, batch_size: int, shuffle_gen: torch.Generator | None, device: torch.device,
                 on_device: bool, num_workers: int = 0):
    """DeviceBatches when on_device (the CUDA default), else the hand-written Dataset through a DataLoader. A batch
    larger than the set is the whole set (DataLoader's BatchSampler would allocate a list of batch_size first)."""
    batch_size = min(batch_size, len(labels))
    if on_device:
        return DeviceBatches(images, labels, batch_size, shuffle_gen, device)
    return make_loader(CifarDataset(images, labels), batch_size, shuffle_gen, device, num_workers)


# ----------------------------------------------------------------------------- batch augmentation (tensor ops)

def crop_flip(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop of a reflect-padded image + random horizontal flip, for a whole (B, C, H, W) batch of any dtype,
    as one gather. The padding is never built: each output pixel reads its source pixel, reflected at the border."""
    B, C, H, W = images.shape
    dev = images.device
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B, 1), generator=gen, device=dev) - pad  # (B, 1) shifts in -pad..pad
    flip = torch.rand(B, 1, generator=gen, device=dev) < 0.5
    reflect = lambda i, n: (n - 1) - ((n - 1) - i.abs()).abs()  # -1 -> 1, n -> n-2 (valid for |shift| < n)
    cols = torch.arange(W, device=dev).expand(B, W)
    cols = torch.where(flip, W - 1 - cols, cols)  # output column j of a mirrored crop reads crop column W-1-j
    rows = reflect(torch.arange(H, device=dev) + dy, H)  # (B, H) source rows
    cols = reflect(cols + dx, W)  # (B, W) source columns
    flat_idx = (rows[:, :, None] * W + cols[:, None, :]).view(B, 1, H * W).expand(B, C, H * W)
    return images.reshape(B, C, H * W).gather(2, flat_idx).view(B, C, H, W)


def cutout(x: torch.Tensor, gen: torch.Generator, size: int) -> torch.Tensor:
    """Zero one random size x size square per image (DeVries & Taylor 2017); on normalised input zero = mean."""
    B, _, H, W = x.shape
    top = torch.randint(0, H - size + 1, (B, 1, 1), generator=gen, device=x.device)
    left = torch.randint(0, W - size + 1, (B, 1, 1), generator=gen, device=x.device)
    r, c = torch.arange(H, device=x.device).view(1, H, 1), torch.arange(W, device=x.device).view(1, 1, W)
    hole = (r >= top) & (r < top + size) & (c >= left) & (c < left + size)  # (B, H, W)
    return x * ~hole[:, None]


@functools.cache
def channel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean*255 and 1/(std*255), shaped (1, 3, 1, 1), built once per device: a tensor made from Python numbers is a
    blocking host->device copy, which a training step must never wait for."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255)
    return mean.to(device), inv_std.to(device)


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 standardised per channel: (x/255 - mean)/std folded into one shift and scale."""
    mean, inv_std = channel_stats(images_u8.device)
    return images_u8.float().sub_(mean).mul_(inv_std)


def augment(images_u8: torch.Tensor, gen: torch.Generator, cutout_size: int = 0) -> torch.Tensor:
    """The training transform on a whole batch already on its device: crop (pad 4) + flip, normalise, cutout."""
    x = normalize(crop_flip(images_u8, gen, pad=4))
    return cutout(x, gen, cutout_size) if cutout_size > 0 else x
