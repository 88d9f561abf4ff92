"""LoRA by hand, in one layer: read this before qlora_minimal.py (which gets the same layer from peft).

A pretrained weight W (out, in) stays frozen; its update is learnt as a product of two thin matrices,
W' = W + (alpha / r) * B @ A with A (r, in) and B (out, r), r << min(in, out). Only A and B train:
r * (in + out) parameters instead of in * out. tests/acceptance/test_grade_lora_minimal.py checks it against
peft's LoRA layer (outputs and gradients equal within 1e-6).
"""

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B(A(dropout(x))), with base (an nn.Linear) frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)  # W (out, in) and bias keep their pretrained values
        self.A = nn.Parameter(torch.empty(r, base.in_features))   # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))  # (out, r): zero, so at step 0 the layer IS base
        # A like nn.Linear's own weight (and peft): uniform in +-1/sqrt(in). A must not be zero too: with A = B = 0
        # both gradients are zero (dL/dB = g A^T x, dL/dA = B^T g x) and LoRA never starts learning.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        # alpha / r keeps the update's size the same when you change r, so lr need not be re-tuned for each r.
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)  # on the LoRA branch's input only; base(x) sees x as it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        # Two thin matmuls, (..., in) -> (..., r) -> (..., out): the (out, in) product B @ A is never built.
        update = self.dropout(x) @ self.A.T @ self.B.T  # (..., out)
        return self.base(x) + self.scaling * update     # (..., out)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """For deployment: fold the update into W and return the plain nn.Linear (no LoRA cost at inference).
        Use the returned layer instead of this one: W now holds the update."""
        self.base.weight += self.scaling * self.B @ self.A  # (out, r) @ (r, in) -> (out, in)
        return self.base
