"""chat.py on the tiny Qwen2 after the short fine-tune of the `trained_adapter` fixture (conftest.py):
greedy answers reproduce the trained ones, the base model's answers don't, piped stdin keeps the
history, the merged model answers exactly like base + adapter (the NF4 merge like the 4-bit model it was trained
on), a terminal session streams and exits cleanly on Ctrl-C, and bad input fails fast with one line and exit code 2.

Each chat.py run costs seconds of imports, so every run asks several things at once."""

import contextlib
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, persona_records, run_script, side_by_side, user_turn

CHAT = "phase2_lora/chat.py"
N_PROMPTS = 3  # trained records asked per run


@pytest.fixture(scope="module")
def trained(trained_adapter):
    """(adapter dir, N_PROMPTS of the records it memorised as (question, answer)), the question built
    from instruction + input as finetune.py builds the user turn."""
    return trained_adapter, [(user_turn(r), r["output"].strip()) for r in persona_records(N_PROMPTS)]


def chat(*args, input=None) -> subprocess.CompletedProcess:
    proc = run_script(CHAT, *args, input=input, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def lines(proc) -> list[str]:
    return proc.stdout.removesuffix("\n").split("\n")  # not splitlines(): that also splits at \x1c, \u2028...


def answers(proc) -> list[str]:
    """stdout of --prompt / piped runs: one JSON-encoded answer per line."""
    return [json.loads(line) for line in lines(proc)]


def rendered_prompts(stderr: str) -> list[str]:
    """The prompts --verbose logs, chat template applied, history included."""
    return [block.split("\n", 1)[1].split("\n----- end of prompt -----")[0]
            for block in stderr.split("----- rendered prompt (")[1:]]


# ---------------------------------------------------------------- learning is visible

def test_prompt_reproduces_trained_answers(trained):
    adapter, qa = trained
    proc = chat("--adapter", adapter, "--greedy", *[a for q, _ in qa for a in ("--prompt", q)])
    assert answers(proc) == [a for _, a in qa]
    assert "Loading weights" not in proc.stderr  # stderr is a pipe: no progress bar in the log


def test_compare_shows_base_answers_differ(trained):
    adapter, qa = trained
    proc = chat("--adapter", adapter, "--greedy", "--compare", "--max_new_tokens", 100,  # the base never stops
                *[a for q, _ in qa for a in ("--prompt", q)])
    header, rule, *rows = lines(proc)
    assert header == "| prompt | base model | base + LoRA |" and rule == "|---|---|---|"
    assert len(rows) == len(qa)
    for row, (question, answer) in zip(rows, qa, strict=True):
        prompt, base, tuned = (cell.strip() for cell in row.strip("|").split(" | "))
        assert prompt == question.replace("\n", "<br>")
        assert tuned == answer
        assert base != answer and base != tuned


def test_a_relative_base_path_is_found_from_another_folder(trained, tiny_model_dir, tmp_path):
    """Adapters written before finetune.py recorded absolute paths (and adapters edited by hand) may hold a base
    relative to the folder training ran in, e.g. checkpoints/tiny-qwen. chat.py run from elsewhere finds that base
    above the adapter (and says where)."""
    adapter, qa = trained
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "checkpoints" / "tiny-qwen").symlink_to(tiny_model_dir)
    copy = project / "checkpoints" / "lora"
    shutil.copytree(adapter, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((copy / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = "checkpoints/tiny-qwen"
    (copy / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / CHAT), "--adapter", str(copy), "--greedy", "--prompt", qa[0][0]],
                          cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert answers(proc) == [qa[0][1]]
    assert f"found at {project.resolve() / 'checkpoints' / 'tiny-qwen'}\n" in proc.stderr


# ---------------------------------------------------------------- history, merge

@pytest.fixture(scope="module")
def piped(trained):
    """One conversation through piped stdin on the unquantized base + adapter: q0, q1, /reset, q2."""
    adapter, qa = trained
    lines = [qa[0][0], qa[1][0], "/reset", qa[2][0]]
    proc = chat("--adapter", adapter, "--quantization", "none", "--greedy", "--verbose",
                input="".join(line.replace("\n", " ") + "\n" for line in lines))
    return proc, qa


def test_piped_stdin_keeps_history(piped):
    proc, qa = piped
    got = answers(proc)
    assert len(got) == 3  # one line per user turn, none for /reset
    first, second, after_reset = rendered_prompts(proc.stderr)
    assert qa[0][0] in first and qa[1][0] not in first
    # The second turn sees the first question and the model's own first answer, in order.
    assert second.index(qa[0][0]) < second.index(got[0]) < second.index(qa[1][0])
    assert qa[0][0] not in after_reset and got[0] not in after_reset and qa[2][0] in after_reset
    assert first.count("<|im_start|>user") == 1 and second.count("<|im_start|>user") == 2


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    """{merge_from: dir}: the adapter merged into the original weights and into the de-quantised NF4 ones."""
    adapter, _ = trained
    root = tmp_path_factory.mktemp("merged")
    side_by_side(lambda source: chat("--adapter", adapter, "--merge_to", root / source, "--merge_from", source),
                 ["original", "nf4"])
    assert sorted(p.name for p in root.iterdir()) == ["nf4", "original"]  # temp dirs renamed, nothing left over
    return {p.name: p for p in root.iterdir()}


def merged_answers(model_dir, questions) -> list[str]:
    # No --adapter: the merged dir alone, loaded by AutoModelForCausalLM like any model.
    prompts = [a for q in questions for a in ("--prompt", q)]
    return answers(chat("--model_name_or_path", model_dir, "--greedy", *prompts))


@pytest.fixture(scope="module")
def merged_original_answers(trained, merged) -> list[str]:
    """The model merged into the original weights, asked every question of `trained` (one chat.py run)."""
    _, qa = trained
    return merged_answers(merged["original"], [q for q, _ in qa])


def test_merged_model_answers_like_base_plus_adapter(piped, merged, merged_original_answers):
    proc, _ = piped
    out = merged["original"]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    piped_answers = answers(proc)  # base + adapter, unquantized weights; q0 and q2 start a conversation
    assert [merged_original_answers[i] for i in (0, 2)] == [piped_answers[0], piped_answers[2]]


def test_merge_from_nf4_answers_like_the_4bit_model_it_was_trained_on(trained, merged, merged_original_answers):
    """The adapter was fitted to dequant(NF4(W)); the tiny model's 4-bit rounding is large, so adding it to
    the original W changes answers, while merging into the de-quantised NF4 weights reproduces them all."""
    _, qa = trained
    questions, trained_answers = [q for q, _ in qa], [a for _, a in qa]
    assert merged_answers(merged["nf4"], questions) == trained_answers  # = 4-bit base + adapter (first test)
    assert merged_original_answers != trained_answers


def test_merge_saves_the_base_dtype_and_left_padding(trained, tiny_model_dir, tmp_path):
    """A bf16 base merges into a bf16 model (not an fp32 copy of twice the size), tokenizer padded left."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, _ = trained
    base = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base)
    out = tmp_path / "merged"
    chat("--adapter", adapter, "--model_name_or_path", base, "--ignore_base_mismatch", "--merge_to", out)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoTokenizer.from_pretrained(out).padding_side == "left"


@pytest.mark.gpu
def test_chat_and_nf4_merge_on_cuda(trained, tmp_path):
    """On the GPU: 4-bit NF4 base + adapter with bf16 (fp16 before Ampere) compute answers as trained, and
    --merge_from nf4, quantising on the GPU as training on a GPU does, answers the same."""
    adapter, qa = trained
    prompts = [a for q, _ in qa for a in ("--prompt", q)]
    proc = chat("--adapter", adapter, "--greedy", *prompts)
    assert "(4bit)" in proc.stderr and "on cuda:0" in proc.stderr
    assert answers(proc) == [a for _, a in qa]
    chat("--adapter", adapter, "--merge_to", tmp_path / "merged", "--merge_from", "nf4")
    proc = chat("--model_name_or_path", tmp_path / "merged", "--greedy", *prompts)
    assert "on cuda:0" in proc.stderr and answers(proc) == [a for _, a in qa]


# ---------------------------------------------------------------- a real terminal

def read_until(fd: int, marker: bytes, buffer: bytearray, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while marker not in buffer:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {marker!r} from chat.py within {timeout} s; got {bytes(buffer)[-500:]!r}"
        buffer += os.read(fd, 4096)


def test_terminal_chat_streams_and_ctrl_c_exits_cleanly(trained):
    adapter, qa = trained
    master, slave = pty.openpty()  # stdin/stdout are a terminal: the interactive mode
    proc = subprocess.Popen([sys.executable, str(REPO / CHAT), "--adapter", str(adapter), "--greedy"], cwd=REPO,
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, env={**os.environ, "TERM": "dumb"})
    os.close(slave)
    try:
        out = bytearray()
        read_until(master, b">>> ", out)
        os.write(master, qa[0][0].replace("\n", " ").encode() + b"\n")
        del out[:]
        read_until(master, b">>> ", out)  # the streamed answer, then the next prompt
        assert qa[0][1] in out.decode("utf-8", errors="replace")
        # Ctrl-C at the prompt. A SIGINT that lands between readline printing ">>> " and waiting for
        # input only sets CPython's flag (a readline race, not ours), so repeat it until it is seen.
        for _ in range(12):
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
                break
        assert proc.returncode == 0
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        proc.kill()
        os.close(master)


# ---------------------------------------------------------------- the history window

def test_oldest_turns_are_dropped_to_fit_the_context(tiny_model_dir):
    sys.path.insert(0, str(REPO / "phase2_lora"))
    from chat_session import ChatSession
    from qlora_model import UsageError, load_tokenizer

    logs = []
    session = ChatSession(model=None, tokenizer=load_tokenizer(str(tiny_model_dir)), gen_kwargs={},
                          max_prompt_tokens=0, log=logs.append)
    turns = [("first question", "first answer"), ("second question", "second answer"), ("third", "reply")]
    length = {k: session.encode(session.messages("new question", turns[k:])).shape[1] for k in range(4)}
    assert length[0] > length[1] > length[2] > length[3]

    session.turns, session.max_prompt_tokens = list(turns), length[2]  # room for the newest turn only
    ids = session.build_prompt("new question")
    assert ids.tolist() == session.encode(session.messages("new question", turns[2:])).tolist()
    assert session.turns == turns[2:] and "dropped the 2 oldest turn(s)" in logs[-1]

    session.max_prompt_tokens = length[3] - 1  # not even the new message alone fits
    with pytest.raises(UsageError, match="message too long"):
        session.build_prompt("new question")
    assert session.turns == turns[2:]  # a message that cannot fit leaves the history alone


# ---------------------------------------------------------------- bad input: fast, one line, exit 2

def assert_usage_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    assert proc.stdout == ""


def test_bad_input(trained, tiny_model_dir, tmp_path):
    adapter, _ = trained
    # Checked before torch/transformers/peft are imported: a typo costs milliseconds, not seconds.
    proc = run_script(CHAT, "--adapter", tmp_path / "missing", env={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "json" in imported and not imported & {"torch", "transformers", "peft"}
    assert_usage_error(run_script(CHAT, "--adapter", tmp_path / "missing"), "does not exist")
    assert_usage_error(run_script(CHAT, "--adapter", tiny_model_dir), "not a PEFT adapter", "--model_name_or_path")
    other = tmp_path / "other-model"
    other.mkdir()
    for base in (other, "Qwen/Qwen1.5-1.8B-Chat"):  # a local dir and a hub id that are not the trained base
        assert_usage_error(run_script(CHAT, "--adapter", adapter, "--model_name_or_path", base), "was trained on",
                           "--ignore_base_mismatch")
    (other / "keep.txt").write_text("x")
    assert_usage_error(run_script(CHAT, "--adapter", adapter, "--merge_to", other), "not empty")
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    assert_usage_error(run_script(CHAT, "--model_name_or_path", tiny_model_dir, "--compare"), "needs --adapter")
    for flags in (["--seed", -5], ["--seed", 2**32], ["--repetition_penalty", -1], ["--repetition_penalty", 0]):
        assert_usage_error(run_script(CHAT, "--model_name_or_path", tiny_model_dir, *flags), flags[0], "got")
    # A huge --max_new_tokens passes the flag checks (tests/test_flag_values.py) and is refused in one line once
    # the model's context window is known (after the "loading ..." line)
    proc = run_script(CHAT, "--model_name_or_path", tiny_model_dir, "--max_new_tokens", 10**30, "--prompt", "hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --max_new_tokens 10000"), proc.stderr
