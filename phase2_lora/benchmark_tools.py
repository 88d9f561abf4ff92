"""What benchmark.py and compare_methods.py share: peak memory of a block of code (on a CUDA GPU or on
the CPU), bytes held by models and optimizers, and atomic writes of their result files.

CUDA: torch's caching allocator keeps counters. `max_memory_allocated` is the peak of bytes held by
live tensors (weights included); `max_memory_reserved` is the peak the allocator took from the driver
(allocated + cached free blocks + fragmentation): the number that decides an out-of-memory error.

CPU: torch keeps no such counters, and process RSS mixes in the Python heap, libraries and freed
pages malloc has not returned. So on CPU we count tensors ourselves: a TorchDispatchMode sees every
tensor an ATen op creates (forward, backward, optimizer, checkpoint recomputation), adds its storage's
bytes when it appears and subtracts them when the storage is freed (a weakref finalizer). Tensors
that already existed before the block (the weights) are added once by the caller via `baseline_bytes`.
It slows ops down, so time code outside of it.
"""

import gc
import os
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _CPUTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the CPU tensor storages created while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: dict[int, weakref.finalize] = {}  # storage data_ptr -> finalizer
        self._aliases: dict = {}  # op -> per output: does the schema say it aliases an input (view, in-place)?

    def _freed(self, key: int, nbytes: int) -> None:
        self._tracked.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = self._aliases.get(func)
        if aliases is None:
            aliases = self._aliases[func] = [r.alias_info is not None for r in func._schema.returns]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if len(aliases) == 1 and len(outs) > 1:  # one Tensor[] return, e.g. split/unbind: views, all of them
            aliases = aliases * len(outs)
        for is_alias, t in zip(aliases, outs, strict=False):
            # Views (t(), view, detach) and in-place ops hand back an input's storage: no new bytes.
            if is_alias or not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._tracked:
                continue
            nbytes = storage.nbytes()
            self._tracked[key] = weakref.finalize(storage, self._freed, key, nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


class PeakMemory:
    """with PeakMemory(device, baseline_bytes) as mem: ... ; then mem.allocated / mem.reserved (bytes, or None).

    CUDA: peak allocated and reserved from torch.cuda's counters, reset on entry (after emptying the
    cache, so reserved starts from what is allocated). CPU: baseline_bytes + peak bytes of tensors
    created inside the block; reserved is None (no caching allocator on CPU).
    """

    def __init__(self, device: torch.device | str, baseline_bytes: int = 0):
        self.device = torch.device(device)
        self.baseline = baseline_bytes
        self.allocated = self.reserved = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._meter = _CPUTensorBytes().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            self._meter.__exit__(*exc)
            self.allocated = self.baseline + self._meter.peak
        return False


def quant_state_tensors(state) -> list[torch.Tensor]:
    """bitsandbytes keeps a 4-bit weight's block scales (absmax, its code book and, with double
    quantisation, a second level) on a QuantState next to the packed weight, outside parameters()."""
    if state is None:
        return []
    return [v for v in vars(state).values() if isinstance(v, torch.Tensor)] + quant_state_tensors(
        getattr(state, "state2", None))


def tensor_bytes(*objects) -> int:
    """Bytes of the distinct storages of the tensors held by modules (parameters, buffers, 4-bit block
    scales), optimizers (their state) and plain (nested) containers of tensors."""
    seen, total = set(), 0
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
            tensors += [t for p in obj.parameters() for t in quant_state_tensors(getattr(p, "quant_state", None))]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors = tree_flatten(list(obj.state.values()))[0]
        else:
            tensors = tree_flatten(obj)[0]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def write_atomic(path: Path, write) -> None:
    """write(tmp_path), then rename over `path`: a crash never leaves a half-written result file."""
    tmp = path.with_suffix(".tmp" + path.suffix)  # keeps the extension: matplotlib picks the format from it
    write(tmp)
    os.replace(tmp, path)
