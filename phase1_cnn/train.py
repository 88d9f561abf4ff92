"""Train a CIFAR-10 classifier in plain PyTorch: our own Dataset, on-device batch augmentation, a training loop and
an evaluation loop, the best checkpoint chosen on a validation split (never on test), exact --resume.

    python phase1_cnn/train.py                    # ResNet-9, 24 epochs, the DAWNBench recipe (a GPU makes it quick)
    python phase1_cnn/train.py --model lenet5     # classic LeNet-5
    python phase1_cnn/train.py --synthetic --model lenet5 --epochs 10   # offline demo, no data needed

The default `resnet9` recipe (alias `cnn`) follows David Page's DAWNBench ResNet-9 ("How to train your ResNet",
2018), which reported 94% test accuracy in 24 epochs: batch 512, SGD nesterov momentum 0.9, weight decay 5e-4,
learning rate linearly up to 0.4 over the first 5/24 of training then linearly down to 0, label smoothing 0.2,
crop + flip + 8x8 cutout.
"""

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from cifar_data import (
    BadInput,
    OneLineArgumentParser,
    download_cifar10,
    exit_bad_input,
    load_cifar10,
    make_batches,
    make_synthetic,
    real,
    split_train_val,
    whole,
)
from cifar_loops import amp_dtype, evaluate, resolve_device, train_one_epoch
from cifar_models import MODEL_ALIASES, build_model, count_params
from cifar_outputs import load_checkpoint, plot_curves, save_checkpoint, write_json

# Per-model recipes. A flag given on the command line overrides its entry.
RECIPES = {
    "resnet9": dict(width=64, epochs=24, batch_size=512, lr=0.4, weight_decay=5e-4, label_smoothing=0.2, cutout=8),
    "lenet5": dict(width=0, epochs=30, batch_size=128, lr=0.05, weight_decay=5e-4, label_smoothing=0.0, cutout=0),
}
COMMON = dict(model="resnet9", seed=0, val_size=5000, max_train_samples=0, synthetic=False)
RUN_KEYS = [*COMMON, *RECIPES["resnet9"]]  # what defines a run: --resume takes these from the checkpoint
WARMUP_FRACTION = 5 / 24  # Page: peak learning rate at epoch 5 of 24
OUTPUTS = ["best.pt", "last.pt", "metrics.json", "curves.png", "eval.json", "confusion_matrix.png"]  # a run's files


def build_parser() -> argparse.ArgumentParser:
    """Every numeric flag's range is checked by its type (whole / real): a bad value is one line, exit 2."""
    intro, usage = __doc__.split("\n\n", 1)
    p = OneLineArgumentParser(description=intro, epilog=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    per_model = lambda key: f"default {RECIPES['resnet9'][key]} (resnet9) / {RECIPES['lenet5'][key]} (lenet5)"
    p.add_argument("--data_dir", default="data", help="folder holding cifar-10-batches-py/ (default: data)")
    p.add_argument("--output_dir", default="checkpoints/phase1", help="best.pt, last.pt, metrics.json, curves.png")
    p.add_argument("--model", choices=[*RECIPES, *MODEL_ALIASES], default=None,
                   help="resnet9 (default; 'cnn' is an alias) or lenet5")
    p.add_argument("--width", type=whole(1, 512), default=None,
                   help="resnet9 base width (default 64; smaller = faster on a CPU)")
    p.add_argument("--epochs", type=whole(1), default=None, help=per_model("epochs"))
    p.add_argument("--batch_size", type=whole(1), default=None, help=per_model("batch_size"))
    p.add_argument("--lr", type=real(0, lo_open=True), default=None, help="peak learning rate, " + per_model("lr"))
    p.add_argument("--weight_decay", type=real(0, 1, hi_open=True), default=None, help=per_model("weight_decay"))
    p.add_argument("--label_smoothing", type=real(0, 1, hi_open=True), default=None, help=per_model("label_smoothing"))
    p.add_argument("--cutout", type=whole(0, 32), default=None,
                   help="cutout square side, 0 = off; " + per_model("cutout"))
    # Below 2**32 (numpy's seed range): epoch_seeds' seed * 100_003 + epoch then stays within torch's 64-bit seeds.
    p.add_argument("--seed", type=whole(0, 2**32 - 1), default=None,
                   help="seeds init, split, shuffling and augmentation (default 0)")
    p.add_argument("--val_size", type=whole(0), default=None, help="training images held out for "
                   "validation (default 5000, at most a fifth of the training set; 0 = none, best.pt is then the last "
                   "epoch)")
    p.add_argument("--max_train_samples", type=whole(0), default=None,
                   help="train on at most this many images (0 = all)")
    p.add_argument("--synthetic", action="store_true", default=None, help="in-memory learnable patterns, no files")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--loader", choices=["auto", "dataloader", "device"], default="auto",
                   help="dataloader: our Dataset through a DataLoader (the CPU default); device: the uint8 images on "
                   "the device, batches by index (the CUDA default). Same batches either way")
    p.add_argument("--num_workers", type=whole(0, 256), default=0, help="DataLoader workers; 0 is right here: the "
                   "images are in memory and augmentation runs batched on the device")
    p.add_argument("--save_every", type=whole(1), default=None, help="write last.pt, best.pt, "
                   "metrics.json and curves.png every N epochs and at the end (default 1 on a CPU, 4 on CUDA where "
                   "an epoch takes seconds); --resume continues from the last write")
    p.add_argument("--tta", action="store_true", help="final test with flip test-time augmentation")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on a GPU)")
    p.add_argument("--check_sync", action="store_true", help="CUDA: raise if the training loop ever waits for the "
                   "GPU (torch.cuda.set_sync_debug_mode('error')); bf16 GPUs, as fp16's GradScaler checks every step")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/last.pt with its settings")
    p.add_argument("--overwrite", action="store_true", help="delete the run in output_dir and start afresh")
    p.add_argument("--download", action="store_true", help="fetch and unpack CIFAR-10 into data_dir (needs internet)")
    p.add_argument("--stop_after_epoch", type=whole(1), default=None,
                   help=argparse.SUPPRESS)  # tests: simulate a crash
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.model = MODEL_ALIASES.get(args.model, args.model)
    return args


def resolve_run(args, saved: dict | None, last_path: str) -> dict:
    """The run's settings: recipe defaults overridden by flags, or, on --resume, the checkpoint's own settings, which
    an explicitly given flag must not contradict (same seed + same settings = same run)."""
    given = {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k) is not None}
    if saved is not None:
        saved = {**saved, "model": MODEL_ALIASES.get(saved.get("model"), saved.get("model"))}
        for k, v in given.items():
            if v != saved.get(k):
                raise BadInput(f"{last_path} was trained with --{k} {saved.get(k)}, not {v}: resume without --{k}, "
                               "or pass a new --output_dir to start a fresh run")
        missing = [k for k in RUN_KEYS if k not in saved]
        if missing:
            raise BadInput(f"{last_path} lacks the run settings {missing}: pass a new --output_dir to start afresh")
        return {k: saved[k] for k in RUN_KEYS}
    model = given.get("model", COMMON["model"])
    return {**COMMON, **RECIPES[model], **given}  # each given value was range-checked by the parser


def one_cycle(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor of optimizer step `step` (0-based): up in equal steps to 1 at the last warm-up step, then
    down in equal steps towards 0 at total_steps, so that no step is wasted at 0 and the peak is used once."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / (total_steps - warmup_steps + 1))


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """(shuffle, augmentation) seeds for one epoch, derived from (seed, epoch) alone: epoch e of a resumed run draws
    exactly what epoch e of an uninterrupted run draws, whatever came before. No RNG state to carry across."""
    pair = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return int(pair[0]), int(pair[1])


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run_training(args)
    except BadInput as e:
        exit_bad_input(e)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.output_dir}/last.pt holds the last saved epoch; continue with --resume",
              file=sys.stderr)
        sys.exit(130)


def run_training(args) -> None:
    """The recipe: settings -> data -> model -> (resume) -> train, saving as it goes -> test best.pt once."""
    device = resolve_device(args.device)
    ckpt, run = settings(args)
    data = load_data(args, run, device)
    t = build_training(run, device, len(data.train), args.compile)
    log = restore(t, ckpt, args, run, device) if ckpt else Log()
    if log.epoch >= run["epochs"]:
        print("that run is already complete: nothing to do")
        return
    if args.overwrite:  # only now, with everything checked: a failed start leaves the old run untouched
        clear_outputs(args.output_dir)
    stopped = train_epochs(t, data, log, args, run, device)
    if not stopped:
        final_test(t, data, log, args, run, device)


# ----------------------------------------------------------------------------- settings and data

def settings(args) -> tuple[dict | None, dict]:
    """Flags checked, the checkpoint read when resuming, and the run's settings."""
    if args.resume and args.overwrite:
        raise BadInput("--resume continues the run in output_dir, --overwrite deletes it: give one of them")
    last_path = os.path.join(args.output_dir, "last.pt")
    present = [f for f in OUTPUTS if os.path.exists(os.path.join(args.output_dir, f))]
    if present and not (args.resume or args.overwrite):  # never replace a run by accident
        raise BadInput(f"{args.output_dir} already holds a run ({', '.join(present)}): continue it with --resume, "
                       "replace it with --overwrite, or pass another --output_dir")
    ckpt = load_checkpoint(last_path, "nothing to resume: drop --resume to start a run") if args.resume else None
    return ckpt, resolve_run(args, ckpt["args"] if ckpt else None, last_path)


@dataclass
class Data:
    train: object  # training batches: a DataLoader or DeviceBatches
    shuffle_gen: torch.Generator  # train's order; reseeded every epoch, see epoch_seeds
    val: object | None  # None without a validation split
    test: object
    num_test: int
    class_names: list


def load_data(args, run: dict, device: torch.device) -> Data:
    """uint8 tensors in memory, validation carved out of the training images, batches on the chosen path."""
    if run["synthetic"]:
        train_x, train_y, test_x, test_y, class_names = make_synthetic()
        source = "synthetic patterns (in memory)"
    else:
        if args.download:
            download_cifar10(args.data_dir)
        train_x, train_y, class_names = load_cifar10(args.data_dir, "train")
        test_x, test_y, _ = load_cifar10(args.data_dir, "test")
        source = f"CIFAR-10 from {args.data_dir}"
    val_size = min(run["val_size"], len(train_y) // 5)
    if val_size < run["val_size"]:
        print(f"note: --val_size {run['val_size']} is more than a fifth of {len(train_y)} training images; "
              f"holding out {val_size}")
    train_x, train_y, val_x, val_y = split_train_val(train_x, train_y, val_size, run["seed"])
    if run["max_train_samples"]:
        train_x, train_y = train_x[:run["max_train_samples"]], train_y[:run["max_train_samples"]]
    if val_size == 0:
        print("note: no validation split, so best.pt is simply the last epoch (the test set never picks a model)")
    on_device = args.loader == "device" or (args.loader == "auto" and device.type == "cuda")
    print(f"data: {len(train_y)} train / {val_size} val / {len(test_y)} test images, {source}; batches from "
          + (f"tensors on {device.type}" if on_device else "a DataLoader"))

    shuffle_gen = torch.Generator()
    batches = lambda x, y, size, gen: make_batches(x, y, size, gen, device, on_device, args.num_workers)
    eval_size = max(run["batch_size"], 1024)
    return Data(train=batches(train_x, train_y, run["batch_size"], shuffle_gen), shuffle_gen=shuffle_gen,
                val=batches(val_x, val_y, eval_size, None) if val_size else None,
                test=batches(test_x, test_y, eval_size, None), num_test=len(test_y), class_names=class_names)


# ----------------------------------------------------------------------------- model, optimizer, resume

@dataclass
class Training:
    net: torch.nn.Module  # the weights (state_dict, checkpoints)
    model: object  # what runs a batch: net, or torch.compile(net)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def build_training(run: dict, device: torch.device, steps_per_epoch: int, compile_model: bool) -> Training:
    torch.manual_seed(run["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # picks the fastest conv kernels; GPU runs are then not bit-exact
    net = build_model(run["model"], run["width"]).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=run["lr"], momentum=0.9, nesterov=True,
                                weight_decay=run["weight_decay"])
    total_steps = run["epochs"] * steps_per_epoch
    warmup_steps = max(1, math.ceil(WARMUP_FRACTION * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: one_cycle(s, total_steps, warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    print(f"model: {run['model']} ({type(net).__name__}), {count_params(net):,} parameters; device {device}"
          + (f", {amp_dtype(device)} autocast, channels_last" if device.type == "cuda" else "")
          + (", torch.compile" if compile_model else ""))
    return Training(net, torch.compile(net) if compile_model else net, optimizer, scheduler, scaler)


@dataclass
class Log:
    epoch: int = 0  # last finished epoch
    best_acc: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)
    best_state: dict | None = None  # in memory until the next save point
    best_saved: bool = True


def restore(t: Training, ckpt: dict, args, run: dict, device: torch.device) -> Log:
    last_path = os.path.join(args.output_dir, "last.pt")
    try:
        t.net.load_state_dict(ckpt["model"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty unless the run used fp16
            t.scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise BadInput(f"{last_path} does not fit this run ({type(e).__name__}: {str(e).splitlines()[0]}): "
                       "pass a new --output_dir to start a fresh run") from None
    torch.set_rng_state(ckpt["rng"]["torch"])  # nothing draws from it now; a dropout layer would
    if device.type == "cuda" and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    print(f"resuming {last_path} after epoch {ckpt['epoch']} of {run['epochs']}")
    return Log(epoch=ckpt["epoch"], best_acc=ckpt["best_val_acc"], best_epoch=ckpt["best_epoch"],
               history=ckpt["history"])


def clear_outputs(output_dir: str) -> None:
    """--overwrite: the old run's files go before training starts, so that neither a crash in epoch 1 (its last.pt)
    nor a stale eval.json can pass for this run."""
    for name in OUTPUTS:
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)


# ----------------------------------------------------------------------------- train, save, test

def train_epochs(t: Training, data: Data, log: Log, args, run: dict, device: torch.device) -> bool:
    """Epochs from log.epoch + 1 on: one plain line each, outputs written every save_every epochs and at the end.
    Returns True when stopped early (--stop_after_epoch)."""
    save_every = args.save_every or (4 if device.type == "cuda" else 1)
    for epoch in range(log.epoch + 1, run["epochs"] + 1):
        t0 = time.perf_counter()
        shuffle_seed, aug_seed = epoch_seeds(run["seed"], epoch)
        data.shuffle_gen.manual_seed(shuffle_seed)  # the epoch's order is drawn from it
        aug_gen = torch.Generator(device=device).manual_seed(aug_seed)  # crops, flips, cutout: drawn on the device
        train_loss, train_acc = train_one_epoch(
            t.model, data.train, t.optimizer, t.scheduler, t.scaler, aug_gen, device, run["label_smoothing"],
            run["cutout"], f"epoch {epoch}/{run['epochs']}", args.check_sync)
        val_loss, val_acc = evaluate(t.model, data.val, device)[:2] if data.val else (None, None)
        lr, seconds = t.scheduler.get_last_lr()[0], time.perf_counter() - t0
        log.history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                                val_acc=val_acc, lr=lr, seconds=seconds))
        val_text = f"val loss {val_loss:.4f} acc {val_acc:.4f}" if data.val else "no val"
        print(f"epoch {epoch:3d}/{run['epochs']} | train loss {train_loss:.4f} acc {train_acc:.4f} | {val_text} | "
              f"lr {lr:.4f} | {seconds:.1f}s", flush=True)

        log.epoch = epoch
        if val_acc is None or val_acc > log.best_acc:
            log.best_acc, log.best_epoch = (val_acc if val_acc is not None else -1.0), epoch
            # Kept in memory until the next save point; a copy on the device does not wait for the GPU.
            log.best_state, log.best_saved = copy.deepcopy(state(t, log, run, data.class_names, device)), False
        stop = epoch == args.stop_after_epoch and epoch < run["epochs"]
        if epoch % save_every == 0 or epoch == run["epochs"] or stop:
            save_outputs(t, log, args.output_dir, run, data.class_names, device)
        if stop:
            print(f"stopping after epoch {epoch} as asked; continue with --resume")
            return True
    return False


def state(t: Training, log: Log, run: dict, class_names: list, device: torch.device) -> dict:
    """Everything --resume needs (the tensors are the live ones: deepcopy to keep them)."""
    return dict(
        model=t.net.state_dict(), optimizer=t.optimizer.state_dict(), scheduler=t.scheduler.state_dict(),
        scaler=t.scaler.state_dict(), epoch=log.epoch, best_val_acc=log.best_acc, best_epoch=log.best_epoch,
        args=run, class_names=class_names, history=log.history,
        rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else []))


def save_outputs(t: Training, log: Log, output_dir: str, run: dict, class_names: list, device) -> None:
    """best.pt (if it changed since the last save), last.pt, metrics.json, curves.png: each written atomically."""
    if not log.best_saved:
        save_checkpoint(log.best_state, os.path.join(output_dir, "best.pt"))
        log.best_saved = True
    save_checkpoint(state(t, log, run, class_names, device), os.path.join(output_dir, "last.pt"))
    write_json(metrics(log, run), os.path.join(output_dir, "metrics.json"))
    plot_curves(log.history, os.path.join(output_dir, "curves.png"))


def metrics(log: Log, run: dict, **extra) -> dict:
    best = dict(epoch=log.best_epoch, val_acc=log.best_acc if run["val_size"] and log.best_acc >= 0 else None)
    return dict(args=run, history=log.history, best=best, **extra)


def final_test(t: Training, data: Data, log: Log, args, run: dict, device: torch.device) -> None:
    """The validation-chosen best.pt, once, on the test set (--tta: with its mirror images too)."""
    best_path = os.path.join(args.output_dir, "best.pt")
    t.net.load_state_dict(load_checkpoint(best_path, "it was removed during training: train again")["model"])
    test_loss, test_acc, _ = evaluate(t.model, data.test, device, tta=args.tta)
    chosen = "chosen on validation" if data.val else "the last epoch"
    print(f"test: best.pt (epoch {log.best_epoch}, {chosen}) loss {test_loss:.4f} accuracy {test_acc:.4f}"
          + (" (flip TTA)" if args.tta else ""))
    test = dict(checkpoint="best.pt", loss=test_loss, accuracy=test_acc, num_images=data.num_test, tta=args.tta)
    write_json(metrics(log, run, test=test), os.path.join(args.output_dir, "metrics.json"))


if __name__ == "__main__":
    main()
