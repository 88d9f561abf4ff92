"""Checkpoints that survive a crash of any rank, and the final adapter directory.

A checkpoint is everything needed to continue as if nothing happened:

    <output_dir>/checkpoint-200/  (the HF Trainer's layout)
        adapter_model.safetensors   LoRA weights (identical on every rank under DDP; --fsdp: gathered from the shards)
        optimizer.pt                AdamW moments (--zero / --fsdp: the shards of all ranks, gathered on rank 0)
        scheduler.pt                learning-rate schedule position
        scaler.pt                   fp16 GradScaler: loss scale and growth tracker ({} when not in fp16)
        rng_state.pt                torch (+ CUDA) and python RNG states of EVERY rank (dropout masks differ per rank)
        trainer_state.json          step, epoch, world size, global batch, fsdp

With --fsdp each rank holds a shard of the LoRA weights and of their Adam moments. They are gathered into the same
single files, not saved per rank: LoRA's state is small (MBs, not the GBs of the frozen base, which is never saved),
one writer needs no shared disk, and a resume re-shards them for any number of ranks. The optimizer state is then
keyed by parameter name (torch.distributed.checkpoint's full state dict) instead of DDP's index, so a resume may not
switch between --fsdp and DDP.

Only rank 0 touches the disk. It writes into `.tmp-checkpoint-N` and renames the finished directory
(os.replace is atomic), so a crash mid-write never leaves a checkpoint that looks complete. On resume
rank 0 reads the newest one and broadcasts it, so the other ranks (other nodes too) need no shared disk.
"""

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_shard import full_trainable_state, is_sharded, shard_like_parameters
from qlora_model import UsageError

# run_files imports qlora_model, which must come before peft (its log and warning filters): see its top
from run_files import CHECKPOINT_PREFIX as PREFIX  # checkpoint-<step>: the HF Trainer's layout, as in phase 2
from run_files import save_loss_curve

# isort: split
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer
from tqdm import tqdm

BNB_NESTED_STATE = "__bnb_optimizer_quant_state__"  # bitsandbytes.optim.optimizer.Optimizer8bit


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: only finished ones carry the `checkpoint-N` name (run_files.py's
    latest_checkpoint() picks the newest the same way)."""
    done = [d for d in Path(output_dir).glob(PREFIX + "*") if d.is_dir() and d.name[len(PREFIX):].isdigit()]
    return sorted(done, key=lambda d: int(d.name[len(PREFIX):]))


def rng_state() -> dict:
    """This process's RNG states, in types torch.load(weights_only=True) accepts (tensors, tuples, ints)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(peft_model, optimizer, scheduler, scaler, state: dict, output_dir, keep: int) -> None:
    """Collective: every rank calls it. Every rank's RNG state is gathered and the ZeRO (or FSDP) shards are
    consolidated on rank 0, which alone writes (DDP: the LoRA weights are the same on every rank)."""
    rank = dist.get_rank()
    rng_states = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(rng_state(), rng_states, dst=0)
    adapter = full_trainable_state(peft_model)  # FSDP: a collective all-gather of every LoRA shard
    if is_sharded(peft_model):  # collective: each parameter's moments all-gathered, kept on rank 0's CPU
        optimizer_state = get_optimizer_state_dict(peft_model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    elif isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)  # collective: the shards travel to rank 0
    if rank == 0:
        optimizer_state = optimizer_state if is_sharded(peft_model) else optimizer.state_dict()
        path = write_checkpoint(Path(output_dir), state["step"], get_peft_model_state_dict(peft_model, adapter),
                                peft_model.peft_config["default"], optimizer_state, scheduler.state_dict(),
                                scaler.state_dict(), rng_states, {**state, "fsdp": is_sharded(peft_model)}, keep=keep)
        tqdm.write(f"step {state['step']} | checkpoint -> {path}")  # keeps rank 0's progress bar intact


def write_checkpoint(output_dir: Path, step: int, adapter: dict, adapter_config, optimizer: dict, scheduler: dict,
                     scaler: dict, rng_states: list[dict], state: dict, keep: int = 2) -> Path:
    """Rank 0 only. Write into a temp dir, rename it into place, then drop all but the newest `keep`."""
    final = Path(output_dir) / f"{PREFIX}{step}"
    tmp = Path(output_dir) / f".tmp-{final.name}"
    for stale in Path(output_dir).glob(".tmp-" + PREFIX + "*"):  # left over from a crash during a save
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, tmp / "adapter_model.safetensors")
    adapter_config.save_pretrained(tmp)  # adapter_config.json: a checkpoint loads like any PEFT adapter
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(scheduler, tmp / "scheduler.pt")
    torch.save(scaler, tmp / "scaler.pt")
    torch.save(rng_states, tmp / "rng_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)  # same step saved by an attempt that crashed right after renaming
    os.replace(tmp, final)
    for old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(ckpt: Path) -> dict:
    """Rank 0 only: everything write_checkpoint wrote, on CPU. weights_only=True: no pickled code runs."""
    return {
        "adapter": load_file(ckpt / "adapter_model.safetensors"),
        "optimizer": torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True),
        "scheduler": torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True),
        "rng": torch.load(ckpt / "rng_state.pt", map_location="cpu", weights_only=True),
        "scaler": (torch.load(ckpt / "scaler.pt", weights_only=True) if (ckpt / "scaler.pt").is_file()
                   else None),  # None: written before the scaler was saved
        **json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")),
    }


def restore_checkpoint(ckpt: Path | None, peft_model, optimizer, scheduler, scaler, log=print) -> dict | None:
    """Collective. Rank 0 reads `ckpt` and broadcasts it (no shared disk needed); every rank loads the LoRA
    weights, optimizer (ZeRO: its own shard of the full dict), scheduler, fp16 loss scale and, if the world size
    is unchanged, its own RNG state. Returns the trainer state (step, epoch, log_history, ...), or None without
    a checkpoint."""
    payload = [read_checkpoint(ckpt) if dist.get_rank() == 0 and ckpt else None]
    dist.broadcast_object_list(payload, src=0)
    state = payload[0]
    if state is None:
        return None
    if state.get("fsdp", False) != is_sharded(peft_model):  # older checkpoints hold no "fsdp": DDP ones
        was = "with" if state.get("fsdp") else "without"
        raise UsageError(f"--resume: checkpoint-{state['step']} was written {was} --fsdp; resume {was} it, or "
                         "choose another --output_dir")
    if is_sharded(peft_model):  # each rank keeps its rows of the full tensors: optimizer by name, as saved
        set_peft_model_state_dict(peft_model, shard_like_parameters(peft_model, state.pop("adapter")))
        set_optimizer_state_dict(peft_model, optimizer, optim_state_dict=state.pop("optimizer"),
                                 options=StateDictOptions(full_state_dict=True))
        return restore_rest(state, scheduler, scaler, log)
    set_peft_model_state_dict(peft_model, state.pop("adapter"))
    optimizer_state = state.pop("optimizer")
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        # bitsandbytes' state_dict() nests its quantisation tensors under one key (to hide them from FSDP) and
        # only its own load_state_dict() un-nests them; ZeroRedundancyOptimizer.load_state_dict() copies each
        # parameter's state straight into the local optimizer, so un-nest them here (no-op for torch AdamW).
        for param_state in optimizer_state["state"].values():
            param_state.update(param_state.pop(BNB_NESTED_STATE, {}))
    optimizer.load_state_dict(optimizer_state)
    return restore_rest(state, scheduler, scaler, log)


def restore_rest(state: dict, scheduler, scaler, log) -> dict:
    """After the weights and the optimizer: the schedule, the fp16 loss scale and this rank's RNG."""
    scheduler.load_state_dict(state.pop("scheduler"))
    scaler_state = state.pop("scaler")
    if scaler.is_enabled() and scaler_state:  # fp16: the loss scale the run had reached, not 65,536 again
        scaler.load_state_dict(scaler_state)
    elif scaler.is_enabled():
        log("resume: the checkpoint holds no GradScaler state (an older version wrote it): the fp16 loss scale "
            "restarts at its initial value")
    rng = state.pop("rng")
    if state["world_size"] == dist.get_world_size():
        set_rng_state(rng[dist.get_rank()])
    else:  # --resume checked that batch_size x ranks is unchanged, which is all the data order depends on
        log(f"resume: checkpoint has {state['world_size']} ranks, now {dist.get_world_size()}: the same data order "
            "(the same global micro-batch), but each rank's RNG starts afresh, so dropout masks differ from an "
            "uninterrupted run")
    return state


def save_final(peft_model, tokenizer, output_dir: Path, metrics: dict, adapter: dict | None = None) -> None:
    """Rank 0 only: adapter + tokenizer + metrics.json + loss_curve.png (run_args.json was written at the start),
    written into a temp dir and moved file by file (each os.replace is atomic), so a crash never leaves a
    half-written file that chat.py would try to load. adapter: the full LoRA weights (full_trainable_state, which
    every rank must call under --fsdp); None reads them from peft_model, whose weights must then be whole (DDP)."""
    out = Path(output_dir)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # adapter_config.json + adapter_model.safetensors (LoRA weights only), a normal PEFT adapter either way
    peft_model.save_pretrained(tmp, state_dict=adapter)
    tokenizer.save_pretrained(tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    save_loss_curve(metrics["log_history"], tmp / "loss_curve.png", title="LoRA fine-tuning with DDP")
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
