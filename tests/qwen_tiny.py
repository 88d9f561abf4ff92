"""The tiny Qwen2 with Qwen's real tokenizer (`make_tiny_model.py --tokenizer qwen`), built once per test process
and shared by the test modules that import it (151,646 tokens, 151,936 embedding rows, a 64-wide random body)."""

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from conftest import run_script


@functools.cache
def qwen_model_dir(variant: str = "chat") -> Path:
    """Path of the model folder; built on the first call (a few seconds), removed when the test process exits."""
    out = Path(tempfile.mkdtemp(prefix=f"tiny-qwen-real-{variant}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    proc = run_script("phase2_lora/make_tiny_model.py", "--tokenizer", "qwen", "--variant", variant,
                      "--output_dir", out / "model")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "model"
