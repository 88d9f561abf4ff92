"""The phase-1 grader's observer (test_grade_train_minimal.py), imported by hooked_run.py before the graded script.
It watches every BatchNorm call (F.batch_norm, which nn.BatchNorm1d/2d/3d call) and every optimizer step, and at
exit writes the list of events to $GRADER_RECORD as JSON, each [event, n]: n consecutive equal events.
  ["step"]                       an optimizer step
  ["bn", stats, grad]            a BatchNorm call; stats "batch" (training mode: normalise with the batch's own
                                 statistics) or "running" (eval mode: the running averages); grad: autograd was on
  ["bn", "running", false, fp]   an eval-mode call under no_grad, with fp the fingerprint of that layer's running
                                 statistics: which trained weights were evaluated (see `fingerprint`)
Nothing is changed: the patched function returns what the original returns."""

import atexit
import json
import os

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

EVENTS = []


def fingerprint(running_mean: torch.Tensor, running_var: torch.Tensor) -> str:
    """Identifies one BatchNorm layer's running statistics, which change at every training step: equal fingerprints
    mean the same trained weights. The grader computes it from best.pt's state_dict the same way (exact sums)."""
    return f"{float(running_mean.double().sum())!r}/{float(running_var.double().sum())!r}"


def note(event: list) -> None:
    if EVENTS and EVENTS[-1][0] == event:
        EVENTS[-1][1] += 1
    else:
        EVENTS.append([event, 1])


_batch_norm = F.batch_norm


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    event = ["bn", "batch" if training else "running", torch.is_grad_enabled()]
    if not training and not event[2] and running_mean is not None:
        event.append(fingerprint(running_mean, running_var))
    note(event)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def write_record() -> None:
    with open(os.environ["GRADER_RECORD"], "w", encoding="utf-8") as f:
        json.dump(EVENTS, f)


F.batch_norm = batch_norm
register_optimizer_step_post_hook(lambda optimizer, args, kwargs: note(["step"]))
atexit.register(write_record)
