"""phase3_ddp/ddp_data.py's LengthGroupedDistributedSampler, in-process: who reads what, in which order."""

import importlib.util
import random
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
    assert len(one) == len(two[0]) == len(two[1]) == 203 // 4  # whole global micro-batches only, same count
    for k, batch in enumerate(one):
        assert sorted(two[0][k] + two[1][k]) == sorted(batch)  # step k: the same examples, split over 2 ranks
        assert not set(two[0][k]) & set(two[1][k])
    used = [i for b in one for i in b]
    assert len(used) == len(set(used)) == 200  # each example at most once per epoch


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
