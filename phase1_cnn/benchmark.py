"""Training throughput of our data pipeline vs the textbook one, side by side in one run, same model and data.

  textbook:              per-image PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
                         Normalize) in a Dataset that does what torchvision.datasets.CIFAR10 does, through a
                         DataLoader with its default num_workers=0, the baseline every ratio is against;
  textbook + N workers:  the same with N DataLoader worker processes (--textbook_workers), as tutorials advise;
  ours:                  uint8 tensors through our Dataset/DataLoader, crop + flip + normalise for the whole batch
                         with tensor ops on the training device (cifar_data.augment);
  ours, no DataLoader:   the uint8 set on the device, a batch = one index by a random permutation (DeviceBatches,
                         train.py's GPU path), same batch augmentation;
  model only:            one prepared batch reused: the model's own speed, the ceiling for any pipeline.

    python phase1_cnn/benchmark.py                          # lenet5, CIFAR-10 files if present, else synthetic
    python phase1_cnn/benchmark.py --model resnet9 --width 16
    python phase1_cnn/benchmark.py --recipe                 # CUDA: the whole default ResNet-9 recipe, timed

All pipelines run the same training step (forward, backward, SGD step) on a model with the same initial weights.
On CUDA it also times one full epoch over the data for each pipeline. --recipe (CUDA only) times the 24 epochs of
train.py's default ResNet-9 training on the device-resident path and compares with airbench94's published 3.83 s on
an A100 (a different, shorter recipe: the ratio is of wall-clock times, not of equal accuracy).
"""

import argparse
import os
import statistics
import time

import torch
from cifar_data import (
    CIFAR_FOLDER,
    CIFAR_MEAN,
    CIFAR_STD,
    BadInput,
    CifarDataset,
    DeviceBatches,
    OneLineArgumentParser,
    augment,
    exit_bad_input,
    load_cifar10,
    make_loader,
    make_synthetic,
    whole,
)
from cifar_loops import amp_dtype, resolve_device, to_model_input, train_one_epoch, train_step
from cifar_models import MODEL_ALIASES, build_model
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


def sliced_batches(images, labels, batch_size, num_workers, device):
    """No DataLoader: the uint8 tensors on the device, a batch = one index by a random permutation (train.py's GPU
    path, DeviceBatches)."""
    aug_gen = torch.Generator(device=device).manual_seed(0)
    for x, y in DeviceBatches(images, labels, batch_size, torch.Generator().manual_seed(0), device):
        yield to_model_input(augment(x, aug_gen), device), y


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


AIRBENCH94_A100_SECONDS = 3.83  # Keller Jordan, cifar10-airbench README: airbench94.py, 94.01% on an A100


def build_parser() -> argparse.ArgumentParser:
    intro, usage = __doc__.split("\n\n", 1)
    p = OneLineArgumentParser(description=intro, epilog=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["lenet5", "resnet9", "cnn"], default="lenet5", help="cnn = resnet9")
    p.add_argument("--width", type=whole(1, 512), default=64, help="resnet9 base width")
    p.add_argument("--batch_size", type=whole(1), default=128)
    p.add_argument("--steps", type=whole(1), default=100, help="timed training steps per pipeline")
    p.add_argument("--warmup", type=whole(0), default=5,
                   help="untimed steps first (allocator, cuDNN autotune)")
    p.add_argument("--repeats", type=whole(1), default=3,
                   help="times each pipeline, round-robin; the median counts")
    p.add_argument("--data_dir", default="data", help="uses data_dir/cifar-10-batches-py when it is there")
    p.add_argument("--synthetic", action="store_true", help="use in-memory synthetic images even if CIFAR-10 is there")
    p.add_argument("--num_images", type=whole(1), default=50000,
                   help="images to draw batches from (at most what exists)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--num_workers", type=whole(0, 256), default=0, help="DataLoader workers of the 'ours' row")
    p.add_argument("--textbook_workers", type=whole(1, 256), default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers of the 'textbook + N workers' row (default: CPU cores, at most 4)")
    p.add_argument("--recipe", action="store_true", help="CUDA only: time train.py's default ResNet-9 recipe")
    return p


def load_images(args):
    """(images, labels, source) from CIFAR-10 train when present (and not --synthetic), else synthetic."""
    if not args.synthetic and os.path.isdir(os.path.join(args.data_dir, CIFAR_FOLDER)):
        images, labels, _ = load_cifar10(args.data_dir, "train")
        source = f"CIFAR-10 train from {args.data_dir}"
    else:
        images, labels, *_ = make_synthetic(n_train=min(args.num_images, 50000), n_test=1)
        source = "synthetic in-memory images"
    return images[:args.num_images], labels[:args.num_images], source


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.model = MODEL_ALIASES.get(args.model, args.model)
    try:
        device = resolve_device(args.device)
        if args.recipe and device.type != "cuda":
            raise BadInput("--recipe times the 24-epoch ResNet-9 recipe on a GPU: it needs CUDA (use --device cuda)")
        images, labels, source = load_images(args)
        steps = min(args.steps, len(labels) // args.batch_size - args.warmup)
        if steps < 1 and not args.recipe:
            raise BadInput(f"{len(labels)} images give too few batches of {args.batch_size} for --warmup "
                           f"{args.warmup} plus a timed step: lower --batch_size or --warmup")
    except BadInput as e:
        exit_bad_input(e)
    if args.recipe:
        return time_recipe(images, labels, source, device)
    torch.manual_seed(0)
    model_state = build_model(args.model, args.width).state_dict()  # same start for every pipeline
    print(f"{args.model}, batch {args.batch_size}, {steps} timed steps after {args.warmup} warm-up, median of "
          f"{args.repeats} round-robin repeats, "
          f"{len(labels)} {source}, device {device}, torch threads {torch.get_num_threads()}")

    workers = args.textbook_workers
    pipelines = {  # name: (batches, DataLoader workers)
        "textbook (PIL transforms per image, DataLoader)": (textbook_batches, 0),
        f"textbook + {workers} workers (the same, num_workers={workers})": (textbook_batches, workers),
        f"ours (uint8 Dataset + DataLoader, batch augmentation on {device.type})": (our_batches, args.num_workers),
        f"ours, no DataLoader (uint8 tensors on {device.type}, indexed)": (sliced_batches, 0),
        "model only (one batch reused: the ceiling)": (same_batch, 0),
    }
    # Round-robin over the pipelines, --repeats times, median per pipeline: a load that changes during the run (a
    # shared machine) then hits every row alike instead of whichever happened to run at the time.
    timings = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, (make_batches, num_workers) in pipelines.items():
            batches = make_batches(images, labels, args.batch_size, num_workers, device)
            timings[name].append(time_training(batches, model_state, args, device, args.warmup, steps))
    rates = {name: steps * args.batch_size / statistics.median(t) for name, t in timings.items()}
    epoch_seconds = {}
    for name, (make_batches, num_workers) in pipelines.items() if device.type == "cuda" else ():
        batches = make_batches(images, labels, args.batch_size, num_workers, device)  # a whole epoch, workers' start
        epoch_seconds[name] = time_training(batches, model_state, args, device, 0, len(labels) // args.batch_size)

    baseline = next(iter(rates.values()))
    print(f"{'pipeline':70s} {'images/s':>10s}" + (f" {'s/epoch':>8s}" if epoch_seconds else "") + "  x textbook")
    for name, rate in rates.items():
        print(f"{name:70s} {rate:10.0f}" + (f" {epoch_seconds[name]:8.2f}" if epoch_seconds else "")
              + f" {rate / baseline:10.2f}x")
    print("note: torchvision's RandomCrop(32, padding=4) pads with zeros (padding_mode='constant'); ours reflects\n"
          "      the border, as Page's recipe does: the crops differ in the pixels that come from the padding.")


def time_recipe(images, labels, source, device) -> None:
    """The whole training step of train.py's default recipe (ResNet-9 width 64, batch 512, 24 epochs, augmentation
    and cutout on the device, bf16 autocast, channels_last), no validation, timed end to end. Not run here yet (no
    GPU in the sandbox where this was written): its first run on a GPU gives the figure."""
    from train import COMMON, RECIPES, build_training  # the trainer's own recipe, model and optimizer
    run = {**COMMON, **RECIPES["resnet9"]}
    batches = DeviceBatches(images, labels, run["batch_size"], torch.Generator().manual_seed(0), device)
    t = build_training(run, device, len(batches), compile_model=False)
    aug = lambda epoch: torch.Generator(device=device).manual_seed(epoch)
    train_one_epoch(t.model, batches, t.optimizer, t.scheduler, t.scaler, aug(0), device,
                    run["label_smoothing"], run["cutout"])  # warm-up epoch: cuDNN autotuning, allocator
    t = build_training(run, device, len(batches), compile_model=False)  # a fresh model for the timed run
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for epoch in range(1, run["epochs"] + 1):
        loss, acc = train_one_epoch(t.model, batches, t.optimizer, t.scheduler, t.scaler, aug(epoch), device,
                                    run["label_smoothing"], run["cutout"])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device)
    print(f"{len(labels)} {source}; GPU: {name}")
    print(f"{run['epochs']} epochs of the default ResNet-9 recipe: {seconds:.2f} s, "
          f"{run['epochs'] * len(batches) * run['batch_size'] / seconds:.0f} images/s (whole training step), "
          f"last epoch's train loss {loss:.3f} acc {acc:.3f}")
    print(f"vs airbench94, published 3.83 s on an A100 (a shorter recipe): {seconds / AIRBENCH94_A100_SECONDS:.2f}x "
          f"its time, on {name}")


if __name__ == "__main__":
    main()
