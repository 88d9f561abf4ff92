"""LoRA written by hand: the whole method is ~60 lines, and it matches peft to 1e-5.

LoRA (Hu et al., 2021) freezes a pretrained weight W (out x in) and learns its update as a
product of two thin matrices: W' = W + (alpha / r) * B A, with A (r x in) and B (out x r),
r << min(in, out). A starts Kaiming-uniform and B starts at zero, so at step 0 the model is
exactly the pretrained one. Only A and B get gradients and optimizer states.

    python phase2_lora/lora_from_scratch.py            # parameter arithmetic for Qwen1.5-1.8B, no download
    python phase2_lora/lora_from_scratch.py --r 8 --target_modules q_proj v_proj
"""

import argparse
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

# Qwen/Qwen1.5-1.8B(-Chat) config.json, the fields that fix the parameter count.
QWEN15_18B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768,
                  rope_theta=1_000_000.0, tie_word_embeddings=False)
# A tiny config of the same architecture for CPU smoke runs (the benchmarks' --tiny): vocab / hidden = 75,
# the ratio of Qwen's 151936 / 2048, so the vocabulary terms weigh what they weigh at full size.
QWEN_TINY = dict(vocab_size=4800, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=1024)


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W and b frozen."""

    def __init__(self, base: nn.Linear, r: int = 16, alpha: float = 32, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.base.requires_grad_(False)  # W (out, in) and bias stay pretrained
        self.r, self.scaling = r, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))  # (out, r)
        # Same init as nn.Linear's weight (and peft): uniform in +-1/sqrt(in), so the A-branch starts at
        # the scale of a normal layer; B = 0 makes the update BA exactly zero at step 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        y = self.base(x)  # (..., out)
        if self.merged:  # BA already lives inside W: one matmul, zero inference overhead
            return y
        # Two thin matmuls, (..., in) -> (..., r) -> (..., out): never build the (out, in) product.
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold BA into W for deployment; the module then costs exactly what nn.Linear costs."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take BA back out of W (to keep training, or to swap adapters)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def matching_linear_names(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the nn.Linear modules to adapt. "all-linear" means every nn.Linear except the output
    head (peft's rule: adapting lm_head would add vocab x r parameters for little gain); a list
    matches module names exactly or by their last dotted parts, as peft does."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if target_modules == "all-linear":
            if module is not head:
                names.append(name)
        elif any(name == t or name.endswith("." + t) for t in target_modules):
            names.append(name)
    return names


def inject_lora(model: nn.Module, target_modules: str | list[str] = "all-linear", r: int = 16, alpha: float = 32,
                dropout: float = 0.0, verbose: bool = True) -> int:
    """Freeze every parameter of `model`, replace the matching nn.Linear modules by LoRALinear in place,
    and return the number of trainable parameters (only the A and B matrices)."""
    names = matching_linear_names(model, target_modules)
    if not names:
        raise ValueError(f"no nn.Linear module matches target_modules={target_modules!r}")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose:
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA r={r} on {len(names)} Linear modules: trainable {trainable:,} / {total:,} "
              f"({100 * trainable / total:.3f}%)")
    return trainable


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def qwen_config(**overrides):
    from transformers import Qwen2Config  # imported here: the LoRA layer itself needs only torch
    return Qwen2Config(**{**QWEN15_18B, **overrides})


def parameter_arithmetic(config, r: int, target_modules: str | list[str]) -> list[str]:
    """The LoRA budget of a model given by its config, counted on the meta device: the real module
    tree and shapes, zero bytes allocated, no download."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    names = matching_linear_names(model, target_modules)
    if not names:
        raise ValueError(f"no nn.Linear module matches target_modules={target_modules!r}")
    # Group the adapted matrices by their role (q_proj, ..., down_proj): every layer has the same shapes.
    per_role: dict[str, tuple[int, int, int]] = {}
    for name in names:
        out_f, in_f = model.get_submodule(name).weight.shape  # W: (d, k) = (out, in)
        role = name.rsplit(".", 1)[-1]
        count = per_role.get(role, (out_f, in_f, 0))[2] + 1
        per_role[role] = (out_f, in_f, count)
    lines = [f"{type(model).__name__}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
             f"intermediate {config.intermediate_size}, heads {config.num_attention_heads}/"
             f"{config.num_key_value_heads} (q/kv), vocab {config.vocab_size}, "
             f"tied embeddings: {config.tie_word_embeddings}",
             f"total parameters (counted on the meta device): {total:,}",
             f"LoRA r={r}: an adapted W (d x k) gets B (d x r) and A (r x k) -> d*r + r*k parameters",
             f"{'matrix':<10} {'W: d x k':>13} {'full d*k':>12} {'LoRA d*r+r*k':>13} {'ratio':>7} {'count':>6}"]
    lora_total = 0
    for role, (d, k, count) in per_role.items():
        lora = d * r + r * k
        lora_total += lora * count
        lines.append(f"{role:<10} {f'{d} x {k}':>13} {d * k:>12,} {lora:>13,} {lora / (d * k):>7.2%} {count:>6}")
    adapted = sum(d * k * c for d, k, c in per_role.values())
    lines += [f"LoRA total: {lora_total:,} trainable = {100 * lora_total / total:.3f}% of {total:,} "
              f"(the adapted matrices hold {adapted:,} = {100 * adapted / total:.1f}% of the model)",
              # Adam in mixed precision keeps fp32 master weight + grad + 2 moments = 16 bytes per trainable param.
              f"Adam state + grads at 16 B/trainable param: full fine-tune {16 * total / 2**30:.1f} GiB, "
              f"LoRA {16 * lora_total / 2**30:.2f} GiB ({total / lora_total:.0f}x less)"]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA parameter arithmetic for Qwen1.5-1.8B (meta device, no download).")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (finetune.py's default)")
    p.add_argument("--target_modules", nargs="+", default=["all-linear"],
                   help='"all-linear" (finetune.py\'s default) or module names, e.g. q_proj v_proj')
    p.add_argument("--model_config", default=None,
                   help="a local directory or hub id whose config.json to use instead of the built-in Qwen1.5-1.8B one")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    targets = "all-linear" if args.target_modules == ["all-linear"] else args.target_modules
    if args.r <= 0:
        print(f"error: --r must be a positive integer, got {args.r}", file=sys.stderr)
        return 2
    if args.model_config is None:
        config = qwen_config()
    else:
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(args.model_config)
        except (OSError, ValueError) as e:
            print(f"error: cannot read a config from {args.model_config!r} ({type(e).__name__}); pass a model "
                  f"directory with config.json or omit --model_config", file=sys.stderr)
            return 2
    try:
        lines = parameter_arithmetic(config, args.r, targets)
    except ValueError as e:
        print(f"error: {e}; use module names such as q_proj v_proj, or all-linear", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
