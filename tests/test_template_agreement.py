"""Training and inference see the same tokens. For a multi-turn conversation, on Qwen's real tokenizer and on the
small one:
- every inference prompt (the turns before an answer plus the generation prompt, as chat.py renders it) is a prefix
  of the ids the training data holds (sft_data.tokenize_messages, and the cached dataset finetune.py trains on);
- the labels after each such prompt are the answer's own ids plus <|im_end|>, and every other label is -100;
- the ids are exactly apply_chat_template's ids, except where an answer's first characters merge with the
  generation prompt's last "\n" in one token of the whole rendered text (an answer that starts with "\n": Qwen's
  "\n" 198 + "\n" 198 -> "\n\n" 271). There the training ids keep the prompt's tokens, as the model sees them at
  inference, and the text is still the template's text."""

import sys

import pytest
from conftest import REPO, write_json
from qwen_tiny import qwen_model_dir

sys.path.insert(0, str(REPO / "phase2_lora"))
from qlora_model import load_tokenizer  # noqa: E402
from sft_data import IGNORE_INDEX, load_sft_datasets, tokenize_messages  # noqa: E402

# Chinese, English, code and emoji; an answer that repeats the question; one chat with its own system prompt and
# one with the template's default.
TURNS = [("用一句话解释 LoRA。", "LoRA 冻结原权重 W，只训练低秩矩阵 B A（秩 r ≪ d）。"),
         ("Write it in PyTorch, one line.", "y = x @ W.T + (alpha / r) * (x @ A.T) @ B.T  # W frozen"),
         ("好的 👍 再说一遍？", "好的 👍 再说一遍：只训练 B 和 A。🦙")]
CHATS = [[{"role": "system", "content": "你是小柒，回答要简短。"}]
         + [{"role": r, "content": c} for q, a in TURNS for r, c in (("user", q), ("assistant", a))],
         [{"role": r, "content": c} for q, a in TURNS[:2] for r, c in (("user", q), ("assistant", a))]]


@pytest.fixture(scope="module", params=["qwen", "small"])
def tokenizer(request, tiny_model_dir):
    return load_tokenizer(qwen_model_dir() if request.param == "qwen" else tiny_model_dir)


def template_ids(tokenizer, messages, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def answer_positions(tokenizer, ids: list[int]) -> set[int]:
    """Where the answers are, read off the ChatML structure of the ids alone: after each <|im_start|> come the
    role's tokens and "\\n"; an assistant turn's answer runs from there to its <|im_end|>, which is included."""
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    positions = set()
    for i in (i for i, t in enumerate(ids) if t == im_start and ids[i + 1:i + 1 + len(header)] == header):
        start = i + 1 + len(header)
        positions.update(range(start, ids.index(im_end, start) + 1))
    return positions


@pytest.mark.parametrize("messages", CHATS, ids=["own system prompt", "default system prompt"])
def test_training_ids_are_the_template_ids(tokenizer, messages):
    expected = template_ids(tokenizer, messages)
    ex = tokenize_messages(messages, tokenizer, max_seq_len=4096)
    assert ex["input_ids"] == expected and not ex["truncated"]
    for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):  # what chat.py feeds for answer i
        prompt = template_ids(tokenizer, messages[:i], add_generation_prompt=True)
        assert expected[:len(prompt)] == prompt and ex["labels"][len(prompt) - 1] == IGNORE_INDEX
        assert ex["labels"][len(prompt)] == expected[len(prompt)]  # the answer's first token is learnt
    supervised = {i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX}
    assert supervised == answer_positions(tokenizer, expected)
    assert all(ex["labels"][i] == expected[i] for i in supervised)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode([ex["labels"][i] for i in sorted(supervised)]) == "<|im_end|>".join(answers) + "<|im_end|>"


# Answers whose first characters merge with the generation prompt's last "\n" when the whole text is tokenised at
# once (Qwen: "\n" + "\n" -> 271, "\n" + "  \n" -> one token): last in a chat, and every answer of a chat.
NEWLINE_ANSWERS = ["\n```python\nprint(1)\n```", "\n\n好的。\n", "  \n  x = 1"]
AGAIN = {"role": "user", "content": "Again?"}
BOUNDARY_CHATS = [CHATS[1] + [AGAIN, {"role": "assistant", "content": NEWLINE_ANSWERS[0]}],
                  [m for a in NEWLINE_ANSWERS for m in (AGAIN, {"role": "assistant", "content": a})]]


def supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of trained labels: one per answer (answers are never adjacent)."""
    runs = []
    for i in (i for i, label in enumerate(labels) if label != IGNORE_INDEX):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


@pytest.mark.parametrize("messages", BOUNDARY_CHATS, ids=["last answer", "every answer"])
def test_an_answer_that_starts_with_a_newline_follows_its_inference_prompt(tokenizer, messages):
    """Each answer's ids follow its inference prompt's ids exactly, as long as no EARLIER answer starts with a
    newline. When one does, chat.py (which re-renders the history as text) merges it again with the "\n" before
    it in a later prompt, while the training sequence keeps it cut as it was when that answer was trained: no one
    sequence can hold both. The later prompt's text is still the same, and its answer is still its own ids."""
    ex = tokenize_messages(messages, tokenizer, max_seq_len=4096)
    ids, labels = ex["input_ids"], ex["labels"]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    runs = supervised_runs(labels)
    assert len(runs) == len(turns)  # every label outside the answers is -100
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    merges = tokenizer("\n\n", add_special_tokens=False)["input_ids"] != newline * 2  # Qwen: 271, not 198 198
    for n, (i, (start, end)) in enumerate(zip(turns, runs, strict=True)):
        prompt = template_ids(tokenizer, messages[:i], add_generation_prompt=True)
        answer = tokenizer(messages[i]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert ids[start:end] == labels[start:end] == answer  # the answer's own ids and <|im_end|>
        history_cut = any(messages[j]["content"] in NEWLINE_ANSWERS for j in turns[:n])
        assert (ids[:start] == prompt) == (not (history_cut and merges)), f"turn {i}"
        assert tokenizer.decode(ids[:start]) == tokenizer.decode(prompt)
    template = template_ids(tokenizer, messages)
    assert tokenizer.decode(ids) == tokenizer.decode(template)  # the same text, cut into tokens at the answers
    assert (ids == template) == (not merges)  # Qwen: the template's own ids merge there, the case this test is for


def test_the_cached_dataset_holds_the_same_ids(tokenizer, tmp_path):
    """finetune.py trains on load_sft_datasets' rows, read back from the on-disk cache: the same ids and labels."""
    path = write_json(tmp_path / "chats.json", [{"messages": m} for m in CHATS])
    logs = []
    for _ in range(2):  # build and save the cache, then load it from disk
        train, _, _ = load_sft_datasets([path], tokenizer, max_seq_len=4096, cache_dir=tmp_path / "cache",
                                        log=logs.append)
        for row, messages in zip(train, CHATS, strict=True):
            ex = tokenize_messages(messages, tokenizer, max_seq_len=4096)
            assert row["input_ids"] == template_ids(tokenizer, messages) == ex["input_ids"]
            assert row["labels"] == ex["labels"] and row["length"] == len(row["input_ids"])
    assert any("loaded from cache" in line for line in logs)
