"""Opacus, imported without its side effect on Python's root logger.

``opacus.utils.module_utils`` (Opacus 1.5) calls ``logging.basicConfig()`` when it is
imported, which gives the root logger a stderr handler. Flower's logger propagates to
the root, so from then on every Flower line (the round log, and Flower's DEBUG lines,
which its own handler filters out) printed twice. fedlora imports Opacus only through
this module, which takes that handler off again; a root handler that was there before,
or that the user adds, is left alone.
"""

from __future__ import annotations

import logging

#: the format ``opacus.utils.module_utils`` gives ``logging.basicConfig``
OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def drop_opacus_root_handler() -> None:
    """Remove the stderr handler that importing Opacus added to the root logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        formatter = handler.formatter
        if type(handler) is logging.StreamHandler and formatter is not None \
                and formatter._fmt == OPACUS_FORMAT:  # noqa: SLF001 - no public accessor
            root.removeHandler(handler)


import opacus.utils.module_utils  # noqa: E402,F401 - the import whose side effect is undone

drop_opacus_root_handler()
