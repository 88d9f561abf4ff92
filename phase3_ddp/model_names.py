"""When do two spellings name the same base model? Shared by finetune.py (refuse to mix adapters of different
bases in one output_dir) and chat.py (refuse an adapter on the wrong base). Standard library only, so chat.py can
check its arguments before importing torch."""

from pathlib import Path


def same_base(recorded: str, given: str) -> bool:
    """Whether two spellings name one base model. Two local dirs: the same resolved path. Two hub ids:
    equal ignoring case (the hub is case-insensitive). A hub id and a local dir: the same last
    component, i.e. a download of that model (Qwen/Qwen1.5-1.8B-Chat ~ ~/models/Qwen1.5-1.8B-Chat)."""
    a, b = Path(recorded).expanduser(), Path(given).expanduser()
    if a.is_dir() and b.is_dir():
        return a.resolve() == b.resolve()
    if not a.is_dir() and not b.is_dir():
        return recorded.strip("/").lower() == given.strip("/").lower()
    return a.name.lower() == b.name.lower()
