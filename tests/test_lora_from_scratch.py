"""The hand-written LoRA in phase2_lora/lora_from_scratch.py is numerically peft's LoRA."""

import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "phase2_lora"))
import lora_from_scratch  # noqa: E402
from lora_from_scratch import LoRALinear, inject_lora, lora_modules  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

R, ALPHA = 4, 8


def load(model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def peft_and_ours(model_dir, target_modules="all-linear"):
    """A peft LoRA model with random (non-zero) B, and our LoRA model holding the very same A and B."""
    peft_model = get_peft_model(load(model_dir), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                            target_modules=target_modules, task_type="CAUSAL_LM"))
    ours = load(model_dir)
    trainable = inject_lora(ours, target_modules, r=R, alpha=ALPHA, dropout=0.0, verbose=False)
    peft_modules = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
                    if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    our_modules = {name: m for name, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert sorted(peft_modules) == sorted(our_modules) and our_modules
    with torch.no_grad():
        for name, m in peft_modules.items():
            m.lora_B["default"].weight.normal_(0, 0.1)  # B = 0 would make any A look right
            our_modules[name].lora_A.copy_(m.lora_A["default"].weight)
            our_modules[name].lora_B.copy_(m.lora_B["default"].weight)
    return peft_model.eval(), ours.eval(), trainable


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))


def test_logits_match_peft(tiny_model_dir, input_ids):
    peft_model, ours, _ = peft_and_ours(tiny_model_dir)
    base_logits = load(tiny_model_dir)(input_ids).logits
    with torch.no_grad():
        ref, got = peft_model(input_ids=input_ids).logits, ours(input_ids).logits
    assert (ref - base_logits).abs().max() > 1e-3  # the adapters really change the output
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_merge_equals_unmerged_and_unmerge_restores(tiny_model_dir, input_ids):
    _, ours, _ = peft_and_ours(tiny_model_dir)
    weights_before = {n: p.clone() for n, p in ours.named_parameters() if "base" in n}
    with torch.no_grad():
        unmerged = ours(input_ids).logits
        for m in lora_modules(ours):
            m.merge()
        merged = ours(input_ids).logits
        for m in lora_modules(ours):
            m.unmerge()
    assert all(m.merged is False for m in lora_modules(ours))
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    for n, p in ours.named_parameters():
        if n in weights_before:
            torch.testing.assert_close(p, weights_before[n], atol=1e-6, rtol=0)


def test_only_a_and_b_get_gradients(tiny_model_dir, input_ids):
    _, ours, _ = peft_and_ours(tiny_model_dir)
    ours.train()
    ours(input_ids, labels=input_ids).loss.backward()
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    lora_names = {n for n, _ in ours.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert with_grad == lora_names and lora_names
    assert all(p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if n in lora_names)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_trainable_count_equals_peft(tiny_model_dir, targets):
    peft_model, ours, trainable = peft_and_ours(tiny_model_dir, targets)
    assert trainable == peft_model.get_nb_trainable_parameters()[0] > 0
    assert trainable == sum(p.numel() for p in ours.parameters() if p.requires_grad)


def test_fresh_layer_is_the_base_layer():
    base = torch.nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.1).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at init: exactly the pretrained layer
    assert layer.lora_A.abs().max() <= 1 / 16**0.5  # kaiming-uniform(a=sqrt 5) bound = 1/sqrt(in)


def test_cli_prints_qwen_arithmetic(capsys):
    # main() in-process: the same code path as `python phase2_lora/lora_from_scratch.py`, minus 8 s of imports.
    assert lora_from_scratch.main([]) == 0
    out = capsys.readouterr().out
    # Qwen1.5-1.8B has 1,836,828,672 parameters; r=16 on all 7 linear kinds x 24 layers = 14,991,360.
    assert "1,836,828,672" in out and "14,991,360" in out and "0.816%" in out
    assert lora_from_scratch.main(["--target_modules", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:")
