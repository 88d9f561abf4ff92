"""The chat grader's observer (test_grade_chat_minimal.py), imported by hooked_run.py before the graded script. It
appends one JSON line per observation to $GRADER_RECORD, in the order they happen:
  write     each sys.stdout.write(text): the text;
  flush     each sys.stdout.flush(): streamed text is flushed while the answer is still being written;
  generate  each model.generate() call: the prompt's token ids (first row).
Nothing is changed: stdout still gets every write, and generate returns what the original returns."""

import json
import os
import sys
import threading

from transformers.generation.utils import GenerationMixin

_lock = threading.Lock()  # TextIteratorStreamer: generate() runs in a thread while the main thread prints
_record = open(os.environ["GRADER_RECORD"], "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)


def record(event: str, value) -> None:
    with _lock:
        _record.write(json.dumps({"event": event, "value": value}, ensure_ascii=False) + "\n")
        _record.flush()


class RecordedStdout:
    """sys.stdout, with every write and flush recorded first."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        record("write", text)
        return self._stream.write(text)

    def flush(self):
        record("flush", None)
        return self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


sys.stdout = RecordedStdout(sys.stdout)
_generate = GenerationMixin.generate


def generate(self, *args, **kwargs):
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a whole BatchEncoding passed as `inputs`
    record("generate", None if ids is None else [int(i) for i in ids[0]])
    return _generate(self, *args, **kwargs)


GenerationMixin.generate = generate
