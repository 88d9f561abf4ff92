"""Tensor (model) parallelism from scratch, Megatron-LM style: each rank holds 1/p of every weight matrix.

    torchrun --nproc_per_node=2 phase3_ddp/tensor_parallel.py    # 2 ranks, gloo on CPU
    python phase3_ddp/tensor_parallel.py                         # 1 process: the same code, world size 1

Two layers, each split over the p ranks and checked against the unsplit layer in one process (forward output, input
gradient and every weight gradient within 1e-5; exit 1 otherwise):
  * MLP  fc2(gelu(fc1(x))): fc1 is column parallel (each rank computes F/p of the hidden units), fc2 row parallel (each
    rank multiplies its F/p units by its F/p rows of W2, giving a partial sum of the output), then one all-reduce.
  * attention: q/k/v column parallel by heads (each rank owns H/p whole heads), out_proj row parallel, one all-reduce.
The two communication points are Megatron's conjugate operators, written as autograd Functions:
  f = CopyToTP      forward identity,   backward all-reduce (every rank's shard contributed to dL/dx)
  g = ReduceFromTP  forward all-reduce, backward identity   (the sum's gradient reaches each partial sum unchanged)
It then prints, per layer, the bytes each rank passes to all-reduce in one training step, next to the bytes data
parallelism would all-reduce for the same layer (its gradients), and the weights each rank holds.
Letters: B batch, T tokens, E embed_dim, F MLP hidden size, H heads, D = E / H, p ranks.
"""

import argparse
import os
import sys
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

TOL = 1e-5
SENT = Counter()  # (layer, "forward" | "backward") -> bytes this rank passed to all-reduce


def all_reduce(x: torch.Tensor, layer: str, phase: str) -> torch.Tensor:
    x = x.clone()  # a new tensor: autograd may still need the input
    dist.all_reduce(x)  # sum over the ranks
    SENT[layer, phase] += x.numel() * x.element_size()
    return x


class CopyToTP(torch.autograd.Function):
    """Megatron's f, at the entry of a parallel layer: the same x goes to every rank; dL/dx sums all ranks' parts."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.layer, "backward"), None


class ReduceFromTP(torch.autograd.Function):
    """Megatron's g, at the exit: the output is the sum of the ranks' partial outputs; its gradient goes to each."""

    @staticmethod
    def forward(ctx, x, layer):
        return all_reduce(x, layer, "forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def shard(full: nn.Linear, dim: int, rank: int, world: int, pairs: list) -> nn.Linear:
    """This rank's slice of `full`. dim 0 = column parallel: out_features / p output features, with their bias.
    dim 1 = row parallel: in_features / p input features and no bias (added once, after the all-reduce).
    Appends (our parameter, full parameter, dim) to `pairs`, to compare gradients with the full layer."""
    weight = full.weight.detach().chunk(world, dim)[rank]  # (out/p, in) or (out, in/p)
    part = nn.Linear(weight.shape[1], weight.shape[0], bias=dim == 0)
    with torch.no_grad():
        part.weight.copy_(weight)
        pairs.append((part.weight, full.weight, dim))
        if dim == 0:
            part.bias.copy_(full.bias.detach().chunk(world)[rank])
            pairs.append((part.bias, full.bias, 0))
    return part


def replicate(full: nn.Parameter, pairs: list) -> nn.Parameter:
    """A full copy on every rank (the row-parallel layer's bias); its gradient is the full one on every rank."""
    param = nn.Parameter(full.detach().clone())
    pairs.append((param, full, None))
    return param


def attend(x, q_proj, k_proj, v_proj, heads: int) -> torch.Tensor:
    """Causal multi-head attention before out_proj: (B, T, E) -> (B, T, heads * D). The full layer calls it with H
    heads; a rank with its q/k/v shards and H/p heads: heads never mix before out_proj, so no communication."""
    B, T, _ = x.shape
    q, k, v = (proj(x).view(B, T, heads, -1).transpose(1, 2) for proj in (q_proj, k_proj, v_proj))  # (B, h, T, D)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, D)
    return y.transpose(1, 2).reshape(B, T, -1)  # (B, h, T, D) -> (B, T, h, D) -> (B, T, h*D)


class Attention(nn.Module):
    """The unsplit reference layer."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(4))

    def forward(self, x):
        return self.out_proj(attend(x, self.q_proj, self.k_proj, self.v_proj, self.num_heads))


class ParallelMLP(nn.Module):
    def __init__(self, full: nn.Sequential, rank: int, world: int):
        super().__init__()
        fc1, _, fc2 = full
        self.pairs = []
        self.fc1 = shard(fc1, 0, rank, world, self.pairs)  # W1 rows: E -> F/p hidden units
        self.fc2 = shard(fc2, 1, rank, world, self.pairs)  # W2 columns: F/p hidden units -> E, a partial sum
        self.bias = replicate(fc2.bias, self.pairs)

    def forward(self, x):  # (B, T, E), the same on every rank
        # GELU is elementwise: each rank applies it to its own hidden units, so fc1 -> fc2 needs no communication.
        # (Splitting fc1 by rows instead would give partial sums, and GELU of a sum needs the sum first.)
        h = F.gelu(self.fc1(CopyToTP.apply(x, "mlp")))  # (B, T, F/p)
        return ReduceFromTP.apply(self.fc2(h), "mlp") + self.bias  # sum over ranks of h_r W2_rᵀ = h W2ᵀ: (B, T, E)


class ParallelAttention(nn.Module):
    def __init__(self, full: Attention, rank: int, world: int):
        super().__init__()
        self.pairs, self.heads = [], full.num_heads // world  # heads h*p .. : whole heads, D features each
        self.q_proj, self.k_proj, self.v_proj = (shard(p, 0, rank, world, self.pairs)
                                                 for p in (full.q_proj, full.k_proj, full.v_proj))  # E -> E/p
        self.out_proj = shard(full.out_proj, 1, rank, world, self.pairs)  # E/p -> E, a partial sum
        self.bias = replicate(full.out_proj.bias, self.pairs)

    def forward(self, x):  # (B, T, E) -> (B, T, E)
        y = attend(CopyToTP.apply(x, "attention"), self.q_proj, self.k_proj, self.v_proj, self.heads)  # (B, T, E/p)
        return ReduceFromTP.apply(self.out_proj(y), "attention") + self.bias


def check(full: nn.Module, parallel: nn.Module, x, upstream, rank: int, world: int) -> torch.Tensor:
    """One forward + backward of both on the same x and dL/dy; max |parallel - full| of (output, dL/dx, dL/dW)."""
    x_full, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_full, y_tp = full(x_full), parallel(x_tp)
    (y_full * upstream).sum().backward()
    (y_tp * upstream).sum().backward()
    weights = max((ours.grad - (f.grad if d is None else f.grad.chunk(world, d)[rank])).abs().max()
                  for ours, f, d in parallel.pairs)
    return torch.stack([(y_tp - y_full).abs().max(), (x_tp.grad - x_full.grad).abs().max(), weights]).detach()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Megatron-style tensor parallelism (MLP and attention) checked against "
                                            "one process, with the bytes it communicates next to data parallelism's. "
                                            "Run under torchrun --nproc_per_node=P, or alone (P = 1).")
    p.add_argument("--batch_size", type=int, default=4, help="B")
    p.add_argument("--seq_len", type=int, default=16, help="T")
    p.add_argument("--embed_dim", type=int, default=64, help="E")
    p.add_argument("--hidden", type=int, default=256, help="F, the MLP's hidden size (4E as in GPT-2)")
    p.add_argument("--num_heads", type=int, default=8, help="H, split across the ranks")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def usage_problem(args, world: int) -> str | None:
    if min(args.batch_size, args.seq_len, args.embed_dim, args.hidden, args.num_heads) <= 0:
        return "--batch_size, --seq_len, --embed_dim, --hidden and --num_heads must be positive"
    if args.embed_dim % args.num_heads:
        return f"--embed_dim {args.embed_dim} must be divisible by --num_heads {args.num_heads}"
    if args.num_heads % world or args.hidden % world:
        return (f"--num_heads {args.num_heads} and --hidden {args.hidden} must be divisible by the {world} "
                "processes: each rank takes whole heads and an equal share of the hidden units")
    return None


def report(args, world: int, layers: dict, diffs: dict) -> bool:
    """Rank 0's printout: max differences, then bytes per layer. Returns whether every difference is within TOL."""
    ok = all(d.max() <= TOL for d in diffs.values())
    for name, d in diffs.items():
        print(f"check {name}: max |tensor parallel - one process| output {d[0]:.2e}, input grad {d[1]:.2e}, "
              f"weight grads {d[2]:.2e} -> {'ok' if d.max() <= TOL else f'MISMATCH (> {TOL})'}")
    alone = "; with 1 process they are no-ops" if world == 1 else ""
    print(f"\nbytes per rank for one training step, fp32, world {world}, B={args.batch_size} T={args.seq_len} "
          f"E={args.embed_dim} F={args.hidden} H={args.num_heads} (all-reduce payloads; a ring all-reduce sends "
          f"2(p-1)/p of the payload per rank, for both columns alike{alone}):")
    print(f"{'layer':<10} {'TP all-reduce (fwd + bwd)':>30} {'DP all-reduce (= grads)':>24} "
          f"{'weights/rank TP':>16} {'weights/rank DP':>16}")
    for name, (full, parallel) in layers.items():
        dp = sum(p.numel() * p.element_size() for p in full.parameters())
        held = sum(p.numel() * p.element_size() for p in parallel.parameters())
        fwd, bwd = SENT[name, "forward"], SENT[name, "backward"]
        print(f"{name:<10} {f'{fwd:,} + {bwd:,} = {fwd + bwd:,}':>30} {dp:>24,} {held:>16,} {dp:>16,}")
        crossover = dp * args.batch_size * args.seq_len / (fwd + bwd)  # TP's bytes are proportional to B*T
        print(f"{'':<10} TP passes fewer bytes than DP while B*T < {crossover:,.0f} tokens: TP's traffic grows with "
              "the activations, DP's with the parameters")
    return ok


def run(args, rank: int, world: int) -> bool:
    """Build the full layers and their shards, check them, report on rank 0; True when every rank matches."""
    torch.manual_seed(args.seed)  # the same seed on every rank: the same full layers and inputs everywhere
    E = args.embed_dim
    mlp = nn.Sequential(nn.Linear(E, args.hidden), nn.GELU(), nn.Linear(args.hidden, E))
    attention = Attention(E, args.num_heads)
    layers = {"mlp": (mlp, ParallelMLP(mlp, rank, world)),
              "attention": (attention, ParallelAttention(attention, rank, world))}
    x, upstream = torch.randn(2, args.batch_size, args.seq_len, E)  # the input and dL/dy, each (B, T, E)
    diffs = {}
    for name, (full, parallel) in layers.items():
        diffs[name] = check(full, parallel, x, upstream, rank, world)
        dist.all_reduce(diffs[name], op=dist.ReduceOp.MAX)  # the worst rank's differences
    return report(args, world, layers, diffs) if rank == 0 else all(d.max() <= TOL for d in diffs.values())


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if problem := usage_problem(args, world):
        print(f"error: {problem}", file=sys.stderr)  # every rank says it: torchrun may kill rank 0 first
        return 2
    if "RANK" in os.environ:  # launched by torchrun: MASTER_ADDR / MASTER_PORT come from the environment
        dist.init_process_group("gloo")
    else:  # plain python: a one-process group, so the code below is the same
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        matches = run(args, rank, world)
        dist.barrier()  # rank 0 still reports: gloo may abort a rank whose group is torn down before its peer's
        return 0 if matches else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
