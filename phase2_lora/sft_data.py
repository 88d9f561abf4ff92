"""Instruction and chat data -> tokenised examples with assistant-only labels, cached on disk; batching.

Pipeline: read JSON / JSONL files and normalise every record to chat messages (sft_formats.py: Alpaca with
optional `history`, OpenAI `messages`, ShareGPT `conversations`; bad records reported) -> render with the
tokenizer's own chat template -> tokenise it cut at each answer's start and end (so every training sequence starts
with the exact inference prompt) -> labels = -100 except every assistant answer and its end-of-turn token (but not
an OpenAI answer marked `weight: 0`) -> truncate at a turn boundary -> cache (keyed by the data, the tokenizer,
the template, the transformers and tokenizers versions and every option that changes tokens) -> train/val split
-> optional packing.
The collator pads a batch to its longest row; packed rows carry position ids that restart at each example.
"""

import bisect
import hashlib
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import tokenizers
import torch
import transformers
from datasets import Dataset, Features, Sequence, Value, disable_progress_bars, enable_progress_bars
from datasets.utils.logging import is_progress_bar_enabled
from qlora_model import UsageError, end_of_turn_text
from sft_formats import build_messages, load_conversations, read_json_records  # noqa: F401 (re-exported)

IGNORE_INDEX = -100  # label value that torch.nn.CrossEntropyLoss (and HF models) skip
DEFAULT_CACHE_DIR = "data/cache"
CACHE_VERSION = 4  # bump whenever the rules below change the tokens or labels: older caches stop matching
FEATURES = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "length": Value("int32")})  # int32: half of the default int64 on disk and in RAM


# ---------------------------------------------------------------- chat rendering and labels

PROMPT, ANSWER, UNTRAINED = 0, 1, 2  # the kinds of segment a rendered conversation is cut into


def render(messages: list[dict], tokenizer, eot: str | None) -> list[tuple[str, int]]:
    """The conversation as the chat template renders it, cut into segments (text, kind): ANSWER for each assistant
    answer up to and including the end-of-turn token that closes it, UNTRAINED for an answer marked `weight: 0`
    (OpenAI format: shown to the model as context, never trained on), PROMPT for the template text in between.

    Answer i starts where the template's prompt for it (messages[:i] + generation prompt) ends, so no answer text is
    searched for: an answer repeated in a user turn cannot be picked up by mistake."""
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]  # the template never sees `weight`
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    starts, kinds = [], []
    for i, m in enumerate(chat):
        if m["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)
            if not full.startswith(prompt):
                raise UsageError("the chat template renders earlier turns differently once an answer follows "
                                 "(e.g. it rewrites history); multi-turn labels cannot be placed with this template")
            starts.append(len(prompt))
            kinds.append(UNTRAINED if messages[i].get("weight") == 0 else ANSWER)  # absent (None after Arrow): trained
    bounds, ends, eot_at = starts[1:] + [len(full)], [], -1
    for start, bound in zip(starts, bounds, strict=True):
        eot_at = full.find(eot, start, bound) if eot else -1
        ends.append(eot_at + len(eot) if eot_at >= 0 else bound)
    if ends and eot_at < 0 and tokenizer.eos_token:  # the last turn left open: append EOS to teach stopping
        full += tokenizer.eos_token
        ends[-1] = len(full)
    segments, at = [], 0
    for start, end, kind in zip(starts, ends, kinds, strict=True):
        segments += [(full[at:start], PROMPT), (full[start:end], kind)]
        at = end
    return segments + [(full[at:], PROMPT)]


def label_example(pieces: list[list[int]], kinds: list[int], max_seq_len: int, train_on_prompt: bool) -> dict:
    """The segments' ids joined, labels (ANSWER tokens; with train_on_prompt PROMPT tokens too, never UNTRAINED
    ones) and truncation to max_seq_len at the end of the last supervised answer that fits; only if the first
    answer doesn't fit is it cut mid-way."""
    sizes = [len(piece) for piece in pieces]
    ids = np.asarray([t for piece in pieces for t in piece], dtype=np.int64)
    kind = np.repeat(np.asarray(kinds), sizes)
    supervised = kind == ANSWER
    labels = np.where(supervised | (train_on_prompt & (kind == PROMPT)), ids, IGNORE_INDEX)
    turn_ends = [end for end, k, n in zip(np.cumsum(sizes), kinds, sizes, strict=True) if k == ANSWER and n]
    cut, partial = len(ids), False
    if len(ids) > max_seq_len:
        fitting = [end for end in turn_ends if end <= max_seq_len]
        cut = max(fitting) if fitting else max_seq_len  # whole turns where possible
        partial = not fitting and bool(supervised[:cut].any())  # the first answer cut mid-way
    return {"input_ids": ids[:cut].tolist(), "labels": labels[:cut].tolist(), "length": cut,
            "truncated": cut < len(ids), "partial": partial, "n_answer": int(supervised[:cut].sum())}


def tokenize_messages(messages: list[dict], tokenizer, max_seq_len: int, train_on_prompt: bool = False) -> dict:
    """One conversation -> input_ids, labels (every assistant answer + its end-of-turn token, except answers
    marked `weight: 0`; the rest -100, or only those answers masked with train_on_prompt), length, and
    truncation flags.

    The labels come from the segments, never from the ids: with pad == eos a pad-id-based mask would also hide
    the end-of-turn token, and the model would never learn to stop. Templates that don't close the turn get the
    EOS token appended."""
    return tokenize_batch([messages], tokenizer, max_seq_len, train_on_prompt)[0]


def tokenize_batch(conversations: list[list[dict]], tokenizer, max_seq_len: int, train_on_prompt: bool = False,
                   eot: str | None = None) -> list[dict]:
    """tokenize_messages for many conversations: rendered one by one, tokenised in one call.

    Each segment is tokenised on its own (as LLaMA-Factory encodes each message), not the whole text at once: in
    one text an answer's first characters can merge with the generation prompt's last ones (Qwen: an answer that
    starts with "\n" after "<|im_start|>assistant\n" gives "\n\n" 271, not 198 198), and the model would be
    trained on a prompt it never sees at inference, where the prompt always ends in 198. Cut at each answer's start,
    the ids always begin with the exact inference prompt; elsewhere the cuts fall after the end-of-turn special
    token, which splits the text anyway, so the ids are apply_chat_template's."""
    eot = eot or end_of_turn_text(tokenizer)
    rendered = [render(messages, tokenizer, eot) for messages in conversations]
    # One call for the batch: the fast (Rust) tokenizer splits it over its threads. The template wrote the
    # special tokens already, so none are added.
    flat = tokenizer([text for segments in rendered for text, _ in segments], add_special_tokens=False)["input_ids"]
    examples, at = [], 0
    for segments in rendered:
        examples.append(label_example(flat[at:at + len(segments)], [kind for _, kind in segments], max_seq_len,
                                      train_on_prompt))
        at += len(segments)
    return examples


# ---------------------------------------------------------------- tokenise once: the on-disk cache

def cache_key(paths, tokenizer, **options) -> str:
    """A digest of everything that decides the tokens: the data files' bytes (in order), the tokenizer's
    vocabulary, merges and special tokens, its chat template, the transformers and tokenizers versions (they
    render the template and split the text), the options and CACHE_VERSION."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "template": tokenizer.chat_template,
                                   "class": type(tokenizer).__name__, "special": tokenizer.all_special_tokens,
                                   "libraries": [transformers.__version__, tokenizers.__version__],
                                   **options}, sort_keys=True, default=str).encode())
    for path in paths:
        if not Path(path).is_file():
            read_json_records(path)  # raises the usual "data file not found" error
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: the whole tokenizer.json
    h.update((backend.to_str() if backend else json.dumps(sorted(tokenizer.get_vocab().items()))).encode())
    return h.hexdigest()[:24]


class Progress:
    """Plain progress lines (about every 10%) when stderr is not a terminal; on a terminal datasets' tqdm bar."""

    def __init__(self, total: int, log):
        self.total, self.done, self.next, self.log = total, 0, total / 10, log
        self.plain = not sys.stderr.isatty()

    def update(self, n: int):
        self.done += n
        if self.plain and (self.done >= self.next or self.done == self.total):
            self.log(f"tokenise: {self.done}/{self.total} conversations ({100 * self.done // self.total}%)")
            self.next += self.total / 10


def build_examples(paths, tokenizer, system, max_seq_len, max_samples, train_on_prompt, strict, key,
                   log) -> tuple[Dataset, dict]:
    """Read, validate and tokenise: batched datasets.map over the conversations; drops examples with no
    supervised token left after truncation and counts what truncation did."""
    conversations, stats = load_conversations(paths, system=system, strict=strict, log=log)
    conversations = conversations[:max_samples] if max_samples else conversations
    eot, progress = end_of_turn_text(tokenizer), Progress(len(conversations), log)

    def tokenize(batch):
        rows = tokenize_batch(batch["messages"], tokenizer, max_seq_len, train_on_prompt, eot)
        progress.update(len(rows))
        return {name: [row[name] for row in rows] for name in rows[0]}

    ds = Dataset.from_dict({"messages": conversations})
    ds = ds.map(tokenize, batched=True, batch_size=500, remove_columns=["messages"], desc="tokenise",
                new_fingerprint=key,  # we know what the data is: spares datasets hashing the tokenizer
                features=Features({**FEATURES, "truncated": Value("bool"), "partial": Value("bool"),
                                   "n_answer": Value("int32")})) if conversations else ds
    # ds[name] is a lazy Column that iterates row by row; [:] reads it in one go (~10x faster at 52k records).
    column = {name: np.asarray(ds[name][:]) for name in ("truncated", "partial", "n_answer")} if len(ds) else {}
    keep = np.flatnonzero(column["n_answer"] > 0) if len(ds) else []  # prompt filled all max_seq_len tokens
    stats.update(truncated=int(column["truncated"].sum()) if len(ds) else 0, no_answer_left=len(ds) - len(keep),
                 partial_answer=int(column["partial"][keep].sum()) if len(ds) else 0)
    if len(keep) == 0:
        raise UsageError(f"no usable training records in {', '.join(map(str, paths))}: {stats['read']} read, "
                         f"{stats['invalid']} invalid, {stats['nooutput']} <nooutput>"
                         + (f", {stats['no_answer_left']} with no answer left after --max_seq_len "
                            f"{max_seq_len}" if stats["no_answer_left"] else ""))
    return ds.select(keep).remove_columns(["truncated", "partial", "n_answer"]), stats


def save_cache(ds: Dataset, stats: dict, path: Path, log) -> bool:
    """Write to a temp dir, then os.replace it into place: a reader never sees a half-written cache. A
    concurrent writer of the same key (same content) may win the rename; that is fine."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        ds.save_to_disk(str(tmp))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False), encoding="utf-8")
        if path.is_dir():  # --overwrite_cache: move the old one aside first (os.replace needs an empty target)
            os.replace(path, old := tmp.with_name(tmp.name + "-old"))
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
        return True
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_dir():
            log(f"warning: cannot write the tokenised-data cache {path} ({e.strerror or e}); continuing without it")
        return path.is_dir()


@contextmanager
def plain_progress():
    """datasets' tqdm bars on a terminal; in a log file (stderr not a TTY) none: Progress prints plain lines."""
    bars = is_progress_bar_enabled()
    if not sys.stderr.isatty():
        disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            enable_progress_bars()


def tokenized_dataset(paths, tokenizer, system: str | None = None, max_seq_len: int = 1024,
                      max_samples: int | None = None, train_on_prompt: bool = False, strict: bool = False,
                      cache_dir: str | Path | None = None, overwrite_cache: bool = False,
                      log=print) -> tuple[Dataset, dict]:
    """(every usable example, tokenised; stats). With cache_dir, the result is loaded from
    cache_dir/sft-<key> when the same build is there, else built and saved there atomically.

    DDP: call it on rank 0 first, then barrier, then on the other ranks: they find rank 0's cache and load
    it (memory-mapped Arrow files, shared through the page cache) instead of tokenising again."""
    key = cache_key(paths, tokenizer, system=system, max_seq_len=max_seq_len, max_samples=max_samples,
                    train_on_prompt=train_on_prompt)
    path = Path(cache_dir) / f"sft-{key}" if cache_dir else None
    if path is not None and path.is_dir() and not overwrite_cache:
        stats = json.loads((path / "stats.json").read_text(encoding="utf-8"))
        if not (strict and stats["invalid"]):  # --strict must stop at the first bad record: rebuild to raise it
            log(f"tokenised data: loaded from cache {path}")
            return Dataset.load_from_disk(str(path)), {**stats, "cache": str(path)}
    with plain_progress():
        ds, stats = build_examples(paths, tokenizer, system, max_seq_len, max_samples, train_on_prompt, strict, key,
                                   log)
        if path is not None and save_cache(ds, stats, path, log):
            log(f"tokenised data: cached in {path}")
            return Dataset.load_from_disk(str(path)), {**stats, "cache": str(path)}
        return ds.flatten_indices(), stats


# ---------------------------------------------------------------- split, packing, collator

def parse_val_size(text: str) -> float | int:
    """--val_size: a fraction in (0, 1) or a whole count >= 0 (0 = no evaluation)."""
    value = float(text)
    if 0 < value < 1:
        return value
    if 0 <= value < 2**31 and value == int(value):  # inf, nan and absurd counts fall through to the error
        return int(value)
    raise ValueError(f"--val_size must be a fraction in (0, 1) or a whole count >= 0, got {text}")


def n_val_examples(val_size: float | int, n: int) -> int:
    return max(1, math.floor(val_size * n)) if isinstance(val_size, float) else int(val_size)


def load_sft_datasets(paths, tokenizer, system: str | None = None, max_seq_len: int = 1024,
                      max_samples: int | None = None, val_size: float | int = 0, strict: bool = False,
                      seed: int = 42, log=print, train_on_prompt: bool = False, cache_dir: str | Path | None = None,
                      overwrite_cache: bool = False, packing: bool = False) -> tuple[Dataset, Dataset | None, dict]:
    """(train, val or None, stats). Columns: input_ids, labels, length (for length grouping), and with
    packing position_ids (train only: rows of up to max_seq_len tokens). max_samples keeps the first N usable
    records (file order), before the split. cache_dir: see tokenized_dataset (None: no cache)."""
    ds, stats = tokenized_dataset(paths, tokenizer, system=system, max_seq_len=max_seq_len, max_samples=max_samples,
                                  train_on_prompt=train_on_prompt, strict=strict, cache_dir=cache_dir,
                                  overwrite_cache=overwrite_cache, log=log)
    n_val = n_val_examples(val_size, len(ds))
    if n_val >= len(ds):
        raise UsageError(f"--val_size {val_size} leaves no training records out of {len(ds)}; use a smaller value")
    train, val = ds, None
    if n_val:
        split = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        train, val = split["train"], split["test"]
    stats.update(train=len(train), val=len(val) if val is not None else 0)
    if packing:
        train = pack_examples(train, max_seq_len)
        stats["packed_rows"] = len(train)
    return train, val, stats


def describe(stats: dict, max_seq_len: int) -> str:
    """The one-line data summary training scripts print."""
    return (f"data: {stats['read']} records read, {stats['invalid']} invalid skipped, {stats['nooutput']} <nooutput> "
            f"dropped, {stats['truncated']} truncated to {max_seq_len} tokens ({stats['partial_answer']} of them "
            f"with a half-supervised answer), {stats['no_answer_left']} dropped (no answer left) -> "
            f"{stats['train']} train / {stats['val']} val"
            + (f"; packed into {stats['packed_rows']} rows" if "packed_rows" in stats else ""))


def pack_examples(ds: Dataset, max_seq_len: int) -> Dataset:
    """Concatenate examples into rows of at most max_seq_len tokens (best-fit decreasing: few, full rows).
    position_ids restart at 0 for each example: that is how transformers (masking_utils) tells the examples
    of a row apart when no attention_mask is passed, so no token attends across examples. Each example's
    first label is -100: it would otherwise be predicted from the previous example's last token."""
    with plain_progress():
        ds = ds.flatten_indices()  # after a split: make the Arrow table hold exactly these rows, in order
    lengths = np.asarray(ds["length"][:], dtype=np.int64)  # [:]: the whole column at once, not row by row
    ids = ds.data.column("input_ids").combine_chunks()
    labels = ds.data.column("labels").combine_chunks()
    starts = np.asarray(ids.offsets)[:-1] - ids.offsets[0].as_py()
    ids, labels = np.asarray(ids.flatten()), np.asarray(labels.flatten()).copy()
    labels[starts] = IGNORE_INDEX
    rows, free = [], []  # free: sorted (space left, row) of rows that still have room
    for i in np.argsort(-lengths, kind="stable"):
        k = bisect.bisect_left(free, (lengths[i], -1))  # the fullest row the example fits in
        space, row = free.pop(k) if k < len(free) else (max_seq_len, len(rows))
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], row))
    order = np.concatenate(rows)  # examples in row order
    take = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in order])  # (N,) token indices
    positions = np.concatenate([np.arange(lengths[i]) for i in order])
    row_lengths = np.asarray([lengths[r].sum() for r in rows])
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_lengths)]), type=pa.int32())

    def column(values):
        return pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.int32()))

    table = pa.table({"input_ids": column(ids[take]), "labels": column(labels[take]),
                      "position_ids": column(positions), "length": pa.array(row_lengths, type=pa.int32())})
    return Dataset(table)


PAD_POSITION = -1  # position id of padding in packed rows: a sequence of its own, and countable (>= 0: real)


@dataclass
class SFTCollator:
    """Pads a list of examples to the longest one in the batch (dynamic padding): input_ids with the pad
    id, labels with IGNORE_INDEX. Right padding: real tokens keep positions 0..L-1.

    Plain examples get an attention_mask (0 on pads). Packed rows (with position_ids) get position_ids and no
    attention_mask: transformers then builds a block-diagonal causal mask from the position resets. Pads get
    position id PAD_POSITION, which makes each pad a sequence of its own (attended by nothing real: they come
    last) and lets a trainer count real tokens as (position_ids >= 0).sum()."""
    pad_token_id: int
    pad_to_multiple_of: int | None = None  # 8 lets GPU tensor cores use aligned shapes

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in examples[0]
        shape = (len(examples), longest)
        batch = {"input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),   # (B, T)
                 "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long)}           # (B, T)
        mask_key, fill = ("position_ids", PAD_POSITION) if packed else ("attention_mask", 0)
        batch[mask_key] = torch.full(shape, fill, dtype=torch.long)                     # (B, T)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(ex["input_ids"])
            batch["labels"][row, :n] = torch.as_tensor(ex["labels"])
            batch[mask_key][row, :n] = torch.as_tensor(ex["position_ids"]) if packed else 1
        return batch


def real_tokens(batch: dict) -> int:
    """Tokens in a collated batch that are not padding, plain or packed."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int((batch["position_ids"] != PAD_POSITION).sum())
