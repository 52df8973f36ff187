"""Adam / AdamW that never import torch._dynamo in a training process that never compiles (~95 MB, 1-4 s).

torch imports torch._dynamo (with sympy and mpmath, ~900 modules) from two wrappers of eager optimiser code:
- `Optimizer.add_param_group`, `zero_grad`, `state_dict` and `load_state_dict` are wrapped in
  `torch._disable_dynamo`, whose first call imports it only to build a "never trace this" version of the method.
  In eager code nothing is traced, so the method itself is what runs either way. `skip_dynamo_import()` records
  each method as its own "never trace" version, the cache slot torch's wrapper looks up before importing.
- `Adam.step` is wrapped in `_use_grad_for_differentiable`, which imports it on every call for two
  `graph_break()` calls (no-ops in eager code) around setting grad mode to the `differentiable` option.
  `EagerAdam` / `EagerAdamW.step` set grad mode the same way and run the unwrapped step: same update, same
  state_dict (the class name is not saved, so checkpoints load either way).
The import costs memory (about 95 MB of PSS, an eighth of an X-Pool training process) and seconds of start-up.

Only done while torch._dynamo is not imported yet: a process that already compiles something keeps torch's
wrappers untouched. tvr never calls torch.compile; code that does so after `skip_dynamo_import()` should import
torch._dynamo first (those four methods would otherwise be traced rather than skipped).
"""
from __future__ import annotations

import functools
import inspect
import sys
from types import FunctionType
from typing import Callable

import torch

WRAPPED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")  # torch.optim.Optimizer methods
DISABLE_SLOT = "__dynamo_disable"  # the attribute torch._compile._disable_dynamo caches its wrapper in


def _wrapper_code() -> object | None:
    """Code object of torch._disable_dynamo's wrapper function, or None when torch no longer has it."""
    make = getattr(torch, "_disable_dynamo", None)
    if make is None:
        return None
    return make(lambda: None).__code__


@functools.cache
def skip_dynamo_import() -> list[str]:
    """Pre-fill torch's "never trace" cache of the Optimizer methods with the methods themselves; names set.

    Nothing is changed (empty list) once torch._dynamo is imported, or when a method is not wrapped the way this
    torch version wraps them (another torch: the import simply happens as before).
    """
    if "torch._dynamo" in sys.modules:
        return []
    code = _wrapper_code()
    done = []
    for name in WRAPPED:
        method = torch.optim.Optimizer.__dict__.get(name)
        inner = getattr(method, "__wrapped__", None)
        if code is None or not isinstance(method, FunctionType) or method.__code__ is not code:
            continue
        if isinstance(inner, FunctionType) and not hasattr(inner, DISABLE_SLOT):
            setattr(inner, DISABLE_SLOT, inner)
            done.append(name)
    return done


def _unwrapped(step: Callable[..., object]) -> Callable[..., object]:
    """The optimiser's own step under torch's wrappers (profiling hooks, grad mode); itself on another torch."""
    return inspect.unwrap(step)


class _EagerStep:
    """Mixin over a torch optimiser class: no torch._dynamo import when built, or per step."""

    raw_step: Callable[..., object]  # the optimiser class's own step, unwrapped (a staticmethod)
    defaults: dict

    def __init__(self, *args: object, **kwargs: object) -> None:
        skip_dynamo_import()  # before torch's __init__ calls add_param_group
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update, grad mode set as torch's wrapper sets it (off unless the optimiser is `differentiable`)."""
        with torch.set_grad_enabled(bool(self.defaults["differentiable"])):
            return self.raw_step(self, closure)  # type: ignore[return-value]


class EagerAdam(_EagerStep, torch.optim.Adam):
    """torch.optim.Adam without the torch._dynamo import (module docstring); same update and state."""

    raw_step = staticmethod(_unwrapped(torch.optim.Adam.step))


class EagerAdamW(_EagerStep, torch.optim.AdamW):
    """torch.optim.AdamW without the torch._dynamo import (module docstring); same update and state."""

    raw_step = staticmethod(_unwrapped(torch.optim.AdamW.step))
