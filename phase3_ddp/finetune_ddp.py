"""LoRA / QLoRA fine-tuning of a chat model as an explicit PyTorch DDP (data-parallel) program.

    torchrun --nproc_per_node=2 phase3_ddp/finetune_ddp.py          # 2 GPUs (NCCL) or 2 CPU processes (gloo)
    python phase3_ddp/finetune_ddp.py                                # 1 process: the same code, world size 1
    torchrun --nnodes 2 --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 phase3_ddp/finetune_ddp.py

Same data, model, LoRA and 8 GB recipe as phase2_lora/finetune.py (its modules are copied here byte for byte),
but no Trainer: every DDP step is in view. Each of the W processes ("ranks") holds a full replica (frozen 4-bit
base + LoRA), reads its own share of every global batch and, in the backward of the last micro-batch, DDP
all-reduces the LoRA gradients, so every replica takes the identical optimizer step.

    torchrun --nproc_per_node=2 phase3_ddp/finetune_ddp.py --fsdp   # ZeRO-3: each rank holds 1/W of the model

--fsdp shards every parameter instead (FSDP2 fully_shard, fsdp_shard.py): each rank keeps 1/W of the frozen base
too, all-gathers one decoder layer's weights just before it runs, and reduce-scatters the gradients; the
training is the same as DDP's (tests: equal within 1e-5), the per-rank parameter memory about 1/W. Order of the work:
arguments -> launch checks (this file; only torch imported, so a wrong launch fails in about a second) ->
the heavy imports and the checks of values and output dir (ddp_train.check_run) -> process group -> the recipe
(ddp_train.train: data, rank 0 first -> model -> DDP or FSDP -> optimizer, optionally ZeRO-1 -> resume -> train loop
with evaluation and checkpoints -> rank 0 saves the PEFT adapter).
"""

import argparse
import json
import math
import os
import sys
import time
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from model_names import add_hub_flag, resolve_model

# torchrun sets these for every process it starts; plain `python` gets the defaults (one process).
RANK = int(os.environ.get("RANK", 0))                          # global index of this process, 0..W-1
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))              # index on this machine = which GPU to use
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))              # W: processes over all machines
LOCAL_WORLD_SIZE = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # processes on this machine
RESTART_COUNT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))  # > 0: torchrun restarted us after a failure
QUANTIZATIONS = ("4bit", "8bit", "none")  # qlora_model.QUANTIZATIONS, not imported: it would pull in peft
OPTIMIZERS = ("auto", "paged_adamw_8bit", "adamw_torch")
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt")  # as phase 2
INT_MAX = 2**31 - 1  # counts above this are typos (and would overflow the int32 token and index arrays)


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2. Every rank finds the same problem and prints it, prefixed with its
    rank as torch prefixes per-rank tracebacks: torchrun kills the other ranks as soon as one exits, so a line
    left to rank 0 alone would be lost whenever another rank exits first."""
    prefix = f"[rank{RANK}]: " if WORLD_SIZE > 1 else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # set by torchrun for each worker it starts
    if error_file:  # torchrun's failure report then shows this line, not a link to its docs on tracebacks
        with open(error_file, "w", encoding="utf-8") as f:
            json.dump({"message": f"error: {message}", "timestamp": int(time.time())}, f)
    sys.exit(2)


class FailingArgumentParser(argparse.ArgumentParser):
    def error(self, message) -> NoReturn:
        fail(f"{message} (see --help)")


def whole_number(low: int, high: int = INT_MAX):
    """argparse type: a whole number in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number in [{low}, {high}], got {text!r}")
        return value
    return parse


def number(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite number in the interval from low to high ("(" / ")": that end excluded)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = low < value if low_open else low <= value  # nan fails every comparison, so it is refused too
        below = value < high if high_open else value <= high
        if not (above and below and math.isfinite(value)):
            interval = f"{'(' if low_open else '['}{low:_}, {high:_}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value
    return parse


def val_size(text: str) -> str:
    """--val_size: a fraction in (0, 1) or a whole count; checked here (inf, nan: one line), parsed by
    sft_data.parse_val_size in ddp_train.check_run."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < 1 or (0 <= value <= INT_MAX and value == int(value))):  # nan, inf: refused here
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a whole count >= 0, got {text!r}")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The flags of phase2_lora/finetune.py (same names, defaults and checks) plus the DDP ones. --batch_size is
    per rank: the global batch is batch_size x grad_accum x W. Every number is checked to a finite range here:
    a bad value is one line and exit 2 on every rank, within a second."""
    p = FailingArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default="Qwen/Qwen1.5-1.8B-Chat",
                   help="hub id or local directory of a causal LM with a chat template (Qwen2 architecture tested)")
    add_hub_flag(p)
    p.add_argument("--data_path", nargs="+", default=["data/alpaca_data_cleaned.json"],
                   help="JSON list or JSONL files: Alpaca (instruction/input/output, optional history), OpenAI "
                        "messages or ShareGPT conversations, detected per file; several are mixed")
    p.add_argument("--output_dir", default="checkpoints/qwen1.5-1.8b-lora-ddp")
    p.add_argument("--system", default=None, help="system prompt for every example (default: the template's own)")
    p.add_argument("--max_seq_len", type=whole_number(1, 2**20), default=512,
                   help="longer examples are truncated (and counted)")
    p.add_argument("--max_samples", type=whole_number(1), default=None, help="use only the first N valid records")
    p.add_argument("--val_size", type=val_size, default="0.02",  # kept as text: sft_data.parse_val_size parses it
                   help="held-out records: a fraction in (0, 1) or a count; 0 turns evaluation off")
    p.add_argument("--strict", action="store_true", help="stop at the first invalid record instead of skipping it")
    p.add_argument("--train_on_prompt", action="store_true",
                   help="supervise every token, prompts included (default: assistant answers only)")
    p.add_argument("--packing", action="store_true",
                   help="fill rows of --max_seq_len with several examples (attention stays within each example)")
    p.add_argument("--cache_dir", default="data/cache",  # sft_data.DEFAULT_CACHE_DIR
                   help="tokenised data is cached here (rank 0 builds it, the other ranks read it), keyed by data, "
                        "tokenizer, template and options")
    p.add_argument("--no_cache", action="store_true", help="tokenise from scratch and write no cache")
    p.add_argument("--overwrite_cache", action="store_true", help="tokenise again and replace the cached copy")
    p.add_argument("--epochs", type=number(0, 10_000, low_open=True), default=1.0)
    p.add_argument("--max_steps", type=whole_number(-1), default=-1,
                   help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--lr", type=number(0, 1, low_open=True), default=2e-4, help="peak learning rate")
    p.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="cosine",
                   help="learning-rate schedule after the warmup (cosine: decay to 0 at the last step)")
    p.add_argument("--warmup_ratio", type=number(0, 1, high_open=True), default=0.03,
                   help="fraction of steps with linear warmup")
    p.add_argument("--weight_decay", type=number(0, 1), default=0.0,
                   help="AdamW decoupled weight decay on the LoRA matrices")
    p.add_argument("--max_grad_norm", type=number(0, math.inf, high_open=True), default=1.0,
                   help="clip the global gradient norm to this value; 0 turns clipping off")
    p.add_argument("--batch_size", type=whole_number(1), default=4, help="sequences per forward pass PER RANK")
    p.add_argument("--grad_accum", type=whole_number(1), default=4, help="forward passes per optimizer step")
    p.add_argument("--lora_r", type=whole_number(1), default=16, help="rank of the LoRA update B A")
    p.add_argument("--lora_alpha", type=whole_number(1), default=32, help="LoRA scale: the update is (alpha / r) B A")
    p.add_argument("--lora_dropout", type=number(0, 1, high_open=True), default=0.05,
                   help="dropout on the LoRA branch input")
    p.add_argument("--target_modules", nargs="+", default=["all-linear"],
                   help="layer names that get LoRA, e.g. q_proj v_proj; all-linear = every linear layer but lm_head")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="4bit", help="base weights: 4bit = QLoRA")
    p.add_argument("--logging_steps", type=whole_number(1), default=10,
                   help="log loss, learning rate and tokens/s every N steps")
    p.add_argument("--report_to", choices=("none", "tensorboard"), default="none",
                   help="tensorboard: also write event files under <output_dir>/runs (pip install tensorboard)")
    p.add_argument("--eval_steps", type=whole_number(1), default=200, help="evaluate every N steps and at the end")
    p.add_argument("--save_steps", type=whole_number(0), default=200, help="checkpoint every N steps (0: never)")
    p.add_argument("--save_total_limit", type=whole_number(1), default=2, help="keep only the newest N checkpoints")
    p.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=42, help="numpy takes [0, 2**32)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir "
                   "(automatic when torchrun --max-restarts restarts the group)")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code from the hub (off: safer)")
    add_ddp_flags(p)
    return p


def add_ddp_flags(p: argparse.ArgumentParser) -> None:
    """What phase 2 has no use for: the optimizer choice and its sharding, the device, the collective timeout."""
    p.add_argument("--optim", choices=OPTIMIZERS, default="auto",
                   help="auto: paged 8-bit AdamW (bitsandbytes) on CUDA as in phase 2, torch AdamW on CPU")
    p.add_argument("--zero", action="store_true",
                   help="ZeRO-1: torch ZeroRedundancyOptimizer wraps the chosen optimizer (paged 8-bit AdamW too), "
                        "so each rank keeps the optimizer state of 1/W of the LoRA weights")
    p.add_argument("--fsdp", action="store_true",
                   help="ZeRO-3 instead of DDP: FSDP2 fully_shard per decoder layer, so each rank keeps 1/W of the "
                        "frozen base, the LoRA weights, their gradients and Adam moments (needs 2+ processes, "
                        "--quantization 4bit or none, torch AdamW)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA if available")
    p.add_argument("--dist_timeout", type=number(0, 30 * 86400, low_open=True), default=1800,
                   help="seconds a collective may wait for a peer")


def check_fsdp(args: argparse.Namespace) -> None:
    """--fsdp combinations that cannot work, refused before anything loads (the same on every rank)."""
    if not args.fsdp:
        return
    if args.zero:
        fail("--fsdp already shards the optimizer state (ZeRO-3 includes ZeRO-1): drop --zero")
    if WORLD_SIZE < 2:
        fail("--fsdp shards the model over the processes, but this is 1 process: launch 2 or more "
             "(torchrun --nproc_per_node=2 ...), or drop --fsdp")
    if args.quantization == "8bit":  # bitsandbytes' Int8Params keeps CB/SCB on the weight, lost when FSDP shards it
        fail("--fsdp cannot shard LLM.int8 weights (--quantization 8bit); use --quantization 4bit or none")
    if args.optim == "paged_adamw_8bit":  # bitsandbytes' update kernel has no DTensor (sharded parameter) rule
        fail("--fsdp cannot use --optim paged_adamw_8bit (bitsandbytes' optimizer does not take sharded "
             "parameters); use --optim adamw_torch or auto")


def check_data_files(args: argparse.Namespace) -> None:
    """The most common first error (the default --data_path before its download), told before the ~10 s of
    importing transformers and peft (a 2-rank launch: 4 s instead of ~15 s). The same check and message as
    sft_formats.read_json_records, which cannot be called here (it imports them); it still reports every other
    problem with the data."""
    for path in args.data_path:
        if not os.path.isfile(path):
            fail(f"data file not found: {path} (download it as described in data/README.md, "
                 f"or pass another --data_path)")


def pick_device(requested: str) -> torch.device:
    """One GPU per process: LOCAL_RANK picks it. More processes than GPUs would share one and run out of
    memory (NCCL also refuses two ranks on one GPU), so that is an error before anything starts."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus < LOCAL_WORLD_SIZE:
        fix = f"launch one process per GPU (torchrun --nproc_per_node={n_gpus})" if n_gpus else "use --device cpu"
        fail(f"{LOCAL_WORLD_SIZE} process(es) on this machine but {n_gpus} CUDA GPU(s) visible; {fix}")
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
    else:
        store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=RANK, world_size=WORLD_SIZE, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_fsdp(args)
    device = pick_device(args.device)
    check_data_files(args)
    # The heavy imports only now: a wrong launch costs a second, not the ~10 s of importing transformers + peft.
    from ddp_train import UsageError, check_run, train
    try:
        resume_from = check_run(args, device)
        # --hub modelscope: every rank resolves the id to the local folder (modelscope locks each file it fetches)
        args.model_name_or_path = resolve_model(args.model_name_or_path, args.hub, UsageError)
        if os.path.isdir(os.path.expanduser(args.model_name_or_path)):  # adapter_config.json records it: absolute
            args.model_name_or_path = os.path.realpath(os.path.expanduser(args.model_name_or_path))
    except UsageError as e:
        fail(str(e))
    init_distributed(device, args.dist_timeout)
    try:
        train(args, device, resume_from)
    except UsageError as e:  # the same on every rank: bad data (broadcast by rank 0), a model that can't load
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C reaches every rank (torchrun forwards it): one line each, no traceback
        print(f"rank {RANK}: interrupted; --resume continues from the last checkpoint, if any", file=sys.stderr)
        sys.exit(130)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
