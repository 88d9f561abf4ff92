"""ZeRO-3 for finetune_ddp.py --fsdp: shard every parameter over the ranks with PyTorch's FSDP2 (`fully_shard`).

DDP (and ZeRO-1) leave every rank holding the whole model: for LoRA that is the whole frozen base, which is
nearly all of the memory; LoRA's gradients and Adam moments are tiny. fully_shard replaces each parameter by a
DTensor sharded on dim 0, so rank r of W holds the r-th of W row blocks of every matrix: the frozen base weights,
the LoRA weights, their gradients and (since the optimizer only sees the shards) their Adam moments, about 1/W
each. A decoder layer's full weights exist only while it runs: its forward (and, in backward, its recomputation and
gradient) all-gathers them first and frees them after; the gradients are reduce-scattered, so each rank keeps
the averaged gradient of its own rows (the same average DDP's all-reduce gives).

QLoRA: the NF4 weights (bitsandbytes Params4bit: two 4-bit codes per uint8, shape (n/2, 1)) are sharded as they are.
FSDP2 shards each parameter on its own and all-gathers units of mixed dtypes, and bitsandbytes' Linear4bit puts its
quant_state (the block scales, kept on the module) back on the gathered weight when it runs
(fix_4bit_weight_quant_state_from_module). bnb_4bit_quant_storage = the compute dtype, which FSDP1 needs (one flat
buffer of one dtype per unit), is therefore not needed here; it would be with a MixedPrecisionPolicy(param_dtype=...),
which casts every parameter, packed bytes included (this script uses autocast instead). Tested on CPU: 4-bit --fsdp
equals 4-bit DDP within 1e-5 (tests/test_ddp_fsdp.py).
"""

from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the modules whose class a transformers model lists in `_no_split_modules`
    (Qwen2: Qwen2DecoderLayer), found through any wrapper (peft's PeftModel, LoRA layers inside)."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"no decoder layers found in {type(model).__name__} (no _no_split_modules)")
    return layers


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` in place over the default process group (FSDP2) and return it.

    One FSDP unit per decoder layer, one for the input embeddings (unless tied to lm_head), then the root (final
    norm, lm_head: whatever no other unit holds). A unit's parameters are all-gathered together just before its
    forward and freed right after, so at any time a rank holds 1/W of every parameter plus the full weights of the
    unit that is running. The root's stay gathered from forward to the end of backward (FSDP2 keeps them for the
    backward that needs them at once); lm_head must be in the root anyway, because chunked_loss.py reads its weight
    directly instead of calling it. The embedding gets its own unit so that its (V, C) matrix, as large as
    lm_head's, is gathered only for its own forward (its backward needs nothing: it is frozen). Each rank holds: 1/W
    of every frozen base weight, LoRA weight, LoRA gradient and, with an optimizer built on the sharded parameters,
    1/W of the Adam moments. Frozen and trainable parameters may share a unit; only the trainable ones get
    gradients (reduce-scattered: averaged over ranks, as DDP averages). Every rank must then run the same number
    of forwards and backwards, since each one is a collective. The shards stay on the device the model is on:
    fully_shard's default mesh would be CUDA whenever a GPU exists, also for a CPU (gloo) run."""
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))  # all ranks, 1-D
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embedding.weight:
        fully_shard(embedding, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def release(model: torch.nn.Module) -> None:
    """Free the root unit's gathered weights after a forward without backward (evaluation): FSDP2 keeps them
    after the root's forward, expecting a backward; the next forward gathers them again. No-op for DDP."""
    if is_sharded(model):
        model.reshard()


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def unwrap(wrapped: torch.nn.Module) -> torch.nn.Module:
    """The PeftModel: inside DDP's .module, or the sharded model itself (FSDP2 shards in place, wraps nothing)."""
    return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped


@contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """DDP's no_sync() for either wrapper: with enabled=False, backward only accumulates local (unsharded, for FSDP)
    gradients; the next backward outside it all-reduces (DDP) or reduce-scatters (FSDP) the accumulated sum."""
    if not is_sharded(model):
        with model.no_sync() if not enabled else nullcontext():
            yield
        return
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective for a sharded one), a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """What this rank stores of t: a DTensor's local shard, a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: full tensor on CPU} of the trainable parameters (the LoRA weights), named as in model.state_dict().
    Collective when `model` is sharded: every rank calls it and all-gathers each shard in the same order; the frozen
    base is not gathered. Unsharded (DDP), the local tensors are already the full ones."""
    return {name: full(p).detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def shard_like_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors (as every rank has them after a broadcast) -> DTensors sharded as `model`'s parameters are,
    so that load_state_dict copies each rank's rows into its shard. Collective (every rank, same order)."""
    param = next(p for p in model.parameters() if isinstance(p, DTensor))
    return {k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements) for k, v in state.items()}


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters THIS rank stores: the local shard of each DTensor, the whole of each plain tensor."""
    return sum(local(p).numel() * p.element_size() for p in model.parameters())


def full_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the whole model's parameters (what every DDP rank stores)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state THIS rank stores: ZeroRedundancyOptimizer's own shard (its .optim), the local
    shards of FSDP's DTensor moments, else the whole state."""
    own = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    tensors = [local(t) for state in own.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def gather_ints(value: int, device: torch.device) -> list[int]:
    """Every rank's `value`, in rank order, on every rank (all_gather of one int64 each)."""
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [int(g.item()) for g in gathered]


def memory_per_rank(model: torch.nn.Module, optimizer, zero: bool, device: torch.device) -> tuple[dict, list[str]]:
    """Collective. Every rank's parameter and optimizer-state bytes, for metrics.json, and one line per rank and
    term saying what the rank holds: a full replica (and what sharding would leave it) or a shard."""
    sharded = is_sharded(model)
    params = gather_ints(parameter_bytes(model), device)
    states = gather_ints(optimizer_state_bytes(optimizer), device)  # AdamW: two moments per LoRA weight
    terms = (("parameters", params, full_parameter_bytes(model), "FSDP" if sharded else None, "--fsdp"),
             ("optimizer state", states, sum(states) if sharded or zero else states[0],
              "FSDP" if sharded else "ZeRO-1" if zero else None, "--zero"))
    lines = [f"rank {r}: {what} {n / 2**20:.3f} MiB " + (
        f"({shard} shard; {whole / 2**20:.3f} MiB without)" if shard else
        f"(full replica; {flag} would keep about {whole / len(per_rank) / 2**20:.3f} MiB)")
        for what, per_rank, whole, shard, flag in terms for r, n in enumerate(per_rank)]
    return {"parameter_bytes_per_rank": params, "parameter_bytes_unsharded": full_parameter_bytes(model),
            "optimizer_state_bytes_per_rank": states}, lines
