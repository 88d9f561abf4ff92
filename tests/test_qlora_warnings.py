"""qlora_model (both phases import it) silences two harmless messages that every 4-bit or CPU run printed, and only
those: bitsandbytes' failed fetch of a hub CPU kernel, and transformers' FutureWarning about the
`is_gradient_checkpointing` name that peft reads."""

import subprocess
import sys

from conftest import REPO

NOISY = ("Failed to load CPU gemm_4bit_forward from kernels-community", "`is_gradient_checkpointing` is deprecated")

# A fresh process, as a user's run: qlora_model first, then bitsandbytes' CPU backend runs its import-time code again
# as on a CPU with AVX512-BF16 (where it tries the kernels hub; offline, or without the `kernels` package, that
# fails and it logs), then 4-bit QLoRA of the tiny model (get_peft_model reads is_gradient_checkpointing).
# Last, the same two messages from another source must still get through: the filters match nothing else.
PROGRAM = """
import importlib, logging, sys, warnings
sys.path.insert(0, sys.argv[1])
import qlora_model
import bitsandbytes.backends.cpu.ops as cpu_ops
import bitsandbytes.functional
bitsandbytes.functional.has_avx512bf16 = lambda: True
importlib.reload(cpu_ops)
qlora_model.add_lora(qlora_model.load_model(sys.argv[2], "4bit"), r=4, alpha=8)
print("done", flush=True)
logging.getLogger("bitsandbytes").warning("another bitsandbytes warning")
warnings.warn("another FutureWarning", FutureWarning)
"""


def test_a_qlora_run_prints_neither_message(tiny_model_dir):
    """phase3_ddp/qlora_model.py is the same file (tests/test_phase_copies.py)."""
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(REPO / "phase2_lora"), str(tiny_model_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-3000:]
    assert not [text for text in NOISY if text in proc.stderr], proc.stderr[-3000:]
    assert "another bitsandbytes warning" in proc.stderr and "another FutureWarning" in proc.stderr
