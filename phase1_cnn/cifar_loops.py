"""The training loop and the evaluation loop, kept apart, plus the device and mixed-precision choices they share."""

import contextlib
import sys

import torch
import torch.nn.functional as F
from cifar_data import BadInput, augment, channel_stats, normalize
from tqdm import tqdm


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> torch.device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for, but torch sees no CUDA GPU (CPU-only torch build or no driver): "
                       "install a CUDA build of torch (see README), or use --device cpu")
    # With its index (cuda:0), as tensors report their device: caches keyed by device (channel_stats) then match.
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on Ampere and newer (RTX 30xx/40xx: same range as fp32, no loss scaling), fp16 + GradScaler on
    older GPUs, plain fp32 on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def autocast(device: torch.device):
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def to_model_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last (NHWC) lets cuDNN use tensor-core convolution kernels without transposing each layer's input.
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def train_step(model, x, y, optimizer, scheduler, scaler, label_smoothing: float, device):
    """One SGD step on a prepared float batch. Returns the (detached) mean loss and the number of correct guesses."""
    with autocast(device):
        logits = model(x)  # (B, 10)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # a no-op scale unless fp16
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()  # the schedule is per step, not per epoch
    return loss.detach(), (logits.argmax(1) == y).sum()


def progress(batches, desc: str, total: int):
    """A tqdm bar on a terminal; redirected to a file or a pipe, no bar at all (carriage-return lines would fill the
    log): the caller prints one plain line per epoch instead."""
    return tqdm(batches, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def train_one_epoch(model, batches, optimizer, scheduler, scaler, aug_gen: torch.Generator, device,
                    label_smoothing: float = 0.0, cutout_size: int = 0, desc: str = "train",
                    check_sync: bool = False) -> tuple[float, float]:
    """One pass over the training batches with on-device augmentation. Returns mean loss and accuracy.

    Nothing in the loop waits for the GPU: loss and correct guesses are summed on the device and read once, at the
    end. check_sync makes any host<->device synchronisation inside the loop raise (CUDA), the proof of that."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    channel_stats(device)  # built (one blocking copy) before the check, on the first epoch only
    batch_iter = iter(batches)  # DeviceBatches moves this epoch's order to the device here, before the check
    with sync_checked(check_sync and device.type == "cuda"):
        for images, labels in progress(batch_iter, desc, len(batches)):
            images = images.to(device, non_blocking=True)  # uint8 (B, 3, 32, 32); a no-op when already there
            labels = labels.to(device, non_blocking=True)
            x = to_model_input(augment(images, aug_gen, cutout_size), device)  # float (B, 3, 32, 32)
            loss, batch_correct = train_step(model, x, labels, optimizer, scheduler, scaler, label_smoothing, device)
            loss_sum += loss * len(labels)
            correct += batch_correct
            seen += len(labels)
    return loss_sum.item() / seen, correct.item() / seen  # the epoch's one wait for the GPU


@contextlib.contextmanager
def sync_checked(enabled: bool):
    """torch.cuda.set_sync_debug_mode("error") for the enclosed code: .item(), a blocking copy, nonzero()... raise."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def predict(model, x: torch.Tensor, device, tta: bool = False) -> torch.Tensor:
    """Logits (B, 10) in float32. tta: average with the logits of the mirrored images (airbench's flip TTA): a flip
    is a training augmentation, so both views are in-distribution and their errors partly cancel."""
    with autocast(device):
        logits = model(x).float()  # (B, 10)
        if tta:
            logits = (logits + model(x.flip(-1)).float()) / 2
    return logits


@torch.no_grad()
def evaluate(model, batches, device, tta: bool = False) -> tuple[float, float, torch.Tensor]:
    """Plain cross-entropy (no smoothing) and accuracy on un-augmented images, and every prediction (N,) in order.
    Sums stay on the device until the end: one wait for the GPU per evaluation, not one per batch."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    predictions, seen = [], 0
    for images, labels in batches:
        x = to_model_input(normalize(images.to(device, non_blocking=True)), device)
        labels = labels.to(device, non_blocking=True)
        logits = predict(model, x, device, tta)  # (B, 10)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        predictions.append(logits.argmax(1))
        correct += (predictions[-1] == labels).sum()
        seen += len(labels)
    return loss_sum.item() / seen, correct.item() / seen, torch.cat(predictions).cpu()
