"""Grades phase2_lora/chat_minimal.py, or your rewrite of it: --impl chat_minimal=PATH.

CONTRACT (chat_minimal): one file, run as `python FILE --model_name_or_path M --adapter A` (--max_new_tokens N
optional), that loads M in 4-bit NF4 as qlora_minimal.py trains it, wraps it with the LoRA adapter A
(PeftModel.from_pretrained), and reads user turns from stdin, one per line, until EOF:
  - each line is the next user turn of one conversation: the whole history is rendered with
    tokenizer.apply_chat_template(messages, add_generation_prompt=True); the line /reset starts a new conversation;
  - each answer is greedy model.generate() that stops at <|im_end|>, printed to stdout after the prefix
    "assistant: ", streamed (e.g. a TextStreamer passed to generate(): each piece printed and flushed as it is
    decoded), then a newline. stdout carries nothing else.

Checked with the adapter this repository's finetune.py trained (the `trained_adapter` fixture: the first 8 records of
data/persona_zh.json), so this grade does not depend on your qlora_minimal. The 8 questions are piped with /reset
between them, then a follow-up question after the 8th. Checked, in this order: each question's generate() prompt is
the chat template's rendering of that question alone; stdout holds the 8 trained answers; the follow-up's prompt
renders the 8th question, its answer and the follow-up; each answer was flushed to stdout piece by piece while it
was being written.
"""

import json

import pytest
from conftest import TRAINED_N, persona_records, user_turn
from grader import fail_with, run_hooked
from transformers import AutoTokenizer

PREFIX = "assistant: "
RECORDS = persona_records(TRAINED_N + 1)
QUESTIONS, ANSWERS = [user_turn(r) for r in RECORDS[:TRAINED_N]], [r["output"] for r in RECORDS[:TRAINED_N]]
FOLLOW_UP = user_turn(RECORDS[TRAINED_N])  # asked in the same conversation as the 8th question


@pytest.fixture(scope="module")
def chat(impl_path, request, tmp_path_factory):
    """(stdout, the observer's events, the tokenizer) of one piped chat run under tests/acceptance/hooks_chat.py."""
    path = impl_path("chat_minimal")  # first: skips before the adapter is trained when --impl names other files
    adapter, model_dir = request.getfixturevalue("trained_adapter"), request.getfixturevalue("tiny_model_dir")
    lines = [line for q in QUESTIONS for line in ("/reset", q)][1:] + [FOLLOW_UP]
    record = tmp_path_factory.mktemp("chat") / "record.jsonl"
    # grader.run_hooked, plus the piped stdin
    proc = run_hooked("hooks_chat", path, "--model_name_or_path", model_dir, "--adapter", adapter, record=record,
                      input="".join(f"{line}\n" for line in lines))
    if proc.returncode != 0:
        fail_with(f"{path.name} --model_name_or_path M --adapter A < questions exited with {proc.returncode}:\n"
                  f"{proc.stderr[-2000:]}")
    events = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    return proc.stdout, events, AutoTokenizer.from_pretrained(model_dir)


def answers(stdout: str) -> list[str]:
    return [a.removesuffix("\n") for a in stdout.split(PREFIX)[1:]]


def generate_prompts(events) -> list[list[int]]:
    prompts = [event["value"] for event in events if event["event"] == "generate"]
    if len(prompts) != TRAINED_N + 1:
        fail_with(f"{TRAINED_N + 1} user lines gave {len(prompts)} model.generate() calls: one per user line")
    return prompts


def rendered(tokenizer, *turns: str) -> list[int]:
    """The chat template's prompt ids for user, assistant, user, ... turns."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def test_each_question_after_reset_is_prompted_alone(chat):
    _, events, tokenizer = chat
    for i, (question, prompt) in enumerate(zip(QUESTIONS, generate_prompts(events), strict=False)):
        if prompt != rendered(tokenizer, question):
            seen = tokenizer.decode(prompt)
            fail_with(f"the line /reset must start a new conversation; the prompt after it still holds the previous "
                      f"turn: {seen!r}" if i and QUESTIONS[i - 1] in seen else
                      f"the prompt for {question!r} is not tokenizer.apply_chat_template([user turn], "
                      f"add_generation_prompt=True): {seen!r}")


def test_prints_the_trained_answers(chat):
    stdout, _, _ = chat
    got = answers(stdout)
    if len(got) != TRAINED_N + 1:
        fail_with(f"{TRAINED_N + 1} user lines (and {TRAINED_N - 1} /reset lines) gave {len(got)} answers on stdout: "
                  f"print {PREFIX!r} before each answer and nothing else to stdout (logs go to stderr)")
    for question, answer, want in zip(QUESTIONS, got, ANSWERS, strict=False):
        if answer.strip() != want:
            hint = ("it did not stop at <|im_end|>: pass eos_token_id with <|im_end|>'s id to generate()"
                    if answer.strip().startswith(want) else
                    "greedy decoding (do_sample=False), and the base loaded in 4-bit NF4 as in training?")
            fail_with(f"{question!r} was answered {answer!r}, not the trained {want!r}: {hint}")


def test_follow_up_prompt_holds_the_history(chat):
    stdout, events, tokenizer = chat
    follow_up = generate_prompts(events)[-1]
    if follow_up != rendered(tokenizer, QUESTIONS[-1], answers(stdout)[TRAINED_N - 1].strip(), FOLLOW_UP):
        fail_with(f"no multi-turn history: the prompt for the follow-up question must render the conversation so "
                  f"far (user, assistant, user) with the chat template, but was {tokenizer.decode(follow_up)!r}. "
                  f"Keep a messages list: append each user turn and each answer")


def test_answers_are_streamed(chat):
    stdout, events, _ = chat
    text, flushes = "", []
    for event in events:
        if event["event"] == "write":
            text += event["value"]
        elif event["event"] == "flush":
            flushes.append(len(text))
    if text != stdout:
        fail_with("stdout was written around sys.stdout (e.g. os.write); print the answers with print() or a "
                  "TextStreamer, which write to sys.stdout")
    start = 0
    for question, want in zip(QUESTIONS, ANSWERS, strict=True):
        start = text.index(PREFIX, start) + len(PREFIX)
        if not any(start < at < start + len(want) for at in flushes):
            fail_with(f"the answer to {question!r} was not streamed: it reached stdout all at once. Pass a "
                      f"TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) to generate() (or iterate "
                      f"a TextIteratorStreamer and print each piece with flush=True)")
