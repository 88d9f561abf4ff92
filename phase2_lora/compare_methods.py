"""LoRA vs QLoRA vs Prompt Tuning vs P-Tuning vs Prefix Tuning vs IA3, measured side by side.

Every method trains the same base model on the same batches (same seed, same order) for the same
number of optimizer steps, each at its usual learning rate, then reports trainable parameters, peak
memory, seconds, train/eval loss and the exact-match rate of greedy answers to training prompts. Progress goes to
stderr: a bar on a terminal, plain lines in a log.

    python phase2_lora/compare_methods.py                      # GPU: Qwen/Qwen1.5-1.8B-Chat, data/persona_zh.json
    python phase2_lora/compare_methods.py --tiny               # CPU: tiny random Qwen2, built on the fly
                                                               # (the default when no CUDA GPU is visible)

What each method trains (d = hidden size):
  lora     B A (rank r) added to every linear layer of the frozen model (weights in the compute dtype)
  qlora    the same LoRA on a 4-bit NF4 base model (qlora_model.py, as finetune.py)
  prompt   Prompt Tuning: n virtual-token embeddings (n x d) prepended to the input
  ptuning  P-Tuning: the virtual tokens come out of a small MLP encoder, which is trained
  prefix   Prefix Tuning: trained keys and values prepended in every layer (n x 2 x layers x d_kv)
  ia3      IA3: learned vectors that rescale queries, values and the MLP's inner activations
"""

import argparse
import itertools
import json
import math
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from benchmark_tools import PeakMemory, tensor_bytes, write_atomic
from chat import OneLineArgumentParser, log, progress
from qlora_model import UsageError, add_lora, compute_dtype, load_model, load_tokenizer, trainable_parameters  # 1st

# isort: split
from peft import IA3Config, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from sft_data import SFTCollator, load_sft_datasets
from transformers.utils import logging as hf_logging

if not sys.stderr.isatty():  # a log file: no "Loading weights" carriage-return bars in it, only progress()'s lines
    hf_logging.disable_progress_bar()

# Each method at its customary learning rate (QLoRA paper; peft's prompt/prefix/P-tuning guides; T-Few for IA3).
METHOD_LR = {"lora": 2e-4, "qlora": 2e-4, "prompt": 3e-2, "ptuning": 1e-3, "prefix": 1e-2, "ia3": 3e-3}
NUM_VIRTUAL_TOKENS = 20


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default=None,
                   help="default Qwen/Qwen1.5-1.8B-Chat; with --tiny, a tiny model is built unless this is given")
    p.add_argument("--tiny", action="store_true", help="CPU-sized run: tiny random model, lr x10 (see --lr_scale); "
                   "the default without a CUDA GPU, unless --model_name_or_path is given")
    p.add_argument("--data_path", nargs="+", default=["data/persona_zh.json"], help="Alpaca JSON/JSONL files")
    p.add_argument("--methods", nargs="+", choices=list(METHOD_LR), default=list(METHOD_LR))
    p.add_argument("--steps", type=int, default=200, help="optimizer steps, the same budget for every method")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr_scale", type=float, default=None,
                   help="multiply every method's learning rate (default 1; --tiny: 10, a random tiny model "
                        "learns nothing at a pretrained model's rates)")
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--max_samples", type=int, default=None, help="use only the first N valid records")
    p.add_argument("--val_size", type=float, default=0.15, help="held-out fraction for the eval loss")
    p.add_argument("--em_prompts", type=int, default=16, help="training prompts answered greedily for exact match")
    p.add_argument("--output_dir", type=Path, default=Path("checkpoints/compare_methods"),
                   help="compare_methods.md / .png / .json")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    # Without a GPU, training the 1.8B model 6 times would take hours: compare on the tiny model instead.
    args.tiny = args.tiny or (args.model_name_or_path is None and not torch.cuda.is_available())
    if args.lr_scale is None:
        args.lr_scale = 10.0 if args.tiny else 1.0
    # Written so that nan fails too: every comparison with nan is False
    if min(args.steps, args.batch_size, args.max_seq_len, args.em_prompts + 1,
           1 if args.max_samples is None else args.max_samples) < 1:
        p.error("--steps, --batch_size, --max_seq_len, --max_samples must be >= 1 and --em_prompts >= 0")
    if not (0 < args.val_size < 1 and 0 < args.lr_scale < math.inf and 0 <= args.seed < 2**32):
        p.error(f"need --val_size in (0, 1), 0 < --lr_scale < inf and --seed in 0..{2**32 - 1}, got "
                f"{args.val_size}, {args.lr_scale} and {args.seed}")
    return args


# ---------------------------------------------------------------- model per method

def build_method(name: str, model_path: str):
    """The peft model for one method, on the device finetune.py's loader picks."""
    model = load_model(model_path, quantization="4bit" if name == "qlora" else "none")
    for module in model.modules():
        # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks a 4-bit weight for inference at its first eval-mode
        # forward, after which training through it fails; we evaluate before training, so keep the layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if name in ("lora", "qlora"):  # finetune.py's adapter (r=16, alpha=32, dropout 0.05, all linear layers)
        return add_lora(model, gradient_checkpointing=False)  # no checkpointing anywhere: compare methods only
    model.requires_grad_(False)
    config = {
        "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS),
        "ptuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS,
                                               encoder_hidden_size=model.config.hidden_size),
        "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS),
        "ia3": lambda: IA3Config(task_type="CAUSAL_LM"),  # peft's Qwen2 default: q, v outputs; down_proj input
    }[name]()
    return get_peft_model(model, config)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device):
    # bf16/fp16 autocast on a GPU, as the HF Trainer does in finetune.py; plain fp32 on CPU.
    return torch.autocast(device.type, dtype=compute_dtype(device), enabled=device.type == "cuda")


def loss_of(model, batch: dict) -> torch.Tensor:
    device = device_of(model)
    with autocast(device):
        return model(**{k: v.to(device) for k, v in batch.items()}).loss


@torch.no_grad()
def mean_loss(model, loader) -> float:
    """Token-mean loss over a whole split, in eval mode (no dropout)."""
    model.eval()
    total = count = 0
    for batch in loader:
        n = int((batch["labels"][:, 1:] != -100).sum())  # tokens that have a target (HF shifts by one)
        total += loss_of(model, batch).item() * n
        count += n
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def greedy_reproduces(model, prompt_ids: list[int], answer_ids: list[int]) -> bool:
    """Does greedy decoding from the prompt produce exactly the trained answer tokens, end-of-turn token
    included? Decoding stops at the first wrong token (the answer can no longer match), so a miss costs
    one forward pass. Full forward passes without a KV cache: slower than generate(), but exact for every
    method (with peft 0.21 + transformers 5, generate() silently drops prefix tuning's key/value prefix)."""
    device, ids = device_of(model), list(prompt_ids)
    for expected in answer_ids:
        x = torch.tensor([ids], device=device)  # (1, T)
        with autocast(device):
            if int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()) != expected:
                return False
        ids.append(expected)
    return True


def exact_match(model, examples) -> float:
    """Fraction of training examples whose answer greedy decoding reproduces token for token. The prompt is
    everything before the first supervised label; the answer is the supervised labels (sft_data's masking)."""
    model.eval()
    hits = 0
    for ex in examples:
        start = next(i for i, label in enumerate(ex["labels"]) if label != -100)
        hits += greedy_reproduces(model, ex["input_ids"][:start], [t for t in ex["labels"][start:] if t != -100])
    model.train()
    return hits / max(len(examples), 1)


# ---------------------------------------------------------------- one method

def run_method(name: str, args, tokenizer, train_ds, val_ds) -> dict:
    torch.manual_seed(args.seed)  # the same adapter init and dropout stream, run after run
    model = build_method(name, args.model_name_or_path)
    model.train()
    device = device_of(model)
    cuda = device.type == "cuda"
    trainable, total = trainable_parameters(model)
    collate = SFTCollator(tokenizer.pad_token_id)
    columns = ["input_ids", "labels"]
    # The same shuffled order of the same batches for every method: a generator with the same seed.
    train_loader = torch.utils.data.DataLoader(train_ds.select_columns(columns), batch_size=args.batch_size,
                                               shuffle=True, collate_fn=collate,
                                               generator=torch.Generator().manual_seed(args.seed))
    train_eval, val_eval = (torch.utils.data.DataLoader(ds.select_columns(columns), batch_size=args.batch_size,
                                                        collate_fn=collate) for ds in (train_ds, val_ds))
    loss_before = mean_loss(model, train_eval)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=METHOD_LR[name] * args.lr_scale, weight_decay=0.0)
    stream = (batch for _ in itertools.count() for batch in train_loader)  # epochs without end
    steps, losses = progress(range(args.steps), f"{name}: train steps"), []

    def train_steps(some_steps) -> float:
        start = time.perf_counter()
        for _ in some_steps:
            loss = loss_of(model, next(stream))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())  # .item() waits for the GPU: the timing is honest
        return time.perf_counter() - start

    # Peak memory: CUDA counters over every step; on CPU the tensor counter over step 1 only (it slows
    # every op; step 1 already holds weights, activations, gradients and the new optimizer state).
    with PeakMemory(device, baseline_bytes=tensor_bytes(model)) as mem:
        train_steps(itertools.islice(steps, 1))
        seconds = train_steps(steps) if cuda else None  # the rest (a plain loop: progress logs the last step)
    if not cuda:
        seconds = train_steps(steps)
    log(f"{name}: train and eval loss, exact match on {min(args.em_prompts, len(train_ds))} prompts ...")
    return {"method": name, "trainable_params": trainable, "total_params": total, "lr": METHOD_LR[name] * args.lr_scale,
            "peak_memory_mib": mem.allocated / 2**20, "peak_reserved_mib": mem.reserved / 2**20 if cuda else None,
            "seconds": seconds, "train_loss_before": loss_before, "train_loss": mean_loss(model, train_eval),
            "eval_loss": mean_loss(model, val_eval), "step_losses": losses,
            "exact_match": exact_match(model, train_ds.select(range(min(args.em_prompts, len(train_ds)))))}


# ---------------------------------------------------------------- report

def markdown_table(rows: list[dict], cuda: bool) -> str:
    mem = "peak allocated GB" if cuda else "peak tensors MB (CPU count, step 1)"
    lines = [f"| method | trainable params | % of model | {mem} | seconds (steps 2..N) | train loss (before -> after) "
             f"| eval loss | exact match |", "|" + "---|" * 8]
    for r in rows:
        peak = r["peak_memory_mib"] / 1024 if cuda else r["peak_memory_mib"]
        share = 100 * r["trainable_params"] / r["total_params"]
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {share:.3f}% "
                     f"| {peak:.2f} | {r['seconds']:.1f} | {r['train_loss_before']:.3f} -> {r['train_loss']:.3f} "
                     f"| {r['eval_loss']:.3f} | {100 * r['exact_match']:.0f}% |")
    return "\n".join(lines)


def save_table_png(markdown: str, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    header, _, *body = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()]
    fig, ax = plt.subplots(figsize=(14, 0.45 * len(body) + 1.2))
    ax.axis("off")
    table = ax.table(cellText=body, colLabels=[textwrap.fill(h, 18) for h in header], loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    for (row, _), cell in table.get_celld().items():
        if row == 0:  # header labels wrap onto two lines
            cell.set_height(2 * cell.get_height())
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------- main

def run(args, model_dir: str | None) -> int:
    args.model_name_or_path = args.model_name_or_path or model_dir or "Qwen/Qwen1.5-1.8B-Chat"
    try:  # fail before minutes of training, not after
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --output_dir {args.output_dir}: {e.strerror}") from e
    tokenizer = load_tokenizer(args.model_name_or_path)
    train_ds, val_ds, stats = load_sft_datasets(args.data_path, tokenizer, max_seq_len=args.max_seq_len,
                                                max_samples=args.max_samples, val_size=args.val_size, seed=args.seed,
                                                log=lambda *a: None)
    print(f"{args.model_name_or_path}: {stats['train']} train / {stats['val']} val examples, {args.steps} steps of "
          f"batch {args.batch_size} per method, exact match on {min(args.em_prompts, len(train_ds))} training prompts")
    rows = []
    for i, name in enumerate(args.methods, 1):
        log(f"[{i}/{len(args.methods)}] {name}")
        rows.append(run_method(name, args, tokenizer, train_ds, val_ds))

    cuda = torch.cuda.is_available()
    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    title = (f"{Path(args.model_name_or_path).name} on {where}: {args.steps} steps x batch {args.batch_size}, "
             f"{', '.join(map(str, args.data_path))}, lr x{args.lr_scale:g}")
    table = markdown_table(rows, cuda)
    print("\n" + title + "\n\n" + table)
    report = {"title": title, "args": {k: str(v) for k, v in vars(args).items()}, "data": stats, "rows": rows}
    write_atomic(args.output_dir / "compare_methods.json",
                 lambda p: p.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8"))
    write_atomic(args.output_dir / "compare_methods.md",
                 lambda p: p.write_text(title + "\n\n" + table + "\n", encoding="utf-8"))
    write_atomic(args.output_dir / "compare_methods.png", lambda p: save_table_png(table, title, p))
    print(f"compare_methods.md, .png and .json -> {args.output_dir}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.tiny and args.model_name_or_path is None:
            import make_tiny_model
            with tempfile.TemporaryDirectory() as tmp:  # a tiny random Qwen2 + tokenizer, gone after the run
                if make_tiny_model.main(["--output_dir", f"{tmp}/tiny-qwen", "--corpus", *args.data_path]):
                    return 2
                return run(args, f"{tmp}/tiny-qwen")
        return run(args, None)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
