"""The DDP grader's observer (test_grade_ddp_minimal.py), imported by hooked_run.py before the graded script, in every
rank. It appends one JSON line per observation to $GRADER_RECORD, tagged with the rank torchrun gave the process:
  sampler  each time a DistributedSampler is iterated (once per epoch): its epoch, num_replicas, rank and indices;
  step     each optimizer step: the global norm of the gradients the optimizer is about to apply;
  save     each PeftModel.save_pretrained call.
Nothing is changed: every patched method returns what the original returns."""

import json
import os

from peft import PeftModel
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data.distributed import DistributedSampler

RANK = int(os.environ.get("RANK", 0))


def record(event: str, **fields) -> None:
    """One line per observation, written with a single O_APPEND write, so the ranks' lines never interleave."""
    line = json.dumps({"event": event, "rank": RANK, **fields}) + "\n"
    fd = os.open(os.environ["GRADER_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


_sampler_iter = DistributedSampler.__iter__


def sampler_iter(self):
    indices = list(_sampler_iter(self))
    record("sampler", epoch=self.epoch, num_replicas=self.num_replicas, sampler_rank=self.rank, indices=indices)
    return iter(indices)


def before_step(optimizer, args, kwargs) -> None:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    record("step", grad_norm=sum(float(g.double().pow(2).sum()) for g in grads) ** 0.5, n_grads=len(grads))


_save_pretrained = PeftModel.save_pretrained


def save_pretrained(self, *args, **kwargs):
    record("save")
    return _save_pretrained(self, *args, **kwargs)


DistributedSampler.__iter__ = sampler_iter
register_optimizer_step_pre_hook(before_step)
PeftModel.save_pretrained = save_pretrained
