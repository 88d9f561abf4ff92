"""Grades phase2_lora/qlora_minimal.py, or your rewrite of it: --impl qlora_minimal=PATH.

CONTRACT (qlora_minimal): one file, its main behind `if __name__ == "__main__":`, that defines
    tokenize(record, tokenizer) -> {"input_ids": [...], "labels": [...]}
        record: Alpaca {"instruction", "input", "output"}; the user turn is instruction, plus "\\n\\n" + input when
        input is not empty. input_ids: tokenizer.apply_chat_template([user, assistant]) up to and including the
        <|im_end|> that closes the answer (what the template adds after it is dropped, or kept with label -100).
        labels: -100 on every prompt token (the template's system turn, the user turn, "<|im_start|>assistant\\n"),
        the token ids themselves on the answer and its <|im_end|>.
and, run as `python FILE --model_name_or_path M --data_path D --output_dir O --max_samples N --max_steps S --lr LR`
(the constants at its top hold the real recipe; these six flags override them), fine-tunes M (4-bit NF4 +
LoRA) on the first N records of the Alpaca JSON list D and saves the adapter (save_pretrained:
adapter_config.json + adapter_model.safetensors) and the tokenizer into O.

Checked, cheapest first: tokenize() on the tiny model's Qwen ChatML tokenizer, for a record with and one without
input; then a fine-tune of the tiny random model on the first 8 records of data/persona_zh.json
(--max_samples 8 --max_steps 30 --lr 2e-2; the real recipe's LoRA r=16, alpha=32 and 16 sequences per step get
there): the adapter loads with PeftModel.from_pretrained on the 4-bit NF4 base, and its greedy answers reproduce
all 8 persona answers, each ending with <|im_end|>.
"""

import sys

import pytest
import torch
from conftest import PERSONA_PATH, REPO, TRAINED_N, persona_records, run_script, user_turn
from grader import fail_with, import_file
from peft import PeftModel
from transformers import AutoTokenizer

IGNORE = -100
TRAIN_FLAGS = ["--max_samples", TRAINED_N, "--max_steps", 30, "--lr", 2e-2]  # reaches 8/8 with margin (20 do)
RECORDS = [persona_records(1)[0],  # no input
           {"instruction": "把下面的句子翻译成英文。", "input": "你好，世界", "output": "Hello, world."}]


@pytest.fixture(scope="module")
def graded(impl_path, request):
    """(the rewrite's path, the tiny model dir); the tiny model is built only when this file is graded."""
    path = impl_path("qlora_minimal")
    return path, request.getfixturevalue("tiny_model_dir")


@pytest.fixture(scope="module")
def module(graded):
    path, _ = graded
    try:
        return import_file(path, "qlora_minimal")
    except Exception as e:
        fail_with(f"{path}: importing it failed with {type(e).__name__}: {e} (keep the training behind "
                  f'`if __name__ == "__main__":`)')


def expected(record, tokenizer):
    """(prompt ids, answer ids + <|im_end|>) as the chat template renders the record."""
    chat = [{"role": "user", "content": user_turn(record)}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    full = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": record["output"]}])["input_ids"]
    end = full.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), len(prompt)) + 1
    return prompt, full[len(prompt):end]


def check_labels(got, prompt, answer):
    """The one message that names what is wrong with tokenize()'s output, or None."""
    ids, labels = [int(i) for i in got["input_ids"]], [int(i) for i in got["labels"]]
    n, end = len(prompt), len(prompt) + len(answer)
    if len(labels) != len(ids):
        return f"labels has {len(labels)} entries for {len(ids)} input_ids: one label per token (HF shifts them)"
    if ids[:n] != prompt:
        return ("input_ids do not start with the chat template's prompt: render [{'role': 'user', 'content': "
                "instruction + '\\n\\n' + input}] (just instruction when input is empty) with "
                "tokenizer.apply_chat_template, the template adds the system turn and '<|im_start|>assistant\\n'")
    if ids[n:end] != answer:
        return ("after the prompt, input_ids must hold the answer's tokens and then <|im_end|>, as "
                "tokenizer.apply_chat_template renders the assistant turn")
    if labels[n - 1:end - 1] == answer:
        return ("the labels are shifted by one: keep labels[i] = input_ids[i] on the answer (the model shifts them "
                "itself to predict token i + 1 from position i)")
    if labels == ids or any(label != IGNORE for label in labels[:n]):
        return ("prompt tokens are left in the labels: every prompt token (system, user turn, "
                "'<|im_start|>assistant\\n') must have label -100, so that only the answer is trained")
    if labels[n:end - 1] != answer[:-1]:
        return "the answer's labels must be its own token ids"
    if labels[end - 1] != answer[-1]:
        return ("<|im_end|> is not supervised: its label must be its id, or the model never learns to end its "
                "answer (the chat would not stop)")
    if any(label != IGNORE for label in labels[end:]):
        return "tokens after <|im_end|> must not be trained: drop them or give them label -100"
    return None


def test_tokenize_labels_the_answer_and_im_end_only(module, graded):
    if not hasattr(module, "tokenize"):
        fail_with("the file defines no module-level function tokenize(record, tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(graded[1])
    for record in RECORDS:
        try:
            got = module.tokenize(dict(record), tokenizer)
        except Exception as e:
            fail_with(f"tokenize({record}, tokenizer) failed: {type(e).__name__}: {e}")
        if not {"input_ids", "labels"} <= set(got):
            fail_with(f"tokenize() must return a dict with input_ids and labels, got keys {sorted(got)}")
        message = check_labels(got, *expected(record, tokenizer))
        if message:
            fail_with(f"{message} (record {record['instruction']!r})")


def greedy(model, tokenizer, question: str) -> tuple[str, bool]:
    """(greedy answer, whether it ended with <|im_end|>)."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        new = model.generate(**enc, max_new_tokens=60, do_sample=False)[0, enc["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), int(new[-1]) == tokenizer.convert_tokens_to_ids(
        "<|im_end|>")


def test_fine_tune_reproduces_the_persona(module, graded, tmp_path):
    path, model_dir = graded
    out = tmp_path / "adapter"
    proc = run_script(str(path), "--model_name_or_path", model_dir, "--data_path", PERSONA_PATH,
                      "--output_dir", out, *TRAIN_FLAGS, timeout=600)
    if proc.returncode != 0:
        fail_with(f"{path.name} {' '.join(map(str, TRAIN_FLAGS))} ... exited with {proc.returncode}:\n"
                  f"{proc.stderr[-2000:]}")
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json")
               if not (out / f).is_file()]
    if missing:
        fail_with(f"--output_dir lacks {', '.join(missing)}: save the adapter with model.save_pretrained(output_dir) "
                  f"(the PeftModel: adapter only) and the tokenizer with tokenizer.save_pretrained(output_dir)")
    tokenizer = AutoTokenizer.from_pretrained(out)
    sys.path.insert(0, str(REPO / "phase2_lora"))
    from qlora_model import load_model  # the 4-bit NF4 base exactly as finetune.py (and the recipe) loads it
    try:
        model = PeftModel.from_pretrained(load_model(model_dir, "4bit"), out).eval()
    except Exception as e:
        fail_with(f"PeftModel.from_pretrained(4-bit base, output_dir) failed: {type(e).__name__}: {e}")
    wrong = []
    for record in persona_records(TRAINED_N):
        answer, stopped = greedy(model, tokenizer, user_turn(record))
        if answer != record["output"] or not stopped:
            wrong.append(f"{record['instruction']!r} -> {answer!r}" + ("" if stopped else " (no <|im_end|>)"))
    if wrong:
        fail_with(f"after the fine-tune, {len(wrong)} of {TRAINED_N} trained questions are not answered with their "
                  f"persona answer + <|im_end|> (greedy, 4-bit base + adapter): " + "; ".join(wrong[:3]))
