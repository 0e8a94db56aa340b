"""Build the optional compiled parts of mrsync.

Everything else is declared in pyproject.toml. Both extensions are optional: without a C
compiler or Python's headers the build carries on and mrsync runs without them (more CPU,
same results, same bytes on the wire).

- ``mrsync._speedups`` (src/mrsync/_speedups.c): the targets' receive path and the master's
  sealing, with the datagrams' AES-GMAC through OpenSSL's libcrypto (Debian package
  libssl-dev), built only where its header is found; otherwise the ``cryptography`` package
  computes the same tags. The protocol version is compiled in, so that a stale build is
  noticed and not used (see mrsync/speedups.py).
- ``mrsync._isal_rs`` (src/mrsync/_isal_rs.c): Reed-Solomon parity through Intel's ISA-L
  (Debian package libisal-dev), built only where its header is found; otherwise zfec computes
  the same code (see mrsync/engine/fec.py).
"""

import re
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

_init = (Path(__file__).parent / "src" / "mrsync" / "__init__.py").read_text()
_version = re.search(r"^PROTOCOL_VERSION = (\d+)", _init, re.M)
assert _version is not None, "PROTOCOL_VERSION not found in src/mrsync/__init__.py"


def _has_header(name: str) -> bool:
    dirs = [sysconfig.get_config_var("INCLUDEDIR"), "/usr/include", "/usr/local/include"]
    return any(d and (Path(d) / name).is_file() for d in dirs)


extensions = []
if _has_header("openssl/evp.h"):
    extensions.append(
        Extension(
            "mrsync._speedups",
            ["src/mrsync/_speedups.c"],
            define_macros=[("MRSYNC_PROTOCOL_VERSION", _version.group(1))],
            libraries=["crypto"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    )
if _has_header("isa-l/erasure_code.h"):
    extensions.append(
        Extension(
            "mrsync._isal_rs",
            ["src/mrsync/_isal_rs.c"],
            libraries=["isal"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
