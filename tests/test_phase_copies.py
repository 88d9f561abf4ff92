"""Phase 3 runs standalone, so it keeps copies of phase 2's helper modules; the copies must be the same code.

Each copy equals its phase-2 source byte for byte (fix a drift with `cp phase2_lora/X.py phase3_ddp/X.py`), phase 3
imports the copies rather than versions of its own, and holds no other module that could be a leftover duplicate.
"""

import ast

import pytest
from conftest import REPO

PHASE2, PHASE3 = REPO / "phase2_lora", REPO / "phase3_ddp"
COPIES = ("qlora_model.py", "sft_data.py", "sft_formats.py", "chunked_loss.py", "model_names.py", "run_files.py")
OWN = ("finetune_ddp.py", "ddp_train.py", "ddp_data.py", "ddp_checkpoint.py", "fsdp_shard.py", "benchmark.py",
       "benchmark_memory.py")  # what DDP and FSDP add
# Standalone single files that import none of the copies: the learner's loop and the tensor-parallel demo.
STANDALONE = ("ddp_minimal.py", "tensor_parallel.py")


def top_level_names(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}


def imported_modules(path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    return modules


@pytest.mark.parametrize("name", COPIES)
def test_copy_equals_its_phase2_source(name):
    assert (PHASE3 / name).read_bytes() == (PHASE2 / name).read_bytes(), (
        f"phase3_ddp/{name} differs from phase2_lora/{name}: cp phase2_lora/{name} phase3_ddp/{name}")


def test_phase3_holds_only_the_copies_and_its_own_modules():
    assert sorted(p.name for p in PHASE3.glob("*.py")) == sorted(COPIES + OWN + STANDALONE)


def test_phase3_imports_the_copies_instead_of_redefining_them():
    own_imports = set().union(*(imported_modules(PHASE3 / name) for name in OWN + COPIES))
    for name in COPIES:  # every copy is used, so none is a leftover
        assert name.removesuffix(".py") in own_imports, f"no phase-3 module imports {name}"
    shared = set().union(*(top_level_names(PHASE3 / name) for name in COPIES))
    for name in OWN:  # and no phase-3 module keeps its own version of a shared function (a weaker duplicate)
        duplicates = top_level_names(PHASE3 / name) & shared
        assert not duplicates, f"phase3_ddp/{name} redefines {sorted(duplicates)}: import them from the copies"


def test_light_entry_point_lists_the_same_quantizations():
    """finetune_ddp.py spells QUANTIZATIONS out (importing qlora_model would pull in peft before the launch
    checks); it must stay the copy's tuple."""
    def constant(path, name):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        return next(ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name)
    assert constant(PHASE3 / "finetune_ddp.py", "QUANTIZATIONS") == constant(PHASE3 / "qlora_model.py", "QUANTIZATIONS")
