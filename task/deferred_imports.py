"""Keep flwr-datasets' plotting helpers out of processes that only partition data.

``import flwr_datasets`` (which any ``flwr_datasets.partitioner`` import runs) imports its
``visualization`` package, and with it matplotlib, seaborn and pandas plotting: about
1-2 s of every fresh client process, which fedlora never uses (it only partitions). In a
deployment a Flower 1.42 SuperNode starts a new ClientApp process for every message, so
that cost is paid every round. :func:`defer_flwr_datasets_plotting` registers a stand-in
for ``flwr_datasets.visualization`` that imports the real package on first use, so
``flwr_datasets.visualization.plot_label_distributions`` still works when someone needs it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from typing import Any

DEFERRED = "flwr_datasets.visualization"


class _DeferredModule(types.ModuleType):
    """A module stand-in that swaps itself for the real module on first attribute access."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # the import system probing (``__path__``, ...)
            raise AttributeError(name)
        return getattr(_load_real(self), name)


def _load_real(stand_in: types.ModuleType) -> types.ModuleType:
    name = stand_in.__name__
    if sys.modules.get(name) is stand_in:
        del sys.modules[name]
    real = importlib.import_module(name)
    parent, _, child = name.rpartition(".")
    if getattr(sys.modules.get(parent), child, None) is stand_in:
        setattr(sys.modules[parent], child, real)
    return real


def defer_flwr_datasets_plotting() -> bool:
    """Make ``flwr_datasets`` import its plotting package only when it is used.

    A no-op (returning False) once ``flwr_datasets`` is imported, or when its layout is
    not the expected one; True when the stand-in was put in place.
    """
    if "flwr_datasets" in sys.modules or DEFERRED in sys.modules:
        return False
    parent = importlib.machinery.PathFinder.find_spec("flwr_datasets")
    if parent is None or not parent.submodule_search_locations:
        return False
    spec = importlib.machinery.PathFinder.find_spec(DEFERRED, parent.submodule_search_locations)
    if spec is None:
        return False
    stand_in = _DeferredModule(DEFERRED)
    stand_in.__spec__ = spec
    sys.modules[DEFERRED] = stand_in
    return True
