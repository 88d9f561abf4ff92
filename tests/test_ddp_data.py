"""phase3_ddp/ddp_data.py: who tokenises first (under a real 2-process torchrun), and the sampler (in-process):
who reads what, in which order."""

import importlib.util
import os
import random
import subprocess
import sys

from conftest import REPO

sys.path.append(str(REPO / "phase3_ddp"))  # appended: modules already imported (phase 2's identical copies) win
_spec = importlib.util.spec_from_file_location("phase3_ddp_data", REPO / "phase3_ddp" / "ddp_data.py")
ddp_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_data)

_rng = random.Random(0)
LENGTHS = [_rng.randint(5, 500) for _ in range(203)]  # token counts of 203 examples


def epoch(batch_size: int, world: int, epoch: int = 0, skip: int = 0) -> list[list[list[int]]]:
    """Every rank's micro-batches of one epoch: [rank][micro-batch] -> example indices."""
    ranks = []
    for rank in range(world):
        sampler = ddp_data.LengthGroupedDistributedSampler(LENGTHS, batch_size, world, rank, seed=42)
        sampler.set_epoch(epoch, skip=skip)
        ranks.append(list(sampler))
        assert len(ranks[-1]) == len(sampler)
    return ranks


def padding(batches) -> int:
    return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches)


def test_ranks_split_each_global_batch_like_one_process_with_w_times_the_batch():
    one = epoch(batch_size=4, world=1)[0]
    two = epoch(batch_size=2, world=2)
    assert len(one) == len(two[0]) == len(two[1]) == 51  # 203 = 50 x 4 + 3: the short one is kept, same count
    for k, batch in enumerate(one):
        assert sorted(two[0][k] + two[1][k]) == sorted(batch)  # step k: the same examples, split over 2 ranks
        assert not set(two[0][k]) & set(two[1][k])
    used = [i for b in one for i in b]
    assert sorted(used) == list(range(203))  # every example exactly once per epoch, none dropped
    assert sorted(map(len, one))[:2] == [3, 4]


def test_a_rank_without_an_example_in_the_short_micro_batch_gets_a_masked_copy():
    """9 examples, 4 ranks x 2: one full global micro-batch and one of a single example. Every rank runs 2
    micro-batches (DDP needs the same number of backward passes everywhere); ranks 1-3 run a masked copy of that
    example (index -1 - i), which MaskedCopies serves with every label ignored: it adds no target token."""
    lengths = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    ranks = []
    for rank in range(4):
        sampler = ddp_data.LengthGroupedDistributedSampler(lengths, 2, 4, rank, seed=0)
        ranks.append(list(sampler))
        assert len(ranks[-1]) == len(sampler) == 2
    real = sorted(i for batches in ranks for b in batches for i in b if i >= 0)
    assert real == list(range(9))
    short = next(k for k in range(2) if len(ranks[0][k]) == 1)
    (lone,) = ranks[0][short]
    assert [ranks[r][short] for r in (1, 2, 3)] == [[-1 - lone]] * 3
    data = ddp_data.MaskedCopies([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}] * 9)
    assert data[lone] == {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    assert data[-1 - lone] == {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}


def test_batches_group_similar_lengths_and_the_longest_comes_first():
    grouped = epoch(batch_size=4, world=1)[0]
    shuffled = list(range(203))
    random.Random(1).shuffle(shuffled)
    plain = [shuffled[i:i + 4] for i in range(0, 200, 4)]  # what a plain shuffled sampler would batch
    assert padding(grouped) < 0.3 * padding(plain)
    assert max(LENGTHS) in [LENGTHS[i] for i in grouped[0]]  # out of memory shows on step 1, not hours in


def test_each_epoch_has_its_own_order_and_a_resume_skips_exactly_what_was_done():
    first, second = epoch(4, 1, epoch=0)[0], epoch(4, 1, epoch=1)[0]
    assert first != second and sorted(map(sorted, first)) != sorted(map(sorted, second))  # new groups too
    assert epoch(4, 1, epoch=0)[0] == first  # deterministic: every rank, every restart computes the same
    assert epoch(4, 1, epoch=0, skip=7)[0] == first[7:]


# Rank 0's load is slow on purpose: rank 1 must wait for it, not race ahead. Then rank 0's load fails: rank 1 must
# raise the same error without loading.
RANK0_FIRST = f"""
import sys, time
sys.path.insert(0, {str(REPO / "phase3_ddp")!r})
import torch.distributed as dist
from ddp_data import load_on_rank0_first
from qlora_model import UsageError
dist.init_process_group("gloo")
rank = dist.get_rank()

def load():
    if rank == 0:
        time.sleep(3)
    print(f"rank {{rank}} loaded at {{time.time()}}", flush=True)
    return rank

assert load_on_rank0_first(load) == rank

def failing_load():
    if rank == 0:
        raise UsageError("data file not found: x.json")
    raise AssertionError("rank 1 loaded although rank 0 had failed")

try:
    load_on_rank0_first(failing_load)
except UsageError as e:
    print(f"rank {{rank}} raised: {{e}}", flush=True)
dist.destroy_process_group()
"""


def test_rank0_loads_first_and_its_error_reaches_every_rank(tmp_path):
    script = tmp_path / "rank0_first.py"
    script.write_text(RANK0_FIRST, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = {int(line.split()[1]): float(line.split()[-1]) for line in proc.stdout.splitlines() if "loaded at" in line}
    assert loaded.keys() == {0, 1} and loaded[1] >= loaded[0]  # rank 1 started loading after rank 0 had finished
    for rank in (0, 1):
        assert f"rank {rank} raised: data file not found: x.json" in proc.stdout, proc.stdout
