"""The optional compiled modules: the receive path (``_speedups.c``) and ISA-L's Reed-Solomon
(``_isal_rs.c``), each None when absent.

Each is used when it was built (``pip install`` compiles them where a C compiler, and for
ISA-L its header, is found) and, for the receive path, built for this protocol version.
``MRSYNC_PURE_PYTHON=1`` turns both off, to compare the paths or to rule the compiled ones out
when chasing a bug; the results are the same, only the CPU spent differs.
"""

from __future__ import annotations

import os
from types import ModuleType

from mrsync import PROTOCOL_VERSION

API_VERSION = 4  # of _speedups.c's functions, which defines its own to match
ISAL_API_VERSION = 1  # of _isal_rs.c's


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


def _load_isal() -> ModuleType | None:
    if os.environ.get("MRSYNC_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from mrsync import _isal_rs  # type: ignore[attr-defined]
    except ImportError:  # not built (no ISA-L headers), or libisal missing at run time
        return None
    if getattr(_isal_rs, "API_VERSION", None) != ISAL_API_VERSION:
        return None
    return _isal_rs  # type: ignore[no-any-return]


isal_rs = _load_isal()
