"""`python hooked_run.py HOOKS SCRIPT ARGS...`: import tests/acceptance/HOOKS.py (the grader's observers), then run
SCRIPT as `__main__` with ARGS, exactly as `python SCRIPT ARGS...` would (also under torchrun)."""

import importlib
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    hooks, script, *args = sys.argv[1:]
    sys.path.insert(0, str(Path(__file__).parent))
    importlib.import_module(hooks)  # installs its patches on import; records go to $GRADER_RECORD
    sys.path[0] = str(Path(script).resolve().parent)  # the script's folder first, as for `python SCRIPT`
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
