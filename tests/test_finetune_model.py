"""qlora_model: 4-bit loading, LoRA wrapping and parameter counts, on the tiny Qwen2 and the real config."""

import sys

import pytest
import torch
from conftest import PERSONA_PATH, REPO

sys.path.insert(0, str(REPO / "phase2_lora"))
from qlora_model import (  # noqa: E402
    UsageError,
    add_lora,
    compute_dtype,
    load_model,
    load_tokenizer,
    quantization_config,
    trainable_parameters,
)
from sft_data import SFTCollator, load_sft_datasets  # noqa: E402


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    train, _, _ = load_sft_datasets([PERSONA_PATH], tok, max_samples=4, log=lambda *_: None)
    return SFTCollator(tok.pad_token_id)([train[i] for i in range(4)])


def test_quantization_settings():
    assert compute_dtype("cpu") == torch.float32
    cfg = quantization_config("4bit", torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("8bit", torch.float16).load_in_8bit and quantization_config("none", None) is None
    with pytest.raises(UsageError, match="--quantization must be one of 4bit, 8bit, none"):
        quantization_config("3bit", torch.float32)


def test_4bit_parameter_count_matches_full_model(tiny_model_dir):
    """Params4bit packs 2 weights per byte: counted right, the 4-bit model has as many parameters as the
    full-precision one, and our count equals peft's."""
    full = add_lora(load_model(tiny_model_dir, "none"))
    quant = add_lora(load_model(tiny_model_dir, "4bit"))
    assert any(p.__class__.__name__ == "Params4bit" for p in quant.parameters())
    assert trainable_parameters(quant) == trainable_parameters(full) == quant.get_nb_trainable_parameters()
    assert trainable_parameters(quant)[1] > sum(p.numel() for p in quant.parameters())  # naive numel undercounts
    # Only LoRA matrices train; B starts at zero so the wrapped model equals the base model at step 0.
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in quant.named_parameters())
    assert all((p == 0).all() for n, p in quant.named_parameters() if "lora_B" in n)


def test_vocab_matrices_stay_bf16_and_give_the_same_loss(tiny_model_dir, batch):
    """keep_vocab_dtype undoes peft's fp32 upcast of embed_tokens/lm_head (1.2 GB for Qwen1.5-1.8B) with
    bf16 compute, without autocast, and the loss and LoRA gradients stay those of the fp32 variant."""
    results = {}
    for keep in (True, False):
        torch.manual_seed(0)
        model = add_lora(load_model(tiny_model_dir, "4bit", dtype=torch.bfloat16), dropout=0.0, keep_vocab_dtype=keep)
        inner = model.get_base_model()
        vocab = {inner.get_input_embeddings().weight.dtype, inner.get_output_embeddings().weight.dtype}
        assert vocab == ({torch.bfloat16} if keep else {torch.float32})
        assert inner.model.norm.weight.dtype == torch.float32  # norms are still upcast for stability
        out = model(**batch)
        out.loss.backward()
        grad = inner.model.layers[0].self_attn.q_proj.lora_A.default.weight.grad
        results[keep] = out.loss.item(), grad.clone()
    assert results[True][0] == pytest.approx(results[False][0], rel=2e-3)
    assert torch.allclose(results[True][1], results[False][1], rtol=0.05, atol=1e-4)


def test_trainable_parameter_figure_of_qwen15_18b():
    """The README's figure: LoRA r=16 on all linear layers of Qwen1.5-1.8B (config.json values), counted by
    peft on a meta-device model (no weights, no download) and by the formula r * (in + out)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    base_total = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                  target_modules="all-linear"))
    h, ff = 2048, 5504
    per_layer = 16 * (4 * (h + h) + 3 * (h + ff))  # q, k, v, o: 2048 -> 2048; gate, up: 2048 -> 5504; down: back
    assert per_layer * 24 == 14_991_360
    assert peft_model.get_nb_trainable_parameters() == (14_991_360, base_total + 14_991_360)
    assert base_total == 1_836_828_672
