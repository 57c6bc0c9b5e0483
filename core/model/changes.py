"""A process-wide count of changes to any module's structure: cheap to read, so a cached description of a
model (core/model/cpu_step.py's plan) can tell in O(1) whether it must look at the model again.

It moves when torch registers a module, parameter or buffer anywhere (assignment included, through
torch's global registration hooks), when any hook is registered (torch numbers every hook handle from
one counter), and when Sol's packed layers pack or unpack their weights (they write their dicts
directly; they call `changed()`). It moves for changes to any model, so it can only say "maybe changed":
then the plan checks its own model in full.
"""
import torch.nn.modules.module as _module
from torch.utils.hooks import RemovableHandle

_count = 0


def changed(*_args) -> None:
    """Note a change (also the registration hooks' callback: returning None keeps what is registered)."""
    global _count
    _count += 1


def mark() -> tuple:
    """A value that differs after any change counted here."""
    return _count, RemovableHandle.next_id


_module.register_module_module_registration_hook(changed)
_module.register_module_parameter_registration_hook(changed)
_module.register_module_buffer_registration_hook(changed)
