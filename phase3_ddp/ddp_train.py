"""The training recipe of finetune_ddp.py, run by every rank inside the process group.

finetune_ddp.py parses the arguments, checks the launch and starts the process group, importing only torch, so
that a wrong launch fails in about a second; the libraries used here (transformers, peft, datasets) take several
seconds to import. Order of the work: data (rank 0 tokenises first) -> model (phase 2's 8 GB recipe) -> DDP, or
with --fsdp the FSDP2 shards of fsdp_shard.py -> optimizer (paged 8-bit AdamW on CUDA, optionally ZeRO-1) -> resume
-> train loop with evaluation and checkpoints -> rank 0 saves the adapter and metrics.
"""

import importlib.util
import itertools
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import fsdp_shard as fsdp
import torch
import torch.distributed as dist
from chunked_loss import enable_chunked_loss
from ddp_checkpoint import restore_checkpoint, save_checkpoint, save_final
from ddp_data import (
    LengthGroupedDistributedSampler,
    MaskedCopies,
    epoch_note,
    eval_batches,
    load_on_rank0_first,
    target_tokens,
)
from qlora_model import (
    UsageError,
    add_lora,
    check_chat_model,
    compute_dtype,
    load_model,
    load_tokenizer,
    trainable_parameters,
)
from run_files import check_output_dir, check_resume_args, data_fingerprint, write_run_args
from sft_data import IGNORE_INDEX, SFTCollator, describe, load_sft_datasets, parse_val_size, real_tokens
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_scheduler
from transformers.utils import logging as hf_logging

# Flags that define what the checkpoints are (data, model shape, optimisation): --resume refuses to change them.
# Phase 2's list, with two changes. The batch: the data order depends only on the global micro-batch (batch_size x
# ranks) and grad_accum, so 4 ranks x 2 may resume 2 ranks x 4. Added: the optimizer and the device, as resolved
# (--optim auto is 8-bit AdamW on CUDA, torch AdamW on CPU: their states do not load into each other), and --fsdp
# (its checkpoints hold the optimizer state by parameter name, DDP's by index).
# How long to train, logging and saving may change; so may the data files' paths while their bytes stay the same.
RESUME_KEYS = ("data_path", "data_sha256", "max_samples", "val_size", "system", "max_seq_len", "train_on_prompt",
               "packing", "seed", "quantization", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr",
               "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "global_micro_batch", "grad_accum",
               "optim", "device", "fsdp")
IS_RANK0 = int(os.environ.get("RANK", 0)) == 0  # set by torchrun; plain python is rank 0 of 1
RESTART_COUNT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))  # > 0: torchrun restarted us after a failure
# Progress bars only for a person watching a terminal; logs (a pipe, `> train.log`) get plain lines instead.
SHOW_BARS = IS_RANK0 and sys.stderr.isatty()


def say(*args) -> None:
    """Only rank 0 talks: W processes printing the same line would garble the log."""
    if IS_RANK0:
        tqdm.write(" ".join(map(str, args)))  # above rank 0's progress bar, if there is one


def check_run(args, device: torch.device) -> Path | None:
    """Checks that need no peer, run on every rank identically BEFORE the process group exists, so a bad value or
    output dir makes every rank fail at once and none is left waiting at a collective. Returns the checkpoint to
    resume from (None: start from scratch). Also quiets all ranks but 0, and progress bars off a terminal.
    --device and --optim are replaced by what they resolve to here, so run_args.json records what ran."""
    if not IS_RANK0:  # what the libraries and run_files print is the same on every rank: rank 0 shows it
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process); errors go to stderr
        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
    if not SHOW_BARS:
        hf_logging.disable_progress_bar()
    args.device, args.optim = device.type, resolved_optim(args.optim, device, args.fsdp)
    try:
        args.val_size = parse_val_size(args.val_size)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
    resume_from = check_output_dir(args.output_dir, args.model_name_or_path, args.resume or RESTART_COUNT > 0)
    if resume_from:
        check_resume_args(args.output_dir, run_args_dict(args), RESUME_KEYS)
    return resume_from


def run_args_dict(args) -> dict:
    """The settings recorded in run_args.json; data paths resolved, so a resume from another working directory
    compares the same files, and their content's hash, so an edited file counts as new. Recorded too: the global
    micro-batch, which fixes the data order (another number of ranks must compensate with --batch_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return {**vars(args), "data_path": [str(Path(p).resolve()) for p in args.data_path],
            "data_sha256": data_fingerprint(args.data_path), "world_size": world_size,
            "global_micro_batch": args.batch_size * world_size,
            "global_batch": args.batch_size * args.grad_accum * world_size}


def resolved_optim(optim: str, device: torch.device, sharded: bool = False) -> str:
    """--optim auto: paged 8-bit AdamW on CUDA (phase 2's choice), torch AdamW elsewhere and with --fsdp
    (bitsandbytes' optimizer cannot update sharded parameters)."""
    cuda = device.type == "cuda" and not sharded
    return optim if optim != "auto" else ("paged_adamw_8bit" if cuda else "adamw_torch")


# ---------------------------------------------------------------- the steps of the recipe

@dataclass
class Plan:
    global_batch: int     # sequences per optimizer step, all ranks together
    steps_per_epoch: int
    total_steps: int


def load_data(args):
    """Tokenizer and tokenised train/val sets (sft_data, as in phase 2); rank 0 tokenises first, filling the
    cache the others then read. Returns (tokenizer, train, val or None, stats, Plan)."""
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    check_chat_model(args.model_name_or_path, tokenizer, args.trust_remote_code)  # a base model: exit 2, every rank
    train_ds, val_ds, stats = load_on_rank0_first(lambda: load_sft_datasets(
        args.data_path, tokenizer, system=args.system, max_seq_len=args.max_seq_len, max_samples=args.max_samples,
        val_size=args.val_size, strict=args.strict, seed=args.seed, log=say, train_on_prompt=args.train_on_prompt,
        cache_dir=None if args.no_cache else args.cache_dir, packing=args.packing,
        overwrite_cache=args.overwrite_cache and IS_RANK0))  # the others then read rank 0's fresh cache
    say(describe(stats, args.max_seq_len))
    stats["target_tokens"] = target_tokens(train_ds)
    world = dist.get_world_size()
    global_batch, micro = args.batch_size * args.grad_accum * world, args.batch_size * world
    # Every example once per epoch (ddp_data.LengthGroupedDistributedSampler): the last global micro-batch may be
    # short, and the last step of an epoch may have fewer micro-batches; the loss is normalised by the tokens the
    # step holds, so a short step is still a token mean.
    n_micro = math.ceil(len(train_ds) / micro)
    steps_per_epoch = math.ceil(n_micro / args.grad_accum)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.epochs * steps_per_epoch)
    say(f"global batch = {args.batch_size} per rank x {args.grad_accum} accumulation x {world} ranks "
        f"= {global_batch} sequences per optimizer step; {steps_per_epoch} steps per epoch, {total_steps} steps")
    say(epoch_note(len(train_ds), micro, world, n_micro, args.grad_accum))
    return tokenizer, train_ds, val_ds, stats, Plan(global_batch, steps_per_epoch, total_steps)


def build_model(args, device: torch.device):
    """Phase 2's 8 GB model, from the same modules: frozen base (NF4 for QLoRA) with the vocabulary matrices kept
    in the compute dtype, LoRA on --target_modules, non-reentrant gradient checkpointing, and the chunked loss
    (chunked_loss.py), so no (B, T, V) logits exist in training or evaluation. The same seed on every rank gives
    the same LoRA init (DDP also broadcasts rank 0's weights)."""
    torch.manual_seed(args.seed)
    # device_map={"": local rank}: the whole replica on this rank's GPU. Without it, from_pretrained would put
    # every rank's copy on cuda:0 (or bitsandbytes would spread it over all visible GPUs).
    device_map = {"": device.index} if device.type == "cuda" else {"": "cpu"}
    model = load_model(args.model_name_or_path, args.quantization, args.trust_remote_code, device_map=device_map,
                       dtype=compute_dtype(device))
    target = "all-linear" if args.target_modules == ["all-linear"] else args.target_modules
    model = add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     target_modules=target, gradient_checkpointing=True)
    trainable, total = trainable_parameters(model)
    say(f"rank 0 on {device}: trainable params {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    return enable_chunked_loss(model, in_eval=True)


def wrap_ddp(model, device: torch.device) -> DDP:
    """Every rank loaded the same frozen base weights from disk, so DDP need not broadcast those (1.8B values):
    it syncs only the LoRA weights at start and all-reduces only their gradients. Non-reentrant checkpointing
    fires each parameter's gradient hook once per backward, so no static_graph / find_unused_parameters."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_optimizer(args, ddp_model, total_steps: int, device: torch.device):
    """Paged 8-bit AdamW on CUDA (Adam's moments in 8 bits, paged to CPU RAM under memory spikes: phase 2's
    choice); torch AdamW elsewhere. Without --zero each rank keeps the full state; with it, 1/W of it; with
    --fsdp too, since the optimizer sees only this rank's shard of each parameter."""
    if resolved_optim(args.optim, device, args.fsdp) == "paged_adamw_8bit":
        import bitsandbytes as bnb
        optimizer_class = bnb.optim.PagedAdamW8bit  # on CPU bitsandbytes warns and runs it unpaged
    else:
        optimizer_class = torch.optim.AdamW
    params = [p for p in ddp_model.parameters() if p.requires_grad]
    kwargs = {"lr": args.lr, "weight_decay": args.weight_decay}
    optimizer = (ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, **kwargs) if args.zero
                 else optimizer_class(params, **kwargs))
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


# ---------------------------------------------------------------- one step, evaluation, the loop

@dataclass
class Engine:
    """What every step needs, on this rank."""
    ddp_model: torch.nn.Module  # DDP(model), or with --fsdp the model itself, sharded in place
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    max_grad_norm: float
    writer: object = None  # rank 0's TensorBoard SummaryWriter with --report_to tensorboard

    def __post_init__(self):
        dtype = compute_dtype(self.device)
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)
        # fp16: loss scaling. FSDP: each rank sees only its shards' gradients; ShardedGradScaler all-reduces the
        # "found inf" flag, so that every rank skips the same steps
        scaler = ShardedGradScaler if fsdp.is_sharded(self.ddp_model) else torch.amp.GradScaler
        self.scaler = scaler(self.device.type, enabled=dtype == torch.float16)


def record(engine: Engine, log_history: list, entry: dict) -> None:
    """Append a log entry (step + loss, lr, ... or eval_loss); with TensorBoard also write its numbers there."""
    log_history.append(entry)
    for key, value in entry.items() if engine.writer else ():
        if key not in ("step", "epoch"):
            engine.writer.add_scalar(("eval/" if key.startswith("eval") else "train/") + key, value, entry["step"])


def train_step(engine: Engine, window: list[dict]) -> tuple[float, float, int, int]:
    """One optimizer step over this rank's micro-batches. Returns (global mean loss, gradient norm before
    clipping, global target tokens, global real tokens).

    The loss we want is the mean over every target token of the GLOBAL batch. Ranks hold different numbers
    of target tokens, so averaging W per-rank means (what DDP's gradient averaging does with a plain token-mean
    loss) weights tokens unequally. Instead: count the tokens of the whole window on all ranks first (N), and
    let every rank's chunked loss divide its sum of CE by N / W (its num_items_in_batch); DDP divides the summed
    gradients by W, which leaves d(sum of all ranks' CE) / N: exactly the single-process gradient.
    """
    counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window),
                           sum(real_tokens(b) for b in window)], device=engine.device)
    dist.all_reduce(counts)  # SUM over ranks: [target tokens N, real tokens]
    num_items = counts[0].float() / dist.get_world_size()
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    for i, batch in enumerate(window):
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
        # no_sync(): backward only accumulates into .grad; the gradient all-reduce (FSDP: reduce-scatter) runs once
        # per optimizer step, overlapped with the backward of the last micro-batch, instead of once per micro-batch.
        with nullcontext() if i == len(window) - 1 else fsdp.gradient_sync(engine.ddp_model, False):
            with engine.autocast:
                loss = engine.ddp_model(**batch, num_items_in_batch=num_items).loss  # sum(CE) * W / N
            engine.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    engine.scaler.unscale_(engine.optimizer)
    # Grads are identical on all ranks after the all-reduce, so is the norm (logged: the gradient of the global
    # token-mean loss, comparable between runs on any number of ranks) and the clipping (0: none).
    params = [p for p in engine.ddp_model.parameters() if p.requires_grad]
    grad_norm = fsdp.full(torch.nn.utils.clip_grad_norm_(params, engine.max_grad_norm or math.inf))  # of all shards
    engine.scaler.step(engine.optimizer)  # with ZeRO-1: each rank updates its shard, then broadcasts the weights
    engine.scaler.update()
    engine.scheduler.step()
    engine.optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(loss_sum)  # for logging only: W x (all ranks' CE) / N
    return loss_sum.item() / dist.get_world_size(), grad_norm.item(), int(counts[0]), int(counts[1])


@torch.no_grad()
def evaluate(engine: Engine, val_ds, collate, batch_size: int) -> float:
    """Mean loss over every target token of the validation set (sum of CE / number of targets, as in phase 2).
    Rank r takes examples r, r+W, ... (no padding duplicates); sums and counts are all-reduced. The chunked loss
    with num_items_in_batch=1 returns the plain sum; the unwrapped model needs no gradient sync. With --fsdp every
    forward all-gathers weights, a collective: a rank with fewer batches runs stand-ins (example 0), discarded."""
    model = fsdp.unwrap(engine.ddp_model)
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # [sum of CE, number of target tokens]
    rank, world = dist.get_rank(), dist.get_world_size()
    for rows in eval_batches(len(val_ds), rank, world, batch_size, lockstep=fsdp.is_sharded(model)):
        batch = collate([val_ds[i] for i in rows or [0]])
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        with engine.autocast:
            loss = model(**batch, num_items_in_batch=1).loss
        if rows:  # a real batch, not a stand-in
            sums[0] += loss
            sums[1] += (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    dist.all_reduce(sums)
    fsdp.release(model)  # FSDP: the root's weights, gathered for the forwards above
    model.train()
    return (sums[0] / sums[1]).item()


def train_loop(args, engine: Engine, train_ds, val_ds, collate, plan: Plan, step: int, log_history: list) -> float:
    """Train from `step` to plan.total_steps, appending to log_history; returns the training seconds."""
    # train_ds["length"] is a lazy Column; [:] reads it in one go instead of row by row (as in phase 2's Trainer).
    sampler = LengthGroupedDistributedSampler(train_ds["length"][:], args.batch_size, dist.get_world_size(),
                                              dist.get_rank(), seed=args.seed)
    # generator=: making an iterator draws a seed from it; the global RNG must stay untouched for an exact resume.
    loader = DataLoader(MaskedCopies(train_ds), batch_sampler=sampler, collate_fn=collate,
                        generator=torch.Generator())
    engine.ddp_model.train()
    bar = tqdm(total=plan.total_steps, initial=step, desc="train", disable=not SHOW_BARS)
    t_start, start_step = time.perf_counter(), step
    while step < plan.total_steps:
        epoch, skip = divmod(step, plan.steps_per_epoch)
        sampler.set_epoch(epoch, skip=skip * args.grad_accum)  # a new order each epoch; skip what a resume did
        batches = iter(loader)
        for _ in range(skip, plan.steps_per_epoch):
            t0 = time.perf_counter()
            window = list(itertools.islice(batches, args.grad_accum))  # the epoch's last one may be shorter
            loss, grad_norm, n_targets, n_tokens = train_step(engine, window)
            step += 1
            seconds, lr = time.perf_counter() - t0, engine.scheduler.get_last_lr()[0]
            record(engine, log_history, {"step": step, "epoch": epoch, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                                         "tokens": n_targets, "tokens_per_second": n_tokens / seconds,
                                         "seconds": seconds})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step % args.logging_steps == 0 or step == start_step + 1:
                say(f"step {step}/{plan.total_steps} | loss {loss:.4f} | lr {lr:.2e} | {n_tokens / seconds:.0f} "
                    f"tokens/s")
            after_step(args, engine, val_ds, collate, plan, step, epoch, log_history)
            if step >= plan.total_steps:
                break
    bar.close()
    return time.perf_counter() - t_start


def after_step(args, engine: Engine, val_ds, collate, plan: Plan, step: int, epoch: int, log_history: list) -> None:
    """Evaluation and checkpoint on their schedules (collectives: every rank runs them)."""
    if val_ds is not None and (step % args.eval_steps == 0 or step == plan.total_steps):
        record(engine, log_history, {"step": step, "eval_loss": evaluate(engine, val_ds, collate, args.batch_size)})
        say(f"step {step} | eval loss {log_history[-1]['eval_loss']:.4f}")
    if args.save_steps and step % args.save_steps == 0:
        state = {"step": step, "epoch": epoch, "world_size": dist.get_world_size(),
                 "global_batch": plan.global_batch, "log_history": log_history}
        dist.barrier()  # every rank has finished this step before the save starts
        save_checkpoint(fsdp.unwrap(engine.ddp_model), engine.optimizer, engine.scheduler, engine.scaler, state,
                        args.output_dir, args.save_total_limit)
        dist.barrier()  # no rank runs ahead (and maybe crashes) before the checkpoint is on disk


# ---------------------------------------------------------------- report

def report(args, engine: Engine, model, tokenizer, plan: Plan, stats: dict, log_history: list, start_step: int,
           seconds: float, counts: tuple[int, int]) -> None:
    """metrics.json, and rank 0 saves adapter + tokenizer + metrics; a barrier so no rank exits while it writes.
    counts: (trainable, total) parameters, counted before --fsdp hides bitsandbytes' packed 4-bit type."""
    steps_done = [h for h in log_history if "loss" in h and h["step"] > start_step]
    trainable, total = counts
    metrics = {
        "global_step": log_history[-1]["step"] if log_history else 0, "world_size": dist.get_world_size(),
        "global_batch": plan.global_batch,
        "train_loss": sum(h["loss"] for h in steps_done) / len(steps_done) if steps_done else None,
        "eval_loss": next((h["eval_loss"] for h in reversed(log_history) if "eval_loss" in h), None),
        "train_seconds": seconds, "samples_per_second": len(steps_done) * plan.global_batch / seconds,
        "trainable_params": trainable, "total_params": total, "zero": args.zero, "fsdp": args.fsdp,
        "backend": dist.get_backend(),
        "optimizer": type(getattr(engine.optimizer, "optim", engine.optimizer)).__name__,  # ZeRO: the wrapped one
        "precision": str(compute_dtype(engine.device)).removeprefix("torch."),
        "vocab_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "data": stats, "log_history": log_history,
    }
    memory, lines = fsdp.memory_per_rank(model, engine.optimizer, args.zero, engine.device)  # a collective
    metrics.update(memory)  # parameter and optimizer-state bytes per rank
    say("\n".join(lines))
    if engine.device.type == "cuda":
        peaks = fsdp.gather_ints(torch.cuda.max_memory_allocated(engine.device), engine.device)
        metrics["peak_gpu_memory_gb_per_rank"] = [round(n / 2**30, 3) for n in peaks]
    adapter = fsdp.full_trainable_state(model)  # --fsdp: every rank takes part in gathering the LoRA shards
    if dist.get_rank() == 0:
        save_final(model, tokenizer, Path(args.output_dir), metrics, adapter)
        say(f"done: {metrics['global_step']} steps, {metrics['samples_per_second']:.2f} samples/s, "
            f"adapter -> {args.output_dir}")
    dist.barrier()


# ---------------------------------------------------------------- the recipe

def train(args, device: torch.device, resume_from: Path | None) -> None:
    """The recipe. Every rank runs it inside the process group and must reach every collective in the same order."""
    tokenizer, train_ds, val_ds, stats, plan = load_data(args)
    model = build_model(args, device)
    counts = trainable_parameters(model)
    ddp_model = fsdp.shard_model(model) if args.fsdp else wrap_ddp(model, device)  # FSDP2 shards model in place
    optimizer, scheduler = build_optimizer(args, ddp_model, plan.total_steps, device)
    engine = Engine(ddp_model, optimizer, scheduler, device, args.max_grad_norm, writer=tensorboard_writer(args))
    torch.manual_seed(args.seed + dist.get_rank())  # training randomness (dropout) differs per rank
    state = restore_checkpoint(resume_from, model, optimizer, scheduler, engine.scaler, log=say) or {
        "step": 0, "log_history": []}
    if state["step"]:
        say(f"resumed from step {state['step']} (restart {RESTART_COUNT})")
    if IS_RANK0:
        write_run_args(args.output_dir, run_args_dict(args))  # at the start: --resume checks against it
    collate = SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if device.type == "cuda" else None)
    seconds = train_loop(args, engine, train_ds, val_ds, collate, plan, state["step"], state["log_history"])
    report(args, engine, model, tokenizer, plan, stats, state["log_history"], state["step"], seconds, counts)
    if engine.writer:
        engine.writer.close()


def tensorboard_writer(args):
    """Rank 0's TensorBoard writer (event files in <output_dir>/runs) with --report_to tensorboard, else None."""
    if args.report_to != "tensorboard" or not IS_RANK0:
        return None
    from torch.utils.tensorboard import SummaryWriter  # checked to be importable by check_run
    return SummaryWriter(str(Path(args.output_dir) / "runs"))


