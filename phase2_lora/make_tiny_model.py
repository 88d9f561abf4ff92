"""Build a tiny, randomly initialised Qwen2 model and a Qwen-style tokenizer, offline.

The real recipe fine-tunes Qwen/Qwen1.5-1.8B-Chat (3.6 GB download). Everything in
phase2_lora/ and phase3_ddp/ also runs on the tiny model this script writes, so the
whole pipeline can be smoke-tested on a laptop CPU without internet:

    python phase2_lora/make_tiny_model.py --output_dir checkpoints/tiny-qwen
    python phase2_lora/finetune.py --model_name_or_path checkpoints/tiny-qwen ...

What is real here: the architecture class (Qwen2ForCausalLM: RoPE, RMSNorm, SwiGLU,
grouped-query attention), the byte-level BPE tokenizer class with Qwen's pre-tokenizer
regex, Qwen's ChatML special tokens and the Qwen1.5-Chat chat template. What is not:
the weights (random) and the vocabulary (a few hundred BPE merges learnt from a small
corpus instead of Qwen's 151,643).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

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
    p.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary size, special tokens included")
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


def build_tokenizer(lines: list[str], vocab_size: int) -> Qwen2Tokenizer:
    # Train byte-level BPE with exactly Qwen2's normalizer and pre-tokenizer, so the
    # learnt merges are ones the real Qwen2Tokenizer class can apply.
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
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,  # as in Qwen1.5-*-Chat
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768,
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_model(tok: Qwen2Tokenizer, args: argparse.Namespace) -> Qwen2ForCausalLM:
    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=len(tok),
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
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    # Stop generation at either end-of-turn or end-of-text, like Qwen1.5-Chat's generation_config.json.
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id, tok.pad_token_id], pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_heads % args.num_kv_heads or args.hidden_size % args.num_heads:
        print(f"error: need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0, got "
              f"{args.hidden_size}/{args.num_heads}/{args.num_kv_heads}", file=sys.stderr)
        return 2
    tok = build_tokenizer(corpus_lines(args.corpus), args.vocab_size)
    model = build_model(tok, args)
    # Write into a temp dir, then rename: a half-written model dir would load and fail later.
    out = args.output_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # config.json + model.safetensors
    tok.save_pretrained(tmp)    # tokenizer.json + tokenizer_config.json (with chat_template)
    # Replace an earlier tiny model, but never a directory holding anything this script does not write
    # (a mistyped --output_dir such as checkpoints/ must not be wiped).
    foreign = sorted({p.name for p in out.iterdir()} - {p.name for p in tmp.iterdir()}) if out.is_dir() else []
    if foreign or (out.exists() and not out.is_dir()):
        shutil.rmtree(tmp)
        print(f"error: {out} exists and holds other files ({', '.join(foreign[:3]) or 'not a directory'}); "
              f"pass a new --output_dir or remove it", file=sys.stderr)
        return 2
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Qwen2: {n_params:,} params, vocab {len(tok)}, layers {args.num_layers}, "
          f"heads {args.num_heads}/{args.num_kv_heads} (q/kv) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
