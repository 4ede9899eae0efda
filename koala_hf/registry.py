"""Optimizers by name: ``create_optimizer`` and timm's optimizer factory.

``koala_hf.create_optimizer("koala++", model.parameters(), lr=1.0)`` builds an
optimizer from its name. Importing ``koala_hf`` also registers the family in
timm's factory as soon as that factory is imported, so after

    import koala_hf
    from timm.optim import create_optimizer_v2   # timm.optim: ``import timm`` alone does not import it

``create_optimizer_v2(model, opt="koalapp")`` works (timm splits names at ``_`` and lowercases them, hence the
plain names). timm takes a couple of seconds to import, so the registration waits until timm's factory module
is imported, if it is not loaded yet. A script that never imports ``koala_hf`` (timm's ``train.py`` run
as it is) does not know the names: add ``import koala_hf.integrations.timm`` to it, or run it through
``python -m koala_hf.integrations.timm train.py ...``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from dataclasses import dataclass, field

from koala_hf.optim import KOALAM, KOALAV, KOALAPlusPlus


@dataclass(frozen=True)
class OptimizerEntry:
    cls: type
    timm_name: str
    description: str
    defaults: dict = field(default_factory=dict)


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "koala++": OptimizerEntry(KOALAPlusPlus, "koalapp", "KOALA++, symmetric covariance estimate (E10-E17)", {"symmetric": True}),
    "koala++ns": OptimizerEntry(KOALAPlusPlus, "koalappns", "KOALA++ (NS), vanilla covariance estimate (E10-E17)", {"symmetric": False}),
    "koala-v": OptimizerEntry(KOALAV, "koalav", "KOALA-V, scalar shared covariance (E20-E22)"),
    "koala-m": OptimizerEntry(KOALAM, "koalam", "KOALA-M, weights and velocity (E30-E36)"),
}
_ALIASES = {entry.timm_name: name for name, entry in OPTIMIZERS.items()}


def optimizer_entry(name: str) -> OptimizerEntry:
    """The registry entry for ``name`` (``koala++`` or its timm spelling ``koalapp``, any case)."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        known = ", ".join(list(OPTIMIZERS) + list(_ALIASES))
        raise ValueError(f"Unknown KOALA optimizer {name!r}; choose one of: {known}")
    return OPTIMIZERS[key]


def create_optimizer(name: str, params, **kwargs):
    """Create the optimizer called ``name`` over ``params``; ``kwargs`` override its defaults."""
    entry = optimizer_entry(name)
    return entry.cls(params, **{**entry.defaults, **kwargs})


def register_timm_optimizers(factory=None) -> None:
    """Register the family in timm's optimizer factory (idempotent)."""
    if factory is None:
        import timm.optim._optim_factory as factory
    for entry in OPTIMIZERS.values():
        if entry.timm_name in factory.default_registry._optimizers:
            continue
        factory.default_registry.register(
            factory.OptimInfo(
                name=entry.timm_name,
                opt_class=entry.cls,
                description=entry.description,
                has_eps=False,
                defaults=dict(entry.defaults) or None,
            )
        )


_TIMM_FACTORY = "timm.optim._optim_factory"


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    """Runs :func:`register_timm_optimizers` right after timm's factory module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TIMM_FACTORY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            register_timm_optimizers(module)

        spec.loader.exec_module = exec_module
        return spec


def install_timm_registration() -> None:
    if _TIMM_FACTORY in sys.modules:
        register_timm_optimizers(sys.modules[_TIMM_FACTORY])
    elif not any(isinstance(finder, _RegisterWhenTimmLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenTimmLoads())
