"""Alpaca-format instruction data -> tokenised chat examples with answer-only labels.

Pipeline: read + validate JSON/JSONL files -> drop bad and `<nooutput>` records (with counts)
-> chat messages -> the tokenizer's own chat template -> labels = -100 except the answer and
its end-of-turn token -> truncate -> train/val split. A collator pads each batch to its own
longest example (dynamic padding); the Trainer's length-grouped sampler keeps that padding small.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from qlora_model import UsageError

IGNORE_INDEX = -100  # label value that torch.nn.CrossEntropyLoss (and HF models) skip
NO_OUTPUT = "<nooutput>"  # Alpaca marks instructions it could not answer (e.g. "draw a picture") this way


# ---------------------------------------------------------------- reading and validation

def read_json_records(path: str | Path) -> list:
    """All records of one Alpaca file: a JSON list, or JSONL (one object per line).
    Bad JSON raises UsageError naming the line and column; we parse with `json` ourselves because
    the `datasets` JSON reader reports pyarrow errors without a position."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file not found: {path} (download it as described in data/README.md, "
                         f"or pass another --data_path)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from e
    stripped = text.lstrip()
    if not stripped:
        raise UsageError(f"{path} is empty; expected a JSON list or JSONL of Alpaca records")
    if stripped[0] == "[":  # one JSON document holding a list
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"bad JSON in {path} at line {e.lineno}, column {e.colno}: {e.msg}") from e
        if not isinstance(records, list):
            raise UsageError(f"{path} must hold a JSON list of records")
        return records
    records = []  # JSONL: every non-blank line is one JSON object
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
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
        if key not in rec or rec[key] is None:
            return f"missing field {key!r}"
    for key in ("instruction", "input", "output"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            return f"field {key!r} is {type(rec[key]).__name__}, expected a string"
    for key in ("instruction", "output"):
        if not rec[key].strip():
            return f"empty field {key!r}"
    return None


def load_records(paths, strict: bool = False, log=print) -> tuple[list[dict], dict]:
    """Valid {instruction, input, output} records of all files, in file order, plus counts.
    Invalid records are reported by file and index and skipped (strict=True: UsageError instead)."""
    records, stats, shown = [], {"read": 0, "invalid": 0, "nooutput": 0}, 0
    for path in paths:
        for index, rec in enumerate(read_json_records(path)):
            stats["read"] += 1
            problem = record_problem(rec)
            if problem:
                if strict:
                    raise UsageError(f"{path} record {index}: {problem} (drop --strict to skip such records)")
                stats["invalid"] += 1
                if shown < 5:  # a few examples, then only the count: 52k-record files can have many
                    log(f"warning: skipping {path} record {index}: {problem}")
                    shown += 1
                continue
            if rec["output"].strip() == NO_OUTPUT:
                stats["nooutput"] += 1
                continue
            records.append({"instruction": rec["instruction"], "input": rec.get("input") or "",
                            "output": rec["output"]})
    return records, stats


# ---------------------------------------------------------------- chat rendering and labels

def build_messages(rec: dict, system: str | None = None) -> list[dict]:
    """Alpaca record -> chat messages. Without a system message Qwen's template inserts its default one."""
    user = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def tokenize_messages(messages: list[dict], tokenizer, max_seq_len: int) -> dict:
    """Render with the tokenizer's chat template; labels keep only the last assistant answer and the
    end-of-turn token after it (for Qwen: `<|im_end|>`), everything else is IGNORE_INDEX.

    The answer span is found in characters (prompt text = template with add_generation_prompt) and
    mapped to tokens with the offset mapping, so the mask never depends on the pad id: with
    pad == eos a pad-id-based mask would also hide the end-of-turn token, and the model would
    never learn to stop.
    """
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template renders the prompt differently with and without the answer")
    eot = tokenizer.eos_token
    answer_start = len(prompt)
    eot_at = full.find(eot, answer_start) if eot else -1
    # Answer = [answer_start, end of the first end-of-turn token after it). Templates that don't close
    # the turn with EOS get it appended, so every example still teaches the model to stop.
    answer_end = eot_at + len(eot) if eot_at >= 0 else len(full)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)  # template has the specials
    input_ids = list(enc["input_ids"])
    labels = [tok if answer_start <= start < answer_end else IGNORE_INDEX
              for tok, (start, _end) in zip(input_ids, enc["offset_mapping"], strict=True)]
    if eot_at < 0 and tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    truncated = len(input_ids) > max_seq_len
    input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]  # keep the start: the prompt
    return {"input_ids": input_ids, "labels": labels, "length": len(input_ids), "truncated": truncated,
            "n_answer": sum(label != IGNORE_INDEX for label in labels)}


# ---------------------------------------------------------------- split, dataset, collator

def parse_val_size(text: str) -> float | int:
    """--val_size: a fraction in (0, 1) or a whole count >= 0 (0 = no evaluation)."""
    value = float(text)
    if 0 < value < 1:
        return value
    if value >= 0 and value == int(value):
        return int(value)
    raise ValueError(f"--val_size must be a fraction in (0, 1) or a whole count >= 0, got {text}")


def n_val_examples(val_size: float | int, n: int) -> int:
    return max(1, math.floor(val_size * n)) if isinstance(val_size, float) else int(val_size)


def load_sft_datasets(paths, tokenizer, system: str | None = None, max_seq_len: int = 1024,
                      max_samples: int | None = None, val_size: float | int = 0, strict: bool = False,
                      seed: int = 42, log=print) -> tuple[Dataset, Dataset | None, dict]:
    """(train, val or None, stats). Columns: input_ids, labels, length (for length grouping).
    max_samples keeps the first N valid records (file order), before the split."""
    records, stats = load_records(paths, strict=strict, log=log)
    if max_samples:
        records = records[:max_samples]
    # Validated plain records -> datasets.Dataset: .map tokenises with a progress bar and keeps the
    # columns in Arrow, and train_test_split gives a seeded split.
    ds = Dataset.from_list(records) if records else None
    if ds is not None:
        ds = ds.map(lambda rec: tokenize_messages(build_messages(rec, system), tokenizer, max_seq_len),
                    remove_columns=ds.column_names, desc="tokenise")
        stats["truncated"] = sum(ds["truncated"])
        keep = [i for i, n in enumerate(ds["n_answer"]) if n > 0]  # prompt filled all max_seq_len tokens
        stats["no_answer_left"] = len(ds) - len(keep)
        ds = ds.select(keep).remove_columns(["truncated", "n_answer"])
    if ds is None or len(ds) == 0:
        raise UsageError(f"no usable training records in {', '.join(map(str, paths))}: {stats['read']} read, "
                         f"{stats['invalid']} invalid, {stats['nooutput']} <nooutput>"
                         + (f", {stats.get('no_answer_left', 0)} with no answer left after --max_seq_len "
                            f"{max_seq_len}" if stats.get("no_answer_left") else ""))
    n_val = n_val_examples(val_size, len(ds))
    if n_val >= len(ds):
        raise UsageError(f"--val_size {val_size} leaves no training records out of {len(ds)}; use a smaller value")
    train, val = ds, None
    if n_val:
        split = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        train, val = split["train"], split["test"]
    stats.update(train=len(train), val=len(val) if val is not None else 0)
    return train, val, stats


@dataclass
class SFTCollator:
    """Pads a list of examples to the longest one in the batch (dynamic padding): input_ids with the pad
    id, labels with IGNORE_INDEX, attention_mask 0. Right padding: real tokens keep positions 0..L-1."""
    pad_token_id: int
    pad_to_multiple_of: int | None = None  # 8 lets GPU tensor cores use aligned shapes

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long),  # (B, T)
                 "labels": torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long),        # (B, T)
                 "attention_mask": torch.zeros((len(examples), longest), dtype=torch.long)}              # (B, T)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(ex["input_ids"])
            batch["labels"][row, :n] = torch.tensor(ex["labels"])
            batch["attention_mask"][row, :n] = 1
        return batch
