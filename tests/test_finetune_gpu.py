"""finetune.py's recipe on a CUDA GPU, and the real-size one-step benchmark (skipped without CUDA).

    python -m pytest -m gpu -q        # every gpu test of the repo, under 8 minutes on one GPU
"""

import json
import sys

import pytest
import torch
from conftest import PERSONA_PATH, REPO, run_script

sys.path.insert(0, str(REPO / "phase2_lora"))
from chunked_loss import enable_chunked_loss  # noqa: E402
from qlora_model import add_lora, compute_dtype, load_model  # noqa: E402

pytestmark = pytest.mark.gpu


def test_finetune_4bit_on_cuda(tiny_model_dir, tmp_path):
    """QLoRA on the GPU: paged 8-bit AdamW, bf16 autocast from compute capability 8.0 (fp16 + loss scaling before),
    the chunked loss; the loss falls and the peak memory is reported."""
    out = tmp_path / "run"
    proc = run_script("phase2_lora/finetune.py", "--model_name_or_path", tiny_model_dir, "--data_path", PERSONA_PATH,
                      "--output_dir", out, "--max_samples", 8, "--val_size", 2, "--batch_size", 2, "--grad_accum", 2,
                      "--max_steps", 20, "--lr", 1e-2, "--lora_dropout", 0, "--logging_steps", 5, "--eval_steps", 10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU: " in proc.stdout and "phase3_ddp/finetune_ddp.py" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    major, _ = torch.cuda.get_device_capability(0)
    assert metrics["optimizer"] == "paged_adamw_8bit"
    assert metrics["precision"] == ("bf16" if major >= 8 else "fp16")
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert losses[-1] < 0.5 * losses[0] and metrics["eval_loss"] < losses[0]
    assert 0 < metrics["peak_gpu_memory_gb"] <= metrics["peak_gpu_reserved_gb"]
    print(f"\n{torch.cuda.get_device_name(0)}: tiny QLoRA, 20 steps, {metrics['tokens_per_second']:.0f} tokens/s, "
          f"peak {metrics['peak_gpu_memory_gb']:.3f} GB allocated")


def test_chunked_loss_with_compute_dtype_vocab_matrices_on_cuda(tiny_model_dir):
    """The vocabulary matrices stay in the compute dtype, the LoRA weights in fp32, and the chunked loss and its
    LoRA gradients equal the full-logits loss's under autocast."""
    dtype = compute_dtype("cuda")
    model = add_lora(load_model(tiny_model_dir, "4bit"), r=8, alpha=16, dropout=0.0)
    lm = model.get_base_model()
    assert lm.get_input_embeddings().weight.dtype == dtype == lm.get_output_embeddings().weight.dtype
    lora = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in lora} == {torch.float32} and lora[0].device.type == "cuda"
    ids = torch.randint(0, lm.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()  # (B, T)
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt: not supervised
    model.train()

    def loss_and_grads():
        with torch.autocast("cuda", dtype=dtype):
            loss = model(input_ids=ids, labels=labels).loss
        return loss.float(), torch.autograd.grad(loss, lora)

    full_loss, full_grads = loss_and_grads()
    enable_chunked_loss(model, chunk_size=16)
    chunked_loss, chunked_grads = loss_and_grads()
    assert chunked_loss.item() == pytest.approx(full_loss.item(), rel=1e-3)
    for a, b in zip(chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


def test_real_size_one_step_on_cuda(tmp_path):
    """Qwen1.5-1.8B's exact architecture (random weights), finetune.py's recipe, one step at 512 and 1,024 tokens:
    torch.cuda.max_memory_allocated against the <= 4 GB at 1,024 tokens goal."""
    proc = run_script("phase2_lora/benchmark_one_step.py", "--seq_lens", 512, 1024, "--output_dir", tmp_path,
                      timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["seq_len"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    print("\n" + (tmp_path / "results.md").read_text())
    assert rows[512]["allocated"] < rows[1024]["allocated"] <= 4 * 2**30
