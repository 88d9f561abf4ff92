"""Chat with a base model plus its LoRA adapter: streaming multi-turn chat in the terminal, scripted
answers, a before/after comparison, and merging the adapter into a standalone model.

    python phase2_lora/chat.py --adapter checkpoints/qwen1.5-1.8b-lora                   # interactive
    python phase2_lora/chat.py --adapter DIR --greedy --prompt "你是谁？" --prompt "..."   # scripted
    printf '你好\\n我刚才说了什么？\\n' | python phase2_lora/chat.py --adapter DIR          # piped turns
    python phase2_lora/chat.py --adapter DIR --compare --prompt "你是谁？"                 # before/after
    python phase2_lora/chat.py --adapter DIR --merge_to checkpoints/qwen1.5-1.8b-merged [--merge_from nf4]

stdout carries only answers; logs and errors go to stderr.
  interactive (stdin is a terminal): answers stream token by token; /reset, /system TEXT, /exit;
    Ctrl-C stops the answer being generated, Ctrl-C at the prompt or Ctrl-D exits.
  --prompt (repeatable): each prompt is a fresh one-turn chat; one line per answer on stdout,
    JSON-encoded (json.loads(line) gives the answer; newlines inside an answer are "\\n").
  piped stdin: every line is the next user turn of ONE conversation (history kept, /commands work);
    one JSON line per answer, as for --prompt.
  --compare: per prompt (one-turn, from --prompt or stdin lines), a Markdown table row
    | prompt | base model | base + LoRA |, the base answer generated with the adapter disabled.
"""

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from model_names import add_hub_flag, resolve_model, same_base

QUANTIZATIONS = ("4bit", "8bit", "none")  # qlora_model.QUANTIZATIONS, not imported: it would pull in torch
MERGE_FROM = ("original", "nf4")
COMMANDS = "/reset (clear the history), /system TEXT (set the system prompt; /system alone removes it), /exit"
MIN_TEMPERATURE = 1e-5  # below it logits / temperature overflows float32: sampling that cold is greedy (as in vLLM)


class OneLineArgumentParser(argparse.ArgumentParser):
    """A bad flag value (--max_new_tokens inf, --seed x) gets one line, `error: ... (see --help)`, and exit 2,
    like every other bad input: no usage block. Every phase-2 script with flags uses it."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose and load the model: shared by chat.py and serve.py."""
    p.add_argument("--adapter", type=Path, default=None,
                   help="LoRA adapter dir written by finetune.py; omit it to chat with the base model alone")
    p.add_argument("--model_name_or_path", default=None,
                   help="base model (hub id or local dir; a dir written by --merge_to needs no --adapter); "
                        "default: base_model_name_or_path of the adapter's adapter_config.json")
    add_hub_flag(p)
    p.add_argument("--ignore_base_mismatch", action="store_true",
                   help="use --model_name_or_path even if the adapter records another base (e.g. a renamed copy)")
    p.add_argument("--quantization", choices=["auto", *QUANTIZATIONS], default="auto",
                   help="base weights. auto: what the adapter was trained with (its run_args.json), else 4bit "
                        "(NF4) on a GPU and none (fp32) on CPU, where 4bit works but is slower")
    p.add_argument("--trust_remote_code", action="store_true", help="run modelling code shipped with the model")
    p.add_argument("--max_context", type=int, default=4096,
                   help="context window in tokens, capped at the model's max_position_embeddings (default: "
                        "%(default)s). Qwen1.5-1.8B's fp16 KV cache takes 192 KiB per token: 0.75 GiB at 4,096 "
                        "tokens fits beside the 4-bit model on an 8 GB card, the model's full 32,768 (6 GiB) does not")
    p.add_argument("--system", default=None,
                   help="system prompt (default: the one the adapter was trained with, else the chat template's own)")
    p.add_argument("--verbose", action="store_true",
                   help="log each rendered prompt (template + kept history) and tokens/s to stderr")
    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=int, default=512, help="answer length cap (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.7, help="softmax temperature (default: %(default)s)")
    g.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument("--top_k", type=int, default=20, help="sample among the k likeliest tokens (default: %(default)s)")
    g.add_argument("--repetition_penalty", type=float, default=None,
                   help="default 1.05 when sampling, 1.0 (none) with --greedy")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (deterministic); ignores temperature/top_p/k")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--prompt", action="append", default=[], help="ask this and exit; repeatable")
    p.add_argument("--compare", action="store_true", help="answer each prompt with and without the adapter")
    p.add_argument("--merge_to", type=Path, default=None,
                   help="merge the adapter into the base, save the standalone model (in the base's own dtype, "
                        "tokenizer padding left for batched generation) to this new dir, exit")
    p.add_argument("--merge_from", choices=MERGE_FROM, default="original",
                   help="weights --merge_to adds the LoRA update to. original (default): the base's own (bf16 for "
                        "Qwen1.5). nf4: the de-quantised NF4 weights a 4-bit (QLoRA) adapter was trained against, "
                        "so the merged model answers exactly like 4-bit base + adapter")
    p.add_argument("--seed", type=int, default=0, help="each answer is sampled from this seed (default: %(default)s)")
    return p.parse_args(argv)


def die(message: str):
    """Bad input: one line on stderr and exit code 2, like argparse's own errors."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def progress(items, desc: str, total: int | None = None):
    """Iterate `items` and show how far along: a tqdm bar on a terminal; in a log file (stderr not a TTY) plain
    lines, no carriage returns, about every 10% and at least every 30 s (evaluate.py, compare_methods.py)."""
    total = len(items) if total is None else total
    if sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if i % max(1, total // 10) == 0 or i == total or now - last > 30:
            log(f"{desc}: {i}/{total} ({100 * i // max(total, 1)}%), {now - start:.0f} s")
            last = now


# ---------------------------------------------------------------- cheap checks, before loading anything

def read_adapter_config(adapter: Path) -> dict:
    if not adapter.is_dir():
        what = "is a file, not a directory" if adapter.exists() else "does not exist"
        die(f"adapter directory {adapter} {what}; pass the --output_dir of finetune.py")
    if not (adapter / "adapter_config.json").is_file():
        hint = (f"; it looks like a full model: chat with it via --model_name_or_path {adapter}"
                if (adapter / "config.json").is_file() else "; pass the --output_dir of finetune.py")
        die(f"{adapter} is not a PEFT adapter (no adapter_config.json){hint}")
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        die(f"{adapter} has adapter_config.json but no adapter_model.safetensors; did training finish?")
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        die(f"{adapter}/adapter_config.json is not valid JSON ({e})")
    if not isinstance(config, dict):
        die(f"{adapter}/adapter_config.json must hold a JSON object")
    return config


def apply_training_defaults(args) -> None:
    """Chat the way the adapter was trained: finetune.py's run_args.json gives the base weights'
    quantization (for --quantization auto) and the system prompt (unless --system is given)."""
    try:
        run_args = json.loads((args.adapter / "run_args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no run_args.json (an adapter from elsewhere): device defaults
        run_args = {}
    trained = run_args.get("quantization") if isinstance(run_args, dict) else None
    args.trained_quantization = trained if trained in QUANTIZATIONS else None
    if args.system is None and isinstance(run_args, dict) and isinstance(run_args.get("system"), str):
        args.system = run_args["system"] or None
        if args.system:
            log(f"system prompt from {args.adapter}/run_args.json: {args.system!r}")


def recorded_base(recorded: str, adapter: Path) -> str:
    """The base model adapter_config.json names, as a path that works from here. finetune.py records what it was
    given: a hub id, or a local dir relative to the folder training ran in (checkpoints/tiny-qwen). Run from
    another folder, such a dir is looked up beside the adapter and in each folder above it, where training ran."""
    path = Path(recorded).expanduser()
    if path.is_absolute() or path.is_dir():
        return recorded
    for folder in (adapter.resolve(), *adapter.resolve().parents):
        if (folder / path / "config.json").is_file():
            log(f"base model {recorded} (relative, from {adapter}/adapter_config.json) found at {folder / path}")
            return str(folder / path)
    return recorded  # a hub id, or a dir that is gone: loading says which


def resolve_base(args) -> str:
    """The base model to load; exits with code 2 on a bad adapter or a base mismatch."""
    args.trained_quantization = None
    if args.adapter is None:
        if args.model_name_or_path is None:
            die("pass --adapter DIR (base model read from it) and/or --model_name_or_path MODEL")
        return args.model_name_or_path
    recorded = read_adapter_config(args.adapter).get("base_model_name_or_path")
    if recorded and isinstance(recorded, str):
        recorded = recorded_base(recorded, args.adapter)
    apply_training_defaults(args)
    if args.model_name_or_path is None:
        if not recorded:
            die(f"{args.adapter}/adapter_config.json names no base model; pass --model_name_or_path")
        return recorded
    if recorded and not args.ignore_base_mismatch and not same_base(recorded, args.model_name_or_path):
        die(f"adapter {args.adapter} was trained on {recorded}, not {args.model_name_or_path}; drop "
            f"--model_name_or_path, or add --ignore_base_mismatch if it is a copy of the same model")
    return args.model_name_or_path


def check_model_args(args) -> str:
    """Validate the model and generation flags (chat.py and serve.py) before torch/transformers/peft load.
    Returns the base model."""
    base = resolve_base(args)
    for name in ("max_new_tokens", "max_context", "top_k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            die(f"--{name} must be >= 1, got {getattr(args, name)}")
    # Written so that nan fails too (every comparison with nan is False); a huge temperature is just uniform sampling
    if not (MIN_TEMPERATURE <= args.temperature < math.inf and 0 < args.top_p <= 1):
        die(f"need {MIN_TEMPERATURE:g} <= --temperature < inf and 0 < --top_p <= 1, got {args.temperature} and "
            f"{args.top_p} (for deterministic answers leave them and add --greedy)")
    if args.repetition_penalty is not None and not 0.01 <= args.repetition_penalty <= 100:
        die(f"--repetition_penalty must be in [0.01, 100] (1.0: none, above 1 discourages repeats), got "
            f"{args.repetition_penalty}")
    return base


def check_args(args) -> str:
    """Validate flags and paths (milliseconds) before torch/transformers/peft load (seconds). Returns the base."""
    base = check_model_args(args)
    if not 0 <= args.seed < 2**32:  # numpy's seed range; transformers' set_seed seeds numpy too
        die(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
    if (args.compare or args.merge_to) and args.adapter is None:
        die(f"--{'compare' if args.compare else 'merge_to'} needs --adapter")
    if args.merge_to is not None:
        if args.prompt or args.compare:
            die("--merge_to only merges; chat with the result via --model_name_or_path DIR afterwards")
        if args.merge_to.exists() and (not args.merge_to.is_dir() or any(args.merge_to.iterdir())):
            die(f"--merge_to {args.merge_to} already exists and is not empty; remove it or pick a new dir")
        if args.merge_from == "nf4" and args.trained_quantization not in (None, "4bit"):
            die(f"--merge_from nf4 recreates 4-bit training weights, but {args.adapter} was trained with "
                f"--quantization {args.trained_quantization}; use --merge_from original")
    return base


# ---------------------------------------------------------------- the three ways to talk

def answer_line(answer: str) -> str:
    return json.dumps(answer, ensure_ascii=False)  # one line whatever the answer holds; Chinese stays readable


def table_cell(text: str) -> str:
    # Every line boundary (also \r, \x0b, \x1c, \u2028 ...) becomes <br>, so one row stays one line; other
    # control characters (an untrained model emits raw bytes such as \x00) become U+FFFD, as undecodable bytes do.
    lines = text.replace("\\", "\\\\").replace("|", "\\|").splitlines()
    return "<br>".join("".join("\ufffd" if ord(c) < 32 or ord(c) == 127 else c for c in line) for line in lines)


def run_command(session, line: str) -> bool:
    """Handle a /command; False means exit."""
    command, _, rest = line.partition(" ")
    if command == "/exit":
        return False
    if command == "/reset":
        session.reset()
        log("(history cleared)")
    elif command == "/system":
        session.system = rest.strip() or None
        log(f"(system prompt: {session.system!r})")
    else:
        log(f"unknown command {command}; commands: {COMMANDS}")
    return True


def reply_or_skip(session, line: str, **kwargs) -> str | None:
    """The answer, or None after logging why the message was skipped (it alone overflows the context)."""
    from qlora_model import UsageError  # main() has imported it already; kept out of the fast startup path

    try:
        return session.reply(line, **kwargs)
    except UsageError as e:
        log(f"error: {e}")
        return None


def user_turns(session, lines):
    """The user turns among `lines`: blank lines are skipped, /commands are run here, /exit ends the stream."""
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not run_command(session, line):
                return
            continue
        yield line


def terminal_lines():
    """Lines typed at the >>> prompt, until Ctrl-D or Ctrl-C there (both leave cleanly)."""
    while True:
        try:
            yield input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return


def chat_interactive(session) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input(); absent on Windows)
    log(f"chat started; commands: {COMMANDS}; Ctrl-C stops an answer, Ctrl-D exits")
    for line in user_turns(session, terminal_lines()):
        try:
            if reply_or_skip(session, line, on_text=lambda piece: print(piece, end="", flush=True)) is not None:
                print()
        except KeyboardInterrupt:
            log("\n(answer interrupted; it is not kept in the history)")


def chat_lines(session, lines) -> None:
    """Piped stdin: each line is the next user turn of one conversation; one JSON line per turn,
    `null` for a turn skipped because it did not fit the context window (the error goes to stderr)."""
    for line in user_turns(session, lines):
        print(answer_line(reply_or_skip(session, line)), flush=True)


def answer_prompts(session, prompts: list[str]) -> None:
    for i, prompt in enumerate(prompts, 1):
        log(f"[{i}/{len(prompts)}] {prompt}")
        session.reset()  # each --prompt is a fresh one-turn chat
        print(answer_line(session.reply(prompt)), flush=True)


def compare(session, prompts) -> None:
    print("| prompt | base model | base + LoRA |\n|---|---|---|", flush=True)
    for prompt in prompts:
        prompt = prompt.strip()
        if not prompt:
            continue
        answers = []
        for adapter in (False, True):
            session.reset()
            answers.append(session.reply(prompt, adapter=adapter))
        print("| " + " | ".join(table_cell(t) for t in (prompt, *answers)) + " |", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    base = check_args(args)

    # Heavy imports only now: a typo in a path costs milliseconds, not the ~10 s of importing torch + peft.
    from chat_session import merge_adapter, open_session
    from qlora_model import UsageError

    try:
        base = resolve_model(base, args.hub, UsageError)  # --hub modelscope: download, then load the folder
        if args.merge_to is not None:
            merge_adapter(base, args.adapter, args.merge_to, args.trust_remote_code, args.merge_from, log=log)
            return 0
        session = open_session(args, base, log=log)
        if args.compare:
            compare(session, args.prompt or sys.stdin)
        elif args.prompt:
            answer_prompts(session, args.prompt)
        elif sys.stdin.isatty():
            chat_interactive(session)
        else:
            chat_lines(session, sys.stdin)
    except UsageError as e:
        die(str(e))
    except KeyboardInterrupt:  # Ctrl-C while loading or in a scripted run: no traceback
        log("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
