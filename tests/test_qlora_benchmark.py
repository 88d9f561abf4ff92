"""Chunked loss (phase2_lora/chunked_loss.py), the CPU tensor counter (benchmark_tools.py) and the QLoRA benchmark."""

import importlib.util
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_script, side_by_side

sys.path.insert(0, str(REPO / "phase2_lora"))
from benchmark_tools import PeakMemory, tensor_bytes  # noqa: E402
from chunked_loss import chunked_cross_entropy, enable_chunked_loss  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def load_benchmark():
    """phase2_lora/benchmark.py under a unique module name (phase2_attention and phase3_ddp have one too)."""
    spec = importlib.util.spec_from_file_location("qlora_benchmark", REPO / "phase2_lora" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", [7, 64, 1000])
def test_chunked_cross_entropy_matches_full_logits(chunk_size):
    torch.manual_seed(0)
    n, c, v = 150, 32, 500
    hidden = torch.randn(n, c, requires_grad=True)
    weight = (torch.randn(v, c) / c**0.5).requires_grad_()
    bias = torch.randn(v, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[::3] = -100       # scattered masked positions
    targets[40:80] = -100     # and a whole masked chunk (a prompt)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets)  # full (N, V) fp32 logits
    got = chunked_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for g, r in zip(grads(got, (hidden, weight, bias)), grads(ref, (hidden, weight, bias)), strict=True):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)


def test_chunked_loss_never_holds_the_full_logits():
    torch.manual_seed(0)
    n, c, v, chunk = 1024, 32, 4096, 128
    hidden = torch.randn(n, c, requires_grad=True)
    weight, targets = torch.randn(v, c), torch.randint(0, v, (n,))
    logits_bytes = n * v * 4
    with PeakMemory("cpu") as full:
        F.cross_entropy(hidden @ weight.T, targets).backward()
    with PeakMemory("cpu") as chunked:
        chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk).backward()
    assert full.allocated >= 2 * logits_bytes  # logits + log-softmax (+ their gradient)
    # One chunk's logits at a time, forward and backward (checkpointing): far below one full logits tensor.
    assert chunked.allocated < logits_bytes / 2, (chunked.allocated, logits_bytes)


def test_peak_memory_counts_new_tensors_not_views():
    w = torch.randn(256, 256)
    with PeakMemory("cpu", baseline_bytes=tensor_bytes(w)) as mem:
        w.t(), w.split(64), w.view(-1), w.add_(1)  # views and in-place: no new storage
        a = torch.empty(1000, dtype=torch.uint8)
        del a
        b = torch.empty(3000, dtype=torch.uint8)  # noqa: F841  (a is freed first: peak = 3000, not 4000)
    assert mem.allocated == 256 * 256 * 4 + 3000 and mem.reserved is None


def test_enable_chunked_loss_on_a_peft_model_matches_hf(tiny_model_dir):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    ids = torch.randint(0, 200, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0                                   # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100                               # prompt tokens
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    lora = [p for p in model.parameters() if p.requires_grad]
    ref = model(**batch).loss
    ref_grads = grads(ref, lora)
    enable_chunked_loss(model, chunk_size=5)
    out = model(**batch)
    assert out.logits is None                          # training: no (B, T, V) logits at all
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=0)
    for g, r in zip(grads(out.loss, lora), ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)
    n_targets = int((labels[:, 1:] != -100).sum())     # gradient accumulation: divide by the whole batch's count
    torch.testing.assert_close(model(**batch, num_items_in_batch=2 * n_targets).loss, ref / 2, atol=1e-5, rtol=0)
    model.eval()                                       # evaluation and generation keep the usual logits
    assert model(**batch).logits.shape == (2, 16, model.config.vocab_size)


def test_chunked_loss_under_the_hf_trainer_with_gradient_accumulation(tiny_model_dir, tmp_path):
    """The integration finetune.py would use: the same logged losses and eval loss as without chunking,
    including a chunked eval loss (in_eval=True with prediction_loss_only=True)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 500, (20,), generator=gen).tolist()} for _ in range(8)]
    data = Dataset.from_list([{**r, "labels": [-100] * 5 + r["input_ids"][5:]} for r in rows])  # masked prompts

    def train(chunked: bool):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
        if chunked:
            enable_chunked_loss(model, chunk_size=7, in_eval=True)
        args = TrainingArguments(output_dir=str(tmp_path / str(chunked)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, logging_steps=1,
                                 save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                                 prediction_loss_only=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.evaluate(data)["eval_loss"]

    (plain, plain_eval), (chunked, chunked_eval) = train(False), train(True)
    assert len(plain) == 2 and plain[1] != plain[0]
    assert chunked == pytest.approx(plain, abs=1e-5) and chunked_eval == pytest.approx(plain_eval, abs=1e-5)


# The two benchmark scripts on the tiny config: {name: (argv, output dir)}. Both run at once (`tiny_runs`): each is
# mostly imports on one core, and what the tests check is counted memory, not speed.
TINY_RUNS = {
    # The default, the eager extra row and the end of the cumulative recipe list: between them they take every
    # code path (eager/sdpa, reentrant or not, fused torch/8-bit AdamW, full/chunked loss, fp32/compute-dtype
    # embeddings).
    "benchmark": ["phase2_lora/benchmark.py", "--tiny", "--recipes", "default", "eager", "+bf16frozen",
                  "--seq_lens", "64", "--batch_sizes", "2", "--steps", "1"],
    "one_step": ["phase2_lora/benchmark_one_step.py", "--tiny", "--seq_lens", 64, 128],
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict:
    """{name: output dir} of TINY_RUNS, side by side, each checked to have finished."""
    def run(name):
        out = tmp_path_factory.mktemp(name)
        proc = run_script(*TINY_RUNS[name], "--output_dir", out, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return out
    return side_by_side(run, list(TINY_RUNS))


def test_tiny_benchmark_runs_every_code_path(tiny_runs):
    tmp_path = tiny_runs["benchmark"]
    rows = {r["recipe"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert list(rows) == ["default", "eager", "+bf16frozen"]
    tiny = load_benchmark().TINY
    d, i, r = tiny["hidden_size"], tiny["intermediate_size"], 16   # LoRA r=16 on q,k,v,o (d x d) and the MLP
    expected = tiny["num_hidden_layers"] * (4 * r * (d + d) + 3 * r * (d + i))
    for row in rows.values():
        assert row["trainable_params"] == expected
        assert all(abs(loss - math.log(tiny["vocab_size"])) < 1.0 for loss in row["losses"])  # random model
        assert row["tokens_per_s"] > 0 and row["allocated_mib"] > 0
    # chunk 32 of 128 rows: the chunked recipe holds a quarter of the logits the baseline holds.
    assert rows["+bf16frozen"]["allocated_mib"] < 0.7 * rows["default"]["allocated_mib"]
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} | 64 | 2 |" in table for name in rows)
    assert (tmp_path / "memory.png").stat().st_size > 1000


def test_budget_and_cpu_guard(capsys):
    benchmark = load_benchmark()
    assert benchmark.main(["--budget"]) == 0
    out = capsys.readouterr().out
    # 2 x 151936 x 2048 frozen embedding/lm_head weights: 2.32 GiB in fp32, 1.16 GiB in bf16; 14,991,360 LoRA params.
    assert "embeddings+lm_head fp32 2.32 (bf16 1.16)" in out and "14,991,360" in out
    assert "| 2048 | 0.38 | 3.48 | 0.43 | 6.89 | 2.69 |" in out  # fp32 logits x3 at 2048 tokens vs one 256-row chunk
    assert "A budget, not a measurement" in out and "CUDA context" in out and "fragmentation" in out
    if not torch.cuda.is_available():  # the 1.8B run needs a GPU: one clear line, exit 2
        assert benchmark.main([]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1


# ---------------------------------------------------------------- benchmark_one_step.py: measured vs budget

def test_one_step_benchmark_agrees_with_the_budget_on_the_tiny_config(tiny_runs):
    """The real-size CPU benchmark's code path on the tiny config: every static term counted from the tensors
    equals the budget's (NF4 aside: fixed per-tensor code tables weigh a lot in a tiny model), and the profiler's
    peak is within 15% of the budget's total."""
    tmp_path = tiny_runs["one_step"]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["seq_len"] for r in rows] == [64, 128]
    table = (tmp_path / "results.md").read_text()
    for term in ("embeddings + lm_head", "LoRA weights (fp32)", "LoRA gradients (fp32)", "Adam state"):
        assert table.count(f"| {term} |") == 2 and all(line.endswith("| 1.00 |") for line in table.splitlines()
                                                        if line.startswith(f"| {term} |"))
    ratios = [float(line.rsplit("|", 2)[1]) for line in table.splitlines() if line.startswith("| total ")]
    assert len(ratios) == 2 and all(0.85 <= r <= 1.15 for r in ratios), ratios
    assert all(abs(loss - math.log(4800)) < 1.0 for r in rows for loss in r["losses"])  # a random model's loss


def test_profiler_peak_equals_the_tensor_counter(tmp_path):
    """Two independent counts of one training step's peak: the torch profiler's memory timeline
    (benchmark_one_step.py) and benchmark_tools.PeakMemory's dispatch-level counter."""
    spec = importlib.util.spec_from_file_location("one_step", REPO / "phase2_lora" / "benchmark_one_step.py")
    one_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(one_step)
    config = one_step.qwen_config(**one_step.TINY)
    model = one_step.build_model(config, tmp_path, torch.device("cpu"), torch.bfloat16, chunk_size=32)
    ids = torch.randint(0, config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = one_step.make_optimizer(model, torch.device("cpu"))

    def step():
        one_step.train_step(model, optimizer, batch, torch.device("cpu"), torch.bfloat16)
    step()  # creates the optimizer state and the gradient buffers
    static = tensor_bytes(model, optimizer, [p.grad for p in model.parameters() if p.grad is not None])
    with PeakMemory("cpu", baseline_bytes=static) as mem:
        step()
    profiled = one_step.profiled_peak(step)["peak"]
    assert profiled == pytest.approx(mem.allocated, rel=0.05)
