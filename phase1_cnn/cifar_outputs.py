"""Everything phase 1 writes or reads back: checkpoints, JSON, plots. Every write goes to a temp file first and is
then renamed over the target (os.replace is atomic), so an interrupted run never leaves half a file behind."""

import json
import os
import zipfile

import torch
from cifar_data import BadInput


def _atomic(path: str, write) -> None:
    """write(tmp_path) then rename tmp -> path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(state: dict, path: str) -> None:
    _atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, hint: str) -> dict:
    """Load a checkpoint with weights_only=True (tensors and plain types only: no code runs). Map to CPU so a
    checkpoint written on a GPU loads anywhere. hint: how to fix a missing file."""
    if not os.path.isfile(path):
        raise BadInput(f"{path} not found: {hint}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; metrics.json, a log, an image are not one
        raise BadInput(f"{path} is not a checkpoint: point to best.pt or last.pt written by phase1_cnn/train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}): "
                       "delete it, or point to another one") from None
    if not isinstance(ckpt, dict) or not {"model", "args", "class_names"} <= ckpt.keys():
        raise BadInput(f"{path} is not a phase-1 checkpoint (no model/args/class_names): point to one written "
                       "by phase1_cnn/train.py")
    return ckpt


def write_json(obj, path: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    _atomic(path, write)


def _pyplot():
    import matplotlib  # imported on first plot only: keeps start-up (and every error path) fast
    matplotlib.use("Agg")  # files only, no window: works on servers and in CI
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path: str) -> None:
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    _pyplot().close(fig)


def plot_curves(history: list[dict], path: str) -> None:
    """Loss and accuracy per epoch, train vs validation (validation is absent with --val_size 0)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax_loss), ("acc", ax_acc)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        if history[0][f"val_{key}"] is not None:
            ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel({"loss": "cross-entropy", "acc": "accuracy"}[key])
        ax.grid(alpha=0.3)
        ax.legend()
    # Train numbers are running means over augmented (and possibly label-smoothed) batches while the weights move;
    # validation is measured on clean images at the end of the epoch. Validation above train is normal here.
    ax_loss.set_title("loss (train: running mean over augmented batches)")
    ax_acc.set_title("accuracy")
    _save_figure(fig, path)


def plot_confusion(confusion: torch.Tensor, class_names: list[str], path: str, title: str) -> None:
    """confusion (C, C): rows = true class, columns = predicted. Colour = row fraction, text = count."""
    plt = _pyplot()
    frac = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(frac.numpy(), cmap="Blues", vmin=0, vmax=1)
    n = len(class_names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    _save_figure(fig, path)
