"""Grades phase3_ddp/ddp_minimal.py, or your rewrite of it: --impl ddp_minimal=PATH.

CONTRACT (ddp_minimal): a script launched as `torchrun --nproc_per_node=W SCRIPT FLAGS` (gloo on CPU) with
    --model_name_or_path DIR  --data_path FILE (Alpaca JSON list)  --output_dir DIR
    --batch_size B (sequences per step PER RANK)  --max_steps N  --lr LR  --max_samples K (first K records)
that LoRA-fine-tunes the model (answer-only labels) in a hand-written loop with DistributedSampler (+ set_epoch every
epoch), DistributedDataParallel and AdamW, no LoRA dropout, and on rank 0 only
    prints `step N loss X` once per optimizer step (N = 1, 2, ...; X with at least 4 decimals), the loss being the
        mean over the answer tokens of ALL ranks (not rank 0's alone);
    writes a PEFT adapter (PeftModel.save_pretrained) into --output_dir.

Checked on the tiny random Qwen2 and the persona data (10 records, 5 steps: two epochs, a short last batch):
W = 2 ranks x batch 2 must equal W = 1 process x batch 4: the first step's gradient norm (rtol 1e-5), every printed
loss (1e-5, or one unit of the last printed decimal) and every adapter tensor (1e-5). Observed in the runs
(hooks_ddp.py): each rank iterates a DistributedSampler, the ranks read disjoint shares of every epoch, each epoch
in a new order; the ranks apply identical gradients; only rank 0 prints and saves.
"""

import json
import math
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PERSONA_PATH
from grader import fail_with, run_hooked
from safetensors.torch import load_file

N_SAMPLES, STEPS, LR = 10, 5, 1e-3  # 10 = 2 ranks x 5: 3 micro-batches per epoch (2, 2, 1 per rank), so 5 steps
BATCH = {1: 4, 2: 2}                 # cross an epoch boundary; processes -> batch per rank (same global batch)
TOL = 1e-5
STEP_LINE = re.compile(r"^step (\d+) loss (-?\d+(?:\.(\d+))?)\s*$", re.M)


def launch(script, model_dir, out, nproc: int):
    """One torchrun launch of the graded script with the observer; returns (process, records, output_dir)."""
    record = out.with_suffix(".jsonl")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = run_hooked("hooks_ddp", script, "--model_name_or_path", model_dir, "--data_path", PERSONA_PATH,
                      "--output_dir", out, "--batch_size", BATCH[nproc], "--max_steps", STEPS, "--lr", LR,
                      "--max_samples", N_SAMPLES, record=record, launcher=launcher, timeout=600,
                      env={"OMP_NUM_THREADS": "1",  # one thread per rank: 2 ranks on 2 cores
                           "CUDA_VISIBLE_DEVICES": ""})  # gloo on CPU, also on a machine with one GPU
    records = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return proc, records, out


@pytest.fixture(scope="module")
def runs(impl_path, request, tmp_path_factory):
    """Both launches, side by side (they share the cores while each waits on imports): {1: run, 2: run}."""
    script = impl_path("ddp_minimal")  # first: skips before the tiny model is built when --impl names other files
    tiny_model_dir, tmp = request.getfixturevalue("tiny_model_dir"), tmp_path_factory.mktemp("ddp_grade")
    with ThreadPoolExecutor(2) as pool:
        futures = {n: pool.submit(launch, script, tiny_model_dir, tmp / f"w{n}", n) for n in BATCH}
        return {n: future.result() for n, future in futures.items()}


def events(run, event: str, rank: int | None = None) -> list[dict]:
    return [r for r in run[1] if r["event"] == event and rank in (None, r["rank"])]


def printed_losses(run, nproc: int) -> list[tuple[float, int]]:
    """(loss, decimals) of every `step N loss X` line, after checking the run finished and printed each step once."""
    proc, _, out = run
    if proc.returncode != 0:
        fail_with(f"with {nproc} process(es) the run failed (exit code {proc.returncode}):\n{proc.stderr[-2500:]}")
    lines = STEP_LINE.findall(proc.stdout)
    if [int(n) for n, _, _ in lines] != list(range(1, STEPS + 1)):
        steps = [int(n) for n, _, _ in lines]
        hint = ("each step printed by every rank: print on rank 0 only" if len(steps) > len(set(steps))
                else "print `step N loss X` once per optimizer step, N = 1, 2, ..., and stop after --max_steps")
        fail_with(f"with {nproc} process(es) and --max_steps {STEPS} the printed steps are {steps}: {hint}")
    if min(len(d) for _, _, d in lines) < 4:
        fail_with("print the loss with at least 4 decimals (e.g. f'{loss:.4f}'), so runs can be compared")
    return [(float(x), len(d)) for _, x, d in lines]


def test_both_runs_finish_print_every_step_and_save_on_rank0(runs):
    for nproc, run in runs.items():
        printed_losses(run, nproc)
        out = run[2]
        if not (out / "adapter_config.json").is_file() or not (out / "adapter_model.safetensors").is_file():
            fail_with(f"{out} holds no PEFT adapter: save it on rank 0 with model.save_pretrained(output_dir)")
        savers = sorted({r["rank"] for r in events(run, "save")})
        if savers != [0]:
            fail_with(f"with {nproc} process(es) the adapter was saved by ranks {savers}: save on rank 0 only "
                      "(the replicas are identical; two writers of one file can leave it corrupt)")


def test_each_rank_reads_its_own_share_in_a_new_order_every_epoch(runs):
    run = runs[2]
    for rank in (0, 1):
        epochs = events(run, "sampler", rank)
        if not epochs:
            fail_with(f"rank {rank} never iterated a DistributedSampler: give the DataLoader "
                      "sampler=DistributedSampler(dataset) so that each rank reads its own share of the data")
        if any((e["num_replicas"], e["sampler_rank"]) != (2, rank) for e in epochs):
            fail_with(f"rank {rank}'s DistributedSampler has num_replicas={epochs[0]['num_replicas']}, "
                      f"rank={epochs[0]['sampler_rank']}: it must be the world size and this process's rank")
        if len(epochs) < 2:
            fail_with(f"{STEPS} steps of {N_SAMPLES} examples span 2 epochs, but rank {rank} iterated its sampler "
                      f"{len(epochs)} time(s): loop over the DataLoader again for each epoch until --max_steps")
        orders = [e["indices"] for e in epochs]
        if len({e["epoch"] for e in epochs}) < len(epochs) or any(o == orders[0] for o in orders[1:]):
            fail_with(f"every epoch reads the same order: call sampler.set_epoch(epoch) at the start of each "
                      f"epoch (rank {rank} saw sampler.epoch = {[e['epoch'] for e in epochs]}); without it "
                      "DistributedSampler shuffles with the same seed every epoch")
    for k, (a, b) in enumerate(zip(events(run, "sampler", 0), events(run, "sampler", 1), strict=False)):
        if set(a["indices"]) & set(b["indices"]) or len(a["indices"] + b["indices"]) != N_SAMPLES:
            fail_with(f"epoch {k}: rank 0 read {a['indices']}, rank 1 read {b['indices']}: the ranks must read "
                      f"disjoint shares that together cover the {N_SAMPLES} examples once")


def test_printed_loss_is_averaged_over_all_ranks(runs):
    """Step 1 runs on the same weights in both launches, so only the averaging can make its loss differ."""
    (one, digits), (two, _) = printed_losses(runs[1], 1)[0], printed_losses(runs[2], 2)[0]
    if abs(one - two) > max(TOL * abs(one), 1.01 * 10 ** -digits):
        fail_with(f"the printed loss is not averaged over all ranks' tokens: step 1 prints {two} with 2 ranks x "
                  f"batch {BATCH[2]} but {one} with 1 process x batch {BATCH[1]} (same examples, same weights). "
                  "All-reduce the summed CE and the answer-token count over ranks and print sum / count on rank 0; "
                  "printing rank 0's own loss is the likely mistake")


def test_first_step_gradients_equal_one_process(runs):
    """AdamW is nearly blind to a uniform gradient scale (a loss not multiplied by W), so the adapters could match
    while the gradients are wrong: compare the gradient norms the optimizer sees."""
    norms = {n: [e["grad_norm"] for e in events(runs[n], "step", 0)] for n in runs}
    if len(norms[1]) != STEPS or len(norms[2]) != STEPS:
        fail_with(f"expected {STEPS} optimizer steps per rank, saw {len(norms[1])} (1 process) and {len(norms[2])} "
                  "(rank 0 of 2): call optimizer.step() once per step")
    rank1 = [e["grad_norm"] for e in events(runs[2], "step", 1)]
    if len(rank1) != STEPS or any(not math.isclose(a, b, rel_tol=1e-6) for a, b in zip(norms[2], rank1, strict=True)):
        fail_with(f"the 2 ranks applied different gradients (norms {norms[2]} vs {rank1}): wrap the model in "
                  "DistributedDataParallel and run the forward through the wrapper, so backward all-reduces them")
    one, two = norms[1][0], norms[2][0]
    if not math.isclose(one, two, rel_tol=TOL):
        fail_with(f"the gradients are not those of the loss averaged over all ranks' tokens: the first step's "
                  f"gradient norm is {two:.6g} with 2 ranks x batch {BATCH[2]} but {one:.6g} with 1 process x batch "
                  f"{BATCH[1]} (ratio {two / one:.4f}). DDP averages the gradients over the W ranks, so each rank's "
                  "loss must be its summed CE x W / (answer tokens summed over all ranks with dist.all_reduce). "
                  "Dividing by the rank's own token count, or forgetting x W (ratio 1/W), is the likely mistake")


def test_two_ranks_equal_one_process_with_twice_the_batch(runs):
    losses = {n: printed_losses(runs[n], n) for n in runs}
    for step, ((one, digits), (two, _)) in enumerate(zip(losses[1], losses[2], strict=True), 1):
        if abs(one - two) > max(TOL * abs(one), 1.01 * 10 ** -digits):
            fail_with(f"step {step}: loss {two} with 2 ranks x batch {BATCH[2]}, {one} with 1 process x batch "
                      f"{BATCH[1]}: the loss is not averaged over all ranks' tokens, or the ranks do not read the "
                      "global batch one process reads (DistributedSampler, the same seed on every rank)")
    adapters = {n: load_file(runs[n][2] / "adapter_model.safetensors") for n in runs}
    if adapters[1].keys() != adapters[2].keys():
        fail_with(f"the adapters hold different tensors: {sorted(adapters[1])[:3]} vs {sorted(adapters[2])[:3]}")
    if not any("lora_B" in k and v.abs().max() > 1e-4 for k, v in adapters[2].items()):
        fail_with("the adapter did not train: every LoRA B is still (near) zero")
    diff = max((adapters[1][k] - adapters[2][k]).abs().max().item() for k in adapters[1])
    if diff > TOL:
        fail_with(f"2 ranks x batch {BATCH[2]} and 1 process x batch {BATCH[1]} end with adapters {diff:.2e} apart "
                  f"(tolerance {TOL}): the loss is not averaged over all ranks' tokens, or the LoRA init differs "
                  "per rank (seed it the same on every rank), or LoRA dropout is on")
