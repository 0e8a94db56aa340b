"""The optional compiled modules: the receive path (``_speedups.c``) and ISA-L's Reed-Solomon
(``_isal_rs.c``), each None when absent.

Each is used when it was built (``pip install`` compiles them where a C compiler, and for
ISA-L its header, is found) and, for the receive path, built for this protocol version.
``MRSYNC_PURE_PYTHON=1`` turns both off, to compare the paths or to rule the compiled ones out
when chasing a bug; the results are the same, only the CPU spent differs.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from mrsync import PROTOCOL_VERSION

API_VERSION = 6  # of _speedups.c's functions, which defines its own to match
ISAL_API_VERSION = 1  # of _isal_rs.c's


def _load(name: str, **versions: int) -> ModuleType | None:
    """``mrsync.<name>`` if it was built and carries exactly ``versions`` (constants of the
    module); None when turned off, absent (not built, or a library it links to is missing at
    run time) or built from other sources, which are not to be trusted with the wire format."""
    if os.environ.get("MRSYNC_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        module = importlib.import_module(f"mrsync.{name}")
    except ImportError:
        return None
    if any(getattr(module, k, None) != v for k, v in versions.items()):
        return None
    return module


speedups = _load("_speedups", PROTOCOL_VERSION=PROTOCOL_VERSION, API_VERSION=API_VERSION)
isal_rs = _load("_isal_rs", API_VERSION=ISAL_API_VERSION)
