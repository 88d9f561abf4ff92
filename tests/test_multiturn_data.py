"""Multi-turn data: three file formats to one conversation, every assistant turn supervised (checked against a
token-level reference rendering) except OpenAI answers of weight 0, --train_on_prompt, whole-turn truncation, bad
records by file and index."""

import json
import re
import sys

import pytest
from conftest import REPO, write_json

sys.path.insert(0, str(REPO / "phase2_lora"))
from qlora_model import UsageError, load_tokenizer  # noqa: E402
from sft_data import IGNORE_INDEX, load_sft_datasets, tokenize_messages  # noqa: E402
from sft_formats import load_conversations  # noqa: E402

TURNS = [("请记住这个数字：7", "好的，我记住了。"), ("我让你记住的数字是几？", "你让我记住的数字是7。"),
         ("谢谢！", "不客气。")]
SYSTEM = "你是小柒。"


def chat(system=SYSTEM, turns=TURNS) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))]


# The same conversation in each supported format.
ALPACA = {"system": SYSTEM, "history": [list(t) for t in TURNS[:-1]], "instruction": TURNS[-1][0], "input": "",
          "output": TURNS[-1][1]}
MESSAGES = {"messages": chat()}
SHAREGPT = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                               "value": m["content"]} for m in chat()]}
LLAMA_FACTORY = {"system": SYSTEM, "conversations": SHAREGPT["conversations"][1:]}  # ShareGPT, system as a field


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def quiet(*_):
    pass


def reference_labels(messages, tokenizer) -> tuple[list[int], list[int]]:
    """Labels built another way, from token counts: for assistant turn i, the tokens of the prompt before it
    (template with the generation prompt) are skipped, then the answer's and <|im_end|>'s tokens are kept."""
    def ids(msgs, **kw):
        return tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"]
    full = ids(messages)
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(ids(messages[:i], add_generation_prompt=True))
            answer = tokenizer(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            assert full[start:start + len(answer)] == answer
            labels[start:start + len(answer)] = answer
    return full, labels


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_every_assistant_turn_is_supervised(tokenizer, system):
    messages = chat(system)
    ex = tokenize_messages(messages, tokenizer, max_seq_len=1024)
    assert (ex["input_ids"], ex["labels"]) == reference_labels(messages, tokenizer)
    kept = tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    assert kept == "".join(a + "<|im_end|>" for _, a in TURNS)  # all three answers, the middle one included


def test_train_on_prompt_supervises_everything(tokenizer):
    ex = tokenize_messages(chat(), tokenizer, max_seq_len=1024, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_every_format_gives_the_same_tokens(tmp_path, tokenizer):
    paths = [write_json(tmp_path / "alpaca.json", [ALPACA]), write_json(tmp_path / "messages.json", [MESSAGES]),
             write_json(tmp_path / "sharegpt.jsonl", json.dumps(SHAREGPT, ensure_ascii=False) + "\n"),
             write_json(tmp_path / "llama_factory.json", [LLAMA_FACTORY])]
    conversations, stats = load_conversations(paths, log=quiet)
    assert conversations == [chat()] * 4
    assert list(stats["formats"].values()) == ["alpaca", "messages", "sharegpt", "sharegpt"]
    train, _, _ = load_sft_datasets(paths, tokenizer, log=quiet)
    assert train[0] == train[1] == train[2] == train[3]


def test_system_flag_is_the_default_not_an_override(tmp_path):
    paths = [write_json(tmp_path / "d.json", [MESSAGES, {"messages": chat(system=None)}]),
             write_json(tmp_path / "lf.json", [LLAMA_FACTORY])]
    own, _ = load_conversations(paths, system="默认", log=quiet)
    assert own[0][0]["content"] == SYSTEM and own[1][0] == {"role": "system", "content": "默认"}
    assert own[2] == chat()  # a top-level system field is the record's own system prompt


def test_weight_0_answer_is_context_not_target(tmp_path, tokenizer):
    """OpenAI's per-message weight: the answer of weight 0 stays in the input but is never a target (not even
    with --train_on_prompt); weight 1 and no weight are trained on. Loaded through the Arrow dataset, where the
    turns without a weight read back as weight None."""
    weighted = chat()
    weighted[2], weighted[4] = {**weighted[2], "weight": 0}, {**weighted[4], "weight": 1}
    path = write_json(tmp_path / "w.jsonl", "\n".join(json.dumps({"messages": m}) for m in (weighted, chat())))
    ids, labels = reference_labels(chat(), tokenizer)
    start = len(tokenizer.apply_chat_template(chat()[:2], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
    masked = range(start, start + len(tokenizer(TURNS[0][1] + "<|im_end|>", add_special_tokens=False)["input_ids"]))
    train, _, _ = load_sft_datasets([path], tokenizer, log=quiet)
    assert train[0]["input_ids"] == ids == train[1]["input_ids"] and train[1]["labels"] == labels
    assert train[0]["labels"] == [IGNORE_INDEX if i in masked else label for i, label in enumerate(labels)]
    kept = tokenizer.decode([t for t in train[0]["labels"] if t != IGNORE_INDEX])
    assert kept == "".join(a + "<|im_end|>" for _, a in TURNS[1:])
    train, _, _ = load_sft_datasets([path], tokenizer, train_on_prompt=True, log=quiet)
    assert train[0]["labels"] == [IGNORE_INDEX if i in masked else t for i, t in enumerate(ids)]


@pytest.mark.parametrize("rec, why", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": w}]},
     f"message 1 (assistant) has weight {w!r}; only assistant messages take a weight, 0 (not trained on) or 1")
    for w in (0.5, "0", True, None)] + [
    ({"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]},
     "message 0 (user) has weight 1; only assistant messages take a weight"),
    ({"messages": chat(None, TURNS[:1])[:1] + [{"role": "assistant", "content": "b", "weight": 0}]},
     "every assistant turn has weight 0: nothing to learn from"),
    ({**LLAMA_FACTORY, "system": 3}, "field 'system' is int, expected a string"),
    ({**SHAREGPT, "system": "另一个"}, "both a top-level 'system' field and a system turn, with different texts"),
])
def test_bad_weight_or_system_is_named(tmp_path, rec, why):
    path = write_json(tmp_path / "bad.json", [rec])
    with pytest.raises(UsageError, match=re.escape(f"bad.json record 0: {why}")):
        load_conversations([path], strict=True, log=quiet)


def test_truncation_keeps_whole_turns(tokenizer):
    full = tokenize_messages(chat(), tokenizer, max_seq_len=4096)
    two_turns = tokenize_messages(chat(turns=TURNS[:2]), tokenizer, max_seq_len=4096)["length"]
    # Room for two whole turns and part of the third: cut after the second answer's <|im_end|>.
    ex = tokenize_messages(chat(), tokenizer, max_seq_len=full["length"] - 3)
    assert ex["length"] == two_turns - 1  # the template's "\n" after <|im_end|> is not kept
    assert ex["input_ids"] == full["input_ids"][:ex["length"]] and ex["truncated"] and not ex["partial"]
    # Not even the first answer fits whole: cut inside it, and that is flagged as a half-supervised answer.
    first_prompt = len(tokenizer.apply_chat_template(chat()[:2], add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
    ex = tokenize_messages(chat(), tokenizer, max_seq_len=first_prompt + 2)
    assert ex["partial"] and ex["length"] == first_prompt + 2 and ex["n_answer"] == 2


BAD = [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
     "message 1 has unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "turns don't alternate: message 1 is 'user', expected 'assistant'"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "turns don't alternate: message 0 is 'assistant'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]},
     "no assistant turn to learn from"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]},
     "message 1 (assistant) content is list, expected a string"),
    ({"messages": chat(None) + [{"role": "user", "content": "再问"}]}, "ends with an unanswered user turn"),
    ({"messages": "hi"}, "field 'messages' must be a list of objects"),
]


def test_bad_records_are_reported_by_file_and_index(tmp_path):
    path = write_json(tmp_path / "bad.json", [MESSAGES] + [rec for rec, _ in BAD])
    warnings = []
    good, stats = load_conversations([path], log=warnings.append)
    assert len(good) == 1 and stats["invalid"] == len(BAD)
    for i, (_, why) in enumerate(BAD[:5], start=1):  # the first five are shown, the rest only counted
        assert f"bad.json record {i} (messages): {why}" in warnings[i - 1]
    gpt = write_json(tmp_path / "sg.jsonl", json.dumps({"conversations": [{"from": "bot", "value": "x"}]}))
    with pytest.raises(UsageError, match=r"sg.jsonl record 0: message 0 has unknown role 'bot' \(expected human, "):
        load_conversations([gpt], strict=True, log=quiet)
    with pytest.raises(UsageError, match="cannot tell the format of .*odd.json"):
        load_conversations([write_json(tmp_path / "odd.json", [{"prompt": "a", "completion": "b"}])], log=quiet)
    with pytest.raises(UsageError, match="history' must be a list of"):
        load_conversations([write_json(tmp_path / "h.json", [{**ALPACA, "history": [["only one"]]}])], strict=True)
