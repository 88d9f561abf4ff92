"""Training and inference see the same tokens. For a multi-turn conversation, on Qwen's real tokenizer and on the
small one: the ids the training data holds (sft_data.tokenize_messages, and the cached dataset finetune.py trains
on) are exactly apply_chat_template's ids, every inference prompt (the turns before an answer plus the generation
prompt) is a prefix of them, and the labels cover each assistant answer plus its <|im_end|>, nothing else."""

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
