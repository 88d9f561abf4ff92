"""Memory on each rank of a LoRA run under DDP, ZeRO-1 and FSDP2 (ZeRO-3), measured beside the ZeRO formulas.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 phase3_ddp/benchmark_memory.py                # Qwen1.5-1.8B config
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 phase3_ddp/benchmark_memory.py --config tiny  # same path, seconds
    python phase3_ddp/benchmark_memory.py --budget 7b      # ANALYTIC: Qwen1.5-7B QLoRA on two 8 GB cards
    torchrun --nproc_per_node=2 phase3_ddp/benchmark_memory.py --device cuda   # 2 GPUs, NCCL: the CUDA allocator

What runs: on every rank, a model with the real config and random weights (no download), the frozen base in bf16
(not NF4: the unquantised base, as finetune_ddp.py --fsdp --quantization none shards it), LoRA r=16 in fp32
on all linear layers (qlora_model.add_lora, non-reentrant gradient checkpointing), the chunked loss
(chunked_loss.py), bf16 autocast, torch AdamW; batch 1 x --seq_len random tokens. The same model is then wrapped
three ways, one after the other:
  ddp    DDP: every rank holds the whole model, LoRA gradients all-reduced (finetune_ddp.py)
  zero1  DDP + torch ZeroRedundancyOptimizer: each rank keeps the Adam state of ~1/W of the LoRA tensors (--zero)
  fsdp   FSDP2 fully_shard per decoder layer + root (fsdp_shard.shard_model): every parameter, gradient and Adam
         moment sharded 1/W; a unit's full weights exist only while it runs, the root's (embeddings, lm_head)
         from forward to the end of backward (finetune_ddp.py --fsdp)
Before the measured step, zero gradients and one optimizer step allocate the gradients and the Adam state (with zero
gradients AdamW leaves the weights unchanged except for weight decay), so every static term is live during it.

Measured, per rank, two independent ways:
  tensor accounting: bytes of the local tensors after the step: frozen base, LoRA weights, LoRA gradients, Adam
    state (DTensor shards counted by their local part); each beside the ZeRO paper's formula (Rajbhandari et al.
    2020: parameters, gradients, K x optimizer state, / N_d for the stages that shard them), adapted to LoRA:
    a frozen base of Psi_b elements (b bytes each) and Psi_l trainable LoRA elements (fp32: 4 + 4 + 8 bytes).
  torch profiler (profile_memory=True, CPU): every tensor allocation and free from before the model is built, so
    "resident" (live bytes when the measured step starts; includes what the accounting does not list: DDP's
    gradient buckets, buffers) and "step peak" (the most bytes live during the step: resident + activations,
    recomputation, all-gathered weights, the logits of one loss chunk).
  --device cuda (cuda:LOCAL_RANK, NCCL): the CUDA caching allocator instead, above what was allocated before the
    mode: "resident" = memory_allocated at the step's start, "step peak" = max_memory_allocated, + max reserved.
Communication: bytes this rank hands to collectives during the measured step (DDP comm hook; the torch.distributed
calls ZeRO and FSDP make), so what each mode saves can be set beside what it costs.
"""

import argparse
import collections
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from finetune_ddp import FailingArgumentParser, fail, pick_device, whole_number  # one-line errors, exit 2

MODES = ("ddp", "zero1", "fsdp")
# config.json of Qwen/Qwen1.5-1.8B(-Chat) and Qwen/Qwen1.5-7B(-Chat): the fields that fix the parameter count.
QWEN = dict(vocab_size=151936, num_key_value_heads=None, max_position_embeddings=32768, rope_theta=1_000_000.0,
            tie_word_embeddings=False)
CONFIGS = {"1.8b": dict(QWEN, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16),
           "7b": dict(QWEN, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
           # vocab / hidden = 75, Qwen's ratio, so the vocabulary matrices weigh what they weigh at full size
           "tiny": dict(QWEN, vocab_size=4800, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=1024)}
LORA_R, LORA_ALPHA = 16, 32  # finetune_ddp.py's defaults
ADAM_BYTES, STEP_BYTES = 8, 4  # torch AdamW: fp32 m and v per element; one fp32 `step` per tensor
MIB, GIB = 2**20, 2**30


def parse_args(argv=None):
    p = FailingArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=("1.8b", "tiny"), default="1.8b", help="model config (random weights)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="wrappings to measure, in order")
    p.add_argument("--seq_len", type=whole_number(2, 8192), default=4,
                   help="tokens per rank (batch 1); short by default: a CPU without AVX-512 runs bf16 matmuls at "
                        "1.5-3.5 GFLOP/s (a 1.8B step at 32 tokens took over 20 min per mode on the 2-core sandbox); "
                        "the static terms do not depend on it, activations grow linearly with it")
    p.add_argument("--chunk_size", type=whole_number(1, 8192), default=256, help="rows per loss chunk")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one GPU per rank (cuda:LOCAL_RANK) over NCCL, memory from the CUDA allocator")
    p.add_argument("--output_json", type=Path, default=None, help="rank 0 writes every rank's results here")
    p.add_argument("--budget", choices=("7b",), default=None,
                   help="print the ANALYTIC per-rank budget of Qwen1.5-7B QLoRA on two 8 GB GPUs and exit")
    p.add_argument("--budget_seq_lens", type=whole_number(2, 32768), nargs="+", default=[512, 1024])
    return p.parse_args(argv)


# ---------------------------------------------------------------- the model, wrapped three ways

def qwen_config(name: str):
    from transformers import Qwen2Config
    values = dict(CONFIGS[name])
    values["num_key_value_heads"] = values["num_attention_heads"]  # Qwen1.5: no grouped-query attention
    return Qwen2Config(**values)


def build(config, mode: str, chunk_size: int, device: torch.device):
    """(model, module to call, optimizer) on this rank; the same seed gives every rank the same weights."""
    from chunked_loss import enable_chunked_loss
    from fsdp_shard import shard_model
    from qlora_model import add_lora
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)  # bf16: no fp32 copy
    model = add_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, gradient_checkpointing=True)
    enable_chunked_loss(model, chunk_size=chunk_size).train()
    if mode == "fsdp":
        runner = model = shard_model(model)  # every parameter -> a DTensor holding this rank's rows
    else:
        # As ddp_train.wrap_ddp: every rank built the same frozen base, so DDP skips it (no 1.8B-value broadcast,
        # no buckets for it) and all-reduces the LoRA gradients only.
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        runner = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-4) if mode == "zero1"
                 else torch.optim.AdamW(params, lr=1e-4))
    return model, runner, optimizer


def train_step(runner, optimizer, batch: dict) -> float:
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16):
        loss = runner(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated between steps, as in training
    return loss.item()


# ---------------------------------------------------------------- measuring

def local_bytes(tensors) -> int:
    """Bytes this rank stores: a DTensor's local shard, a plain tensor whole."""
    from torch.distributed.tensor import DTensor
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in local)


def accounting(model, optimizer) -> dict[str, int]:
    """The static terms, counted from this rank's tensors."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: the local AdamW over its own share
    lora = [p for p in model.parameters() if p.requires_grad]
    return {"frozen base": local_bytes(p for p in model.parameters() if not p.requires_grad),
            "LoRA weights": local_bytes(lora), "LoRA grads": local_bytes(p.grad for p in lora),
            "Adam state": local_bytes(t for s in inner.state.values() for t in s.values() if torch.is_tensor(t))}


def formula(model, mode: str, world: int) -> dict[str, float]:
    """The ZeRO paper's per-rank terms for LoRA: DDP replicates everything, ZeRO-1 divides the optimizer state by
    N_d, ZeRO-3 (FSDP) divides every term by N_d (step counters: one per tensor, on the rank that holds it)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    lora = [p for p in model.parameters() if p.requires_grad]
    psi_b_bytes = sum(p.numel() * p.element_size() for p in frozen)  # b * Psi_b (global shapes, also for DTensors)
    psi_l = sum(p.numel() for p in lora)
    adam = ADAM_BYTES * psi_l + STEP_BYTES * len(lora)
    shard = {"ddp": 1, "zero1": 1, "fsdp": world}[mode]
    # ZeRO-1 gives each rank whole tensors (their step counters too); FSDP a shard of every tensor
    adam_rank = {"ddp": adam, "zero1": adam / world, "fsdp": ADAM_BYTES * psi_l / world + STEP_BYTES * len(lora)}
    return {"frozen base": psi_b_bytes / shard, "LoRA weights": 4 * psi_l / shard, "LoRA grads": 4 * psi_l / shard,
            "Adam state": adam_rank[mode]}


@contextlib.contextmanager
def count_collectives(runner, counts: collections.Counter):
    """Bytes this rank hands to each collective while the block runs (the whole tensor: an all-gather's output,
    a reduce-scatter's input). DDP all-reduces from C++, so it is counted by a comm hook; ZeRO's broadcasts and
    FSDP's all-gathers / reduce-scatters are torch.distributed calls, counted by wrapping them."""
    def wrapped(name, fn, pick):
        def call(*args, **kwargs):
            t = pick(*args, **kwargs)
            counts[name] += t.numel() * t.element_size()
            return fn(*args, **kwargs)
        return call
    picks = {"broadcast": lambda tensor, *a, **k: tensor,
             "all_gather_single": lambda output, *a, **k: output,
             "reduce_scatter_single": lambda output, input, *a, **k: input}
    originals = {name: getattr(dist, name) for name in picks}
    for name, pick in picks.items():
        setattr(dist, name, wrapped(name, originals[name], pick))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def ddp_counting_hook(counts: collections.Counter):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        counts["all_reduce (DDP)"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)
    return hook


def timeline(prof, step_name: str) -> dict[str, int]:
    """From the profiler's allocation records: peak live bytes while building (before the measured step), live
    bytes when the measured step starts, and the peak during it."""
    events = list(prof.profiler.kineto_results.events())
    step = next(e for e in events if e.name() == step_name)
    start, end = step.start_ns(), step.start_ns() + step.duration_ns()
    live = build_peak = resident = step_peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if e.start_ns() >= start and not resident:
            resident = step_peak = live
        live += e.nbytes()  # negative for a free
        if e.start_ns() < start:
            build_peak = max(build_peak, live)
        if start <= e.start_ns() <= end:
            step_peak = max(step_peak, live)
    return {"build peak": build_peak, "resident": resident, "step peak": step_peak}


def measure(config, mode: str, args, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function
    gen = torch.Generator().manual_seed(1 + dist.get_rank())  # each rank its own batch, as in data parallelism
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=gen).to(device)  # (B=1, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    comm, cuda = collections.Counter(), device.type == "cuda"
    if cuda:  # cuBLAS keeps a workspace per (handle, stream) from its first matmul on: make this thread's and
        x = torch.ones(16, 16, device=device, dtype=torch.bfloat16, requires_grad=True)  # autograd's (backward)
        torch.nn.functional.linear(x, x, x[0]).sum().backward()  # now, so that they fall in `base` below
    gc.collect()
    if cuda:  # the previous mode's blocks back to the driver; peaks from here
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)  # the batch, cuBLAS workspaces: not this mode's
    began = time.perf_counter()
    with contextlib.nullcontext() if cuda else profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model, runner, optimizer = build(config, mode, args.chunk_size, device)
        for p in model.parameters():
            if p.requires_grad:  # gradients and Adam state allocated, without a second (slow) training step
                p.grad = torch.zeros_like(p)
        optimizer.step()
        if mode != "fsdp":
            runner.register_comm_hook(None, ddp_counting_hook(comm))
        if cuda:  # the allocator's counters are kept on the host at each malloc/free: no synchronize needed
            memory = {"build peak": torch.cuda.max_memory_allocated(device) - base,
                      "resident": torch.cuda.memory_allocated(device) - base}
            torch.cuda.reset_peak_memory_stats(device)
        with record_function("measured step"), count_collectives(runner, comm):
            loss = train_step(runner, optimizer, batch)
    if cuda:
        memory |= {"step peak": torch.cuda.max_memory_allocated(device) - base,
                   "reserved": torch.cuda.max_memory_reserved(device)}
    result = {"mode": mode, "rank": dist.get_rank(), "device": device.type, "loss": loss,
              **(memory if cuda else timeline(prof, "measured step")),
              "measured": accounting(model, optimizer), "formula": formula(model, mode, dist.get_world_size()),
              "communication": dict(comm), "seconds": time.perf_counter() - began}
    del prof, model, runner, optimizer
    gc.collect()
    return result


# ---------------------------------------------------------------- report

def table(results: list[dict], world: int, config_name: str, seq_len: int) -> str:
    """One row per mode and rank, in MiB: each static term measured (and its formula), the profiler's resident
    and step peak, their ratio against DDP on the same rank, and the bytes handed to collectives."""
    ddp = {r["rank"]: r for r in results if r["mode"] == "ddp"}
    terms = list(results[0]["measured"])
    unit, name = (MIB, "MiB") if max(r["step peak"] for r in results) > 100 * MIB else (2**10, "KiB")  # tiny: KiB
    lines = [f"Per-rank memory, {config_name} config (random weights), {world} ranks, batch 1 x {seq_len} tokens;"
             f" {name}, measured (ZeRO formula)",
             "| mode | rank | " + " | ".join(terms) + " | resident | step peak | peak vs DDP | collectives/step |",
             "|---|---:|" + "---:|" * (len(terms) + 4)]
    for r in results:
        cells = [f"{r['measured'][t] / unit:,.1f} ({r['formula'][t] / unit:,.1f})" for t in terms]
        base = ddp.get(r["rank"])
        ratio = f"{r['step peak'] / base['step peak']:.2f}x" if base else "-"
        comm = ", ".join(f"{k} {v / unit:,.1f}" for k, v in sorted(r["communication"].items())) or "-"
        lines.append(f"| {r['mode']} | {r['rank']} | " + " | ".join(cells) +
                     f" | {r['resident'] / unit:,.1f} | {r['step peak'] / unit:,.1f} | {ratio} | {comm} |")
    return "\n".join(lines)


def notes(results: list[dict]) -> str:
    """Where the saving comes from, in the run's own numbers (rank 0)."""
    by = {r["mode"]: r for r in results if r["rank"] == 0}
    lines = []
    for mode, r in by.items():
        static = sum(r["measured"].values())
        lines.append(f"{mode}: static terms {static / MIB:,.1f} MiB, of which frozen base "
                     f"{r['measured']['frozen base'] / static:.1%}; resident - static (buffers, DDP buckets) "
                     f"{(r['resident'] - static) / MIB:,.1f} MiB; step peak - resident (activations, gathered "
                     f"weights, loss chunk) {(r['step peak'] - r['resident']) / MIB:,.1f} MiB; "
                     f"peak while building {r['build peak'] / MIB:,.1f} MiB" +
                     (f"; CUDA reserved (peak) {r['reserved'] / MIB:,.1f} MiB" if "reserved" in r else ""))
    if "ddp" in by and "zero1" in by:
        saved = by["ddp"]["measured"]["Adam state"] - by["zero1"]["measured"]["Adam state"]
        lines.append(f"ZeRO-1 saves the Adam state only: {saved / MIB:,.1f} MiB on rank 0")
    if "ddp" in by and "fsdp" in by:
        saved = by["ddp"]["measured"]["frozen base"] - by["fsdp"]["measured"]["frozen base"]
        total = sum(by["ddp"]["measured"].values()) - sum(by["fsdp"]["measured"].values())
        lines.append(f"FSDP saves {saved / MIB:,.1f} MiB of frozen base on rank 0 "
                     f"({saved / max(total, 1):.1%} of its saving on the static terms)")
    return "\n".join(lines)


# ---------------------------------------------------------------- ANALYTIC: Qwen1.5-7B QLoRA on two 8 GB GPUs

NF4_BYTES, NF4_CONSTANTS = 0.5, 1 / 64 + 4 / (64 * 256)  # 4-bit codes; 8-bit absmax per 64 + fp32 per 64 x 256
CUDA_RANGES_GIB = {"CUDA context + kernels (torch, bitsandbytes)": (0.3, 0.8), "NCCL buffers": (0.05, 0.3),
                   "cuBLAS workspaces": (0.01, 0.07)}
FRAGMENTATION = (0.05, 0.20)  # caching allocator: reserved above allocated, fraction of the allocated peak


def budget_7b(seq_lens: list[int], world: int = 2, chunk: int = 256) -> str:
    """Per-rank bytes of finetune_ddp.py's CUDA recipe at Qwen1.5-7B: NF4 linear layers (bnb_4bit_quant_storage
    bf16 so FSDP can shard the codes; the quantisation constants are not parameters, so every rank keeps all of
    them), bf16 embeddings and lm_head, fp32 norms, LoRA r=16 fp32 + grads + paged 8-bit AdamW (2 B/element).
    FSDP (shard_model's units): each rank holds 1/W of every parameter, plus the full root unit (embeddings +
    lm_head + norm: unsharded from its forward to the end of backward) and, at its all-gather, the all-gather
    buffer beside the unsharded copy: 2 x the root at that moment (the 1.8B run measures exactly this: step peak -
    resident = 2 x root), else two decoder layers (running + prefetched, buffer + copy) plus the activations.
    Activations: gradient checkpointing keeps each layer's input (fp32: peft's fp32 norms make the residual fp32)
    plus one layer's recomputation (bf16, range)."""
    from transformers import AutoModelForCausalLM
    config = qwen_config("7b")
    with torch.device("meta"):  # the real module tree, no bytes
        model = AutoModelForCausalLM.from_config(config)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    quant = sum(m.weight.numel() for m in linears)
    vocab = embed.weight.numel() + head.weight.numel()
    other = sum(p.numel() for p in model.parameters()) - quant - vocab
    lora = sum(LORA_R * (m.in_features + m.out_features) for m in linears)
    h, i, v, n_layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    layer = quant / n_layers * NF4_BYTES + lora / n_layers * 4  # one decoder layer's gathered weights
    root = vocab * 2 + h * 4  # embeddings + lm_head (bf16) + final norm (fp32): shard_model's root unit
    static = {f"embed_tokens {v:,} x {h:,} bf16": embed.weight.numel() * 2,
              f"lm_head {v:,} x {h:,} bf16": head.weight.numel() * 2,
              f"NF4 codes, {quant / 1e9:.2f}B linear weights": quant * NF4_BYTES,
              "norms + q/k/v biases fp32": other * 4,
              f"LoRA r={LORA_R} weights fp32 ({lora / 1e6:.1f}M)": lora * 4, "LoRA grads fp32": lora * 4,
              "paged 8-bit AdamW state": lora * 2}
    rows = [(name, b, b / world) for name, b in static.items()]
    rows.append(("NF4 quantisation constants (replicated)", quant * NF4_CONSTANTS, quant * NF4_CONSTANTS))
    rows.append(("FSDP: root unit unsharded, forward to end of backward", 0, root))
    lines = [f"ANALYTIC per-rank budget (not a measurement): Qwen1.5-7B QLoRA, {world} ranks, batch 1, GiB",
             "| term | DDP | FSDP |", "|---|---:|---:|"]
    lines += [f"| {name} | {a / GIB:.3f} | {b / GIB:.3f} |" for name, a, b in rows]
    ddp_static, fsdp_static = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"| model state subtotal | {ddp_static / GIB:.2f} | {fsdp_static / GIB:.2f} |")
    low_fix = sum(lo for lo, _ in CUDA_RANGES_GIB.values()) * GIB
    high_fix = sum(hi for _, hi in CUDA_RANGES_GIB.values()) * GIB
    for t in seq_lens:
        acts = n_layers * t * h * 4 + 3 * min(t, chunk) * v * 4  # checkpointed inputs + one chunk of fp32 logits
        recompute = (t * (4 * h + 3 * i) * 2, 2 * t * (4 * h + 3 * i) * 2)  # one layer's outputs, (x2 with grads)
        lines.append(f"| activations at {t:,} tokens (checkpointed inputs + loss chunk + recompute) | "
                     f"{(acts + recompute[0]) / GIB:.2f}-{(acts + recompute[1]) / GIB:.2f} | same |")
        # FSDP's transient: the root's all-gather buffer (step start, no activations yet) or, later, two layers'
        # buffers + copies with the activations, whichever is larger
        fsdp_extra = [max(root, 4 * layer + acts + r) for r in recompute]
        lines.append(f"| FSDP transient: root all-gather buffer {root / GIB:.2f} vs 2 layers x 2 + activations | | "
                     f"{fsdp_extra[0] / GIB:.2f}-{fsdp_extra[1] / GIB:.2f} |")
        for mode, base in (("DDP", ddp_static), ("FSDP", fsdp_static)):
            extra = [acts + r for r in recompute] if mode == "DDP" else fsdp_extra
            low = (base + extra[0]) * (1 + FRAGMENTATION[0]) + low_fix
            high = (base + extra[1]) * (1 + FRAGMENTATION[1]) + high_fix
            lines.append(f"| **{mode} total at {t:,} tokens** (+ CUDA {low_fix / GIB:.2f}-{high_fix / GIB:.2f} GiB, "
                         f"+{FRAGMENTATION[0]:.0%}-{FRAGMENTATION[1]:.0%} fragmentation) | "
                         f"{low / GIB:.2f}-{high / GIB:.2f} | |" if mode == "DDP" else
                         f"| **{mode} total at {t:,} tokens** | | {low / GIB:.2f}-{high / GIB:.2f} |")
    lines.append("Ranges: " + "; ".join(f"{k} {lo}-{hi} GiB" for k, (lo, hi) in CUDA_RANGES_GIB.items()) +
                 ". An 8 GB card (RTX 4060: 8,188 MiB = 8.0 GiB) less what the desktop uses.")
    cpu_bf16 = (quant + vocab + other) * 2
    lines.append(f"Measuring this on this CPU machine: the unquantised bf16 base is {cpu_bf16 / 1e9:.1f} GB per rank;"
                 f" DDP's 2 ranks need {2 * cpu_bf16 / 1e9:.1f} GB > 24 GB of RAM, and building it on each rank "
                 f"before FSDP shards it needs the same. Not measured here.")
    return "\n".join(lines)


def write_json(path: Path, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)  # atomic: never a half-written result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.budget:
        print(budget_7b(args.budget_seq_lens))
        return
    if int(os.environ.get("WORLD_SIZE", 1)) < 2:
        fail("the modes differ only over several ranks: run under torchrun --nproc_per_node=2 (or use --budget 7b)")
    if args.chunk_size > args.seq_len:
        args.chunk_size = args.seq_len
    device = pick_device(args.device)  # cuda: cuda:LOCAL_RANK; an error if this machine has fewer GPUs than ranks
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        config = qwen_config(args.config)
        results = []
        for mode in args.modes:
            mine = measure(config, mode, args, device)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            results += gathered
            if dist.get_rank() == 0:
                print(f"{mode}: loss {mine['loss']:.4f}, built and measured in {mine['seconds']:.0f} s", flush=True)
                if args.output_json:  # after every mode: a long run that is stopped keeps what it measured
                    write_json(args.output_json, results)
        if dist.get_rank() == 0:
            print(table(results, dist.get_world_size(), args.config, args.seq_len))
            print(notes(results))
        dist.barrier()  # rank 0 still prints: gloo may abort a rank whose group is torn down before its peer's
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
