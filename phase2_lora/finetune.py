"""QLoRA fine-tuning of a chat model (default Qwen/Qwen1.5-1.8B-Chat) on Alpaca-format data, in 8 GB.

    python phase2_lora/finetune.py                                  # the RTX 4060 recipe, all defaults
    python phase2_lora/finetune.py --data_path data/alpaca_data_cleaned.json data/persona_zh.json
    python phase2_lora/finetune.py --resume                         # continue after Ctrl-C / a crash
    python phase2_lora/finetune.py --report_to tensorboard          # then: tensorboard --logdir <output_dir>/runs

One process, one GPU (the first of CUDA_VISIBLE_DEVICES); for several GPUs use phase3_ddp/finetune_ddp.py.
Order of the work: arguments -> output-dir checks -> tokenizer + data -> 4-bit model + LoRA ->
HF Trainer (paged 8-bit AdamW, cosine schedule, length-grouped batches, eval split) -> adapter,
tokenizer, run arguments, metrics JSON and loss curve in --output_dir.
"""

# ruff: noqa: E402  (the imports after pin_one_gpu() below come after it on purpose)
import argparse
import os
import sys

MULTI_GPU_HINT = "for several GPUs use torchrun --nproc_per_node=N phase3_ddp/finetune_ddp.py"


def pin_one_gpu(environ) -> str:
    """Make only the first GPU of CUDA_VISIBLE_DEVICES (GPU 0 when unset) visible; returns its id.

    finetune.py trains in one process on one GPU. Left alone, the HF Trainer sees every GPU, wraps the model in
    nn.DataParallel and multiplies the batch (and its logged loss) while QLoRA's device_map keeps the model on
    GPU 0. Set before CUDA initialises (torch, bitsandbytes and transformers read it once, at that moment)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    first = "0" if visible is None else visible.split(",")[0].strip()
    environ["CUDA_VISIBLE_DEVICES"] = first
    return first


if __name__ == "__main__":  # as a script: pin before the imports below can initialise CUDA
    pin_one_gpu(os.environ)

import importlib.util
import json
import signal
import time
from pathlib import Path

import torch
from chat import OneLineArgumentParser  # one error line for a bad flag, as in every script
from chunked_loss import enable_chunked_loss
from finetune_trainer import StopOnCtrlC, TokenStatsTrainer
from model_names import add_hub_flag, resolve_model
from qlora_model import (
    QUANTIZATIONS,
    UsageError,
    add_lora,
    check_chat_model,
    compute_dtype,
    load_model,
    load_tokenizer,
    trainable_parameters,
)
from run_files import check_output_dir, check_resume_args, data_fingerprint, save_loss_curve, write_run_args
from sft_data import DEFAULT_CACHE_DIR, SFTCollator, describe, load_sft_datasets, parse_val_size
from transformers import TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt")
# Flags that define what the saved checkpoints are (data, model shape, optimisation): --resume refuses to
# change them. How long to train (--max_steps, --epochs), logging and saving may change.
RESUME_KEYS = ("data_path", "data_sha256", "max_samples", "val_size", "system", "max_seq_len", "train_on_prompt",
               "packing",
               "seed", "quantization",
               "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "lr_scheduler", "warmup_ratio",
               "weight_decay", "max_grad_norm", "batch_size", "grad_accum")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default="Qwen/Qwen1.5-1.8B-Chat",
                   help="hub id or local directory of a causal LM with a chat template (Qwen2 architecture tested)")
    add_hub_flag(p)
    p.add_argument("--data_path", nargs="+", default=["data/alpaca_data_cleaned.json"],
                   help="JSON list or JSONL files, format detected per file: Alpaca (instruction, input, output, "
                        "optional history), OpenAI messages or ShareGPT conversations; several are mixed")
    p.add_argument("--output_dir", default="checkpoints/qwen1.5-1.8b-lora")
    p.add_argument("--system", default=None, help="system prompt for every example (default: the template's own)")
    p.add_argument("--max_seq_len", type=positive_int, default=512, help="longer examples are truncated (and counted)")
    p.add_argument("--max_samples", type=positive_int, default=None, help="use only the first N valid records")
    p.add_argument("--val_size", type=_val_size, default=0.02,
                   help="held-out records: a fraction in (0, 1) or a count; 0 turns evaluation off")
    p.add_argument("--strict", action="store_true", help="stop at the first invalid record instead of skipping it")
    p.add_argument("--train_on_prompt", action="store_true",
                   help="supervise every token, prompts included (default: assistant answers only)")
    p.add_argument("--packing", action="store_true",
                   help="fill rows of --max_seq_len with several examples (attention stays within each example)")
    p.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR,
                   help="tokenised data is cached here, keyed by data, tokenizer, template and options")
    p.add_argument("--no_cache", action="store_true", help="tokenise from scratch and write no cache")
    p.add_argument("--overwrite_cache", action="store_true", help="tokenise again and replace the cached copy")
    p.add_argument("--epochs", type=positive_float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--lr", type=positive_float, default=2e-4,
                   help="peak learning rate (QLoRA paper: 2e-4 for small models)")
    p.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="cosine",
                   help="learning-rate schedule after the warmup (cosine: decay to 0 at the last step)")
    p.add_argument("--warmup_ratio", type=fraction, default=0.03, help="fraction of steps with linear warmup")
    p.add_argument("--weight_decay", type=nonnegative_float, default=0.0,
                   help="AdamW decoupled weight decay on the LoRA matrices (biases and norms excluded)")
    p.add_argument("--max_grad_norm", type=nonnegative_float, default=1.0,
                   help="clip the global gradient norm to this value; 0 turns clipping off")
    p.add_argument("--batch_size", type=positive_int, default=4, help="sequences per forward pass")
    p.add_argument("--grad_accum", type=positive_int, default=4, help="forward passes per optimizer step")
    p.add_argument("--lora_r", type=positive_int, default=16, help="rank of the LoRA update B A")
    p.add_argument("--lora_alpha", type=positive_int, default=32, help="LoRA scale: the update is (alpha / r) B A")
    p.add_argument("--lora_dropout", type=fraction, default=0.05, help="dropout on the LoRA branch input")
    p.add_argument("--target_modules", nargs="+", default=["all-linear"],
                   help="layer names that get LoRA, e.g. q_proj v_proj; all-linear = every linear layer but lm_head")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="4bit", help="base weights: 4bit = QLoRA")
    p.add_argument("--logging_steps", type=positive_int, default=10,
                   help="log loss, learning rate and tokens/s every N steps")
    p.add_argument("--report_to", choices=("none", "tensorboard"), default="none",
                   help="tensorboard: also write event files under <output_dir>/runs (pip install tensorboard)")
    p.add_argument("--eval_steps", type=positive_int, default=200)
    p.add_argument("--save_steps", type=positive_int, default=200, help="checkpoint every N steps (for --resume)")
    p.add_argument("--save_total_limit", type=positive_int, default=2, help="keep only the newest N checkpoints")
    p.add_argument("--seed", type=seed, default=42, help="a whole number in [0, 2**32): numpy's seed range")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code from the hub (off: safer)")
    return p.parse_args(argv)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def seed(text: str) -> int:
    if not text.isdigit() or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, 2**32), got {text!r}")
    return int(text)


def _float(text: str, ok, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not ok(value):  # nan fails every comparison, so it lands here too
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _float(text, lambda v: 0 < v < float("inf"), "a number > 0")


def nonnegative_float(text: str) -> float:
    return _float(text, lambda v: 0 <= v < float("inf"), "a number >= 0")


def fraction(text: str) -> float:
    return _float(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _val_size(text: str):
    try:
        return parse_val_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


# ---------------------------------------------------------------- the steps of a run

def check_one_process_one_gpu() -> None:
    """finetune.py is a single-process, single-GPU program: refuse torchrun, refuse several visible GPUs
    (possible only when CUDA was initialised before pin_one_gpu ran, e.g. finetune imported as a module)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip() not in ("", "0", "1"):
        raise UsageError(f"finetune.py trains in one process; it was started by torchrun (WORLD_SIZE={world}); "
                         f"{MULTI_GPU_HINT}")
    if torch.cuda.is_available():
        if (n := torch.cuda.device_count()) > 1:
            raise UsageError(f"{n} GPUs are visible but finetune.py trains on one: set CUDA_VISIBLE_DEVICES=0, "
                             f"or {MULTI_GPU_HINT}")
        print(f"GPU: {torch.cuda.get_device_name(0)} (CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); finetune.py uses one GPU, {MULTI_GPU_HINT}")


def absolute_if_local(name_or_path: str) -> str:
    """A local model folder as an absolute path, a hub id as it is. adapter_config.json records it as the base
    (base_model_name_or_path): relative, chat.py could find the base only from this working directory."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def run_args_dict(args) -> dict:
    """The run's settings as recorded in run_args.json; data paths resolved, so --resume from another
    working directory still compares the same files, and their content's hash, so an edited file counts as new."""
    return {**vars(args), "data_path": [str(Path(p).resolve()) for p in args.data_path],
            "data_sha256": data_fingerprint(args.data_path)}


def prepare_output_dir(args) -> Path | None:
    """Checks before any heavy work, so a mistake costs seconds; returns the checkpoint to resume from."""
    if args.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
    resume_from = check_output_dir(args.output_dir, args.model_name_or_path, args.resume)
    if resume_from:
        check_resume_args(args.output_dir, run_args_dict(args), RESUME_KEYS)
    return resume_from


def load_data(args):
    """The model's own tokenizer and chat template (a chat model's: base models are refused), assistant-only
    labels (tokenised once: later runs and --resume load the cache), train/val split, packing."""
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    check_chat_model(args.model_name_or_path, tokenizer, args.trust_remote_code)
    train_ds, val_ds, stats = load_sft_datasets(
        args.data_path, tokenizer, system=args.system, max_seq_len=args.max_seq_len, max_samples=args.max_samples,
        val_size=args.val_size, strict=args.strict, seed=args.seed, train_on_prompt=args.train_on_prompt,
        cache_dir=None if args.no_cache else args.cache_dir, overwrite_cache=args.overwrite_cache,
        packing=args.packing)
    print(describe(stats, args.max_seq_len))
    return tokenizer, train_ds, val_ds, stats


def build_model(args):
    """Frozen base (4-bit NF4 for QLoRA) + trainable LoRA matrices (fp32) on --target_modules."""
    model = load_model(args.model_name_or_path, args.quantization, args.trust_remote_code)
    target = "all-linear" if args.target_modules == ["all-linear"] else args.target_modules
    model = add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     target_modules=target, gradient_checkpointing=True)
    # The loss is computed chunk by chunk over the sequence, so the (B, T, 151936) fp32 logits are never
    # materialised: at 2048 tokens that alone is 1.16 GiB (phase2_lora/benchmark.py measures the saving).
    # Eval loss too, which is why the Trainer below is told it gets losses only, no logits.
    enable_chunked_loss(model, in_eval=True)
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    return model, trainable, total


def precision_and_optimizer(cuda: bool, dtype: torch.dtype) -> dict:
    """The Trainer's mixed-precision and optimizer flags for the compute dtype qlora_model chose."""
    return dict(
        # Paged 8-bit AdamW: Adam's two moments in 8 bits (4x smaller) and in CUDA unified memory, so
        # memory spikes page them to CPU RAM instead of crashing. bitsandbytes pages only on CUDA.
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        # Autocast the LoRA/non-quantised math in the base's dtype. fp16 (GPUs before compute capability 8.0)
        # also gets the Trainer's GradScaler, which needs the trainable weights in fp32 (add_lora sees to it).
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
    )


def build_trainer(args, model, tokenizer, train_ds, val_ds) -> TokenStatsTrainer:
    """The HF Trainer with the 8 GB recipe. Anything not set here is a Trainer default."""
    cuda = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,      # effective batch = batch_size * grad_accum sequences
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio,                   # a float < 1 is read as a fraction of all steps
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,                 # 0: no clipping
        **precision_and_optimizer(cuda, compute_dtype()),
        logging_steps=args.logging_steps,
        logging_first_step=True,
        report_to=args.report_to,                         # tensorboard: event files in <output_dir>/runs/
        eval_strategy="steps" if val_ds is not None else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        train_sampling_strategy="group_by_length",         # batches of similar length: little padding
        length_column_name="length",                       # precomputed by sft_data, no re-tokenising
        remove_unused_columns=False,                       # keep "length" for the sampler; the collator drops it
        label_names=["labels"],
        prediction_loss_only=True,                         # eval needs the loss only (chunked: no logits)
        seed=args.seed,
        dataloader_num_workers=0,                          # tokenised already: nothing to parallelise
        dataloader_pin_memory=cuda,
        disable_tqdm=not sys.stderr.isatty(),             # in a log file: one line per logging step, no bars
    )
    return TokenStatsTrainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
        data_collator=SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if cuda else None),
        callbacks=[StopOnCtrlC()],
    )


def train(args, trainer, resume_from: Path | None):
    """Train (resuming restores LoRA weights, optimizer, scheduler, RNG states and the data position);
    returns (TrainOutput, seconds), or None when Ctrl-C stopped the run after saving a checkpoint."""
    write_run_args(args.output_dir, run_args_dict(args))  # at the start: --resume checks against it
    if resume_from:
        print(f"resuming from {resume_from}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ctrl_c = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StopOnCtrlC))
    if ctrl_c.requested:
        print(f"interrupted at step {trainer.state.global_step}; checkpoint saved in {args.output_dir}. "
              f"Continue with the same command plus --resume")
        return None
    return train_out, seconds


def report(trainer, train_out, seconds: float, stats: dict, trainable: int, total: int) -> dict:
    """Final evaluation and the metrics of the run, printed in one line and returned for metrics.json."""
    metrics = {
        "global_step": trainer.state.global_step,
        "train_loss": train_out.training_loss,
        "trainable_params": trainable, "total_params": total,
        "train_tokens": trainer.real_tokens,
        "tokens_per_second": trainer.real_tokens / seconds,
        "padding_fraction": 1 - trainer.real_tokens / max(trainer.padded_tokens, 1),
        "train_seconds": seconds,
        "data": stats,
        "optimizer": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
    }
    if trainer.eval_dataset is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30        # tensors
        metrics["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30       # + allocator cache
    metrics["log_history"] = trainer.state.log_history
    print(f"train loss {metrics['train_loss']:.4f}"
          + (f" | eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
          + f" | {metrics['tokens_per_second']:.0f} tokens/s | padding {100 * metrics['padding_fraction']:.1f}%"
          + (f" | peak GPU memory {metrics['peak_gpu_memory_gb']:.2f} GB allocated, "
             f"{metrics['peak_gpu_reserved_gb']:.2f} GB reserved" if "peak_gpu_memory_gb" in metrics else ""))
    return metrics


def save_outputs(output_dir, trainer, tokenizer, metrics: dict) -> None:
    """Adapter, tokenizer, metrics.json and loss_curve.png, written into a temp dir and moved file by file
    with os.replace, so a crash never leaves a half-written file that chat.py would try to load."""
    out = Path(output_dir)
    tmp = out / ".final.tmp"
    if tmp.exists():  # left over from a crash during a previous save
        for f in tmp.iterdir():
            f.unlink()
    trainer.model.save_pretrained(tmp)  # PeftModel: adapter_config.json + adapter_model.safetensors only
    tokenizer.save_pretrained(tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    save_loss_curve(trainer.state.log_history, tmp / "loss_curve.png", title="QLoRA fine-tuning")
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    print(f"adapter, tokenizer, run_args.json, metrics.json and loss_curve.png -> {out}")


# ---------------------------------------------------------------- main

def run(args) -> int:
    """The recipe: checks -> data -> model -> trainer -> train -> evaluate and report -> save."""
    check_one_process_one_gpu()
    set_seed(args.seed)  # python, numpy and torch RNGs: LoRA init, data split and shuffling are reproducible
    resume_from = prepare_output_dir(args)
    args.model_name_or_path = absolute_if_local(resolve_model(args.model_name_or_path, args.hub, UsageError))
    tokenizer, train_ds, val_ds, stats = load_data(args)
    model, trainable, total = build_model(args)
    trainer = build_trainer(args, model, tokenizer, train_ds, val_ds)
    trained = train(args, trainer, resume_from)
    if trained is None:  # Ctrl-C: checkpoint saved, nothing reported as finished
        return 130
    metrics = report(trainer, *trained, stats, trainable, total)
    save_outputs(args.output_dir, trainer, tokenizer, metrics)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if not sys.stderr.isatty():  # in a log file: no carriage-return bars (weight loading); the Trainer logs lines
        hf_logging.disable_progress_bar()
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading, a second Ctrl-C in training, or one while saving
        print("\ninterrupted; --resume continues from the last saved checkpoint, if any", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
