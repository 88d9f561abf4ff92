"""Evaluate a LoRA adapter against its base model, side by side, on held-out chat records.

    python phase2_lora/evaluate.py --adapter checkpoints/qwen1.5-1.8b-persona-lora --data_path data/persona_zh.json

Per model (base = the same weights with the adapter switched off, so both load once):
  eval loss and perplexity: mean cross-entropy over the target tokens (every assistant answer and its end-of-turn
    token, tokenised exactly as finetune.py trains: sft_data.load_sft_datasets), perplexity = exp(loss);
  exact match and character-level F1 of the greedy answer to each record's last user turn against its reference
    (the last assistant turn), generated through chat.py's code path (chat_session.Generation).
Writes a JSON file and a Markdown table (--output, default <adapter>/eval.json and .md); the table goes to stdout.
Progress goes to stderr: a bar on a terminal, a plain line about every 10% in a log. Model flags are chat.py's.
"""

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from chat import OneLineArgumentParser, add_model_flags, check_model_args, die, log, progress
from model_names import resolve_model


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--data_path", type=Path, nargs="+", required=True,
                   help="JSON/JSONL records (Alpaca, OpenAI messages or ShareGPT), as finetune.py reads them")
    p.add_argument("--max_samples", type=int, default=None, help="evaluate the first N usable records only")
    p.add_argument("--max_seq_len", type=int, default=1024,
                   help="tokens per record for the loss (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, help="JSON file (default: <adapter>/eval.json); .md beside it")
    args = p.parse_args(argv)
    if args.adapter is None:
        die("pass --adapter DIR: evaluate.py compares an adapter with its base model")
    for path in args.data_path:
        if not path.is_file():
            die(f"--data_path {path} does not exist or is not a file")
    if args.output is not None and not args.output.parent.is_dir():  # checked now, not after the evaluation
        die(f"--output {args.output}: folder {args.output.parent} does not exist; create it or pass another path")
    if (args.max_samples is not None and args.max_samples < 1) or args.max_seq_len < 2:
        die("need --max_samples >= 1 and --max_seq_len >= 2")
    args.greedy = True  # exact match is about the model's best answer, not a sample
    return args


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the character multisets (SQuAD's token F1 with characters as tokens: right for Chinese text)."""
    common = sum((Counter(prediction) & Counter(reference)).values())
    if not prediction or not reference or not common:
        return float(prediction == reference)
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def eval_loss(model, dataset, adapter: bool, name: str) -> tuple[float, int]:
    """(mean cross-entropy over target tokens, number of target tokens): summed over all records, then divided once."""
    from contextlib import nullcontext

    import torch

    total, count = 0.0, 0
    with torch.inference_mode(), (nullcontext() if adapter else model.disable_adapter()):
        for example in progress(dataset, f"{name}: eval loss"):
            ids = torch.tensor([example["input_ids"]], device=model.device)  # (1, T)
            labels = torch.tensor(example["labels"][1:], device=model.device)  # (T-1,) target of each position
            logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V)
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / max(count, 1), count


def answers(model, tokenizer, conversations, gen_kwargs, adapter: bool, name: str) -> list[str]:
    from chat_session import Generation, encode_chat

    out = []
    for messages in progress(conversations, f"{name}: greedy answers"):
        input_ids = encode_chat(tokenizer, messages[:-1])  # (1, T): up to the last user turn
        generation = Generation(model, tokenizer, input_ids, gen_kwargs, seed=0, adapter=adapter)
        out.append("".join(generation).strip())
    return out


def markdown(results: dict) -> str:
    rows = ["| model | eval loss | perplexity | exact match | char F1 |", "|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['eval_loss']:.4f} | {r['perplexity']:.2f} | {r['exact_match']:.3f} "
                    f"| {r['char_f1']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    base = check_model_args(args)
    from chat_session import cli_generation_kwargs, load_for_chat
    from qlora_model import UsageError
    from run_files import atomic_write_text
    from sft_data import load_conversations, load_sft_datasets

    try:
        base = resolve_model(base, args.hub, UsageError)  # --hub modelscope: download, then load the folder
        model, tokenizer, window, stop_ids = load_for_chat(args, base, log=log)
        dataset, _, _ = load_sft_datasets(args.data_path, tokenizer, system=args.system,
                                          max_seq_len=min(args.max_seq_len, window), max_samples=args.max_samples,
                                          log=log)
        conversations, _ = load_conversations(args.data_path, system=args.system, log=lambda message: None)
    except UsageError as e:
        die(str(e))
    conversations = [c for c in conversations if c[-1]["role"] == "assistant"][:args.max_samples]
    if not conversations or not len(dataset):
        die(f"no usable records in {' '.join(map(str, args.data_path))}")
    references = [c[-1]["content"].strip() for c in conversations]
    gen_kwargs = cli_generation_kwargs(args, stop_ids, tokenizer.pad_token_id)
    results, per_record = {}, {}
    for name, adapter in (("base", False), ("base + LoRA", True)):
        loss, n_tokens = eval_loss(model, dataset, adapter, name)
        got = answers(model, tokenizer, conversations, gen_kwargs, adapter, name)
        per_record[name] = got
        results[name] = {"eval_loss": loss, "perplexity": math.exp(min(loss, 700)), "target_tokens": n_tokens,
                         "exact_match": sum(a == r for a, r in zip(got, references, strict=True)) / len(references),
                         "char_f1": sum(map(char_f1, got, references)) / len(references)}
        log(f"{name}: eval loss {loss:.4f} over {n_tokens} target tokens, exact match "
            f"{results[name]['exact_match']:.3f}")
    table = markdown(results)
    output = args.output or args.adapter / "eval.json"
    report = {"base_model": base, "adapter": str(args.adapter), "data_path": [str(p) for p in args.data_path],
              "records_loss": len(dataset), "records_answers": len(references), "results": results,
              "answers": [{"reference": r, **{name: got[i] for name, got in per_record.items()}}
                          for i, r in enumerate(references)]}
    atomic_write_text(output, json.dumps(report, ensure_ascii=False, indent=2))
    atomic_write_text(output.with_suffix(".md"), table + "\n")
    print(table)
    log(f"wrote {output} and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
