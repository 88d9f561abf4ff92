"""Training throughput of our data pipeline vs the textbook one, side by side in one run, same model and data.

  textbook: per-image PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) in a
            Dataset that does what torchvision.datasets.CIFAR10 does, through a DataLoader;
  ours:     uint8 tensors through our Dataset/DataLoader, crop + flip + normalise for the whole batch with tensor ops
            on the training device (cifar_data.augment).

    python phase1_cnn/benchmark.py                          # lenet5, CIFAR-10 files if present, else synthetic
    python phase1_cnn/benchmark.py --model cnn --width 16

Both pipelines run the same training step (forward, backward, SGD step) on a model with the same initial weights.
On CUDA it also times one full epoch over the data for each pipeline.
"""

import argparse
import os
import time

import torch
from cifar_data import (
    CIFAR_FOLDER,
    CIFAR_MEAN,
    CIFAR_STD,
    BadInput,
    CifarDataset,
    augment,
    exit_bad_input,
    load_cifar10,
    make_loader,
    make_synthetic,
)
from cifar_loops import amp_dtype, resolve_device, to_model_input, train_step
from cifar_models import build_model
from torch.utils.data import DataLoader, Dataset


class PilCifarDataset(Dataset):
    """The textbook way, as torchvision.datasets.CIFAR10: HWC uint8 array, one PIL image + transform per item."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3) as CIFAR10.data
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def textbook_batches(images, labels, batch_size, num_workers, device):
    import torchvision.transforms as T
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    loader = DataLoader(PilCifarDataset(images, labels, transform), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0)
    for x, y in loader:
        yield to_model_input(x.to(device, non_blocking=True), device), y.to(device, non_blocking=True)


def our_batches(images, labels, batch_size, num_workers, device):
    loader = make_loader(CifarDataset(images, labels), batch_size, torch.Generator().manual_seed(0), device,
                         num_workers)
    aug_gen = torch.Generator(device=device).manual_seed(0)
    for x, y in loader:
        x = augment(x.to(device, non_blocking=True), aug_gen)
        yield to_model_input(x, device), y.to(device, non_blocking=True)


def same_batch(images, labels, batch_size, num_workers, device):
    """No data pipeline at all: one prepared batch, reused. The model's own speed, the ceiling for any pipeline."""
    x, y = next(our_batches(images[:batch_size], labels[:batch_size], batch_size, 0, device))
    while True:
        yield x, y


def time_training(batches, model_state, args, device, warmup: int, steps: int) -> float:
    """Seconds for `steps` training steps (after `warmup` untimed ones) fed by the `batches` iterator."""
    model = build_model(args.model, args.width).to(device)
    model.load_state_dict(model_state)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        train_step(model, x, y, optimizer, scheduler, scaler, 0.0, device)
        if i == warmup + steps - 1:
            break
    sync()
    return time.perf_counter() - t0


def main() -> None:
    intro, usage = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=intro, epilog=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["lenet5", "cnn"], default="lenet5")
    p.add_argument("--width", type=int, default=64, help="cnn base width")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=100, help="timed training steps per pipeline")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, cuDNN autotune)")
    p.add_argument("--data_dir", default="data", help="uses data_dir/cifar-10-batches-py when it is there")
    p.add_argument("--synthetic", action="store_true", help="use in-memory synthetic images even if CIFAR-10 is there")
    p.add_argument("--num_images", type=int, default=50000, help="images to draw batches from (at most what exists)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers, the same for both pipelines")
    args = p.parse_args()
    try:
        device = resolve_device(args.device)
        if min(args.batch_size, args.steps, args.num_images, args.width) < 1 or min(args.warmup, args.num_workers) < 0:
            raise BadInput("--batch_size, --steps, --num_images and --width must be at least 1, --warmup and "
                           "--num_workers at least 0")
        if not args.synthetic and os.path.isdir(os.path.join(args.data_dir, CIFAR_FOLDER)):
            images, labels, _ = load_cifar10(args.data_dir, "train")
            source = f"CIFAR-10 train from {args.data_dir}"
        else:
            images, labels, *_ = make_synthetic(n_train=min(args.num_images, 50000), n_test=1)
            source = "synthetic in-memory images"
        images, labels = images[:args.num_images], labels[:args.num_images]
        steps = min(args.steps, len(labels) // args.batch_size - args.warmup)
        if steps < 1:
            raise BadInput(f"{len(labels)} images give too few batches of {args.batch_size} for --warmup "
                           f"{args.warmup} plus a timed step: lower --batch_size or --warmup")
    except BadInput as e:
        exit_bad_input(e)
    torch.manual_seed(0)
    model_state = build_model(args.model, args.width).state_dict()  # same start for both pipelines
    print(f"{args.model}, batch {args.batch_size}, {steps} timed steps after {args.warmup} warm-up, "
          f"{len(labels)} {source}, device {device}, torch threads {torch.get_num_threads()}, "
          f"num_workers {args.num_workers}")

    pipelines = {"textbook (PIL transforms per image)": textbook_batches,
                 f"ours (uint8 batch augmentation on {device.type})": our_batches,
                 "model only (one batch reused: the ceiling)": same_batch}
    rates, epoch_seconds = {}, {}
    for name, make_batches in pipelines.items():
        batches = make_batches(images, labels, args.batch_size, args.num_workers, device)
        rates[name] = steps * args.batch_size / time_training(batches, model_state, args, device, args.warmup, steps)
        if device.type == "cuda":  # a whole epoch as well (fresh loader, workers included): GPU runs are short enough
            batches = make_batches(images, labels, args.batch_size, args.num_workers, device)
            epoch_seconds[name] = time_training(batches, model_state, args, device, 0, len(labels) // args.batch_size)

    print(f"{'pipeline':45s} {'images/s':>10s}" + (f" {'s/epoch':>8s}" if epoch_seconds else ""))
    for name, rate in rates.items():
        print(f"{name:45s} {rate:10.0f}" + (f" {epoch_seconds[name]:8.2f}" if epoch_seconds else ""))
    textbook, ours, _ = rates.values()
    print(f"speed-up: {ours / textbook:.2f}x (ours / textbook images per second)")


if __name__ == "__main__":
    main()
