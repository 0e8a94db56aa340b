"""The optional compiled receive path (``_speedups.c``), or None.

Targets use it when it was built (``pip install`` compiles it where a C compiler is found)
and was built for this protocol version. ``MRSYNC_PURE_PYTHON=1`` turns it off, to compare the
two paths or to rule the compiled one out when chasing a bug; the results are the same, only
the CPU a target spends differs.
"""

from __future__ import annotations

import os
from types import ModuleType

from mrsync import PROTOCOL_VERSION

API_VERSION = 4  # of _speedups.c's functions, which defines its own to match


def _load() -> ModuleType | None:
    if os.environ.get("MRSYNC_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from mrsync import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    if (
        getattr(_speedups, "PROTOCOL_VERSION", None) != PROTOCOL_VERSION
        or getattr(_speedups, "API_VERSION", None) != API_VERSION
    ):
        return None  # built from other sources: not to be trusted with the wire format
    return _speedups  # type: ignore[no-any-return]


speedups = _load()
