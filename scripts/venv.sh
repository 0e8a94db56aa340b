#!/usr/bin/env bash
# Create the project's virtual environment and install mrsync into it (editable, with the
# test extras). Called by `make venv`; the Makefile decides *when* to run it (missing venv, or
# pyproject.toml newer than the stamp), this script decides *how*.
#
#   scripts/venv.sh VENV_DIR [STAMP_FILE]
#
# PYTHON may name the interpreter; otherwise the first of python3, python3.13, python3.12,
# python3.11 that is >= 3.11 is used. On Debian/Ubuntu the venv module lives in a separate
# package (python3-venv); as root it is installed with apt-get when missing.
set -euo pipefail

venv=${1:?usage: scripts/venv.sh VENV_DIR [STAMP_FILE]}
stamp=${2:-}

say() { printf '%s\n' "venv: $*" >&2; }

new_enough() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

find_python() {
    local candidates=()
    if [[ -n ${PYTHON:-} ]]; then
        candidates=("$PYTHON")
    else
        candidates=(python3 python3.13 python3.12 python3.11)
    fi
    local py
    for py in "${candidates[@]}"; do
        if command -v "$py" >/dev/null 2>&1 && new_enough "$py"; then
            command -v "$py"
            return 0
        fi
    done
    return 1
}

if [[ ! -x $venv/bin/python ]] || ! new_enough "$venv/bin/python"; then
    if ! py=$(find_python); then
        say "mrsync needs Python >= 3.11; none found (tried ${PYTHON:-python3 python3.1[321]})."
        say "Install one, or run: make venv PYTHON=/path/to/python3.11"
        exit 1
    fi
    say "creating $venv with $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
    rm -rf "$venv"
    if ! "$py" -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            say "the venv module is missing; installing python${ver}-venv with apt-get"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >/dev/null
            apt-get install -y -qq --no-install-recommends "python${ver}-venv" >/dev/null \
                || apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
            "$py" -m venv "$venv"
        else
            say "'$py -m venv' failed; install the venv module (Debian/Ubuntu:" \
                "apt-get install python${ver}-venv) and re-run make venv"
            exit 1
        fi
    fi
fi

# The compiled parts need a C compiler and Python's headers: the receive path and the
# datagrams' MAC (src/mrsync/_speedups.c), which also needs OpenSSL's headers (libssl-dev),
# and parity through Intel's ISA-L (src/mrsync/_isal_rs.c), which also needs ISA-L's headers
# (libisal-dev). They are optional - without them mrsync runs in
# pure Python, or computes parity with zfec, spending more CPU for the same bytes - so they
# are installed only where that is easy: as root, with apt-get.
headers=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if { ! command -v cc >/dev/null 2>&1 || [[ ! -f $headers/Python.h ]] \
        || [[ ! -f /usr/include/isa-l/erasure_code.h ]] || [[ ! -f /usr/include/openssl/evp.h ]]; } \
        && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    ver=$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    say "installing a C compiler, Python, OpenSSL and ISA-L headers (gcc, python${ver}-dev," \
        "libssl-dev, libisal-dev) with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || true
    apt-get install -y -qq --no-install-recommends gcc libc6-dev "python${ver}-dev" >/dev/null \
        || apt-get install -y -qq --no-install-recommends gcc libc6-dev python3-dev >/dev/null \
        || say "could not install them: the pure-Python receive path will be used"
    apt-get install -y -qq --no-install-recommends libssl-dev >/dev/null \
        || say "could not install libssl-dev: the pure-Python receive path will be used"
    apt-get install -y -qq --no-install-recommends libisal-dev >/dev/null \
        || say "could not install libisal-dev: zfec will compute parity"
fi

say "installing mrsync (editable) with test extras"
"$venv/bin/python" -m pip install -q -e '.[test]'

if [[ -n $stamp ]]; then
    touch "$stamp"
fi
