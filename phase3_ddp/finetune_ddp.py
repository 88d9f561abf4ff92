"""LoRA / QLoRA fine-tuning of a chat model as an explicit PyTorch DDP (data-parallel) program.

    torchrun --nproc_per_node=2 phase3_ddp/finetune_ddp.py          # 2 GPUs (NCCL) or 2 CPU processes (gloo)
    python phase3_ddp/finetune_ddp.py                                # 1 process: the same code, world size 1
    torchrun --nnodes 2 --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 phase3_ddp/finetune_ddp.py

Same data, model and LoRA flags as phase2_lora/finetune.py, but no Trainer: every DDP step is in view.
Each of the W processes ("ranks") holds a full replica (frozen 4-bit base + LoRA), reads its own 1/W of
every global batch (DistributedSampler) and, in the backward of the last micro-batch, DDP all-reduces the
LoRA gradients, so every replica takes the identical AdamW step. Order of the work: arguments -> checks ->
data -> process group -> model -> DDP -> optimizer (optionally ZeRO-1) -> resume -> train loop with
checkpoints -> evaluate -> rank 0 saves the PEFT adapter.
"""

import argparse
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_checkpoint import check_output_dir, read_checkpoint, save_checkpoint, save_final, set_rng_state
from ddp_data import IGNORE_INDEX, PadCollator, load_sft_examples, parse_val_size
from ddp_model import QUANTIZATIONS, UsageError, compute_dtype, count_parameters, load_lora_model, load_tokenizer
from peft import set_peft_model_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

# torchrun sets these for every process it starts; plain `python` gets the defaults (one process).
RANK = int(os.environ.get("RANK", 0))                          # global index of this process, 0..W-1
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))              # index on this machine = which GPU to use
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))              # W: processes over all machines
LOCAL_WORLD_SIZE = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # processes on this machine
RESTART_COUNT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))  # > 0: torchrun restarted us after a failure


def say(*args, **kwargs) -> None:
    """Only rank 0 talks: W processes printing the same line would garble the log."""
    if RANK == 0:
        tqdm.write(" ".join(map(str, args)), **kwargs)


def fail(message: str) -> int:
    """Bad input. Every rank finds the same problem and exits 2; one rank per machine (LOCAL_RANK 0, which on
    one machine is rank 0) prints the one line, so each machine's log says what went wrong."""
    if LOCAL_RANK == 0:
        print(f"error: {message}", file=sys.stderr)
    return 2


class RankZeroArgumentParser(argparse.ArgumentParser):
    """Every rank parses the same argv and fails the same way: one line per machine, exit 2 everywhere."""

    def error(self, message):
        sys.exit(fail(f"{message} (see --help)"))


def parse_args(argv=None) -> argparse.Namespace:
    p = RankZeroArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default="Qwen/Qwen1.5-1.8B-Chat",
                   help="hub id or local directory of a causal LM with a chat template (Qwen2 architecture tested)")
    p.add_argument("--data_path", nargs="+", default=["data/alpaca_data_cleaned.json"],
                   help="Alpaca JSON list or JSONL files (instruction, optional input, output); several are mixed")
    p.add_argument("--output_dir", default="checkpoints/qwen1.5-1.8b-lora-ddp")
    p.add_argument("--system", default=None, help="system prompt for every example (default: the template's own)")
    p.add_argument("--max_seq_len", type=int, default=512, help="longer examples are truncated (and counted)")
    p.add_argument("--max_samples", type=int, default=None, help="use only the first N valid records")
    p.add_argument("--val_size", type=_val_size, default=0.02,
                   help="held-out records: a fraction in (0, 1) or a count; 0 turns evaluation off")
    p.add_argument("--strict", action="store_true", help="stop at the first invalid record instead of skipping it")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--warmup_ratio", type=float, default=0.03, help="fraction of steps with linear warmup")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per forward pass PER RANK")
    p.add_argument("--grad_accum", type=int, default=4, help="forward passes per optimizer step")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=int, default=32)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="4bit", help="base weights: 4bit = QLoRA")
    p.add_argument("--zero", action="store_true",
                   help="ZeRO-1: shard the AdamW state over ranks (torch ZeroRedundancyOptimizer)")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--eval_steps", type=int, default=200, help="evaluate every N steps and at the end")
    p.add_argument("--save_steps", type=int, default=200, help="checkpoint every N steps (0: never)")
    p.add_argument("--save_total_limit", type=int, default=2, help="keep only the newest N checkpoints")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir "
                   "(automatic when torchrun --max-restarts restarts the group)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA if available")
    p.add_argument("--dist_timeout", type=float, default=1800, help="seconds a collective may wait for a peer")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code from the hub (off: safer)")
    p.add_argument("--crash_at_step", type=int, default=None, help=argparse.SUPPRESS)  # test only: kill last rank
    args = p.parse_args(argv)
    for name in ("max_seq_len", "batch_size", "grad_accum", "lora_r", "logging_steps", "eval_steps",
                 "save_total_limit"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.lora_dropout < 1 or args.epochs <= 0 or args.lr <= 0 or args.save_steps < 0:
        p.error("need 0 <= --lora_dropout < 1, --epochs > 0, --lr > 0 and --save_steps >= 0")
    return args


def _val_size(text: str):
    try:
        return parse_val_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def pick_device(requested: str) -> torch.device:
    """One GPU per process: LOCAL_RANK picks it. More processes than GPUs would share one and run out of
    memory (NCCL also refuses two ranks on one GPU), so that is an error before anything starts."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus < LOCAL_WORLD_SIZE:
        fix = f"launch one process per GPU (torchrun --nproc_per_node={n_gpus})" if n_gpus else "use --device cpu"
        raise UsageError(f"{LOCAL_WORLD_SIZE} process(es) on this machine but {n_gpus} CUDA GPU(s) visible; {fix}")
    torch.cuda.set_device(LOCAL_RANK)
    return torch.device("cuda", LOCAL_RANK)


def init_distributed(device: torch.device, timeout_s: float) -> None:
    """NCCL between GPUs, gloo between CPU processes. Under torchrun the rendezvous address comes from the
    environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE); under plain python an in-memory store makes a group
    of one, so the training code below is the same in both cases."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)  # a rank stuck at a collective raises instead of hanging forever
    if "RANK" in os.environ:
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))  # the TCPStore torchrun points us to
        # torchrun keeps that store across restarts (pytorch/pytorch#135712): without a per-attempt prefix a
        # restarted rank can read a dead rank's address from the crashed attempt and fail to connect.
        store = dist.PrefixStore(f"attempt_{RESTART_COUNT}", store)
        dist.init_process_group(backend, store=store, rank=RANK, world_size=WORLD_SIZE, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)


def train_step(ddp_model, params: list, window: list[dict], optimizer, scheduler, scaler, autocast,
               max_grad_norm: float, device: torch.device) -> tuple[float, int]:
    """One optimizer step over this rank's `grad_accum` micro-batches. Returns (global mean loss, global tokens).

    The loss we want is the mean over every answer token of the GLOBAL batch. Ranks hold different numbers
    of answer tokens, so averaging W per-rank means (what DDP's gradient averaging would do with a plain
    token-mean loss) weights tokens unequally. Instead: count the tokens of the whole window on all ranks
    first (N), backprop sum(CE) * W / N on each rank; DDP divides the summed gradients by W, which leaves
    d(sum of all ranks' CE) / N: exactly the single-process gradient of the same global batch.
    """
    n_tokens = torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window), device=device)
    dist.all_reduce(n_tokens)  # SUM over ranks
    scale = dist.get_world_size() / n_tokens.item()
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(window):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # no_sync(): backward only accumulates into .grad; the gradient all-reduce runs once per optimizer
        # step, overlapped with the backward of the last micro-batch, instead of once per micro-batch.
        with nullcontext() if i == len(window) - 1 else ddp_model.no_sync():
            with autocast:
                logits = ddp_model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits  # (B, T, V)
                ce_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),   # (B*(T-1), V): predict t+1 from t
                                         batch["labels"][:, 1:].flatten(),      # (B*(T-1),)
                                         ignore_index=IGNORE_INDEX, reduction="sum")
            scaler.scale(ce_sum * scale).backward()
        loss_sum += ce_sum.detach()
    scaler.unscale_(optimizer)
    if max_grad_norm > 0:  # grads are identical on all ranks after the all-reduce, so is the clipping
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)  # with ZeRO-1: each rank updates its shard, then broadcasts the new weights
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(loss_sum)  # for logging only: every rank's sum of answer-token losses
    return loss_sum.item() / n_tokens.item(), int(n_tokens.item())


@torch.no_grad()
def evaluate(model, val_set: list[dict], collate, batch_size: int, autocast, device: torch.device) -> float:
    """Mean answer-token loss over the whole validation set: rank r takes examples r, r+W, ... (no padding
    duplicates), the sums and counts are all-reduced. Uses the unwrapped model: no gradient sync needed."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of CE, number of answer tokens]
    shard = val_set[dist.get_rank()::dist.get_world_size()]
    for start in range(0, len(shard), batch_size):
        batch = {k: v.to(device) for k, v in collate(shard[start:start + batch_size]).items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:].flatten()
        sums[0] += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels, reduction="sum")
        sums[1] += (labels != IGNORE_INDEX).sum()
    dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[1]).item()


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state held by THIS rank (AdamW: exp_avg + exp_avg_sq per trainable weight)."""
    local = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer  # ZeRO: own shard
    return sum(t.numel() * t.element_size() for s in local.state.values() for t in s.values() if torch.is_tensor(t))


def gather_ints(value: int, device: torch.device) -> list[int]:
    """Every rank's `value`, in rank order, on every rank (all_gather of one int64 each)."""
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [int(g.item()) for g in gathered]


def report_optimizer_state(optimizer, zero: bool, device: torch.device) -> list[int]:
    """Every rank's optimizer-state bytes; rank 0 prints them with and without ZeRO-1."""
    per_rank = gather_ints(optimizer_state_bytes(optimizer), device)
    # Without ZeRO each rank holds the whole state; with it, the whole state is the sum of the shards.
    full = sum(per_rank) if zero else per_rank[0]
    for r, n in enumerate(per_rank):
        say(f"rank {r}: optimizer state {n / 2**20:.2f} MiB " + (f"(ZeRO-1 shard; {full / 2**20:.2f} MiB without)"
            if zero else f"(full replica; --zero would keep about {full / len(per_rank) / 2**20:.2f} MiB)"))
    return per_rank


def main(argv=None) -> int:
    args = parse_args(argv)
    resume = args.resume or RESTART_COUNT > 0
    if RANK != 0:  # library warnings and progress bars are the same on every rank: rank 0 shows them
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
    # 1. Checks and data, on every rank identically and BEFORE any process group exists: a bad path or
    #    flag makes every rank fail here at once, so none can be left waiting at a collective.
    try:
        device = pick_device(args.device)
        resume_from = check_output_dir(args.output_dir, args.model_name_or_path, resume)
        tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
        train_set, val_set, stats = load_sft_examples(
            args.data_path, tokenizer, system=args.system, max_seq_len=args.max_seq_len,
            max_samples=args.max_samples, val_size=args.val_size, strict=args.strict, seed=args.seed, log=say)
        global_batch = args.batch_size * args.grad_accum * WORLD_SIZE
        # drop_last everywhere: each rank gets len // W examples, in whole micro-batches, in whole windows.
        steps_per_epoch = len(train_set) // WORLD_SIZE // args.batch_size // args.grad_accum
        if steps_per_epoch == 0:
            raise UsageError(f"{len(train_set)} training examples are fewer than one global batch of {global_batch} "
                             f"(batch_size x grad_accum x {WORLD_SIZE} ranks); lower them or add data")
    except UsageError as e:
        return fail(str(e))
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.epochs * steps_per_epoch)
    say(f"data: {stats['read']} records read, {stats['invalid']} invalid skipped, {stats['nooutput']} <nooutput> "
        f"dropped, {stats['truncated']} truncated to {args.max_seq_len} tokens, {stats['no_answer_left']} dropped "
        f"(no answer left) -> {stats['train']} train / {stats['val']} val")
    say(f"global batch = {args.batch_size} per rank x {args.grad_accum} accumulation x {WORLD_SIZE} ranks "
        f"= {global_batch} sequences per optimizer step; {steps_per_epoch} steps per epoch, {total_steps} steps")

    # 2. Process group: from here on every rank must reach every collective, in the same order.
    init_distributed(device, args.dist_timeout)
    try:
        return train(args, device, tokenizer, train_set, val_set, stats, resume_from, resume, steps_per_epoch,
                     total_steps, global_batch)
    except UsageError as e:  # e.g. the model can't be loaded: identical on every rank
        return fail(str(e))
    finally:
        dist.destroy_process_group()


def train(args, device, tokenizer, train_set, val_set, stats, resume_from, resume, steps_per_epoch, total_steps,
          global_batch) -> int:
    # 3. Model: the same seed on every rank gives the same LoRA init (DDP also broadcasts rank 0's weights).
    torch.manual_seed(args.seed)
    model = load_lora_model(args.model_name_or_path, device, args.quantization, args.lora_r, args.lora_alpha,
                            args.lora_dropout, args.trust_remote_code)
    trainable, total = count_parameters(model)
    say(f"rank 0 on {device}: trainable params {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")

    # 4. DDP. Every rank loaded the same frozen base weights from disk, so DDP need not broadcast those
    #    (1.8B values); it syncs only the LoRA weights at start and all-reduces only their gradients.
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # 5. Optimizer: plain AdamW keeps a full copy of its state on every rank; ZeRO-1 gives each rank 1/W of it.
    params = [p for p in ddp_model.parameters() if p.requires_grad]
    if args.zero:
        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    dtype = compute_dtype(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling

    # 6. Resume: rank 0 reads the checkpoint and broadcasts it, each rank restores its own RNG state.
    start_step, log_history = 0, []
    torch.manual_seed(args.seed + dist.get_rank())  # training randomness (dropout) differs per rank
    if resume:
        payload = [read_checkpoint(resume_from) if dist.get_rank() == 0 and resume_from else None]
        dist.broadcast_object_list(payload, src=0)
        ckpt = payload[0]
        if ckpt is None:
            say("resume: no checkpoint yet, starting from scratch")
        else:
            set_peft_model_state_dict(ddp_model.module, ckpt["adapter"])
            optimizer.load_state_dict(ckpt["optimizer"])  # ZeRO: every rank keeps its own shard of the full dict
            scheduler.load_state_dict(ckpt["scheduler"])
            start_step, log_history = ckpt["step"], ckpt["log_history"]
            if ckpt["world_size"] == dist.get_world_size():
                set_rng_state(ckpt["rng"][dist.get_rank()])
            else:
                say(f"resume: checkpoint has {ckpt['world_size']} ranks, now {dist.get_world_size()}: "
                    "data order and dropout masks will differ from an uninterrupted run")
            say(f"resumed from step {start_step} (restart {RESTART_COUNT})")

    # 7. Data: DistributedSampler gives rank r the indices perm[r], perm[r+W], ... of a permutation seeded by
    #    seed + epoch, so the W ranks together see each global batch once, and a resumed run sees the same.
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
    collate = PadCollator(tokenizer.pad_token_id)
    # generator=: making an iterator draws a seed from it; the global RNG must stay untouched for exact resume.
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, collate_fn=collate, drop_last=True,
                        generator=torch.Generator())

    # 8. Train.
    ddp_model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=dist.get_rank() != 0)
    step, t_start, opt_bytes = start_step, time.perf_counter(), None
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)  # a new shuffle each epoch, identical on every rank
        batches = iter(loader)
        for _ in range(skip * args.grad_accum):  # fast-forward a resumed epoch (collating only)
            next(batches)
        for _ in range(skip, steps_per_epoch):
            t0 = time.perf_counter()
            window = [next(batches) for _ in range(args.grad_accum)]
            loss, n_tokens = train_step(ddp_model, params, window, optimizer, scheduler, scaler, autocast,
                                        args.max_grad_norm, device)
            step += 1
            log_history.append({"step": step, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
                                "tokens": n_tokens, "seconds": time.perf_counter() - t0})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % args.logging_steps == 0:
                say(f"step {step}/{total_steps} | loss {loss:.4f} | lr {scheduler.get_last_lr()[0]:.2e}")
            if opt_bytes is None:  # AdamW allocates its state at the first step
                opt_bytes = report_optimizer_state(optimizer, args.zero, device)
            if val_set and (step % args.eval_steps == 0 or step == total_steps):
                log_history.append({"step": step, "eval_loss": evaluate(
                    ddp_model.module, val_set, collate, args.batch_size, autocast, device)})
                say(f"step {step} | eval loss {log_history[-1]['eval_loss']:.4f}")
            if args.save_steps and step % args.save_steps == 0:
                state = {"step": step, "epoch": epoch, "world_size": dist.get_world_size(),
                         "global_batch": global_batch, "log_history": log_history}
                dist.barrier()  # every rank has finished this step before the save starts
                save_checkpoint(ddp_model.module, optimizer, scheduler, state, args.output_dir, args.save_total_limit)
                dist.barrier()  # no rank runs ahead (and maybe crashes) before the checkpoint is on disk
            if args.crash_at_step == step and RESTART_COUNT == 0 and dist.get_rank() == dist.get_world_size() - 1:
                print(f"rank {dist.get_rank()}: injected crash after step {step}", file=sys.stderr, flush=True)
                os._exit(13)  # like a segfault or an OOM kill: no cleanup, no exception handling
            if step >= total_steps:
                break
    bar.close()
    train_seconds = time.perf_counter() - t_start

    # 9. Report and save (rank 0), then a barrier so no rank exits while rank 0 is still writing.
    steps_done = [h for h in log_history if "loss" in h and h["step"] > start_step]
    metrics = {
        "global_step": step, "world_size": dist.get_world_size(), "global_batch": global_batch,
        "train_loss": sum(h["loss"] for h in steps_done) / len(steps_done) if steps_done else None,
        "eval_loss": next((h["eval_loss"] for h in reversed(log_history) if "eval_loss" in h), None),
        "train_seconds": train_seconds, "samples_per_second": len(steps_done) * global_batch / train_seconds,
        "trainable_params": trainable, "total_params": total, "zero": args.zero,
        "optimizer_state_bytes_per_rank": opt_bytes, "data": stats, "log_history": log_history,
    }
    if device.type == "cuda":
        peaks = gather_ints(torch.cuda.max_memory_allocated(device), device)
        metrics["peak_gpu_memory_gb_per_rank"] = [round(n / 2**30, 3) for n in peaks]
    if dist.get_rank() == 0:
        save_final(ddp_model.module, tokenizer, Path(args.output_dir), vars(args), metrics)  # .module: unwrap DDP
        say(f"done: {step} steps, {metrics['samples_per_second']:.2f} samples/s, adapter -> {args.output_dir}")
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
