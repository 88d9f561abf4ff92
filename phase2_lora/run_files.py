"""The files a fine-tuning run keeps in its --output_dir, and the checks that protect them.

Shared, byte for byte, by phase2_lora/finetune.py (HF Trainer) and phase3_ddp/finetune_ddp.py (plain DDP loop),
so nothing here knows either trainer or either argument parser: callers pass plain dicts and paths.

    checkpoint-N/           complete checkpoints (a `marker` file inside, written last, says the save finished)
    adapter_config.json     written by peft; records the base model the adapter belongs to
    run_args.json           the run's settings, written at the START, so --resume can refuse changed settings
    loss_curve.png          training (and eval) loss per optimizer step
"""

import hashlib
import json
import os
from pathlib import Path

from model_names import same_base
from qlora_model import UsageError

CHECKPOINT_PREFIX = "checkpoint-"
RUN_ARGS = "run_args.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + os.replace: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from path; a missing file, bad JSON or a non-object raises UsageError naming `what`."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, or bad JSON
        raise UsageError(f"{path} is not a valid {what} ({e}); choose another --output_dir") from e
    if not isinstance(obj, dict):
        raise UsageError(f"{path} is not a valid {what} (a JSON object expected); choose another --output_dir")
    return obj


# ---------------------------------------------------------------- checkpoints

def latest_checkpoint(output_dir: Path, marker: str = "trainer_state.json") -> Path | None:
    """Newest complete checkpoint-N in output_dir (N compared as a number), or None. A checkpoint counts as
    complete when its `marker` file exists: savers write it last, so a save cut short is skipped."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    done = [d for d in out.glob(CHECKPOINT_PREFIX + "*")
            if d.name[len(CHECKPOINT_PREFIX):].isdigit() and (d / marker).is_file()]
    return max(done, key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):]), default=None)


def adapter_base(adapter_config: Path) -> str:
    """The base model an adapter_config.json was trained on ("" when it does not say)."""
    return str(read_json(adapter_config, "adapter config").get("base_model_name_or_path") or "")


def check_output_dir(output_dir: Path, model_name_or_path: str, resume: bool,
                     marker: str = "trainer_state.json") -> Path | None:
    """Refuse to mix adapters of different base models in one directory (model_names.same_base decides what
    counts as the same model) and to silently build on an old run's checkpoints without --resume.
    Returns the checkpoint to resume from; None means start from scratch."""
    out = Path(output_dir)
    for cfg in [out / "adapter_config.json", *sorted(out.glob(CHECKPOINT_PREFIX + "*/adapter_config.json"))]:
        if cfg.is_file() and not same_base(base := adapter_base(cfg), str(model_name_or_path)):
            raise UsageError(f"{cfg} holds an adapter of base model {base!r}, not {str(model_name_or_path)!r}; "
                             f"choose another --output_dir")
    ckpt = latest_checkpoint(out, marker)
    if ckpt and not resume:
        raise UsageError(f"{out} already holds checkpoints ({ckpt.name}); pass --resume to continue, "
                         f"or choose another --output_dir")
    if resume and ckpt is None:
        print(f"--resume: no checkpoint in {out}, starting from scratch")
    return ckpt


# ---------------------------------------------------------------- run arguments

def write_run_args(output_dir: Path, args: dict) -> Path:
    """Record the run's settings as output_dir/run_args.json (atomically); returns the path."""
    path = Path(output_dir) / RUN_ARGS
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(args, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


# Settings recorded beside the flags, derived from them and from the environment. A changed flag that explains
# them is named instead (a new --data_path changes the hash, a new --batch_size the global micro-batch).
DERIVED_SETTINGS = {"data_sha256": "the content of the --data_path files (sha256)",
                    "global_micro_batch": "the sequences per micro-batch on all ranks together (batch_size x ranks)"}
# A flag whose change does not matter while the setting it names is unchanged: data files moved or renamed but
# with the same bytes are the same data.
SAME_WHEN_EQUAL = {"data_path": "data_sha256"}
UNORDERED = {"target_modules"}  # lists compared as sets: `q_proj v_proj` is `v_proj q_proj`


def check_resume_args(output_dir: Path, args: dict, keys) -> None:
    """Raise UsageError when resuming would train the saved checkpoints on different settings: every key in
    `keys` (flag names without the dashes) whose value in args differs from the one recorded in run_args.json
    is named with its old and new value. Settings not in keys (how long to train, logging) may change.
    A run_args.json written before a key existed does not hold it; such keys are not compared."""
    path = Path(output_dir) / RUN_ARGS
    if not path.is_file():
        print(f"--resume: {path} not found; cannot check that the settings match the checkpoints")
        return
    old = read_json(path, "run_args.json")

    def same(key: str) -> bool:
        if key in SAME_WHEN_EQUAL and SAME_WHEN_EQUAL[key] in old and same(SAME_WHEN_EQUAL[key]):
            return True
        return _comparable(old[key], key) == _comparable(args.get(key), key)
    differ = [k for k in keys if k in old and not same(k)]
    changed = [f"--{k} {_show(old[k])} -> {_show(args.get(k))}" for k in differ if k not in DERIVED_SETTINGS]
    if not changed:  # no flag changed, yet the data files' content or the number of ranks did
        changed = [f"{DERIVED_SETTINGS[k]} {_show(old[k])} -> {_show(args.get(k))}" for k in differ]
    if changed:
        raise UsageError(f"--resume with settings that differ from the checkpoints' ({path}): {'; '.join(changed)}. "
                         f"Resume with the old values, or choose another --output_dir")


def data_fingerprint(paths) -> str:
    """SHA-256 (first 16 hex digits) over the data files' bytes, in order. --resume compares it: a data file edited
    in place is a different data set, which comparing paths alone would not notice."""
    digest = hashlib.sha256()
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"data file not found: {path} (download it as described in data/README.md, "
                             f"or pass another --data_path)")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):  # 1 MiB at a time: the 52k-record file is 22 MB
                digest.update(block)
    return digest.hexdigest()[:16]


def _comparable(value, key: str = ""):
    # run_args.json round-trips through JSON: tuples come back as lists, paths as strings.
    value = json.loads(json.dumps(value, default=str))
    return sorted(value) if key in UNORDERED and isinstance(value, list) else value


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


# ---------------------------------------------------------------- loss curve

def save_loss_curve(log_history: list[dict], path: Path, title: str = "LoRA fine-tuning") -> None:
    """Plot training loss ("loss" entries) and eval loss ("eval_loss") against "step" into a PNG (atomically)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed, and none is available on a training server
    import matplotlib.pyplot as plt
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, label=label)
    ax.set(xlabel="optimizer step", ylabel="loss (mean over answer tokens)", title=title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keep the suffix: matplotlib picks the format by it
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
