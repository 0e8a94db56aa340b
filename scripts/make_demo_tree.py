"""Build the sample tree used by `make demo` (stdlib only; deterministic for a given seed).

    python scripts/make_demo_tree.py DIR [--seed N] [--small N] [--big-mib N]

DIR must not exist; the tree is built next to it and renamed into place, so an interrupted run
never leaves a half-built tree behind. Contents:

    big.bin                a few MiB of random bytes
    files/dNN/sNN/fNNN.dat a few hundred small random files (0 B - 8 KiB) in nested directories
    empty.txt              an empty file
    empty-dir/             an empty directory
    link-to-big            a symlink (relative, to big.bin); files/latest -> a nested directory
    with space.txt         a name with a space
    caf\\xe9                a name that is not valid UTF-8 (Latin-1 e-acute)
    run.sh                 an executable file (mode 0755)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys


def write(path: bytes, data: bytes, mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def build(root: bytes, seed: int, small: int, big_mib: int) -> tuple[int, int]:
    rng = random.Random(seed)
    os.makedirs(root)
    total = 0
    files = 0

    def put(rel: bytes, data: bytes, mode: int = 0o644) -> None:
        nonlocal total, files
        write(os.path.join(root, rel), data, mode)
        total += len(data)
        files += 1

    put(b"big.bin", rng.randbytes(big_mib * 1024 * 1024))
    for i in range(small):
        d = os.path.join(b"files", b"d%02d" % (i % 10), b"s%02d" % (i // 10 % 4))
        os.makedirs(os.path.join(root, d), exist_ok=True)
        put(os.path.join(d, b"f%03d.dat" % i), rng.randbytes(rng.randint(0, 8192)))
    put(b"empty.txt", b"")
    os.mkdir(os.path.join(root, b"empty-dir"))
    os.symlink(b"big.bin", os.path.join(root, b"link-to-big"))
    os.symlink(b"d03/s01", os.path.join(root, b"files", b"latest"))
    put(b"with space.txt", b"a name with a space\n")
    put(b"caf\xe9", "caf\u00e9 (the name is Latin-1, not UTF-8)\n".encode())
    put(b"run.sh", b"#!/bin/sh\necho hello from the demo tree\n", 0o755)
    return files, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--small", type=int, default=300, help="number of small files (default 300)")
    ap.add_argument("--big-mib", type=int, default=4, help="size of big.bin in MiB (default 4)")
    args = ap.parse_args()

    root = os.fsencode(args.dir.rstrip("/"))
    if os.path.lexists(root):
        print(f"make_demo_tree: {args.dir} exists; remove it first", file=sys.stderr)
        return 1
    tmp = root + b".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    files, total = build(tmp, args.seed, args.small, args.big_mib)
    os.rename(tmp, root)
    print(f"built {args.dir}: {files} files, {total / 2**20:.1f} MiB, plus dirs and symlinks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
