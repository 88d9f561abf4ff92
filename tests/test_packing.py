"""--packing: several examples per row of max_seq_len, positions restarting at each example, attention never
crossing examples. The proof: a packed batch has the same loss and gradients as its examples run one by one."""

import json
import sys

import pytest
import torch
from conftest import PERSONA_PATH, REPO, run_script

sys.path.insert(0, str(REPO / "phase2_lora"))
from chunked_loss import enable_chunked_loss  # noqa: E402
from qlora_model import load_tokenizer  # noqa: E402
from sft_data import IGNORE_INDEX, SFTCollator, load_sft_datasets, pack_examples, real_tokens  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

MAX_LEN = 200


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    train, _, _ = load_sft_datasets([PERSONA_PATH], tok, max_samples=12, max_seq_len=MAX_LEN, log=lambda *_: None)
    return tok, train


def example_slices(row) -> list[slice]:
    """Where each example of a packed row lies: a new example starts wherever the position id is 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [row["length"]], strict=True)]


def test_rows_hold_every_token_once_with_restarting_positions(examples):
    _, train = examples
    packed = pack_examples(train, MAX_LEN)
    assert len(packed) < len(train) / 2  # persona examples are ~50-60 tokens: several per row
    assert all(row["length"] == len(row["input_ids"]) <= MAX_LEN for row in packed)
    pieces = []  # cut every row at its position resets: exactly the original examples come back
    for row in packed:
        parts = example_slices(row)
        assert row["position_ids"] == [p for s in parts for p in range(s.stop - s.start)]
        pieces += [(tuple(row["input_ids"][s]), tuple(row["labels"][s][1:])) for s in parts]
        assert all(row["labels"][s.start] == IGNORE_INDEX for s in parts)  # nothing predicted across examples
    assert sorted(pieces) == sorted((tuple(ex["input_ids"]), tuple(ex["labels"][1:])) for ex in train)


def test_no_label_crosses_an_example_boundary_with_train_on_prompt(tiny_model_dir):
    """--train_on_prompt --packing: every token is a target except at each position-id reset, where the label
    would ask the previous example's last token to predict the next example's first one."""
    tok = load_tokenizer(tiny_model_dir)
    packed, _, _ = load_sft_datasets([PERSONA_PATH], tok, max_samples=12, max_seq_len=MAX_LEN, train_on_prompt=True,
                                     packing=True, log=lambda *_: None)
    resets = 0
    for row in packed:
        for i, (token, label, position) in enumerate(zip(row["input_ids"], row["labels"], row["position_ids"],
                                                         strict=True)):
            assert label == (IGNORE_INDEX if position == 0 else token), (i, position)
        resets += row["position_ids"].count(0)
    assert resets == 12 > len(packed)  # several examples per row: resets inside rows, not only at row starts


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_grads_equal_one_by_one(tiny_model_dir, examples, attn):
    """fp32 tiny model with finetune.py's chunked loss: one packed batch (all rows, padding included) against
    every example alone, both normalised by the same target count, as gradient accumulation does."""
    tok, train = examples
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model = enable_chunked_loss(model).train()
    collate = SFTCollator(tok.pad_token_id)
    packed = pack_examples(train, MAX_LEN)
    rows = list(packed)
    assert len({row["length"] for row in rows}) > 1  # rows of different lengths: padding in the batch too
    # The examples inside those rows, recovered from the position resets.
    singles = [{"input_ids": row["input_ids"][s], "labels": row["labels"][s]}
               for row in rows for s in example_slices(row)]
    n_items = sum(sum(label != IGNORE_INDEX for label in ex["labels"][1:]) for ex in singles)

    def loss_and_grads(batches):
        model.zero_grad()
        total = sum(model(**batch, num_items_in_batch=n_items).loss for batch in batches)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    batch = collate(rows)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape  # (B, T)
    assert real_tokens(batch) == sum(row["length"] for row in rows) < batch["input_ids"].numel()
    loss_packed, grads_packed = loss_and_grads([batch])
    loss_single, grads_single = loss_and_grads([collate([ex]) for ex in singles])
    torch.testing.assert_close(loss_packed, loss_single, atol=1e-5, rtol=1e-5)
    assert grads_packed.keys() == grads_single.keys() and len(grads_packed) > 10
    for name, grad in grads_packed.items():
        torch.testing.assert_close(grad, grads_single[name], atol=1e-5, rtol=1e-5, msg=name)


def test_finetune_trains_packed_rows(tiny_model_dir, tmp_path):
    """finetune.py --packing end to end: rows hold several examples, real tokens are counted through the
    position ids (no attention mask), and the padding fraction is that of the packed rows."""
    proc = run_script("phase2_lora/finetune.py", "--model_name_or_path", tiny_model_dir, "--data_path", PERSONA_PATH,
                      "--output_dir", tmp_path / "out", "--quantization", "none", "--max_samples", 24, "--val_size", 4,
                      "--max_seq_len", MAX_LEN, "--packing", "--max_steps", 2, "--batch_size", 2, "--grad_accum", 1,
                      "--cache_dir", tmp_path / "cache", "--save_steps", 1000, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-> 20 train / 4 val; packed into" in proc.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["data"]["packed_rows"] < 10 and metrics["train_tokens"] > 4 * 150  # 2 steps x 2 rows, ~3 each
    assert 0 <= metrics["padding_fraction"] < 0.3 and "eval_loss" in metrics
