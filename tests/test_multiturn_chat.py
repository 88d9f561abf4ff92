"""Multi-turn proof: finetune.py (4-bit QLoRA on the tiny model) on our own multi-turn data, replayed through
chat.py with piped stdin. In every conversation the checked answer is the middle one and it depends on the
first user turn (the number or colour to remember), so it comes out right only if the model learnt to read
back through the history, and only if non-final assistant turns were supervised at all."""

import json

import pytest
from conftest import REPO, run_script, side_by_side

DATA = [REPO / "data" / "multiturn_zh.json", REPO / "data" / "multiturn_zh_sharegpt.jsonl"]


def conversations() -> list[list[tuple[str, str]]]:
    """Every conversation of DATA as (user, assistant) pairs: OpenAI messages, then ShareGPT lines."""
    convs = [[m["content"] for m in rec["messages"]] for rec in json.loads(DATA[0].read_text(encoding="utf-8"))]
    convs += [[t["value"] for t in json.loads(line)["conversations"]]
              for line in DATA[1].read_text(encoding="utf-8").splitlines() if line.strip()]
    return [list(zip(c[::2], c[1::2], strict=True)) for c in convs]


def replay(*model_args) -> list[str]:
    """All conversations through one chat.py run: user turns on stdin, /reset between conversations."""
    lines = "/reset\n".join("".join(q + "\n" for q, _ in conv) for conv in conversations())
    proc = run_script("phase2_lora/chat.py", *model_args, "--greedy", "--max_new_tokens", 40, input=lines,
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("multiturn") / "lora"
    proc = run_script("phase2_lora/finetune.py", "--model_name_or_path", tiny_model_dir, "--data_path", *DATA,
                      "--output_dir", out, "--quantization", "4bit", "--val_size", 0, "--max_steps", 50,
                      "--batch_size", 6, "--grad_accum", 1, "--lr", 2e-2, "--lora_dropout", 0,
                      "--logging_steps", 10, "--save_steps", 1000, "--cache_dir", out.parent / "cache", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 records read, 0 invalid" in proc.stdout
    return out


def test_later_answers_come_from_earlier_turns(adapter, tiny_model_dir):
    expected = [a for conv in conversations() for _, a in conv]
    checked = {i for i, a in enumerate(expected) if any(a == c[1][1] for c in conversations())}  # middle turns
    assert len(checked) == len(conversations()) == 6
    # The middle answers differ between conversations only through what the first user turn said.
    assert len({expected[i] for i in checked}) == 6 and len({conv[1][0] for conv in conversations()}) == 2
    runs = side_by_side(lambda args: replay(*args), [("--adapter", adapter), ("--model_name_or_path", tiny_model_dir)])
    tuned, base = runs.values()
    assert tuned == expected
    assert len(base) == len(expected) and not set(base) & set(expected)
