"""Phase 3 in one process (a gloo group of one where a group is needed): the optimisation knobs reach the optimizer
and the scheduler, every numeric flag refuses inf / nan / negative / huge values in one line, gradient accumulation
all-reduces once per step, --resume accepts what keeps the run identical and refuses what does not, and the fp16
loss scale survives a resume. --target_modules is checked against phase 2 in test_ddp_recipe.py."""

import importlib.util
import json
import shutil
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import PERSONA_PATH, REPO, write_json
from safetensors.torch import load_file

sys.path.append(str(REPO / "phase3_ddp"))  # appended: modules already imported (phase 2's identical copies) win
import ddp_checkpoint  # noqa: E402
import ddp_data  # noqa: E402
import ddp_train  # noqa: E402
import finetune_ddp  # noqa: E402
import run_files  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

_spec = importlib.util.spec_from_file_location("phase3_benchmark", REPO / "phase3_ddp" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


@pytest.mark.parametrize("scheduler, lr_at_step_5", [("linear", 5e-4), ("constant", 1e-3), ("cosine", 5e-4)])
def test_weight_decay_and_scheduler_reach_the_optimizer(scheduler, lr_at_step_5):
    args = SimpleNamespace(optim="auto", lr=1e-3, weight_decay=0.1, zero=False, fsdp=False, lr_scheduler=scheduler,
                           warmup_ratio=0.0)
    optimizer, lr_schedule = ddp_train.build_optimizer(args, torch.nn.Linear(2, 2), 10, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW  # on CPU; paged 8-bit AdamW on CUDA (the gpu test)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    for _ in range(5):
        optimizer.step()
        lr_schedule.step()
    assert lr_schedule.get_last_lr()[0] == pytest.approx(lr_at_step_5)


# ---------------------------------------------------------------- bad numbers: one line, exit 2 (issue 23 §4)

BAD_NUMBERS = ["inf", "nan", "-2", "1e30", "1" + "0" * 30]
# A clipping threshold no gradient norm reaches is well defined: it clips nothing, like 0 (documented in --help).
ACCEPTED = {("finetune_ddp", "max_grad_norm", "1e30"), ("finetune_ddp", "max_grad_norm", "1" + "0" * 30)}


def numeric_flags(parser) -> list[str]:
    """Every flag with a value check (all of them take numbers), so a new numeric flag is walked too."""
    return [a.option_strings[0] for a in parser._actions if a.type is not None]


@pytest.mark.parametrize("script", [finetune_ddp, benchmark], ids=["finetune_ddp", "benchmark"])
def test_every_numeric_flag_refuses_inf_nan_negative_and_huge_values_in_one_line(script, capsys):
    flags = numeric_flags(script.build_parser())
    assert len(flags) >= (20 if script is finetune_ddp else 7), flags
    name = "finetune_ddp" if script is finetune_ddp else "benchmark"
    for flag in flags:
        for value in BAD_NUMBERS:
            if (name, flag[2:], value) in ACCEPTED:
                script.parse_args([flag, value])
                continue
            with pytest.raises(SystemExit) as e:
                script.parse_args([flag, value])
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.count("\n") == 1, (flag, value, err)
            assert err.startswith(f"error: argument {flag}: expected ") and value in err, (flag, value, err)
    for flag, value in (("--seed", str(2**32)), ("--val_size", "1.5"), ("--max_steps", "0.5")):
        with pytest.raises(SystemExit):
            finetune_ddp.parse_args([flag, value])
        assert capsys.readouterr().err.startswith(f"error: argument {flag}: expected ")
    args = finetune_ddp.parse_args(["--seed", str(2**32 - 1), "--val_size", "0", "--max_steps", "-1"])
    assert (args.seed, args.val_size, args.max_steps) == (2**32 - 1, "0", -1)  # the edges still pass


# ---------------------------------------------------------------- --fsdp combinations that cannot work (issue 22)

@pytest.mark.parametrize("world_size, argv, expected", [
    (2, ["--zero"], "error: --fsdp already shards the optimizer state (ZeRO-3 includes ZeRO-1): drop --zero"),
    (1, [], "error: --fsdp shards the model over the processes, but this is 1 process: launch 2 or more "
            "(torchrun --nproc_per_node=2 ...), or drop --fsdp"),
    (2, ["--quantization", "8bit"], "error: --fsdp cannot shard LLM.int8 weights (--quantization 8bit); use "
                                    "--quantization 4bit or none"),
    (2, ["--optim", "paged_adamw_8bit"],
     "error: --fsdp cannot use --optim paged_adamw_8bit (bitsandbytes' optimizer does not take sharded parameters); "
     "use --optim adamw_torch or auto"),
], ids=["zero", "one_process", "int8", "bnb_optim"])
def test_fsdp_refuses_what_cannot_shard_in_one_line(world_size, argv, expected, monkeypatch, capsys):
    """Checked before any heavy import (finetune_ddp.check_fsdp), on every rank alike; 4-bit and none are sharded
    (tests/test_ddp_fsdp.py). The last two fail inside FSDP otherwise: 'Parameter' object has no attribute 'CB' (bnb
    Int8Params loses its CB/SCB when FSDP replaces it), and bitsandbytes.optimizer_update_32bit has no sharding
    strategy for DTensor parameters."""
    monkeypatch.setattr(finetune_ddp, "WORLD_SIZE", world_size)
    monkeypatch.setattr(finetune_ddp, "RANK", 1 if world_size > 1 else 0)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit) as e:
        finetune_ddp.check_fsdp(finetune_ddp.parse_args(["--fsdp", *argv]))
    prefix = "[rank1]: " if world_size > 1 else ""
    assert e.value.code == 2 and capsys.readouterr().err == prefix + expected + "\n"
    finetune_ddp.check_fsdp(finetune_ddp.parse_args([*argv]))  # the same flags without --fsdp pass
    monkeypatch.setattr(finetune_ddp, "WORLD_SIZE", 2)
    finetune_ddp.check_fsdp(finetune_ddp.parse_args(["--fsdp", "--quantization", "4bit"]))  # and 4-bit shards


def test_eval_batches_cover_every_example_once_and_keep_fsdp_ranks_in_lockstep():
    """5 validation examples, 2 ranks, batch 2: rank 0 has 2 batches, rank 1 one. Under --fsdp every forward is a
    collective, so rank 1 gets an empty second batch (a stand-in it runs and discards); without, it stops."""
    assert ddp_data.eval_batches(5, 0, 2, 2) == ddp_data.eval_batches(5, 0, 2, 2, lockstep=True) == [[0, 2], [4]]
    assert ddp_data.eval_batches(5, 1, 2, 2) == [[1, 3]]
    assert ddp_data.eval_batches(5, 1, 2, 2, lockstep=True) == [[1, 3], []]
    assert ddp_data.eval_batches(1, 1, 2, 4, lockstep=True) == [[]]  # fewer examples than ranks
    for n, world, batch in ((7, 2, 2), (10, 3, 2), (2, 4, 1)):
        runs = [ddp_data.eval_batches(n, r, world, batch, lockstep=True) for r in range(world)]
        assert len({len(run) for run in runs}) == 1  # the same number of forwards on every rank
        assert sorted(i for run in runs for rows in run for i in rows) == list(range(n))  # each example once


# ---------------------------------------------------------------- one all-reduce per optimizer step (§7)

@contextmanager
def process_group():
    """A gloo group of one in this process, as finetune_ddp.py makes under plain python."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class TinyLM(torch.nn.Module):
    """What train_step needs of a model: model(**batch, num_items_in_batch=n).loss = sum of CE / n."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)

    def forward(self, input_ids, attention_mask, labels, num_items_in_batch):
        logits = self.head(self.embed(input_ids))                                        # (B, T, V)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        return SimpleNamespace(loss=ce / num_items_in_batch)


def test_gradient_accumulation_all_reduces_once_per_optimizer_step():
    """Without no_sync() every micro-batch's backward would all-reduce the gradients: the same adapter, 3x the
    communication, so no comparison of results can catch it. A DDP comm hook counts the all-reduces (one call per
    gradient bucket; this model fits in one)."""
    torch.manual_seed(0)
    window = [{"input_ids": torch.randint(16, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long),
               "labels": torch.randint(16, (2, 5))} for _ in range(3)]
    with process_group():
        model = DDP(TinyLM())
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(bucket.index())
            return default_hooks.allreduce_hook(state, bucket)
        model.register_comm_hook(None, counting_allreduce)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
        engine = ddp_train.Engine(model, optimizer, scheduler, torch.device("cpu"), max_grad_norm=1.0)
        loss, grad_norm, n_targets, _ = ddp_train.train_step(engine, window)
    assert calls == [0], calls  # 3 micro-batches, 1 bucket: one all-reduce, in the last backward
    assert n_targets == 3 * 2 * 4 and grad_norm > 0 and loss > 0


# ---------------------------------------------------------------- what --resume accepts and refuses (§1)

def recorded(tmp_path, monkeypatch, world_size: int, argv: list[str]) -> dict:
    """The run_args.json dict a launch on `world_size` ranks with `argv` records (device and optim resolved on CPU
    as check_run resolves them)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    args = finetune_ddp.parse_args(["--output_dir", str(tmp_path / "out"), *argv])
    args.device, args.optim = "cpu", ddp_train.resolved_optim(args.optim, torch.device("cpu"))
    return ddp_train.run_args_dict(args)


def test_resume_accepts_what_keeps_the_run_and_refuses_what_changes_it(tmp_path, monkeypatch):
    data = write_json(tmp_path / "data.json", [{"instruction": "hi", "output": "hello"}])
    old = recorded(tmp_path, monkeypatch, 4, ["--data_path", str(data), "--batch_size", "2", "--target_modules",
                                              "q_proj", "v_proj"])
    run_files.write_run_args(tmp_path / "out", old)
    moved = shutil.copy(data, tmp_path / "moved.json")  # the same bytes under another name

    def check(world_size, argv):
        new = recorded(tmp_path, monkeypatch, world_size, argv)
        run_files.check_resume_args(tmp_path / "out", new, ddp_train.RESUME_KEYS)

    # 2 ranks x 4 resume 4 ranks x 2 (the data order depends on batch_size x ranks only), from the moved file, with
    # the LoRA targets listed in another order: all the same run.
    check(2, ["--data_path", str(moved), "--batch_size", "4", "--target_modules", "v_proj", "q_proj"])
    with pytest.raises(ddp_train.UsageError, match=r"on all ranks together \(batch_size x ranks\) 8 -> 4"):
        check(2, ["--data_path", str(data), "--batch_size", "2", "--target_modules", "q_proj", "v_proj"])
    write_json(moved, [{"instruction": "hi", "output": "hello!"}])  # moved and edited: another data set
    with pytest.raises(ddp_train.UsageError, match="--data_path .*data.json -> .*moved.json"):
        check(4, ["--data_path", str(moved), "--batch_size", "2", "--target_modules", "q_proj", "v_proj"])
    with pytest.raises(ddp_train.UsageError, match="--target_modules q_proj v_proj -> q_proj k_proj v_proj"):
        check(4, ["--data_path", str(data), "--batch_size", "2", "--target_modules", "q_proj", "k_proj", "v_proj"])


def test_resume_refuses_a_checkpoint_written_by_the_other_kind_of_run(tmp_path):
    """A checkpoint records whether --fsdp wrote it (its optimizer state is keyed by parameter name, DDP's by index).
    run_args.json written before --fsdp existed holds no "fsdp" key, so check_resume_args cannot see the switch:
    restore_checkpoint refuses it in one line, before loading anything into the model."""
    from peft import LoraConfig

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = ddp_checkpoint.write_checkpoint(tmp_path, 3, {"w": torch.zeros(1)}, LoraConfig(), optimizer.state_dict(),
                                           {}, {}, [ddp_checkpoint.rng_state()], {"step": 3, "fsdp": True})
    with process_group(), pytest.raises(ddp_train.UsageError) as e:
        ddp_checkpoint.restore_checkpoint(ckpt, model, optimizer, scheduler=None, scaler=None)
    assert str(e.value) == ("--resume: checkpoint-3 was written with --fsdp; resume with it, or choose another "
                            "--output_dir")


# ---------------------------------------------------------------- the fp16 loss scale survives a resume (§1)

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_restores_the_fp16_loss_scale(device, tiny_model_dir, tmp_path, monkeypatch):
    """An fp16 card (compute capability < 8: T4, V100) trains with a GradScaler. A resume must continue with the loss
    scale the run had reached, not start again at its initial value (the first steps could overflow and be skipped
    while the schedule advances). The run: 6 steps, checkpoint at 3; then checkpoint-3 resumed to 6 must end as the
    uninterrupted run did. The scaler grows its scale after every step (growth_interval=1), so the scale moves.
    CPU: the scaler is a stub, an enabled CPU GradScaler on fp32 (no overflow: the scale doubles each step).
    CUDA: real fp16 (the compute dtype forced to fp16, as on a T4), where the growing scale overflows and skips
    steps, so a wrong scale changes the adapter too."""
    real_post_init = ddp_train.Engine.__post_init__

    def post_init(engine):
        real_post_init(engine)
        engine.scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=1)
    monkeypatch.setattr(ddp_train.Engine, "__post_init__", post_init)
    if device == "cuda":
        monkeypatch.setattr(ddp_train, "compute_dtype", lambda device=None: torch.float16)
    argv = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(PERSONA_PATH), "--max_samples", "8",
            "--val_size", "0", "--batch_size", "4", "--grad_accum", "1", "--max_steps", "6", "--save_steps", "3",
            "--lr", "1e-3", "--lora_dropout", "0", "--no_cache", "--device", device,
            "--quantization", "none" if device == "cpu" else "4bit"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    finetune_ddp.main([*argv, "--output_dir", str(full)])
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(full / "run_args.json", resumed)
    finetune_ddp.main([*argv, "--output_dir", str(resumed), "--resume"])
    def scaler(run, step):
        return torch.load(run / f"checkpoint-{step}" / "scaler.pt", weights_only=True)
    assert scaler(full, 3)["scale"] != 2.0**10  # the scale had moved by the checkpoint
    assert scaler(resumed, 6) == scaler(full, 6)
    history = [json.loads((run / "metrics.json").read_text())["log_history"] for run in (full, resumed)]
    assert [h["loss"] for h in history[1] if "loss" in h] == pytest.approx([h["loss"] for h in history[0]
                                                                             if "loss" in h], rel=1e-6)
    a, b = (load_file(run / "adapter_model.safetensors") for run in (full, resumed))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_readme_diff_shows_the_lines_ddp_minimal_adds():
    """phase3_ddp/README.md shows DDP as a diff against the single-process loop; every added line is ddp_minimal.py's,
    so the README cannot drift from the file."""
    readme = (REPO / "phase3_ddp" / "README.md").read_text(encoding="utf-8")
    diff = readme[readme.index("```diff\n"):].split("```")[1]
    source = {line.rstrip() for line in (REPO / "phase3_ddp" / "ddp_minimal.py").read_text().splitlines()}
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert len(added) >= 15 and all(line.rstrip() in source for line in added), [
        line for line in added if line.rstrip() not in source]
