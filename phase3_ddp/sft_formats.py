"""Instruction and chat data files -> validated chat messages, one list of {role, content} per record.

Each file (a JSON list, or JSONL: one object per line) is one format, detected from its records:
  Alpaca    {"instruction", "input" (optional), "output", "history" (optional [[user, assistant], ...]),
             "system" (optional)}
  messages  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}   (OpenAI)
            an assistant message may carry "weight": 0 (kept as context, not trained on) or 1 (the default)
  ShareGPT  {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}
messages and ShareGPT records may also carry a top-level "system" string (LLaMA-Factory's layout): it becomes
the system turn. A record's own system prompt wins over --system, which is the default for records without one.
A usable conversation is an optional system message, then user and assistant turns alternating, ending with
an answer. Anything else is reported by file and record index and skipped (or stops the run with --strict).
"""

import json
from pathlib import Path

from qlora_model import UsageError

NO_OUTPUT = "<nooutput>"  # Alpaca marks instructions it could not answer (e.g. "draw a picture") this way
FORMAT_KEYS = {"alpaca": "instruction", "messages": "messages", "sharegpt": "conversations"}  # the key that tells
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def read_json_records(path: str | Path) -> list:
    """All records of one file: a JSON list, or JSONL (one object per line).
    Bad JSON raises UsageError naming the line and column; we parse with `json` ourselves because
    the `datasets` JSON reader reports pyarrow errors without a position."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file not found: {path} (download it as described in data/README.md, "
                         f"or pass another --data_path)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from e
    stripped = text.lstrip()
    if not stripped:
        raise UsageError(f"{path} is empty; expected a JSON list or JSONL of records")
    if stripped[0] == "[":  # one JSON document holding a list
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"bad JSON in {path} at line {e.lineno}, column {e.colno}: {e.msg}") from e
        if not isinstance(records, list):
            raise UsageError(f"{path} must hold a JSON list of records")
        return records
    records = []  # JSONL: every non-blank line is one JSON object
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UsageError(f"bad JSON in {path} at line {lineno}, column {e.colno}: {e.msg}") from e
    return records


def detect_format(records: list, path) -> str:
    """"alpaca", "messages" or "sharegpt": decided per file by the first object carrying a telltale key."""
    for rec in records:
        for fmt, key in FORMAT_KEYS.items():
            if isinstance(rec, dict) and key in rec:
                return fmt
    raise UsageError(f"cannot tell the format of {path}: expected records with 'instruction' and 'output' (Alpaca), "
                     f"'messages' (OpenAI: role/content) or 'conversations' (ShareGPT: from/value)")


def build_messages(rec: dict, system: str | None = None) -> list[dict]:
    """Validated Alpaca record -> chat messages: optional system, the `history` pairs, then instruction
    (+ a blank line + input) as the user turn and output as the answer."""
    system = rec.get("system") or system
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in rec.get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def alpaca_problem(rec: dict) -> str | None:
    """Why an Alpaca record is unusable, or None. `input`, `system` and `history` are optional."""
    for key in ("instruction", "output"):
        if key not in rec or rec[key] is None:
            return f"missing field {key!r}"
    for key in ("instruction", "input", "output", "system"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            return f"field {key!r} is {type(rec[key]).__name__}, expected a string"
    for key in ("instruction", "output"):
        if not rec[key].strip():
            return f"empty field {key!r}"
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(isinstance(p, list) and len(p) == 2 for p in history):
        return "field 'history' must be a list of [user, assistant] pairs"
    return None


def to_messages(rec, fmt: str, system: str | None) -> tuple[list[dict] | None, str | None]:
    """(chat messages, None) for a usable record of format fmt, else (None, why not)."""
    if not isinstance(rec, dict):
        return None, f"expected an object, got {type(rec).__name__}"
    if fmt == "alpaca":
        problem = alpaca_problem(rec)
        return (None, problem) if problem else (build_messages(rec, system), None)
    messages, problem = chat_turns(rec, fmt, system)
    problem = problem or conversation_problem(messages, fmt)
    if problem:
        return None, problem
    for m in messages:  # weight 1 is the default: only an untrained answer keeps the key
        if m.pop("weight", 1) == 0:
            m["weight"] = 0
    return messages, None


def chat_turns(rec: dict, fmt: str, system: str | None) -> tuple[list[dict] | None, str | None]:
    """The turns of a messages or ShareGPT record as {role, content[, weight]}, system turn first when there
    is one (the record's own, its top-level `system` field, else --system), or (None, why not)."""
    key = FORMAT_KEYS[fmt]
    turns = rec.get(key)
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None, f"field {key!r} must be a list of objects"
    if fmt == "messages":  # OpenAI fine-tuning format: `weight` is kept for conversation_problem to check
        messages = [{"role": t.get("role"), "content": t.get("content"),
                     **({"weight": t["weight"]} if "weight" in t else {})} for t in turns]
    else:  # ShareGPT speaker names -> chat roles; unknown names stay as they are and fail below
        messages = [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
                    for t in turns]
    own = rec.get("system")
    if own is not None and not isinstance(own, str):
        return None, f"field 'system' is {type(own).__name__}, expected a string"
    has_turn = bool(messages) and messages[0]["role"] == "system"
    if own and has_turn and own != messages[0]["content"]:
        return None, "both a top-level 'system' field and a system turn, with different texts; keep one"
    if (own or system) and not has_turn:  # the record's own system wins over --system
        messages.insert(0, {"role": "system", "content": own or system})
    return messages, None


def conversation_problem(messages: list[dict], fmt: str) -> str | None:
    """Why normalised messages don't form [system] user, assistant, user, assistant, ..., or None."""
    roles = ("human", "gpt", "system") if fmt == "sharegpt" else ("system", "user", "assistant")
    expected = "user"
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant"):
            return f"message {i} has unknown role {m['role']!r} (expected {', '.join(roles)})"
        if not isinstance(m["content"], str):
            return f"message {i} ({m['role']}) content is {type(m['content']).__name__}, expected a string"
        if not m["content"].strip() and m["role"] != "system":
            return f"message {i} ({m['role']}) is empty"
        if "weight" in m and (m["role"] != "assistant" or isinstance(m["weight"], bool) or m["weight"] not in (0, 1)):
            return (f"message {i} ({m['role']}) has weight {m['weight']!r}; only assistant messages take a weight, "
                    f"0 (not trained on) or 1 (trained on)")
        if m["role"] == "system" and i == 0:
            continue
        if m["role"] != expected:
            return f"turns don't alternate: message {i} is {m['role']!r}, expected {expected!r}"
        expected = "assistant" if expected == "user" else "user"
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        return "no assistant turn to learn from"
    if not any(m.get("weight", 1) for m in answers):
        return "every assistant turn has weight 0: nothing to learn from"
    if expected == "assistant":
        return f"ends with an unanswered user turn (message {len(messages) - 1})"
    return None


def load_conversations(paths, system: str | None = None, strict: bool = False,
                       log=print) -> tuple[list[list[dict]], dict]:
    """Chat messages of every usable record of all files, in file order, plus counts. Invalid records are
    reported by file and index and skipped (strict=True: UsageError instead); Alpaca <nooutput> is dropped."""
    conversations, stats, shown = [], {"read": 0, "invalid": 0, "nooutput": 0}, 0
    for path in paths:
        records = read_json_records(path)
        fmt = detect_format(records, path)
        stats.setdefault("formats", {})[str(path)] = fmt
        for index, rec in enumerate(records):
            stats["read"] += 1
            messages, problem = to_messages(rec, fmt, system)
            if problem:
                if strict:
                    raise UsageError(f"{path} record {index}: {problem} (drop --strict to skip such records)")
                stats["invalid"] += 1
                if shown < 5:  # a few examples, then only the count: 52k-record files can have many
                    log(f"warning: skipping {path} record {index} ({fmt}): {problem}")
                    shown += 1
            elif fmt == "alpaca" and rec["output"].strip() == NO_OUTPUT:
                stats["nooutput"] += 1
            else:
                conversations.append(messages)
    return conversations, stats
