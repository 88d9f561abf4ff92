"""The phase folders are standalone: no phase imports another phase's code."""

import ast

import pytest
from conftest import REPO

PHASES = ("phase1_cnn", "phase2_attention", "phase2_lora", "phase3_ddp")


@pytest.mark.parametrize("phase", PHASES)
def test_no_cross_phase_imports(phase):
    for path in (REPO / phase).glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                other = [p for p in PHASES if p != phase and name.split(".")[0] == p]
                assert not other, f"{path.relative_to(REPO)} imports {name}"
