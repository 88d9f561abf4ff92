"""Phase 3's optimisation knobs reach the optimizer and the scheduler (in-process, no process group needed);
--target_modules is checked against phase 2 in test_ddp_recipe.py."""

import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

sys.path.append(str(REPO / "phase3_ddp"))  # appended: modules already imported (phase 2's identical copies) win
_spec = importlib.util.spec_from_file_location("phase3_ddp_train", REPO / "phase3_ddp" / "ddp_train.py")
ddp_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_train)


@pytest.mark.parametrize("scheduler, lr_at_step_5", [("linear", 5e-4), ("constant", 1e-3), ("cosine", 5e-4)])
def test_weight_decay_and_scheduler_reach_the_optimizer(scheduler, lr_at_step_5):
    args = SimpleNamespace(optim="auto", lr=1e-3, weight_decay=0.1, zero=False, lr_scheduler=scheduler,
                           warmup_ratio=0.0)
    optimizer, lr_schedule = ddp_train.build_optimizer(args, torch.nn.Linear(2, 2), 10, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW  # on CPU; paged 8-bit AdamW on CUDA (the gpu test)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    for _ in range(5):
        optimizer.step()
        lr_schedule.step()
    assert lr_schedule.get_last_lr()[0] == pytest.approx(lr_at_step_5)
