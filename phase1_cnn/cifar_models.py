"""The two CIFAR-10 classifiers: classic LeNet-5 and a ResNet-9 in the style of the DAWNBench record (Page, 2018)."""

import torch
from torch import nn


class LeNet5(nn.Module):
    """LeCun et al. (1998) layout for 3x32x32 input: conv5-pool-conv5-pool, then 120-84-10 fully connected.
    ReLU and max-pooling instead of the original tanh and average subsampling, as most modern re-implementations."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 5, 5)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 400)
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),  # (B, 10)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU (-> 2x2 max-pool). No conv bias: BatchNorm's shift replaces it."""
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class Residual(nn.Module):
    """x + two conv_bn blocks: the identity path keeps gradients flowing while the block learns a correction."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """The 'ResNet-9' of David Page's DAWNBench entry ("How to train your ResNet", myrtle.ai 2018), 94% on CIFAR-10
    in 24 epochs. Only 8 convolutions; residual blocks only after layer1 and layer3, the placement Page's architecture
    search settled on. width=64 is the original; smaller widths make quick CPU runs."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            conv_bn(3, w),  # prep: (B, 64, 32, 32)
            conv_bn(w, 2 * w, pool=True), Residual(2 * w),  # layer1: (B, 128, 16, 16)
            conv_bn(2 * w, 4 * w, pool=True),  # layer2: (B, 256, 8, 8)
            conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w),  # layer3: (B, 512, 4, 4)
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),  # (B, 512)
            nn.Linear(8 * w, num_classes, bias=False),  # (B, 10)
        )
        # Page scales the logits by 1/8: smaller initial logits keep the softmax from saturating early in training.
        self.logit_scale = 0.125

    def forward(self, x):
        return self.net(x) * self.logit_scale


MODEL_ALIASES = {"cnn": "resnet9"}  # the name older checkpoints and commands use


def build_model(name: str, width: int = 64) -> nn.Module:
    name = MODEL_ALIASES.get(name, name)
    if name == "lenet5":
        return LeNet5()
    if name == "resnet9":
        return ResNet9(width)
    raise ValueError(f"unknown model {name!r}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    # python phase1_cnn/cifar_models.py: parameter counts and output shapes, measured rather than quoted.
    import argparse
    argparse.ArgumentParser(description="Print parameter counts and output shapes of the phase-1 models.").parse_args()
    x = torch.zeros(2, 3, 32, 32)
    for name in ("lenet5", "resnet9"):
        model = build_model(name).eval()
        print(f"{name:7s} {type(model).__name__:8s} params={count_params(model):>9,}  out={tuple(model(x).shape)}")
