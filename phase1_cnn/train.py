"""Train a CIFAR-10 classifier in plain PyTorch: our own Dataset, on-device batch augmentation, a training loop and
an evaluation loop, the best checkpoint chosen on a validation split (never on test), exact --resume.

    python phase1_cnn/train.py                    # ResNet-9, 24 epochs, the DAWNBench recipe (a GPU makes it quick)
    python phase1_cnn/train.py --model lenet5     # classic LeNet-5
    python phase1_cnn/train.py --synthetic --model lenet5 --epochs 10   # offline demo, no data needed

The default `cnn` recipe follows David Page's DAWNBench ResNet-9 ("How to train your ResNet", 2018), 94% test
accuracy in 24 epochs there: batch 512, SGD nesterov momentum 0.9, weight decay 5e-4, learning rate linearly up to
0.4 over the first 5/24 of training then linearly down to 0, label smoothing 0.2, crop + flip + 8x8 cutout.
"""

import argparse
import math
import os
import sys
import time

import torch
from cifar_data import (
    BadInput,
    CifarDataset,
    download_cifar10,
    exit_bad_input,
    load_cifar10,
    make_loader,
    make_synthetic,
    split_train_val,
)
from cifar_loops import amp_dtype, evaluate, resolve_device, train_one_epoch
from cifar_models import build_model, count_params
from cifar_outputs import load_checkpoint, plot_curves, save_checkpoint, write_json

# Per-model recipes. A flag given on the command line overrides its entry.
RECIPES = {
    "cnn": dict(width=64, epochs=24, batch_size=512, lr=0.4, weight_decay=5e-4, label_smoothing=0.2, cutout=8),
    "lenet5": dict(width=0, epochs=30, batch_size=128, lr=0.05, weight_decay=5e-4, label_smoothing=0.0, cutout=0),
}
COMMON = dict(model="cnn", seed=0, val_size=5000, max_train_samples=0, synthetic=False)
RUN_KEYS = [*COMMON, *RECIPES["cnn"]]  # what defines a run: --resume takes these from the checkpoint
WARMUP_FRACTION = 5 / 24  # Page: peak learning rate at epoch 5 of 24


def parse_args(argv=None) -> argparse.Namespace:
    intro, usage = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=intro, epilog=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    per_model = lambda key: f"default {RECIPES['cnn'][key]} (cnn) / {RECIPES['lenet5'][key]} (lenet5)"
    p.add_argument("--data_dir", default="data", help="folder holding cifar-10-batches-py/ (default: data)")
    p.add_argument("--output_dir", default="checkpoints/phase1", help="best.pt, last.pt, metrics.json, curves.png")
    p.add_argument("--model", choices=list(RECIPES), default=None, help="cnn (ResNet-9, default) or lenet5")
    p.add_argument("--width", type=int, default=None, help="cnn base width (default 64; smaller = faster on a CPU)")
    p.add_argument("--epochs", type=int, default=None, help=per_model("epochs"))
    p.add_argument("--batch_size", type=int, default=None, help=per_model("batch_size"))
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, " + per_model("lr"))
    p.add_argument("--weight_decay", type=float, default=None, help=per_model("weight_decay"))
    p.add_argument("--label_smoothing", type=float, default=None, help=per_model("label_smoothing"))
    p.add_argument("--cutout", type=int, default=None, help="cutout square side, 0 = off; " + per_model("cutout"))
    p.add_argument("--seed", type=int, default=None, help="seeds init, split, shuffling and augmentation (default 0)")
    p.add_argument("--val_size", type=int, default=None, help="training images held out for validation (default "
                   "5000, at most a fifth of the training set; 0 = none, best.pt is then the last epoch)")
    p.add_argument("--max_train_samples", type=int, default=None, help="train on at most this many images (0 = all)")
    p.add_argument("--synthetic", action="store_true", default=None, help="in-memory learnable patterns, no files")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers; 0 is right here: the images are "
                   "in memory and augmentation runs batched on the device")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/last.pt with its settings")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an output_dir that already holds a run")
    p.add_argument("--download", action="store_true", help="fetch and unpack CIFAR-10 into data_dir (needs internet)")
    p.add_argument("--stop_after_epoch", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a crash
    return p.parse_args(argv)


def resolve_run(args, saved: dict | None, last_path: str) -> dict:
    """The run's settings: recipe defaults overridden by flags, or, on --resume, the checkpoint's own settings, which
    an explicitly given flag must not contradict (same seed + same settings = same run)."""
    given = {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k) is not None}
    if saved is not None:
        for k, v in given.items():
            if v != saved.get(k):
                raise BadInput(f"{last_path} was trained with --{k} {saved.get(k)}, not {v}: resume without --{k}, "
                               "or pass a new --output_dir to start a fresh run")
        missing = [k for k in RUN_KEYS if k not in saved]
        if missing:
            raise BadInput(f"{last_path} lacks the run settings {missing}: pass a new --output_dir to start afresh")
        return {k: saved[k] for k in RUN_KEYS}
    model = given.get("model", COMMON["model"])
    run = {**COMMON, **RECIPES[model], **given}
    # Checked here, before any file is read or written: out of range, torch would fail later with a traceback.
    rules = {
        "epochs": (run["epochs"] >= 1, "at least 1"),
        "batch_size": (run["batch_size"] >= 1, "at least 1"),
        "width": (model != "cnn" or run["width"] >= 1, "at least 1"),
        "lr": (run["lr"] > 0, "positive"),
        "weight_decay": (run["weight_decay"] >= 0, "at least 0"),
        "label_smoothing": (0 <= run["label_smoothing"] < 1, "in [0, 1)"),
        "cutout": (0 <= run["cutout"] <= 32, "in 0..32 pixels"),
        "val_size": (run["val_size"] >= 0, "at least 0"),
        "max_train_samples": (run["max_train_samples"] >= 0, "at least 0"),
    }
    for flag, (ok, rule) in rules.items():
        if not ok:
            raise BadInput(f"--{flag} must be {rule}, got {run[flag]}")
    return run


def one_cycle(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear 0 -> 1 over warmup_steps, then linear 1 -> 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


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
        print(f"\ninterrupted: {args.output_dir}/last.pt holds the last finished epoch; continue with --resume",
              file=sys.stderr)
        sys.exit(130)


def run_training(args) -> None:
    # ---- arguments: device, and the run's settings (from the checkpoint when resuming)
    device = resolve_device(args.device)
    if args.num_workers < 0:
        raise BadInput(f"--num_workers must be at least 0, got {args.num_workers}")
    last_path, best_path = os.path.join(args.output_dir, "last.pt"), os.path.join(args.output_dir, "best.pt")
    if os.path.exists(last_path) and not (args.resume or args.overwrite):  # never replace a run by accident
        raise BadInput(f"{args.output_dir} already holds a run ({last_path}): continue it with --resume, replace it "
                       "with --overwrite, or pass another --output_dir")
    ckpt = load_checkpoint(last_path, "nothing to resume: drop --resume to start a run") if args.resume else None
    run = resolve_run(args, ckpt["args"] if ckpt else None, last_path)

    # ---- data: uint8 tensors in memory; validation carved out of the training images
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
    print(f"data: {len(train_y)} train / {val_size} val / {len(test_y)} test images, {source}")

    train_set = CifarDataset(train_x, train_y)
    shuffle_gen = torch.Generator()  # reseeded every epoch, see epoch_seeds
    train_loader = make_loader(train_set, run["batch_size"], shuffle_gen, device, args.num_workers)
    eval_batch = max(run["batch_size"], 1024)
    eval_loader = lambda x, y: make_loader(CifarDataset(x, y), eval_batch, None, device, args.num_workers)
    val_loader = eval_loader(val_x, val_y) if val_size else None
    test_loader = eval_loader(test_x, test_y)

    # ---- model, optimizer, schedule
    torch.manual_seed(run["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # picks the fastest conv kernels; GPU runs are then not bit-exact
    model = build_model(run["model"], run["width"]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=run["lr"], momentum=0.9, nesterov=True,
                                weight_decay=run["weight_decay"])
    total_steps = run["epochs"] * len(train_loader)
    warmup_steps = max(1, math.ceil(WARMUP_FRACTION * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: one_cycle(s, total_steps, warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    print(f"model: {run['model']} ({type(model).__name__}), {count_params(model):,} parameters; device {device}"
          + (f", {amp_dtype(device)} autocast, channels_last" if device.type == "cuda" else ""))

    start_epoch, best_acc, best_epoch, history = 1, -1.0, 0, []
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt["scaler"]:  # empty unless the run used fp16
                scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise BadInput(f"{last_path} does not fit this run ({type(e).__name__}: {str(e).splitlines()[0]}): "
                           "pass a new --output_dir to start a fresh run") from None
        torch.set_rng_state(ckpt["rng"]["torch"])  # nothing draws from it now; a dropout layer would
        if device.type == "cuda" and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start_epoch, best_acc, best_epoch = ckpt["epoch"] + 1, ckpt["best_val_acc"], ckpt["best_epoch"]
        history = ckpt["history"]
        print(f"resuming {last_path} after epoch {ckpt['epoch']} of {run['epochs']}")
        if start_epoch > run["epochs"]:
            print("that run is already complete: nothing to do")
            return

    # ---- train: one line per epoch, both checkpoints and the metrics rewritten after every epoch
    metrics_path = os.path.join(args.output_dir, "metrics.json")
    best_summary = lambda: dict(epoch=best_epoch, val_acc=best_acc if val_size else None)
    for epoch in range(start_epoch, run["epochs"] + 1):
        t0 = time.perf_counter()
        shuffle_seed, aug_seed = epoch_seeds(run["seed"], epoch)
        shuffle_gen.manual_seed(shuffle_seed)  # the train loader's sampler draws this epoch's order from it
        aug_gen = torch.Generator(device=device).manual_seed(aug_seed)  # crops, flips, cutout: drawn on the device
        train_loss, train_acc = train_one_epoch(
            model, train_loader, optimizer, scheduler, scaler, aug_gen, device,
            label_smoothing=run["label_smoothing"], cutout_size=run["cutout"], desc=f"epoch {epoch}/{run['epochs']}")
        val_loss, val_acc = evaluate(model, val_loader, device)[:2] if val_loader else (None, None)
        seconds = time.perf_counter() - t0
        lr = scheduler.get_last_lr()[0]
        history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                            val_acc=val_acc, lr=lr, seconds=seconds))
        val_text = f"val loss {val_loss:.4f} acc {val_acc:.4f}" if val_loader else "no val"
        print(f"epoch {epoch:3d}/{run['epochs']} | train loss {train_loss:.4f} acc {train_acc:.4f} | {val_text} | "
              f"lr {lr:.4f} | {seconds:.1f}s", flush=True)

        improved = val_acc is None or val_acc > best_acc
        if improved:
            best_acc, best_epoch = (val_acc if val_acc is not None else -1.0), epoch
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict(), epoch=epoch, best_val_acc=best_acc, best_epoch=best_epoch,
                     args=run, class_names=class_names, history=history,
                     rng=dict(torch=torch.get_rng_state(),
                              cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else []))
        if improved:
            save_checkpoint(state, best_path)
        save_checkpoint(state, last_path)
        write_json(dict(args=run, history=history, best=best_summary()), metrics_path)
        plot_curves(history, os.path.join(args.output_dir, "curves.png"))
        if epoch == args.stop_after_epoch and epoch < run["epochs"]:
            print(f"stopping after epoch {epoch} as asked; continue with --resume")
            return

    # ---- evaluate: the validation-chosen best.pt, once, on the test set
    model.load_state_dict(load_checkpoint(best_path, "it was removed during training: train again")["model"])
    test_loss, test_acc, _ = evaluate(model, test_loader, device)
    chosen = "chosen on validation" if val_size else "the last epoch"
    print(f"test: best.pt (epoch {best_epoch}, {chosen}) loss {test_loss:.4f} accuracy {test_acc:.4f}")
    write_json(dict(args=run, history=history, best=best_summary(),
                    test=dict(checkpoint="best.pt", loss=test_loss, accuracy=test_acc, num_images=len(test_y))),
               metrics_path)


if __name__ == "__main__":
    main()
