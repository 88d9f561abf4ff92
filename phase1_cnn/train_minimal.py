"""Phase 1 in one file, to read first and then retype from memory: a CIFAR-10 CNN in plain PyTorch.

    python phase1_cnn/train_minimal.py --data_dir data --epochs 10 --output_dir checkpoints/phase1-minimal

Reads the official python-version files (data_dir/cifar-10-batches-py/), holds a tenth of the training images out
for validation, prints one line per epoch, keeps best.pt = the epoch with the best VALIDATION accuracy, and at the
end tests best.pt once on the test set. train.py is the full tool (ResNet-9 recipe, exact resume, checks on every
input, GPU path); phase1_cnn/README.md says what it adds and why.
"""

import argparse
import os
import pickle

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

BATCH_SIZE = 128
LR = 0.05  # peak learning rate of the one-cycle schedule
WEIGHT_DECAY = 5e-4
VAL_FRACTION = 0.1  # of the training images, held out to choose best.pt (5,000 of CIFAR-10's 50,000)
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)  # per-channel statistics of CIFAR-10's training images
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickling calls whatever functions a file names, so a downloaded pickle could run any code. A CIFAR batch
    needs three globals to rebuild its one numpy array; admit those (under numpy 1's and numpy 2's module names)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        assert (module, name) in self.ALLOWED, f"refusing to load {module}.{name}"
        return super().find_class(module, name)


def load_batches(folder, names):
    """CIFAR-10 batch files -> images uint8 (N, 3, 32, 32), labels int64 (N,)."""
    images, labels = [], []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            batch = NumpyOnlyUnpickler(f, encoding="bytes").load()  # written by Python 2: keys are bytes
        images.append(torch.from_numpy(batch[b"data"]).view(-1, 3, 32, 32))  # (N, 3072) R,G,B planes -> (N, 3, 32, 32)
        labels.append(torch.tensor(batch[b"labels"]))
    return torch.cat(images), torch.cat(labels)


class CifarDataset(Dataset):
    """uint8 images in memory; an item is (float (3, 32, 32) normalised, label). augment: random crop + flip."""

    def __init__(self, images, labels, augment=False):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = (self.images[i].float() / 255 - MEAN) / STD  # (3, 32, 32), each channel ~ mean 0, std 1
        if self.augment:  # a new random view of each image every epoch: memorising pixels does not pay
            x = F.pad(x, (4, 4, 4, 4), mode="reflect")  # (3, 40, 40)
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = x[:, top:top + 32, left:left + 32]  # random 32x32 crop: shifts by up to 4 px
            if torch.rand(()) < 0.5:
                x = x.flip(2)  # a mirrored image is still the same class
        return x, self.labels[i]


def conv_bn(c_in, c_out):
    # No conv bias: BatchNorm subtracts the mean anyway and adds its own shift.
    # BatchNorm uses the batch's statistics in train mode and its running averages in eval mode.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.MaxPool2d(2))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16),  # (B, 16, 16, 16)
            conv_bn(16, 32),  # (B, 32, 8, 8)
            conv_bn(32, 64),  # (B, 64, 4, 4)
        )
        self.head = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x):  # x: (B, 3, 32, 32)
        return self.head(self.features(x).flatten(1))  # (B, 1024) -> logits (B, 10)


def train_one_epoch(model, loader, optimizer, scheduler):
    model.train()  # BatchNorm: normalise with this batch's statistics and update the running averages
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)  # (B, 10)
        loss = F.cross_entropy(logits, y)  # mean over the batch
        optimizer.zero_grad()  # gradients add up across backward() calls: clear the last step's
        loss.backward()
        optimizer.step()
        scheduler.step()  # the schedule moves every step, not every epoch
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return loss_sum / n, correct / n


@torch.no_grad()  # no graph kept: evaluation needs no gradients, so less memory and time
def evaluate(model, loader):
    model.eval()  # BatchNorm: use the running averages, so a prediction does not depend on the rest of the batch
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return loss_sum / n, correct / n


def main():
    p = argparse.ArgumentParser(description="Train a small CIFAR-10 CNN; best.pt is chosen on validation accuracy.")
    p.add_argument("--data_dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--output_dir", default="checkpoints/phase1-minimal")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)  # seeds the split, the initial weights, the shuffling and the augmentation

    # ---- data: validation carved out of the TRAINING images; the test set is touched once, at the very end
    folder = os.path.join(args.data_dir, "cifar-10-batches-py")
    images, labels = load_batches(folder, [f"data_batch_{i}" for i in range(1, 6)])
    test_images, test_labels = load_batches(folder, ["test_batch"])
    order = torch.randperm(len(labels))
    n_val = int(len(labels) * VAL_FRACTION)
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_set = CifarDataset(images[train_idx], labels[train_idx], augment=True)
    val_set = CifarDataset(images[val_idx], labels[val_idx])
    test_set = CifarDataset(test_images, test_labels)
    train_loader = DataLoader(train_set, BATCH_SIZE, shuffle=True, drop_last=True)  # a new order every epoch
    val_loader = DataLoader(val_set, 1000)
    test_loader = DataLoader(test_set, 1000)
    print(f"data: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test images")

    # ---- model and optimiser
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)
    # One cycle: the learning rate warms up to LR, then anneals towards 0 by the last step.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=args.epochs * len(train_loader))

    # ---- train; keep the epoch with the best validation accuracy
    os.makedirs(args.output_dir, exist_ok=True)
    best_path, best_acc = os.path.join(args.output_dir, "best.pt"), -1.0
    for epoch in range(1, args.epochs + 1):
        train_loss, train_acc = train_one_epoch(model, train_loader, optimizer, scheduler)
        val_loss, val_acc = evaluate(model, val_loader)
        print(f"epoch {epoch} train_loss {train_loss:.4f} train_acc {train_acc:.4f} "
              f"val_loss {val_loss:.4f} val_acc {val_acc:.4f}", flush=True)
        if val_acc > best_acc:  # chosen on validation, never on test: test must stay an unbiased estimate
            best_acc = val_acc
            torch.save({"model": model.state_dict(), "epoch": epoch, "val_acc": val_acc}, best_path)

    # ---- test best.pt once; weights_only=True loads tensors and plain types only, so no code in the file runs
    checkpoint = torch.load(best_path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    test_loss, test_acc = evaluate(model, test_loader)
    print(f"best.pt is epoch {checkpoint['epoch']} (val_acc {checkpoint['val_acc']:.4f})")
    print(f"test_loss {test_loss:.4f} test_acc {test_acc:.4f}")


if __name__ == "__main__":
    main()
