"""Grades phase1_cnn/train_minimal.py, or your rewrite of it: --impl train_minimal=PATH.

CONTRACT (train_minimal): one script, run as
    python FILE --data_dir DIR --epochs N --output_dir OUT
  - reads DIR/cifar-10-batches-py/ (data_batch_1..5, test_batch: the official python-version pickles);
  - trains a CNN with BatchNorm (nn.BatchNorm2d) on the training batches minus a validation split carved out of them;
  - prints one line per epoch of key-value pairs, accuracies as fractions:
        epoch 3 train_loss 0.812 train_acc 0.71 val_loss 0.90 val_acc 0.69
  - keeps OUT/best.pt = {"model": model.state_dict(), "epoch": int, "val_acc": float}, the epoch with the best val_acc,
    loadable with torch.load(path, weights_only=True);
  - at the end reloads best.pt, evaluates it once on the test set and prints `test_acc 0.70`.

Checked on small data sets in the same file format (ten classes of coloured stripes, tests/cifar_fixtures.py), with
N = 10, each run observed by tests/acceptance/hooks_phase1.py (every BatchNorm call and optimizer step):
  1. it runs and prints a line per epoch and the test_acc line;
  2. evaluation runs in eval mode (BatchNorm on its running averages) under no_grad, and training in train mode;
  3. best.pt loads with weights_only=True, its epoch is the one with the best printed val_acc, its weights are the
     ones validated at that epoch, and the final test evaluates those weights;
  4. it learns: test_acc >= 0.80;
  5. the test set never chooses: a second run, on data whose TEST labels are shifted by one class (a model that
     learned scores near 0 there), must still show val_acc rising and pick best.pt by it.
"""

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from cifar_fixtures import write_cifar_like
from grader import fail_with, run_hooked

EPOCHS = 10
N_PER_FILE, N_TEST = 200, 100  # 1000 training images: enough steps (and BatchNorm running averages) for batch 256
MIN_TEST_ACC = 0.80
EPOCH_LINE = "epoch 3 train_loss 0.812 train_acc 0.71 val_loss 0.90 val_acc 0.69"
EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")
NUMBER = r"-?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
PAIR = re.compile(rf"([A-Za-z_]+)[\s=:]+({NUMBER})", re.IGNORECASE)  # "val_acc 0.69", "val_acc=0.69", "loss nan"
CHOSEN_ON_TEST = "best.pt was chosen on the test set"


@dataclass
class Run:
    name: str
    proc: object  # subprocess.CompletedProcess
    out: object  # the run's --output_dir (Path)
    events: list  # hooks_phase1's record: [event, count] pairs


def launch(impl, root, name: str, seed: int, test_label_shift: int) -> Run:
    data = write_cifar_like(root / f"data_{name}", N_PER_FILE, N_TEST, seed=seed, test_label_shift=test_label_shift)
    out, record = root / f"out_{name}", root / f"record_{name}.json"
    proc = run_hooked("hooks_phase1", impl, "--data_dir", data, "--epochs", EPOCHS, "--output_dir", out,
                      record=record, timeout=900, env={"OMP_NUM_THREADS": "1"})
    events = json.loads(record.read_text()) if record.exists() else []
    return Run(name, proc, out, events)


@pytest.fixture(scope="module")
def runs(impl_path, tmp_path_factory) -> dict[str, Run]:
    """Both runs at once (one CPU thread each): "plain" on the patterns, "shifted" with its test labels shifted."""
    impl, root = impl_path("train_minimal"), tmp_path_factory.mktemp("grade_train")
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(launch, impl, root, "plain", 0, 0)
        shifted = pool.submit(launch, impl, root, "shifted", 1, 1)
        return {"plain": plain.result(), "shifted": shifted.result()}


def epoch_rows(run: Run) -> list[dict]:
    """The per-epoch lines as {key: value}, after checking the script ran and printed them as the contract says."""
    if run.proc.returncode != 0:
        lines = run.proc.stderr.strip().splitlines() or ["(no output on stderr)"]
        raised = [ln for ln in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", ln)]  # a traceback's last line
        fail_with(f"the script exited with code {run.proc.returncode} ({run.name} run): {(raised or lines)[-1][:400]}")
    rows = [{k.lower(): float(v) for k, v in PAIR.findall(line)} for line in run.proc.stdout.splitlines()
            if re.match(r"\s*epoch\b", line, re.IGNORECASE)]
    if [row.get("epoch") for row in rows] != list(range(1, EPOCHS + 1)):
        fail_with(f"expected one line per epoch (epochs 1..{EPOCHS}) like `{EPOCH_LINE}`; the lines starting with "
                  f"'epoch' give epochs {[row.get('epoch') for row in rows]}")
    for row in rows:
        missing = [k for k in EPOCH_KEYS if k not in row]
        if missing:
            fail_with(f"epoch {row['epoch']:.0f}'s line lacks {missing}: print `{EPOCH_LINE}` every epoch")
        if not all(0 <= row[k] <= 1 for k in ("train_acc", "val_acc")):
            fail_with(f"epoch {row['epoch']:.0f}: accuracies must be fractions in [0, 1] (0.69, not 69%), got "
                      f"train_acc {row['train_acc']} and val_acc {row['val_acc']}")
    return rows


def printed_test_acc(run: Run) -> float:
    found = re.findall(r"\btest_acc[\s=:]+(\d+(?:\.\d*)?)", run.proc.stdout)
    if not found:
        fail_with("no `test_acc 0.70` line: at the end, reload best.pt, evaluate it on the test set and print it")
    return float(found[-1])


def load_best(run: Run, rows: list[dict]) -> dict:
    path = run.out / "best.pt"
    if not path.is_file():
        fail_with(f"no best.pt in --output_dir ({run.name} run): save it there when val_acc improves")
    try:
        best = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail_with(f"best.pt does not load with torch.load(..., weights_only=True) ({type(e).__name__}): save only "
                  "tensors and plain Python values: {'model': model.state_dict(), 'epoch': epoch, 'val_acc': acc}")
    if not (isinstance(best, dict) and {"model", "epoch", "val_acc"} <= best.keys()
            and isinstance(best["model"], dict) and all(torch.is_tensor(t) for t in best["model"].values())):
        fail_with("best.pt must be a dict {'model': model.state_dict(), 'epoch': epoch, 'val_acc': val_acc}; got "
                  + (f"keys {sorted(best)}" if isinstance(best, dict) else type(best).__name__))
    if best["epoch"] not in range(1, len(rows) + 1):
        fail_with(f"best.pt's epoch is {best['epoch']!r}: store the epoch number (1..{len(rows)}) it was saved at")
    return best


def bn_fingerprints(state_dict: dict) -> set[str]:
    """hooks_phase1.fingerprint of every BatchNorm layer in a state_dict."""
    prefixes = [k.removesuffix("running_mean") for k in state_dict if k.endswith("running_mean")]
    return {f"{float(state_dict[p + 'running_mean'].double().sum())!r}/"
            f"{float(state_dict[p + 'running_var'].double().sum())!r}" for p in prefixes}


def evaluated_weights(events: list) -> list[set[str]]:
    """After each stretch of optimizer steps (an epoch), the fingerprints of the weights evaluated before the next
    step: entry k-1 holds epoch k's validation (and, after the last epoch, the final test)."""
    stretches = []
    for event, _ in events:
        if event == ["step"]:
            if not stretches or stretches[-1]:
                stretches.append(set())
        elif stretches and len(event) == 4:  # an eval-mode BatchNorm call under no_grad, with its fingerprint
            stretches[-1].add(event[3])
    return stretches


# ----------------------------------------------------------------- the checks, in this order (-x stops at the first)

def test_prints_a_line_per_epoch_and_test_acc(runs):
    epoch_rows(runs["plain"])
    printed_test_acc(runs["plain"])


def test_eval_mode_for_evaluation_and_train_mode_for_training(runs):
    events = [event for event, _ in runs["plain"].events]
    if not any(e[0] == "bn" for e in events):
        fail_with("no BatchNorm layer ran: the contract's CNN has nn.BatchNorm2d layers (conv -> BatchNorm -> ReLU)")
    if ["bn", "batch", False] in events:
        fail_with("evaluation ran BatchNorm in training mode (batch statistics under no_grad): call model.eval() "
                  "before evaluating, so that BatchNorm uses its running averages, and model.train() before training")
    for i, event in enumerate(events):
        if event == ["bn", "running", True]:
            following = next((e for e in events[i + 1:] if e != event), None)
            if following == ["step"]:
                fail_with("training ran with the model in eval mode (BatchNorm on its running averages while the "
                          "optimizer steps): call model.train() at the start of every epoch, after evaluating")
            fail_with("evaluation ran with autograd on: wrap the evaluation loop in torch.no_grad() (no graph is "
                      "built, so it takes less memory and time)")
    if not any(len(e) == 4 for e in events):
        fail_with("no evaluation in eval mode was seen: evaluate the validation split every epoch with model.eval()")


def check_best_checkpoint(run: Run) -> None:
    rows = epoch_rows(run)
    best = load_best(run, rows)
    epoch, val_accs = best["epoch"], [r["val_acc"] for r in rows]
    top = [i + 1 for i, acc in enumerate(val_accs) if acc == max(val_accs)]
    if epoch not in top:
        where = ("on a data set whose test labels are shifted by one class: " + CHOSEN_ON_TEST if run.name == "shifted"
                 else "choose it on val_acc (not on the test set, the loss or the last epoch)")
        fail_with(f"best.pt is epoch {epoch} (printed val_acc {val_accs[epoch - 1]}), but the best printed val_acc "
                  f"is {max(val_accs)} at epoch {top[0]}: {where}")
    if abs(float(best["val_acc"]) - val_accs[epoch - 1]) > 0.006:  # printed values may be rounded to 2 decimals
        fail_with(f"best.pt says val_acc {best['val_acc']}, but epoch {epoch}'s line printed {val_accs[epoch - 1]}: "
                  "store the val_acc of the epoch you save")
    saved, stretches = bn_fingerprints(best["model"]), evaluated_weights(run.events)
    if len(stretches) != len(rows):
        return  # evaluations not one per epoch: the fingerprints cannot be tied to epochs
    if not saved <= stretches[epoch - 1]:
        fail_with(f"best.pt says epoch {epoch}, but its weights are not the ones validated at epoch {epoch}: save "
                  "model.state_dict() right when val_acc improves (not after the loop, not a later epoch's weights)")
    if not saved <= stretches[-1]:
        fail_with("the final test did not evaluate best.pt's weights: after training, load best.pt "
                  "(model.load_state_dict(torch.load(path, weights_only=True)['model'])) and test that model")


def test_best_pt_is_the_best_validation_epoch(runs):
    check_best_checkpoint(runs["plain"])


def test_learns_the_patterns(runs):
    rows, acc = epoch_rows(runs["plain"]), printed_test_acc(runs["plain"])
    val_accs = [round(r["val_acc"], 2) for r in rows]
    diverged = [r["epoch"] for r in rows if not math.isfinite(r["train_loss"])]
    if diverged:
        fail_with(f"train_loss is {rows[diverged[0] - 1]['train_loss']} from epoch {diverged[0]:.0f}: training "
                  "diverged (a learning rate far too high, or a loss on the wrong tensors)")
    if max(val_accs) < MIN_TEST_ACC:
        fail_with(f"val_acc stays below {MIN_TEST_ACC} for {EPOCHS} epochs on ten easy patterns (chance is 0.10; "
                  f"val_acc by epoch: {val_accs}): the model does not learn. Check that each step runs zero_grad, "
                  "loss.backward() and optimizer.step(), the loss takes the logits and the labels of the same batch, "
                  "and the pixels are scaled (x / 255, then normalised)")
    if acc < MIN_TEST_ACC:
        fail_with(f"val_acc reaches {max(val_accs)} but test_acc is {acc:.3f}: the test set is prepared differently "
                  "from the training and validation images (scale and normalise them the same way), or the model "
                  "tested is not best.pt")


def test_the_test_set_never_chooses(runs):
    """Test labels shifted by one class: val_acc (from training images) still rises; the test accuracy falls to ~0."""
    run = runs["shifted"]
    rows = epoch_rows(run)
    last = rows[-1]
    if last["val_acc"] < 0.5:
        fail_with(f"on a data set whose test labels are shifted by one class (a model that learned scores ~0 on its "
                  f"test set), val_acc ends at {last['val_acc']} while train_acc reaches {last['train_acc']}: your "
                  f"validation numbers come from the test set, so {CHOSEN_ON_TEST}. Carve the validation split out "
                  "of the training batches")
    check_best_checkpoint(run)
