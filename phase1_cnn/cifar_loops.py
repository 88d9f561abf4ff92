"""The training loop and the evaluation loop, kept apart, plus the device and mixed-precision choices they share."""

import contextlib

import torch
import torch.nn.functional as F
from cifar_data import BadInput, augment, normalize
from tqdm import tqdm


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> torch.device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for, but torch sees no CUDA GPU (CPU-only torch build or no driver): "
                       "install a CUDA build of torch (see README), or use --device cpu")
    return torch.device(name)


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


def train_one_epoch(model, loader, optimizer, scheduler, scaler, aug_gen: torch.Generator, device,
                    label_smoothing: float = 0.0, cutout_size: int = 0, desc: str = "train") -> tuple[float, float]:
    """One pass over the training loader with on-device augmentation. Returns mean loss and accuracy."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)  # uint8 (B, 3, 32, 32): 4x fewer bytes than float
        labels = labels.to(device, non_blocking=True)
        x = to_model_input(augment(images, aug_gen, cutout_size), device)  # float (B, 3, 32, 32)
        loss, batch_correct = train_step(model, x, labels, optimizer, scheduler, scaler, label_smoothing, device)
        loss_sum += loss * len(labels)
        correct += batch_correct
        seen += len(labels)
        if step % 10 == 0 or step == len(loader) - 1:  # .item() waits for the GPU: not on every step
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
    return loss_sum.item() / seen, correct.item() / seen


@torch.no_grad()
def evaluate(model, loader, device) -> tuple[float, float, torch.Tensor]:
    """Plain cross-entropy (no smoothing) and accuracy on un-augmented images, and every prediction (N,) in order."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    predictions = []
    for images, labels in loader:
        x = to_model_input(normalize(images.to(device, non_blocking=True)), device)
        with autocast(device):
            logits = model(x)  # (B, 10)
        loss_sum += F.cross_entropy(logits.float(), labels.to(device), reduction="sum")
        predictions.append(logits.argmax(1).cpu())
    predictions = torch.cat(predictions)
    labels = loader.dataset.labels
    return loss_sum.item() / len(labels), (predictions == labels).sum().item() / len(labels), predictions
