"""One rank's model: the base causal LM in 4-bit / 8-bit / full precision on this rank's device, plus LoRA.

Under DDP every rank holds a complete replica. With QLoRA the replica is cheap: the frozen base weights
sit in 4-bit NF4 (~1.2 GB for Qwen1.5-1.8B) and only the LoRA matrices A (r x in) and B (out x r) train,
so only they get gradients, get all-reduced and get Adam states.
(Same recipe as phase2_lora/qlora_model.py, copied on purpose: every phase folder stands alone.)
"""

import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

QUANTIZATIONS = ("4bit", "8bit", "none")


class UsageError(Exception):
    """Bad user input (paths, flags, data). Rank 0 prints `error: <msg>`; every rank exits 2."""


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: bf16 on GPUs that have it (Ampere+), fp16 on older GPUs, fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",          # 16 levels at the quantiles of N(0, 1), matching weight statistics
            bnb_4bit_use_double_quant=True,     # quantise the per-block fp32 scales too: ~0.37 bit/param saved
            bnb_4bit_compute_dtype=dtype,       # de-quantise to this dtype inside each matmul
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_model_path(model_name_or_path: str) -> None:
    """Fail before any process group exists, with a hint, on a local path that is not a saved model."""
    path = str(model_name_or_path)
    looks_local = path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1  # hub ids: "owner/name"
    if looks_local and not Path(path).expanduser().is_dir():
        raise UsageError(f"model directory not found: {path} (build a tiny one with phase2_lora/make_tiny_model.py, "
                         f"or pass a hub id such as Qwen/Qwen1.5-1.8B-Chat)")
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise UsageError(f"model directory {path} has no config.json; pass a directory written by save_pretrained")


def _load_error(path: str, err: OSError) -> UsageError:
    # transformers raises OSError subclasses for unknown hub ids, no network, or missing files.
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") else ""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return UsageError(f"cannot load {path!r}: not a local model directory and could not be downloaded{offline}: "
                      f"{first_line}")


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False):
    """The model's own tokenizer (chat template included) with a pad token and right padding."""
    check_model_path(model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_name_or_path), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _load_error(str(model_name_or_path), e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels are masked by position, never by pad id
    tokenizer.padding_side = "right"
    return tokenizer


def load_lora_model(model_name_or_path: str, device: torch.device, quantization: str = "4bit", r: int = 16,
                    alpha: int = 32, dropout: float = 0.05, trust_remote_code: bool = False) -> PeftModel:
    """This rank's replica: the base model loaded straight onto `device`, frozen, with LoRA on every linear
    layer (q,k,v,o,gate,up,down_proj; not lm_head) and non-reentrant gradient checkpointing."""
    dtype = compute_dtype(device)
    # device_map={"": local_rank}: the whole model on this rank's GPU. Without it, from_pretrained
    # would put every rank's copy on cuda:0 (or bitsandbytes would spread it over all visible GPUs).
    device_map = {"": device.index} if device.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_name_or_path), quantization_config=quantization_config(quantization, dtype), dtype=dtype,
            device_map=device_map, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _load_error(str(model_name_or_path), e) from e
    if quantization != "none":
        # Freezes the base, casts norms/embeddings to fp32 for stable training. Checkpointing is set below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Non-reentrant checkpointing recomputes each decoder layer in backward through ordinary autograd, so
    # DDP's gradient hooks fire once per parameter per backward, as DDP expects: no static_graph and no
    # find_unused_parameters needed. (The reentrant variant runs a second backward inside backward; DDP
    # then sees hooks fire twice and needs static_graph=True.)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules="all-linear", bias="none")
    return get_peft_model(model, config)  # B = 0 at start: the wrapped model equals the base model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total). A bnb Params4bit packs two 4-bit values per byte, so it counts twice its numel."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
