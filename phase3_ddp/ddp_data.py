"""Alpaca-format instruction data -> tokenised chat examples with answer-only labels.

Same rules as phase2_lora/sft_data.py (copied on purpose: every phase folder stands alone):
read + validate JSON / JSONL -> skip invalid records (counted; --strict makes them an error) and
`<nooutput>` ones -> chat messages -> the tokenizer's own chat template -> labels = -100 except the
answer and its end-of-turn token -> truncate -> seeded train/val split.

Every rank runs this identically before the process group exists: same files, same seed, same
result, so a bad input fails on every rank at once and no rank is left waiting at a collective.
The examples are a plain list; the DistributedSampler decides which rank sees which index.
"""

import json
import math
from pathlib import Path

import torch
from ddp_model import UsageError

IGNORE_INDEX = -100  # label value that F.cross_entropy skips
NO_OUTPUT = "<nooutput>"  # Alpaca marks instructions it could not answer (e.g. "draw a picture") this way


def read_json_records(path: str | Path) -> list:
    """All records of one file: a JSON list, or JSONL (one object per line). Bad JSON names line and column."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file not found: {path} (download it as described in data/README.md, "
                         f"or pass another --data_path)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from e
    if not text.strip():
        raise UsageError(f"{path} is empty; expected a JSON list or JSONL of Alpaca records")
    if text.lstrip()[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"bad JSON in {path} at line {e.lineno}, column {e.colno}: {e.msg}") from e
        if not isinstance(records, list):
            raise UsageError(f"{path} must hold a JSON list of records")
        return records
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"bad JSON in {path} at line {lineno}, column {e.colno}: {e.msg}") from e
    return records


def record_problem(rec) -> str | None:
    """Why an Alpaca record is unusable, or None. `input` is optional and may be empty."""
    if not isinstance(rec, dict):
        return f"expected an object, got {type(rec).__name__}"
    for key in ("instruction", "output"):
        if rec.get(key) is None:
            return f"missing field {key!r}"
    for key in ("instruction", "input", "output"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            return f"field {key!r} is {type(rec[key]).__name__}, expected a string"
    for key in ("instruction", "output"):
        if not rec[key].strip():
            return f"empty field {key!r}"
    return None


def load_records(paths, strict: bool = False, log=print) -> tuple[list[dict], dict]:
    """Valid {instruction, input, output} records of all files in file order, plus counts."""
    records, stats, shown = [], {"read": 0, "invalid": 0, "nooutput": 0}, 0
    for path in paths:
        for index, rec in enumerate(read_json_records(path)):
            stats["read"] += 1
            problem = record_problem(rec)
            if problem:
                if strict:
                    raise UsageError(f"{path} record {index}: {problem} (drop --strict to skip such records)")
                stats["invalid"] += 1
                if shown < 5:  # a few examples, then only the count
                    log(f"warning: skipping {path} record {index}: {problem}")
                    shown += 1
            elif rec["output"].strip() == NO_OUTPUT:
                stats["nooutput"] += 1
            else:
                records.append({"instruction": rec["instruction"], "input": rec.get("input") or "",
                                "output": rec["output"]})
    return records, stats


def build_messages(rec: dict, system: str | None = None) -> list[dict]:
    """Alpaca record -> chat messages. Without a system message Qwen's template inserts its default one."""
    user = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def tokenize_messages(messages: list[dict], tokenizer, max_seq_len: int) -> dict:
    """Chat template -> {"input_ids", "labels"}: labels keep the answer and the end-of-turn token after it
    (Qwen: `<|im_end|>`), all else IGNORE_INDEX. The answer span is found in characters (the prompt is the
    template with add_generation_prompt) and mapped to tokens by offsets, never by pad id: with pad == eos
    a pad-id mask would also hide the end-of-turn token and the model would never learn to stop."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise UsageError("the chat template renders the prompt differently with and without the answer")
    eot = tokenizer.eos_token
    eot_at = full.find(eot, len(prompt)) if eot else -1
    answer_end = eot_at + len(eot) if eot_at >= 0 else len(full)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)  # the template has the specials
    input_ids = list(enc["input_ids"])
    labels = [tok if len(prompt) <= start < answer_end else IGNORE_INDEX
              for tok, (start, _end) in zip(input_ids, enc["offset_mapping"], strict=True)]
    if eot_at < 0 and tokenizer.eos_token_id is not None:  # template doesn't close the turn: teach stopping
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len],  # keep the start: the prompt
            "truncated": len(input_ids) > max_seq_len}


def parse_val_size(text: str) -> float | int:
    """--val_size: a fraction in (0, 1) or a whole count >= 0 (0 = no evaluation)."""
    value = float(text)
    if 0 < value < 1:
        return value
    if value >= 0 and value == int(value):
        return int(value)
    raise ValueError(f"--val_size must be a fraction in (0, 1) or a whole count >= 0, got {text}")


def load_sft_examples(paths, tokenizer, system: str | None = None, max_seq_len: int = 1024,
                      max_samples: int | None = None, val_size: float | int = 0, strict: bool = False,
                      seed: int = 42, log=print, progress=None) -> tuple[list[dict], list[dict], dict]:
    """(train, val, stats): lists of {"input_ids", "labels"}. max_samples keeps the first N valid records."""
    records, stats = load_records(paths, strict=strict, log=log)
    records = records[:max_samples] if max_samples else records
    examples = [tokenize_messages(build_messages(rec, system), tokenizer, max_seq_len)
                for rec in (progress(records) if progress else records)]
    stats["truncated"] = sum(ex.pop("truncated") for ex in examples)
    kept = [ex for ex in examples if any(label != IGNORE_INDEX for label in ex["labels"])]
    stats["no_answer_left"] = len(examples) - len(kept)  # the prompt alone filled --max_seq_len
    if not kept:
        raise UsageError(f"no usable training records in {', '.join(map(str, paths))}: {stats['read']} read, "
                         f"{stats['invalid']} invalid, {stats['nooutput']} <nooutput>, {stats['no_answer_left']} "
                         f"with no answer left after --max_seq_len {max_seq_len}")
    n_val = max(1, math.floor(val_size * len(kept))) if isinstance(val_size, float) else val_size
    if n_val >= len(kept):
        raise UsageError(f"--val_size {val_size} leaves no training records out of {len(kept)}; use a smaller value")
    # Seeded permutation: every rank computes the same split without talking to the others.
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed)).tolist()
    val = [kept[i] for i in sorted(order[:n_val])]
    train = [kept[i] for i in sorted(order[n_val:])]
    stats.update(train=len(train), val=len(val))
    return train, val, stats


class PadCollator:
    """Pads a list of examples to the longest one (dynamic padding): input_ids with pad_token_id, labels with
    IGNORE_INDEX, attention_mask 0. Right padding: with a causal mask real tokens never see the pads."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        B, T = len(examples), max(len(ex["input_ids"]) for ex in examples)
        batch = {"input_ids": torch.full((B, T), self.pad_token_id, dtype=torch.long),  # (B, T)
                 "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),          # (B, T)
                 "attention_mask": torch.zeros((B, T), dtype=torch.long)}               # (B, T)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(ex["input_ids"])
            batch["labels"][row, :n] = torch.tensor(ex["labels"])
            batch["attention_mask"][row, :n] = 1
        return batch
