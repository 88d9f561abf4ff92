"""Phase 3 trains with phase 2's 8 GB recipe: the same batch through finetune.py's model builder and through
finetune_ddp.py's (ddp_train.build_model), with the loss each trainer asks for, gives the same loss and the same
LoRA gradients. Each phase runs in its own process (one per phase for both LoRA targets: imports cost most),
importing only its own folder's modules."""

import pytest
import torch
from conftest import REPO, run_script, side_by_side
from safetensors.torch import load_file

BUILD = {  # phase folder -> how its trainer builds the model and calls the loss
    "phase2_lora": ("import finetune; model = finetune.build_model(args)[0]",
                    "n"),  # the HF Trainer passes the batch's target-token count (num_items_in_batch)
    "phase3_ddp": ("import ddp_train; model = ddp_train.build_model(args, torch.device('cpu'))",
                   "n.float() / 1"),  # train_step: the global count over the world size (1 here)
}
TARGETS = [["all-linear"], ["q_proj", "v_proj"]]  # --target_modules values
PROBE = """
import sys, torch
sys.path.insert(0, {folder!r})
from argparse import Namespace
from safetensors.torch import save_file
batch = torch.load({batch!r}, weights_only=True)
n = (batch["labels"][:, 1:] != -100).sum()
for k, target_modules in enumerate({targets!r}):
    args = Namespace(model_name_or_path={model!r}, quantization="4bit", trust_remote_code=False, lora_r=8,
                     lora_alpha=16, lora_dropout=0.0, target_modules=target_modules, seed=42)
    torch.manual_seed(42)  # what each script does before building: the same LoRA A init
    {build}
    torch.manual_seed(1)  # B starts at 0 (so A would get no gradient): give both the same non-zero B
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.train()
    loss = model(**batch, num_items_in_batch={num_items}).loss
    loss.backward()
    grads = {{name: p.grad.float() for name, p in model.named_parameters() if p.requires_grad}}
    save_file({{"loss": loss.detach().float().reshape(1), **grads}}, {out!r}.format(k))
"""


@pytest.fixture(scope="module")
def probed(tiny_model_dir, tmp_path_factory) -> dict[str, list[dict]]:
    """{phase folder: [loss and LoRA gradients for each of TARGETS]}, one probe process per phase, both at once."""
    tmp_path = tmp_path_factory.mktemp("recipe")
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 300, (2, 24), generator=g)               # (B, T)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 17:] = 0                                            # row 1: 17 real tokens, then padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :9] = -100                                                  # the prompt is not supervised
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, tmp_path / "batch.pt")

    def probe(folder: str) -> list[dict]:
        build, num_items = BUILD[folder]
        script, out = tmp_path / f"probe_{folder}.py", str(tmp_path / f"{folder}_{{}}.safetensors")  # {}: TARGETS index
        script.write_text(PROBE.format(folder=str(REPO / folder), model=str(tiny_model_dir), build=build,
                                       batch=str(tmp_path / "batch.pt"), num_items=num_items, out=out,
                                       targets=TARGETS))
        proc = run_script(script, timeout=300, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [load_file(out.format(k)) for k in range(len(TARGETS))]
    return side_by_side(probe, list(BUILD))  # one thread each


@pytest.mark.parametrize("target_modules", TARGETS)
def test_both_phases_build_the_same_model_and_loss(probed, target_modules):
    k = TARGETS.index(target_modules)
    p2, p3 = probed["phase2_lora"][k], probed["phase3_ddp"][k]
    assert p2.keys() == p3.keys() and len(p2) > 1
    assert p3["loss"].item() == pytest.approx(p2["loss"].item(), rel=1e-6)
    for name in p2:
        assert p2[name].abs().max() > 0, name  # every LoRA matrix gets a gradient ...
        torch.testing.assert_close(p3[name], p2[name], rtol=1e-5, atol=1e-7)  # ... the same in both phases
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in p2 if "lora_" in name}
    assert adapted == ({"q_proj", "v_proj"} if target_modules != ["all-linear"] else
                       {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
