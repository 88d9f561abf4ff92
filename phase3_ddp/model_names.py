"""Model names: where a model id is fetched from (--hub), and when two spellings name the same base model.

Shared by finetune.py and finetune_ddp.py (resolve the model; refuse to mix adapters of different bases in one
output_dir) and chat.py, serve.py, evaluate.py (resolve the model; refuse an adapter on the wrong base). Standard
library only, so chat.py can check its arguments before importing torch; modelscope is imported only when a
download from ModelScope is asked for.

    --hub huggingface   the default: transformers downloads hub ids itself, from HF_ENDPOINT when that is set
                        (a mirror, e.g. HF_ENDPOINT=https://hf-mirror.com)
    --hub modelscope    hub ids are downloaded from ModelScope (modelscope.cn, fast in China) into its cache and
                        loaded from there; USE_MODELSCOPE_HUB=1 makes it the default, as in LLaMA-Factory
"""

import argparse
import os
import re
from pathlib import Path

HUBS = ("huggingface", "modelscope")
HUB_ENV = "USE_MODELSCOPE_HUB"  # LLaMA-Factory's switch; 1, true or y turn it on
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name: the only shape a hub id has on either hub


def default_hub(environ=os.environ) -> str:
    """--hub's default: modelscope when USE_MODELSCOPE_HUB is 1 / true / y, else huggingface."""
    return "modelscope" if environ.get(HUB_ENV, "").strip().lower() in ("1", "true", "y") else "huggingface"


def add_hub_flag(p: argparse.ArgumentParser) -> None:
    """--hub, for every script that takes --model_name_or_path."""
    p.add_argument("--hub", choices=HUBS, default=default_hub(),
                   help=f"where a hub id in --model_name_or_path is downloaded from (local directories are loaded "
                        f"as they are): huggingface (set HF_ENDPOINT=https://hf-mirror.com for a mirror) or "
                        f"modelscope (pip install modelscope; {HUB_ENV}=1 makes it the default). "
                        f"Default here: %(default)s")


def modelscope_id(model_id: str) -> str:
    """ModelScope's id for a Hugging Face id. Qwen1.5 was published on ModelScope under the organisation `qwen`,
    lowercase (Qwen1.5's README: snapshot_download('qwen/Qwen1.5-7B-Chat')); other ids read the same on both."""
    owner, _, name = model_id.partition("/")
    return f"qwen/{name}" if owner == "Qwen" and name.startswith("Qwen1.5-") else model_id


def resolve_model(name_or_path: str, hub: str, error: type[Exception]) -> str:
    """What from_pretrained should load, for a --model_name_or_path and a --hub. A local directory, or anything
    that is not an owner/name hub id, is returned as it is (the loader reports a path that does not exist); so is
    every hub id with hub="huggingface" (transformers downloads it, honouring HF_ENDPOINT). With hub="modelscope"
    a hub id is downloaded by modelscope.snapshot_download (a second run finds it cached) and its local folder
    is returned. Failures raise `error` (the calling script's UsageError) with one line: modelscope missing
    (how to install it), or the download failing (the id and the cause)."""
    if hub not in HUBS:
        raise error(f"--hub must be one of {', '.join(HUBS)}, got {hub!r}")
    if hub == "huggingface" or Path(name_or_path).expanduser().is_dir() or not HUB_ID.fullmatch(name_or_path):
        return name_or_path
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name == "modelscope"  # not one of its dependencies
        how = "pip install modelscope" if missing else f"it is installed but fails to import ({e}); reinstall it"
        raise error(f"downloading {name_or_path} from ModelScope (--hub modelscope or {HUB_ENV}=1) needs the "
                    f"modelscope package: {how} (or use --hub huggingface, with HF_ENDPOINT=https://hf-mirror.com "
                    f"for a mirror)") from None
    model_id = modelscope_id(name_or_path)
    try:
        return str(snapshot_download(model_id))
    except Exception as e:  # the library's own errors (unknown id, no network, full disk): one line, no traceback
        cause = (str(e).strip().splitlines() or [""])[0]
        raise error(f"cannot download {model_id} from ModelScope ({type(e).__name__}: {cause}); check the id at "
                    f"https://modelscope.cn/models/{model_id} and the network, or pass a local directory") from e


def model_name(name_or_path: str) -> str:
    """The model's own name in a hub id or a local directory: Qwen1.5-1.8B-Chat for Qwen/Qwen1.5-1.8B-Chat,
    ~/models/Qwen1.5-1.8B-Chat and the folders the hub libraries download into:
      Hugging Face:            .../models--Qwen--Qwen1.5-1.8B-Chat/snapshots/<commit>
      ModelScope (>= 1.38):    .../models/qwen--Qwen1.5-1.8B-Chat/snapshots/master
      ModelScope (older):      .../models/qwen/Qwen1___5-1___8B-Chat   (each "." written as "___")"""
    path = Path(name_or_path.rstrip("/\\"))
    if path.parent.name == "snapshots":  # <repo folder>/snapshots/<revision>: the repo folder is owner--name
        return path.parent.parent.name.rsplit("--", 1)[-1]
    if path.parent.parent.name == "models":  # ModelScope's older layout: models/<owner>/<name with ___>
        return path.name.replace("___", ".")
    return path.name


def same_base(recorded: str, given: str) -> bool:
    """Whether two spellings name one base model. Two local dirs: the same resolved path. Two hub ids: equal
    ignoring case (both hubs are case-insensitive; ModelScope's qwen/ is Hugging Face's Qwen/). Otherwise (a hub
    id and a local dir, e.g. a download of it in a hub cache, or a path from another machine): the same
    model_name, so Qwen/Qwen1.5-1.8B-Chat ~ ~/models/Qwen1.5-1.8B-Chat ~ ModelScope's download of it."""
    a, b = Path(recorded).expanduser(), Path(given).expanduser()
    if a.is_dir() and b.is_dir():
        return a.resolve() == b.resolve()
    if not a.is_dir() and not b.is_dir() and HUB_ID.fullmatch(recorded) and HUB_ID.fullmatch(given):
        return recorded.lower() == given.lower()
    return model_name(recorded).lower() == model_name(given).lower()
