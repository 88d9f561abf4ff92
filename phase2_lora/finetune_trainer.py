"""The HF Trainer pieces of finetune.py: a Trainer that accounts per token, and a graceful Ctrl-C.

TokenStatsTrainer changes three things about transformers' Trainer, each for a reason given where it is done:
tokens/s at every logging step, the eval loss as a mean over target tokens, and a length-grouped sampler that is
fast and whose order is a function of (seed, epoch), so that --resume continues exactly.
"""

import signal
import sys
import time

import torch
from chunked_loss import IGNORE_INDEX
from sft_data import real_tokens
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler (batches of similar length), its order drawn from a generator seeded
    with seed + epoch instead of the global RNG at the moment the iterator is created.

    With the global RNG, a run resumed from a checkpoint in epoch k >= 1 draws epoch 0's order (the RNG was just
    seeded), then skips epoch k's first batches in it: some examples train twice, others never. The Trainer calls
    set_epoch(epoch) on the sampler before every epoch, the resumed one included (accelerate's DataLoaderShard
    forwards it through skip_first_batches' SkipBatchSampler), so the resumed epoch gets its own order back."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class TokenStatsTrainer(Trainer):
    """HF Trainer that accounts per token: counts the real and padded tokens of the training batches, logs
    tokens/s at every logging step, and reports the eval loss as the mean over all target tokens."""

    real_tokens = padded_tokens = 0

    def train(self, *args, **kwargs):
        self._since_log = (time.perf_counter(), self.real_tokens)
        return super().train(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        # The Trainer hands LengthGroupedSampler `dataset["length"]`, which datasets >= 4 returns as a lazy
        # Column that the sampler then reads row by row (~1 ms a row: about a minute per epoch at 52k records,
        # paid before the first step). `[:]` reads the column once, as a plain list. And the Trainer's sampler
        # draws from the global RNG, which breaks --resume after epoch 0 (EpochLengthGroupedSampler says why).
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or "length" not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                         lengths=dataset["length"][:], seed=seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:  # eval batches go through here too; count training only
            self.real_tokens += real_tokens(inputs)  # plain batches: the attention mask; packed: position ids
            self.padded_tokens += inputs["input_ids"].numel()
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log line (eval and summary lines have other keys)
            now, tokens = time.perf_counter(), self.real_tokens
            then, tokens_then = self._since_log
            logs["tokens_per_second"] = round((tokens - tokens_then) / max(now - then, 1e-9), 1)
            self._since_log = (now, tokens)
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # The Trainer averages the batches' mean losses (weighted by batch size), so a batch of short answers
        # counts as much as one of long answers. The eval loss we report is sum(token losses) / n target tokens,
        # the quantity the training loss estimates; prediction_step below accumulates both sums.
        start, self._eval_sums = time.perf_counter(), [0.0, 0]
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        loss_sum, targets = self._eval_sums
        output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / targets if targets else float("nan")
        if hasattr(self, "_since_log"):  # evaluation time is not training time: keep it out of tokens/s
            then, tokens = self._since_log
            self._since_log = (then + time.perf_counter() - start, tokens)
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        targets = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())  # position t predicts labels[t + 1]
        if loss is not None and targets:
            self._eval_sums[0] += float(loss) * targets  # the batch's loss is its mean over these targets
            self._eval_sums[1] += targets
        return loss, logits, labels


class StopOnCtrlC(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False

    def on_train_begin(self, args, state, control, **kwargs):
        def handler(signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C raises KeyboardInterrupt
            print("\nCtrl-C: saving a checkpoint after this step (press again to abort without saving)",
                  file=sys.stderr)
        signal.signal(signal.SIGINT, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = control.should_training_stop = True
        return control
