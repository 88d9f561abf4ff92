"""What DDP adds to the data of phase 2: who tokenises, and which rank reads which examples in which order.

The data itself (Alpaca/chat records -> chat template -> answer-only labels -> train/val split -> padding
collator) is sft_data.py, a byte-identical copy of phase2_lora/sft_data.py. This module adds:

- load_on_rank0_first: rank 0 tokenises (and fills the cache) while the other ranks wait; then they load too.
- LengthGroupedDistributedSampler: length-grouped micro-batches (little padding, as the HF Trainer's
  group_by_length in phase 2) that every rank derives from the same seeded order, so that each optimizer step
  reads exactly the examples a single process with W times the batch would read; every example once per epoch.
- MaskedCopies: the dataset as that sampler indexes it, with the masked stand-ins a short micro-batch needs.
- eval_batches: which validation examples each rank evaluates, in lockstep under --fsdp.
- target_tokens, epoch_note: an epoch's supervised tokens, and the start-up line on how its examples fill the steps.
"""

import math

import pyarrow.compute as pc
import torch
import torch.distributed as dist
from qlora_model import UsageError
from sft_data import IGNORE_INDEX
from torch.utils.data import Dataset, Sampler


def load_on_rank0_first(load):
    """Call `load()` on rank 0, then on every other rank. Rank 0 builds the tokenisation cache; the others
    wait for it at a collective and then read the cache instead of tokenising the same records W times.
    A UsageError on rank 0 (missing file, bad JSON) is broadcast and raised on every rank, so no rank is
    left waiting for a peer that has given up."""
    result, error = None, [None]
    if dist.get_rank() == 0:
        try:
            result = load()
        except UsageError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)  # the barrier: the others start once rank 0 is done
    if error[0] is not None:
        raise UsageError(error[0])
    return result if dist.get_rank() == 0 else load()


class LengthGroupedDistributedSampler(Sampler[list[int]]):
    """Batch sampler: this rank's micro-batches (lists of example indices) for one epoch.

    Every rank computes the same global order, then takes its share of it:
      1. a permutation of the examples seeded by seed + epoch (the same on every rank, new every epoch;
         without set_epoch every epoch would repeat the first one's order);
      2. cut into megabatches of up to 50 global micro-batches, each sorted by length, longest first, and
         cut into global micro-batches of batch_size x W examples of similar length (little padding);
      3. the global micro-batches shuffled (same generator), the one with the longest example moved first,
         so that a sequence length that does not fit in memory fails on step 1, not hours into the run;
      4. rank r takes examples r, r+W, r+2W, ... of each global micro-batch.
    The order depends on W only through the global micro-batch, so 2 ranks x 2 sequences read the same
    examples per step as 1 process x 4 sequences: the runs are identical (tests/test_ddp.py).
    Nothing is dropped: when len % (batch_size x W) != 0, one global micro-batch is short. Every rank still gets
    one micro-batch per global one (DDP needs the same number of backward passes on every rank); a rank left
    with no example of the short one gets a masked copy of its first example (index -1 - i, see MaskedCopies):
    no target token, so no loss, no gradient and no change to the token count the loss is normalised by.
    """

    def __init__(self, lengths: list[int], batch_size: int, num_replicas: int, rank: int, seed: int):
        self.lengths, self.batch_size, self.num_replicas, self.rank = lengths, batch_size, num_replicas, rank
        self.seed, self.epoch, self.skip = seed, 0, 0
        self.global_batch = batch_size * num_replicas

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use the order of `epoch`, starting after its first `skip` micro-batches (a resumed run)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.global_batch) - self.skip

    def global_batches(self) -> list[list[int]]:
        """The global micro-batches of the current epoch, in training order (steps 1-3 above)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n_batches = math.ceil(len(self.lengths) / self.global_batch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        per_mega = max(1, min(50, n_batches // 4)) * self.global_batch  # >= 4 megabatches: groups change per epoch
        batches = []
        for start in range(0, len(order), per_mega):
            mega = sorted(order[start:start + per_mega], key=lambda i: -self.lengths[i])
            batches += [mega[i:i + self.global_batch] for i in range(0, len(mega), self.global_batch)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def __iter__(self):
        for batch in self.global_batches()[self.skip:]:
            yield batch[self.rank::self.num_replicas] or [-1 - batch[0]]  # nothing left for this rank: a masked copy


class MaskedCopies(Dataset):
    """The training set as LengthGroupedDistributedSampler indexes it: i >= 0 is example i; -1 - i is example i
    with every label IGNORE_INDEX, the stand-in of a rank that has no example in the short global micro-batch."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        if i >= 0:
            return self.ds[i]
        example = dict(self.ds[-1 - i])
        example["labels"] = [IGNORE_INDEX] * len(example["labels"])
        return example


def eval_batches(n: int, rank: int, world_size: int, batch_size: int, lockstep: bool = False) -> list[list[int]]:
    """Rank `rank`'s validation batches: examples rank, rank + W, ... (each example on one rank, no padding
    duplicates), batch_size at a time. lockstep (--fsdp, where every forward is a collective all-gather): as many
    batches as rank 0 has, the ones past this rank's examples empty (the caller runs a stand-in and discards it)."""
    mine = list(range(rank, n, world_size))
    count = math.ceil(math.ceil(n / world_size) / batch_size) if lockstep else math.ceil(len(mine) / batch_size)
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def target_tokens(ds) -> int:
    """Supervised tokens in one epoch of ds: labels != IGNORE_INDEX, less each row's first (it predicts nothing)."""
    labels = ds.with_format("arrow")["labels"].combine_chunks()  # (rows, variable length), the split's rows
    supervised = pc.sum(pc.not_equal(labels.flatten(), IGNORE_INDEX)).as_py() or 0
    return supervised - (pc.sum(pc.not_equal(pc.list_element(labels, 0), IGNORE_INDEX)).as_py() or 0)


def epoch_note(n: int, micro: int, world: int, n_micro: int, grad_accum: int) -> str:
    """The start-up line that says how an epoch's examples fill its steps (none is dropped)."""
    note = f"every one of the {n} training examples is trained once per epoch"
    if n % micro:
        masked = f" ({world - n % micro} rank(s) run a masked copy: no loss, no tokens)" if n % micro < world else ""
        note += f"; one global micro-batch holds {n % micro} of {micro}{masked}"
    if n_micro % grad_accum:
        note += f"; the last step of an epoch has {n_micro % grad_accum} of {grad_accum} micro-batches"
    return note
