"""finetune.py's length-grouped batch order is a function of (seed, epoch), not of the global RNG: each epoch has its
own order, the Trainer hands every epoch to the sampler (a resumed one too), and a run resumed mid-way through epoch 2
ends with the uninterrupted run's adapter, bit for bit."""

import shutil
import sys

import torch
from conftest import PERSONA_PATH, REPO, run_script
from datasets import Dataset
from safetensors.torch import load_file

sys.path.insert(0, str(REPO / "phase2_lora"))
from accelerate import skip_first_batches  # noqa: E402
from finetune_trainer import EpochLengthGroupedSampler, TokenStatsTrainer  # noqa: E402
from qlora_model import load_model  # noqa: E402
from sft_data import SFTCollator  # noqa: E402
from test_qlora_warnings import NOISY  # noqa: E402
from transformers import TrainingArguments  # noqa: E402


def test_the_order_depends_on_seed_and_epoch_only():
    sampler = EpochLengthGroupedSampler(4, lengths=[5 + i % 17 for i in range(64)], seed=42)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)  # the global RNG plays no part
    assert list(sampler) == first and sorted(first) == list(range(64))
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new order every epoch...
    sampler.set_epoch(0)
    assert list(sampler) == first  # ...and the same one whenever that epoch comes round again
    assert list(EpochLengthGroupedSampler(4, lengths=sampler.lengths, seed=43)) != first


def test_the_trainer_hands_each_epoch_to_the_sampler(tiny_model_dir, tmp_path):
    """What Trainer._run_epoch does with the accelerate-prepared loader: set_epoch(epoch), also on the loader that
    skip_first_batches builds for a resumed epoch. Example i is the one-token sequence [i]."""
    n = 16
    ds = Dataset.from_dict({"input_ids": [[i] for i in range(n)], "labels": [[i] for i in range(n)],
                            "length": [1 + i % 5 for i in range(n)]})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, seed=7, report_to="none",
                             train_sampling_strategy="group_by_length", remove_unused_columns=False, use_cpu=True)
    trainer = TokenStatsTrainer(model=load_model(tiny_model_dir, "none"), args=args, train_dataset=ds,
                                data_collator=SFTCollator(0))
    loader = trainer.get_train_dataloader()

    def order(dl, epoch):
        dl.set_epoch(epoch)
        return [int(i) for batch in dl for i in batch["input_ids"][:, 0]]

    expected = {}
    for epoch in (0, 2):
        sampler = EpochLengthGroupedSampler(2, lengths=ds["length"][:], seed=7)
        sampler.set_epoch(epoch)
        expected[epoch] = list(sampler)
    assert expected[0] != expected[2]
    assert order(loader, 2) == expected[2] and order(loader, 0) == expected[0]
    assert order(skip_first_batches(loader, 3), 2) == expected[2][3 * 2:]  # resumed after 3 batches of epoch 2


def test_resume_in_epoch_2_gives_the_uninterrupted_adapter(tiny_model_dir, tmp_path):
    """8 examples in batches of 2: 4 steps an epoch, 3 epochs. The run is cut after step 10 (epoch 2, 2 steps in)
    and resumed from checkpoint-10: the final adapter must equal the uninterrupted one exactly."""
    out = tmp_path / "run"
    args = ["phase2_lora/finetune.py", "--model_name_or_path", tiny_model_dir, "--data_path", PERSONA_PATH,
            "--output_dir", out, "--quantization", "none", "--max_samples", 8, "--val_size", 0, "--batch_size", 2,
            "--grad_accum", 1, "--epochs", 3, "--lr", 1e-2, "--lora_dropout", 0, "--save_steps", 10, "--no_cache"]
    first = run_script(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]
    straight = load_file(out / "adapter_model.safetensors")
    shutil.rmtree(out / "checkpoint-12")
    (out / "adapter_model.safetensors").unlink()

    resumed = run_script(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-10'}" in resumed.stdout
    again = load_file(out / "adapter_model.safetensors")
    assert straight.keys() == again.keys() and len(straight) > 10
    for name, tensor in straight.items():
        assert torch.equal(tensor, again[name]), name
    assert not any(text in proc.stderr for proc in (first, resumed) for text in NOISY)
