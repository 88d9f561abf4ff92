"""Evaluate a phase-1 checkpoint on the CIFAR-10 test set: accuracy, per-class accuracy, confusion matrix.

    python phase1_cnn/evaluate.py                                   # checkpoints/phase1/best.pt on data/
    python phase1_cnn/evaluate.py --checkpoint checkpoints/phase1/last.pt
    python phase1_cnn/evaluate.py --checkpoint checkpoints/phase1-demo     # a run's folder: its best.pt
    python phase1_cnn/evaluate.py --tta                              # flip test-time augmentation

Writes eval.json and confusion_matrix.png beside the checkpoint. A checkpoint trained on a GPU evaluates on a CPU.
A checkpoint trained with --synthetic is evaluated on the same synthetic test set, regenerated in memory.
"""

import argparse
import os

import torch
from cifar_data import (
    NUM_CLASSES,
    BadInput,
    OneLineArgumentParser,
    exit_bad_input,
    load_cifar10,
    make_batches,
    make_synthetic,
    whole,
)
from cifar_loops import evaluate, resolve_device
from cifar_models import build_model
from cifar_outputs import load_checkpoint, plot_confusion, write_json


def build_parser() -> argparse.ArgumentParser:
    intro, usage = __doc__.split("\n\n", 1)
    p = OneLineArgumentParser(description=intro, epilog=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/phase1/best.pt",
                   help="a checkpoint written by train.py, or a run's folder (its best.pt); "
                   "default: checkpoints/phase1/best.pt")
    p.add_argument("--data_dir", default="data", help="folder holding cifar-10-batches-py/ (default: data)")
    p.add_argument("--batch_size", type=whole(1), default=1024)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--num_workers", type=whole(0, 256), default=0,
                   help="DataLoader workers (CPU; on CUDA the test images are put on the GPU once instead)")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror image")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if os.path.isdir(args.checkpoint):  # a run's folder, as train.py's --output_dir names it
        args.checkpoint = os.path.join(args.checkpoint, "best.pt")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run_evaluation(args)
    except BadInput as e:
        exit_bad_input(e)


def run_evaluation(args) -> None:
    # ---- checkpoint and model: the architecture comes from the checkpoint's own settings
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, "train one first with python phase1_cnn/train.py, or pass --checkpoint")
    run, class_names = ckpt["args"], ckpt["class_names"]
    model = build_model(run["model"], run["width"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        raise BadInput(f"{args.checkpoint}: weights do not fit a {run['model']} model ({reason})") from None
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    # ---- data: the test split only
    if run["synthetic"]:
        *_, test_x, test_y, _ = make_synthetic()
        source = "the synthetic test set (the checkpoint was trained with --synthetic)"
    else:
        test_x, test_y, _ = load_cifar10(args.data_dir, "test")
        source = f"CIFAR-10 test_batch from {args.data_dir}"
    batches = make_batches(test_x, test_y, args.batch_size, None, device, device.type == "cuda", args.num_workers)

    # ---- evaluate
    test_loss, test_acc, preds = evaluate(model, batches, device, tta=args.tta)
    confusion = torch.bincount(test_y * NUM_CLASSES + preds, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1)  # rows = true class
    print(f"{args.checkpoint} (epoch {ckpt.get('epoch', '?')}, {run['model']}) on {len(test_y)} images of {source}")
    print(f"{'class':12s} {'images':>7s} {'accuracy':>9s}")
    for name, total, acc in zip(class_names, confusion.sum(1).tolist(), per_class.tolist(), strict=True):
        print(f"{name:12s} {total:7d} {acc:9.4f}")
    print(f"test loss {test_loss:.4f}  test accuracy {test_acc:.4f}" + ("  (flip TTA)" if args.tta else ""))

    # ---- save beside the checkpoint
    out_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    png_path = os.path.join(out_dir, "confusion_matrix.png")
    plot_confusion(confusion, class_names, png_path,
                   title=f"{os.path.basename(args.checkpoint)}: test accuracy {test_acc:.4f}")
    write_json(dict(checkpoint=args.checkpoint, epoch=ckpt.get("epoch"), model=run["model"], test_accuracy=test_acc,
                    test_loss=test_loss, tta=args.tta, num_images=len(test_y),
                    per_class_accuracy=dict(zip(class_names, per_class.tolist(), strict=True)),
                    confusion_matrix=confusion.tolist()),
               os.path.join(out_dir, "eval.json"))
    print(f"wrote {os.path.join(out_dir, 'eval.json')} and {png_path}")


if __name__ == "__main__":
    main()
