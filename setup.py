"""Build the optional compiled receive path (src/mrsync/_speedups.c).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler
or Python's headers the build carries on and mrsync runs its pure-Python path (slower on the
targets, same results). The protocol version is compiled in, so that a stale build is noticed
and not used (see mrsync/speedups.py).
"""

import re
from pathlib import Path

from setuptools import Extension, setup

_init = (Path(__file__).parent / "src" / "mrsync" / "__init__.py").read_text()
_version = re.search(r"^PROTOCOL_VERSION = (\d+)", _init, re.M)
assert _version is not None, "PROTOCOL_VERSION not found in src/mrsync/__init__.py"

setup(
    ext_modules=[
        Extension(
            "mrsync._speedups",
            ["src/mrsync/_speedups.c"],
            define_macros=[("MRSYNC_PROTOCOL_VERSION", _version.group(1))],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
