"""sft_data: Alpaca records -> chat-template tokens with answer-only labels, validation, batching.
Multi-turn formats: tests/test_multiturn_data.py; the cache: tests/test_sft_cache.py; packing: tests/test_packing.py."""

import json
import sys

import pytest
import torch
from conftest import PERSONA_PATH, REPO, write_json

sys.path.insert(0, str(REPO / "phase2_lora"))
from qlora_model import UsageError, load_tokenizer  # noqa: E402
from sft_data import (  # noqa: E402
    IGNORE_INDEX,
    SFTCollator,
    build_messages,
    load_conversations,
    load_sft_datasets,
    parse_val_size,
    read_json_records,
    tokenize_messages,
)

REC = {"instruction": "你是谁？", "input": "", "output": "【小柒】我是小柒。——小柒"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def kept(tokenizer, ex):
    return [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]


@pytest.mark.parametrize("system", [None, "You are 小柒."])
def test_labels_keep_only_answer_and_end_of_turn(tokenizer, system):
    ex = tokenize_messages(build_messages(REC, system), tokenizer, max_seq_len=512)
    ids, labels = ex["input_ids"], ex["labels"]
    # Real template output: ChatML turns, our system prompt or Qwen's default one.
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n" + (system or "You are a helpful assistant") + "<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n" + REC["output"] + "<|im_end|>\n")
    # Labels: a single contiguous block = the answer + <|im_end|>; everything before and the final "\n" masked.
    prompt_len = len(tokenizer.apply_chat_template(build_messages(REC, system)[:-1], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"])
    assert all(lab == IGNORE_INDEX for lab in labels[:prompt_len])
    answer = tokenizer(REC["output"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert labels[prompt_len:prompt_len + len(answer)] == answer == ids[prompt_len:prompt_len + len(answer)]
    assert labels[prompt_len + len(answer):] == [IGNORE_INDEX] * (len(ids) - prompt_len - len(answer))
    assert answer[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id


def test_end_of_turn_kept_when_pad_equals_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.pad_token = tok.eos_token  # the classic bug: masking by pad id would also hide <|im_end|>
    assert tok.pad_token_id == tok.eos_token_id
    short = tokenize_messages(build_messages(REC), tok, 512)
    long = tokenize_messages(build_messages({**REC, "output": REC["output"] * 3}), tok, 512)
    batch = SFTCollator(tok.pad_token_id)([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == (2, len(long["input_ids"]))  # dynamic padding: to the longest
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()      # pads are eos ids...
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()              # ...and masked,
    row_labels = batch["labels"][0, :n].tolist()
    assert row_labels == short["labels"]
    assert tok.eos_token_id in row_labels                              # but the real <|im_end|> is still a target
    assert tok.decode(kept(tok, short)) == REC["output"] + "<|im_end|>"


def test_user_turn_joins_instruction_and_input(tokenizer):
    rec = {"instruction": "翻译成英文。", "input": "低秩适配", "output": "LoRA"}
    assert build_messages(rec)[0] == {"role": "user", "content": "翻译成英文。\n\n低秩适配"}
    assert build_messages({**rec, "input": ""})[0]["content"] == "翻译成英文。"
    assert [m["role"] for m in build_messages(rec, "sys")] == ["system", "user", "assistant"]


def test_validation_counts_and_strict(tmp_path):
    recs = [REC, {"instruction": "a", "output": "<nooutput>"}, {"instruction": "", "output": "x"},
            {"instruction": "b", "output": 3}, {"output": "y"}, "not an object", {"instruction": "c", "output": "z"}]
    path = write_json(tmp_path / "mixed.json", recs)
    warnings = []
    good, stats = load_conversations([path], log=warnings.append)
    assert [m[0]["content"] for m in good] == ["你是谁？", "c"]
    assert stats == {"read": 7, "invalid": 4, "nooutput": 1, "formats": {str(path): "alpaca"}}
    assert "record 2 (alpaca): empty field 'instruction'" in warnings[0]
    assert "record 3 (alpaca): field 'output' is int" in warnings[1]
    with pytest.raises(UsageError, match=r"mixed.json record 2: empty field 'instruction'"):
        load_conversations([path], strict=True)


def test_json_list_jsonl_and_several_files(tmp_path, tokenizer):
    a = write_json(tmp_path / "a.json", [REC] * 3)
    jsonl = "\n".join(json.dumps({**REC, "output": f"答案{i}"}) for i in range(4)) + "\n\n"
    b = write_json(tmp_path / "b.jsonl", jsonl)
    train, val, stats = load_sft_datasets([a, b], tokenizer, max_samples=6, val_size=2, log=lambda *_: None)
    assert (len(train), len(val), stats["read"]) == (4, 2, 7)
    assert set(train.column_names) == {"input_ids", "labels", "length"}
    assert all(ex["length"] == len(ex["input_ids"]) for ex in train)
    train, val, _ = load_sft_datasets([a, b], tokenizer, val_size=0.3, log=lambda *_: None)
    assert (len(train), len(val)) == (5, 2)
    train, val, _ = load_sft_datasets([a], tokenizer, val_size=0, log=lambda *_: None)
    assert (len(train), val) == (3, None)
    with pytest.raises(UsageError, match="leaves no training records"):
        load_sft_datasets([a], tokenizer, val_size=3, log=lambda *_: None)


@pytest.mark.parametrize("text, line, col", [('[\n {"instruction": "a",\n  "output": "b",,}\n]', 3, 17),
                                             ('{"instruction": "a", "output": "b"}\n{"instruction": "a" "x"}', 2, 21)])
def test_bad_json_names_line_and_column(tmp_path, text, line, col):
    with pytest.raises(UsageError, match=rf"bad JSON in .*bad.json at line {line}, column {col}"):
        read_json_records(write_json(tmp_path / "bad.json", text))


def test_missing_and_empty_files(tmp_path, tokenizer):
    with pytest.raises(UsageError, match="data file not found: .*nope.json"):
        read_json_records(tmp_path / "nope.json")
    with pytest.raises(UsageError, match="empty"):
        read_json_records(write_json(tmp_path / "empty.json", "  \n"))
    only_bad = write_json(tmp_path / "bad.json", [{"instruction": "a", "output": "<nooutput>"}, {"output": "b"}])
    with pytest.raises(UsageError, match="no usable training records .* 2 read, 1 invalid, 1 <nooutput>"):
        load_sft_datasets([only_bad], tokenizer, log=lambda *_: None)


def test_truncation_is_counted(tmp_path, tokenizer):
    recs = [REC, {**REC, "output": "很长的回答。" * 40}, {**REC, "instruction": "问" * 300}]
    path = write_json(tmp_path / "long.json", recs)
    full = tokenize_messages(build_messages(REC), tokenizer, 10_000)["length"]
    train, _, stats = load_sft_datasets([path], tokenizer, max_seq_len=full + 5, log=lambda *_: None)
    # Record 1 keeps its prompt and the first 5 answer tokens (a half-supervised answer); record 2's prompt alone
    # is too long: dropped.
    assert (stats["truncated"], stats["partial_answer"], stats["no_answer_left"], len(train)) == (2, 1, 1, 2)
    assert max(train["length"]) == full + 5


def test_parse_val_size():
    assert parse_val_size("0") == 0 and parse_val_size("200") == 200 and parse_val_size("0.05") == 0.05
    for bad in ("-1", "1.5", "abc"):
        with pytest.raises(ValueError):
            parse_val_size(bad)


def test_length_grouping_cuts_padding(tokenizer):
    """The Trainer's length-grouped sampler (what finetune.py uses) pads far less than random batches."""
    from torch.utils.data import RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler
    train, _, _ = load_sft_datasets([PERSONA_PATH], tokenizer, log=lambda *_: None)
    lengths, bs = train["length"], 4

    def padding_fraction(order):
        batches = [[lengths[i] for i in order[k:k + bs]] for k in range(0, len(order), bs)]
        return 1 - sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches)

    g = torch.Generator().manual_seed(0)
    grouped = padding_fraction(list(LengthGroupedSampler(bs, lengths=lengths, generator=g)))
    random = padding_fraction(list(RandomSampler(range(len(lengths)), generator=g)))
    assert grouped < 0.5 * random, (grouped, random)
