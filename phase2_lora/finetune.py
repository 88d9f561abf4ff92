"""QLoRA fine-tuning of a chat model (default Qwen/Qwen1.5-1.8B-Chat) on Alpaca-format data, in 8 GB.

    python phase2_lora/finetune.py                                  # the RTX 4060 recipe, all defaults
    python phase2_lora/finetune.py --data_path data/alpaca_data_cleaned.json data/persona_zh.json
    python phase2_lora/finetune.py --resume                         # continue after Ctrl-C / a crash

Order of the work: arguments -> output-dir checks -> tokenizer + data -> 4-bit model + LoRA ->
HF Trainer (paged 8-bit AdamW, cosine schedule, length-grouped batches, eval split) -> adapter,
tokenizer, run arguments, metrics JSON and loss curve in --output_dir.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from chunked_loss import enable_chunked_loss
from model_names import same_base
from qlora_model import (
    QUANTIZATIONS,
    UsageError,
    add_lora,
    compute_dtype,
    load_model,
    load_tokenizer,
    trainable_parameters,
)
from sft_data import SFTCollator, load_sft_datasets, parse_val_size
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

# peft 0.21 still calls transformers' old gradient-checkpointing names; the warning is not actionable here.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default="Qwen/Qwen1.5-1.8B-Chat",
                   help="hub id or local directory of a causal LM with a chat template (Qwen2 architecture tested)")
    p.add_argument("--data_path", nargs="+", default=["data/alpaca_data_cleaned.json"],
                   help="Alpaca JSON list or JSONL files (instruction, optional input, output); several are mixed")
    p.add_argument("--output_dir", default="checkpoints/qwen1.5-1.8b-lora")
    p.add_argument("--system", default=None, help="system prompt for every example (default: the template's own)")
    p.add_argument("--max_seq_len", type=positive_int, default=512, help="longer examples are truncated (and counted)")
    p.add_argument("--max_samples", type=positive_int, default=None, help="use only the first N valid records")
    p.add_argument("--val_size", type=_val_size, default=0.02,
                   help="held-out records: a fraction in (0, 1) or a count; 0 turns evaluation off")
    p.add_argument("--strict", action="store_true", help="stop at the first invalid record instead of skipping it")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (QLoRA paper: 2e-4 for small models)")
    p.add_argument("--warmup_ratio", type=float, default=0.03, help="fraction of steps with linear warmup")
    p.add_argument("--batch_size", type=positive_int, default=4, help="sequences per forward pass")
    p.add_argument("--grad_accum", type=positive_int, default=4, help="forward passes per optimizer step")
    p.add_argument("--lora_r", type=positive_int, default=16)
    p.add_argument("--lora_alpha", type=positive_int, default=32)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="4bit", help="base weights: 4bit = QLoRA")
    p.add_argument("--logging_steps", type=positive_int, default=10)
    p.add_argument("--eval_steps", type=positive_int, default=200)
    p.add_argument("--save_steps", type=positive_int, default=200, help="checkpoint every N steps (for --resume)")
    p.add_argument("--save_total_limit", type=positive_int, default=2, help="keep only the newest N checkpoints")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code from the hub (off: safer)")
    return p.parse_args(argv)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _val_size(text: str):
    try:
        return parse_val_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


# ---------------------------------------------------------------- output directory

def latest_checkpoint(output_dir: Path) -> Path | None:
    """Newest complete checkpoint-N: trainer_state.json is written last, so a save cut short has none."""
    done = [d for d in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (d / "trainer_state.json").is_file()]
    return max(done, key=lambda d: int(d.name.rsplit("-", 1)[1]), default=None)


def check_output_dir(args) -> Path | None:
    """Refuse to mix adapters of different base models in one directory (model_names.same_base decides what
    counts as the same model); return the checkpoint to resume."""
    out = Path(args.output_dir)
    for cfg in [out / "adapter_config.json", *out.glob(f"{PREFIX_CHECKPOINT_DIR}-*/adapter_config.json")]:
        if cfg.is_file():
            try:
                base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
            except (ValueError, AttributeError) as e:  # bad JSON, or JSON that is not an object
                raise UsageError(f"{cfg} is not a valid adapter config ({e}); choose another --output_dir") from e
            if not same_base(base, args.model_name_or_path):
                raise UsageError(f"{cfg} holds an adapter of base model {base!r}, not {args.model_name_or_path!r}; "
                                 f"choose another --output_dir")
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    if ckpt and not args.resume:
        raise UsageError(f"{out} already holds checkpoints ({ckpt.name}); pass --resume to continue, "
                         f"or choose another --output_dir")
    if args.resume and ckpt is None:
        print(f"--resume: no checkpoint in {out}, starting from scratch")
    return ckpt


# ---------------------------------------------------------------- training helpers

class SFTTrainer(Trainer):
    """HF Trainer that also counts real and padded tokens of the training batches it sees."""

    real_tokens = padded_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:  # eval batches go through here too; count training only
            self.real_tokens += int(inputs["attention_mask"].sum())
            self.padded_tokens += inputs["attention_mask"].numel()
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class StopOnCtrlC(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False

    def on_train_begin(self, args, state, control, **kwargs):
        def handler(signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C raises KeyboardInterrupt
            print("\nCtrl-C: saving a checkpoint after this step (press again to abort without saving)",
                  file=sys.stderr)
        signal.signal(signal.SIGINT, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = control.should_training_stop = True
        return control


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
    ax.set(xlabel="optimizer step", ylabel="loss (answer tokens)", title="QLoRA fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main

def run(args) -> int:
    set_seed(args.seed)  # python, numpy and torch RNGs: LoRA init, data split and shuffling are reproducible
    resume_from = check_output_dir(args)  # before any heavy work, so a mistake costs seconds

    # 1. Data: the model's own tokenizer and chat template, answer-only labels, train/val split.
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    train_ds, val_ds, stats = load_sft_datasets(
        args.data_path, tokenizer, system=args.system, max_seq_len=args.max_seq_len, max_samples=args.max_samples,
        val_size=args.val_size, strict=args.strict, seed=args.seed)
    print(f"data: {stats['read']} records read, {stats['invalid']} invalid skipped, {stats['nooutput']} <nooutput> "
          f"dropped, {stats['truncated']} truncated to {args.max_seq_len} tokens, {stats['no_answer_left']} dropped "
          f"(no answer left) -> {stats['train']} train / {stats['val']} val")

    # 2. Model: frozen base (4-bit NF4 for QLoRA) + trainable LoRA matrices on every linear layer but lm_head.
    model = load_model(args.model_name_or_path, args.quantization, args.trust_remote_code)
    model = add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     target_modules="all-linear", gradient_checkpointing=True)
    # The loss is computed chunk by chunk over the sequence, so the (B, T, 151936) fp32 logits are never
    # materialised: at 2048 tokens that alone is 1.16 GiB (phase2_lora/benchmark.py measures the saving).
    # Eval loss too, which is why the Trainer below is told it gets losses only, no logits.
    enable_chunked_loss(model, in_eval=True)
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")

    # 3. Trainer settings. Everything not set here is a Trainer default (weight decay 0, grad clip 1.0).
    cuda = torch.cuda.is_available()
    dtype = compute_dtype()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,      # effective batch = batch_size * grad_accum sequences
        learning_rate=args.lr,
        lr_scheduler_type="cosine",                       # decay to 0 over the run, after a linear warmup
        warmup_steps=args.warmup_ratio,                   # a float < 1 is read as a fraction of all steps
        # Paged 8-bit AdamW: Adam's two moments in 8 bits (4x smaller) and in CUDA unified memory, so
        # memory spikes page them to CPU RAM instead of crashing. bitsandbytes pages only on CUDA.
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        bf16=cuda and dtype == torch.bfloat16,            # autocast the LoRA/non-quantised math like the base
        fp16=cuda and dtype == torch.float16,
        logging_steps=args.logging_steps,
        logging_first_step=True,
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
        report_to="none",
        disable_tqdm=False,
    )
    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
        data_collator=SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if cuda else None),
        callbacks=[ctrl_c := StopOnCtrlC()],
    )

    # 4. Train. Resuming restores LoRA weights, optimizer, scheduler, RNG states and the data position.
    if resume_from:
        print(f"resuming from {resume_from}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if ctrl_c.requested:
        print(f"interrupted at step {trainer.state.global_step}; checkpoint saved in {args.output_dir}. "
              f"Continue with the same command plus --resume")
        return 130

    # 5. Evaluate and report.
    metrics = {
        "global_step": trainer.state.global_step,
        "train_loss": train_out.training_loss,
        "trainable_params": trainable, "total_params": total,
        "train_tokens": trainer.real_tokens,
        "tokens_per_second": trainer.real_tokens / seconds,
        "padding_fraction": 1 - trainer.real_tokens / max(trainer.padded_tokens, 1),
        "train_seconds": seconds,
        "data": stats,
        "log_history": trainer.state.log_history,
    }
    if val_ds is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    if cuda:
        metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30        # tensors
        metrics["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30       # + allocator cache
    print(f"train loss {metrics['train_loss']:.4f}"
          + (f" | eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
          + f" | {metrics['tokens_per_second']:.0f} tokens/s | padding {100 * metrics['padding_fraction']:.1f}%"
          + (f" | peak GPU memory {metrics['peak_gpu_memory_gb']:.2f} GB allocated, "
             f"{metrics['peak_gpu_reserved_gb']:.2f} GB reserved" if cuda else ""))

    # 6. Save into a temp dir, then move file by file with os.replace: a crash never leaves a half-written file.
    out = Path(args.output_dir)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)  # PeftModel: adapter_config.json + adapter_model.safetensors only
    tokenizer.save_pretrained(tmp)
    (tmp / "run_args.json").write_text(json.dumps(vars(args), indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    save_loss_curve(trainer.state.log_history, tmp / "loss_curve.png")
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    print(f"adapter, tokenizer, run_args.json, metrics.json and loss_curve.png -> {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
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
