"""Checkpoints that survive a crash of any rank, and the final adapter directory.

A checkpoint is everything needed to continue as if nothing happened:

    <output_dir>/checkpoint-000200/
        adapter_model.safetensors   LoRA weights (identical on every rank: DDP keeps the replicas in sync)
        optimizer.pt                AdamW moments (with --zero: the shards of all ranks, consolidated on rank 0)
        scheduler.pt                learning-rate schedule position
        rng_state.pt                torch (+ CUDA) and python RNG states of EVERY rank (dropout masks differ per rank)
        trainer_state.json          step, epoch, world size, global batch

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
from ddp_model import UsageError
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.distributed.optim import ZeroRedundancyOptimizer
from tqdm import tqdm

PREFIX = "checkpoint-"


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: only finished ones carry the `checkpoint-N` name."""
    done = [d for d in Path(output_dir).glob(PREFIX + "*") if d.is_dir() and d.name[len(PREFIX):].isdigit()]
    return sorted(done, key=lambda d: int(d.name[len(PREFIX):]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    return (checkpoints(output_dir) or [None])[-1]


def same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())


def check_output_dir(output_dir: str, model_name_or_path: str, resume: bool) -> Path | None:
    """Refuse to mix adapters of different base models or to silently build on an old run's checkpoints;
    return the checkpoint to resume from (None: start from scratch)."""
    out = Path(output_dir)
    for cfg in [out / "adapter_config.json", *out.glob(PREFIX + "*/adapter_config.json")]:
        if cfg.is_file():
            base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
            if not same_model(base, model_name_or_path):
                raise UsageError(f"{cfg} holds an adapter of base model {base!r}, not {model_name_or_path!r}; "
                                 f"choose another --output_dir")
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    if ckpt and not resume:
        raise UsageError(f"{out} already holds checkpoints ({ckpt.name}); pass --resume to continue, "
                         f"or choose another --output_dir")
    return ckpt


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


def save_checkpoint(peft_model, optimizer, scheduler, state: dict, output_dir, keep: int) -> None:
    """Collective: every rank calls it. Every rank's RNG state is gathered and the ZeRO shards are
    consolidated on rank 0, which alone writes (the LoRA weights are the same on every rank)."""
    rank = dist.get_rank()
    rng_states = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(rng_state(), rng_states, dst=0)
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)  # collective: the shards travel to rank 0
    if rank == 0:
        path = write_checkpoint(Path(output_dir), state["step"], get_peft_model_state_dict(peft_model),
                                peft_model.peft_config["default"], optimizer.state_dict(), scheduler.state_dict(),
                                rng_states, state, keep=keep)
        tqdm.write(f"step {state['step']} | checkpoint -> {path}")  # keeps rank 0's progress bar intact


def write_checkpoint(output_dir: Path, step: int, adapter: dict, adapter_config, optimizer: dict, scheduler: dict,
                     rng_states: list[dict], state: dict, keep: int = 2) -> Path:
    """Rank 0 only. Write into a temp dir, rename it into place, then drop all but the newest `keep`."""
    final = Path(output_dir) / f"{PREFIX}{step:06d}"
    tmp = Path(output_dir) / f".tmp-{final.name}"
    for stale in Path(output_dir).glob(".tmp-" + PREFIX + "*"):  # left over from a crash during a save
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, tmp / "adapter_model.safetensors")
    adapter_config.save_pretrained(tmp)  # adapter_config.json: a checkpoint loads like any PEFT adapter
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(scheduler, tmp / "scheduler.pt")
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
        **json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")),
    }


def save_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, label=label)
    ax.set(xlabel="optimizer step", ylabel="loss (answer tokens, global mean)", title="LoRA fine-tuning with DDP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_final(peft_model, tokenizer, output_dir: Path, run_args: dict, metrics: dict) -> None:
    """Rank 0 only: adapter + tokenizer + run_args.json + metrics.json + loss_curve.png, written into a temp dir
    and moved file by file (each os.replace is atomic), so a crash never leaves a half-written file that chat.py
    would try to load."""
    out = Path(output_dir)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors (LoRA weights only)
    tokenizer.save_pretrained(tmp)
    (tmp / "run_args.json").write_text(json.dumps(run_args, indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    save_loss_curve(metrics["log_history"], tmp / "loss_curve.png")
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
