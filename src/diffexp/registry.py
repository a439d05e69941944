"""Registries of the parts a model is built from (pure Python): one per kind, filled by decorators.

A part is registered where it is defined (``@PATHS.register("flow")``, ``@SAMPLERS.register("ddim")``), so a class
written outside the package joins by the same decorator. The registries serve two purposes: names for code that
looks parts up (``get_sampler("ddim")``), and the allow-list of what a checkpoint's stored config may instantiate
(:func:`diffexp.checkpoints.allowed_targets`): a checkpoint can only build registered parts.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterator


class Registry(dict):
    """name -> class or function of one kind of part (``kind`` names it in error messages)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        REGISTRIES.append(self)

    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        """Decorator: add the decorated class or function under ``name`` (default: its own name)."""

        def add(obj):
            self[name or obj.__name__] = obj
            return obj

        return add

    def get_part(self, name: str):
        """The part called ``name``; a ValueError listing the registered names otherwise."""
        if name not in self:
            raise ValueError(f"{name!r} is not a known {self.kind}; choose one of {sorted(self)}")
        return self[name]


REGISTRIES: list[Registry] = []
#: model parts that have no registry of their own (modules, nets, conditioners, spaces, data, optimizers, ...)
PARTS = Registry("model part")


def register_part(obj):
    """Class/function decorator: allow ``obj`` as a ``_target_`` of a checkpoint's stored config."""
    return PARTS.register(f"{obj.__module__}.{obj.__qualname__}")(obj)


def import_names(obj) -> Iterator[str]:
    """Every dotted name that imports ``obj``: its defining module's, and each parent package's that re-exports it
    (``diffexp.samplers.DDIMSampler`` for ``diffexp.samplers.ddim.DDIMSampler``)."""
    module, name = obj.__module__, obj.__qualname__
    yield f"{module}.{name}"
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = sys.modules.get(".".join(parts[:i]))
        if parent is not None and getattr(parent, name, None) is obj:
            yield f"{'.'.join(parts[:i])}.{name}"

