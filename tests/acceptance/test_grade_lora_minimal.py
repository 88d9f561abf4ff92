"""Grades phase2_lora/lora_minimal.py, or your rewrite of it: --impl lora_minimal=PATH.

CONTRACT (lora_minimal): one file that defines
    LoRALinear(base: nn.Linear, r, alpha, dropout=0.0)     an nn.Module wrapping `base`
        base frozen (weight and bias); exactly two trainable parameters, A (r, in) and B (out, r), any names
        (nn.Parameter, or the weight of an nn.Linear without bias); A Kaiming-uniform as nn.Linear's weight
        (kaiming_uniform_(a=sqrt(5)): |A| <= 1/sqrt(in)), B zeros
    forward(x) = base(x) + (alpha / r) * B A dropout(x)    x (..., in) -> (..., out)
    merge() -> nn.Linear (optional, checked when defined): the base layer with (alpha / r) B A added to its weight
It keeps any demo behind `if __name__ == "__main__":`.

Checked against peft's LoRA layer (peft.LoraConfig + get_peft_model on a one-layer module, same base weights, A and
B copied in, B random): outputs and gradients (input, A, B) equal within 1e-6, in eval mode and in train mode with
dropout 0.5 (same seed); at the start (B = 0) the layer equals its base.
"""

import copy

import pytest
import torch
from grader import fail_with, import_file
from peft import LoraConfig, get_peft_model
from torch import nn

IN, OUT, R, ALPHA = 12, 10, 4, 12  # scaling alpha / r = 3: a missing, inverted or doubled scaling tells apart
SCALING = ALPHA / R
TOL = 1e-6


@pytest.fixture(scope="module")
def module(impl_path):
    path = impl_path("lora_minimal")
    try:
        return import_file(path, "lora_minimal")
    except Exception as e:
        fail_with(f"{path}: importing it failed with {type(e).__name__}: {e} (keep any demo behind "
                  f'`if __name__ == "__main__":`)')


def make(module, dropout=0.0):
    """A fresh LoRALinear around a fresh nn.Linear(IN, OUT); returns (layer, A, B)."""
    if not hasattr(module, "LoRALinear"):
        fail_with("the file defines no class LoRALinear")
    torch.manual_seed(0)
    try:
        layer = module.LoRALinear(nn.Linear(IN, OUT), r=R, alpha=ALPHA, dropout=dropout)
    except Exception as e:
        fail_with(f"LoRALinear(nn.Linear({IN}, {OUT}), r={R}, alpha={ALPHA}, dropout={dropout}) failed: "
                  f"{type(e).__name__}: {e}")
    trainable = {name: p for name, p in layer.named_parameters() if p.requires_grad}
    shapes = {name: tuple(p.shape) for name, p in trainable.items()}
    if len(trainable) != 2 or sorted(shapes.values()) != sorted([(R, IN), (OUT, R)]):
        fail_with(f"trainable parameters {shapes}: expected exactly A {(R, IN)} = (r, in) and B {(OUT, R)} = "
                  f"(out, r); the base layer's weight and bias must be frozen (requires_grad_(False))")
    by_shape = {tuple(p.shape): p for p in trainable.values()}
    return layer, by_shape[(R, IN)], by_shape[(OUT, R)]


def base_of(layer) -> nn.Linear:
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear) and m.weight.shape == (OUT, IN)]
    if len(linears) != 1:
        fail_with("LoRALinear must keep the nn.Linear it wraps (as a submodule, e.g. self.base)")
    return linears[0]


def peft_twin(layer, A, B, dropout=0.0):
    """peft's LoRA layer on a copy of the same base, with A and B copied in."""
    class OneLayer(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(OneLayer(copy.deepcopy(base_of(layer))),
                           LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["proj"]))
    twin = model.base_model.model.proj
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(A)
        twin.lora_B["default"].weight.copy_(B)
    return model, twin


def x_and_grad_out(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, IN, generator=g), torch.randn(2, 5, OUT, generator=g)  # (batch, tokens, features)


def run(model, x, grad_out, seed=None):
    """(output, d loss / d x) for loss = sum(output * grad_out)."""
    x = x.clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    y = model(x)
    (y * grad_out).sum().backward()
    return y.detach(), x.grad


def name_the_scaling(ours_delta, ref_delta) -> str:
    """Why the LoRA branch differs from peft's, when it is peft's times a constant."""
    ratio = float((ours_delta * ref_delta).sum() / (ref_delta * ref_delta).sum())
    if not torch.allclose(ours_delta, ratio * ref_delta, atol=1e-5):
        return ("the output differs from peft's LoRA layer: forward must be base(x) + (alpha / r) * B(A(dropout(x))) "
                "with x (..., in) -> A -> (..., r) -> B -> (..., out)")
    known = {1 / SCALING: "missing the alpha/r scaling: the update B A x must be multiplied by alpha / r",
             1 / SCALING**2: "the scaling is inverted: multiply the update by alpha / r, not r / alpha",
             SCALING: "the alpha/r scaling is applied twice",
             R: "the update is multiplied by alpha; the scaling is alpha / r"}
    for factor, message in known.items():
        if abs(ratio - factor) < 1e-4 * factor:
            return f"{message} (your LoRA branch is {ratio:.4g} x peft's, with r={R}, alpha={ALPHA})"
    return f"the LoRA branch is {ratio:.4g} x peft's: the scaling must be alpha / r = {SCALING:g}"


def test_base_frozen_and_b_zero_at_start(module):
    layer, A, B = make(module)
    base = base_of(layer)
    if any(p.requires_grad for p in base.parameters()):
        fail_with("the base nn.Linear is not frozen: requires_grad_(False) on its weight and bias")
    if B.abs().max() != 0:
        fail_with("B must start at zero, so that the wrapped layer equals its base before any training")
    bound = 1 / IN**0.5  # kaiming_uniform_(a=sqrt(5)) on (r, in) = nn.Linear's init: U(-1/sqrt(in), 1/sqrt(in))
    if not (A.abs().max() <= bound + 1e-7 and A.abs().max() > 0.7 * bound and A.std() > 0.3 * bound):
        fail_with(f"A must be initialised Kaiming-uniform like nn.Linear's weight (nn.init.kaiming_uniform_(A, "
                  f"a=math.sqrt(5)): uniform in +-1/sqrt(in) = +-{bound:.3f}); got |A| max {A.abs().max():.3f}. "
                  f"A = 0 as well as B = 0 would leave both gradients zero")
    x, _ = x_and_grad_out()
    with torch.no_grad():
        same = torch.allclose(layer.eval()(x), base(x), atol=TOL, rtol=0)
    if not same:
        fail_with("with B = 0 the output must equal base(x): the LoRA branch adds (alpha / r) * B(A(x)), nothing else")


@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["eval", "train-dropout"])
def test_outputs_and_gradients_equal_peft(module, dropout):
    layer, A, B = make(module, dropout)
    with torch.no_grad():
        B.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))  # B = 0 would make any A look right
    model, twin = peft_twin(layer, A, B, dropout)
    layer.train(dropout > 0)
    model.train(dropout > 0)
    x, grad_out = x_and_grad_out()
    seed = 3 if dropout else None  # the same dropout mask for both, if both draw it once from x's shape
    (y, dx), (ref, ref_dx) = run(layer, x, grad_out, seed), run(model, x, grad_out, seed)
    if not torch.allclose(y, ref, atol=TOL, rtol=0):
        with torch.no_grad():
            base = base_of(layer).eval()
            if dropout == 0:
                fail_with(name_the_scaling(y - base(x), ref - base(x)))
        fail_with("in train mode with dropout 0.5 the output differs from peft's (same seed), while it matches "
                  "without dropout: apply nn.Dropout once, to the LoRA branch's input only: B(A(dropout(x)))")
    for name, got, want in (("the input", dx, ref_dx), ("A", A.grad, twin.lora_A["default"].weight.grad),
                            ("B", B.grad, twin.lora_B["default"].weight.grad)):
        if got is None or not torch.allclose(got, want, atol=TOL, rtol=0):
            fail_with(f"the gradient of {name} differs from peft's while the outputs match: is a tensor detached, "
                      f"or a parameter used outside autograd?")
    if any(p.grad is not None for p in base_of(layer).parameters()):
        fail_with("the base layer got gradients: freeze it")


def test_merge_folds_the_update_into_the_weight(module):
    layer, A, B = make(module)
    if not hasattr(layer, "merge"):
        pytest.skip("no merge() defined (optional in the contract)")
    with torch.no_grad():
        B.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        x, _ = x_and_grad_out()
        want = layer.eval()(x)
        merged = layer.merge()
        if not isinstance(merged, nn.Linear):
            fail_with(f"merge() returned {type(merged).__name__}: it must return the base nn.Linear holding "
                      f"W + (alpha / r) * B @ A")
        if not torch.allclose(merged(x), want, atol=1e-5, rtol=0):
            fail_with("the merged nn.Linear answers differently from the LoRA layer: add (alpha / r) * B @ A, "
                      "shape (out, r) @ (r, in) = (out, in), to the base weight")
