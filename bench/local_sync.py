"""Local benchmark: mrsync to three local targets versus three sequential `cp -a`.

    .venv/bin/python bench/local_sync.py [--runs N] [--small N] [--big-mib N] [--workdir DIR]

Builds a source tree once (cached in the work directory, rebuilt only when its parameters
change): one big random file plus many small random files (1 B - 16 KiB, seeded). Then, for
each run, it removes the targets, times `mrsync --no-progress SRC/ T1 T2 T3` and three
sequential `cp -a SRC/. Ci` (one timing for all three), checks that mrsync exited 0 and, when
rsync is installed, that every mrsync target is identical (`rsync -anci --delete`).

Throughput is tree bytes x 3 targets / wall time. Caches are not dropped: after the first run
the source is read from the page cache by both tools. Dirty pages are flushed (sync) before
each timing, so neither tool pays for the other's writeback.

Network safety: mrsync pins local syncs to loopback with TTL 0; as root this script also runs
it inside a private network namespace (`unshare -n`, only lo up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import stat
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
TARGETS = 3
NETNS_WRAPPER = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


# --- the machine --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / MiB:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def filesystem_of(path: Path) -> str:
    """Type and device of the mount holding path (longest mount-point prefix)."""
    best = ("", "unknown", "?")
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} ({best[2]} on {best[0] or '?'})"


def print_machine(workdir: Path, mrsync: Path) -> None:
    version = subprocess.run(
        [str(mrsync), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    print(f"machine: nproc {usable} (of {os.cpu_count()}), {cpu_model()}, RAM {mem_total()}")
    print(f"kernel:  {platform.system()} {platform.release()} ({platform.machine()})")
    print(f"python:  {platform.python_version()}; {version or mrsync}")
    print(f"workdir: {workdir} on {filesystem_of(workdir)}")


# --- the source tree ----------------------------------------------------------------------


@dataclass(frozen=True)
class TreeSpec:
    big_mib: int
    small: int
    seed: int

    def as_dict(self) -> dict[str, int]:
        return {"big_mib": self.big_mib, "small": self.small, "seed": self.seed}


def tree_bytes(root: Path) -> tuple[int, int]:
    """(regular files, their total size) under root; symlinks are not followed."""
    files = total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                total += st.st_size
    return files, total


def build_tree(root: Path, spec: TreeSpec) -> None:
    rng = random.Random(spec.seed)
    root.mkdir(parents=True)
    with open(root / "big.bin", "wb") as f:
        left = spec.big_mib * MiB
        while left:
            n = min(left, 8 * MiB)
            f.write(rng.randbytes(n))
            left -= n
    for i in range(spec.small):
        d = root / "small" / f"d{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.dat").write_bytes(rng.randbytes(rng.randint(1, 16 * 1024)))


def ensure_tree(workdir: Path, spec: TreeSpec) -> Path:
    src = workdir / "src"
    marker = workdir / "src.json"
    try:
        if src.is_dir() and json.loads(marker.read_text()) == spec.as_dict():
            print(f"source:  {src} (cached; {marker.name} matches)")
            return src
    except (OSError, ValueError):
        pass
    print(f"source:  building {src}: {spec.big_mib} MiB file + {spec.small} small files "
          f"(seed {spec.seed}) ...", flush=True)
    t0 = time.perf_counter()
    marker.unlink(missing_ok=True)
    shutil.rmtree(src, ignore_errors=True)
    tmp = workdir / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tree(tmp, spec)
    tmp.rename(src)
    marker.write_text(json.dumps(spec.as_dict()) + "\n")
    print(f"         built in {time.perf_counter() - t0:.1f} s")
    return src


# --- timing -------------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    times: list[float] = field(default_factory=list)


def remove(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return time.perf_counter() - t0, proc


def rsync_differences(src: Path, dest: Path) -> str:
    """Empty when dest is identical to src (content checksums and metadata)."""
    proc = subprocess.run(
        ["rsync", "-anci", "--delete", f"{src}/", f"{dest}/"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        return f"rsync failed ({proc.returncode}): {proc.stderr.strip()}"
    return proc.stdout.strip()


def find_mrsync(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else [
        Path(sys.executable).with_name("mrsync"),
        Path(__file__).resolve().parent.parent / ".venv" / "bin" / "mrsync",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    sys.exit(f"local_sync: mrsync not found (tried {', '.join(map(str, candidates))}); "
             "run `make venv` or pass --mrsync")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per tool (default 3)")
    ap.add_argument("--small", type=int, default=2000, help="small files (default 2000)")
    ap.add_argument("--big-mib", type=int, default=256, help="big file in MiB (default 256)")
    ap.add_argument("--seed", type=int, default=42, help="random seed of the tree (default 42)")
    ap.add_argument("--workdir", default="/tmp/mrsync-bench",
                    help="source cache and targets (default /tmp/mrsync-bench)")
    ap.add_argument("--mrsync", help="mrsync executable (default: the one next to this python)")
    args = ap.parse_args()
    if args.runs < 1 or args.small < 0 or args.big_mib < 0:
        ap.error("--runs must be >= 1; --small and --big-mib >= 0")

    mrsync = find_mrsync(args.mrsync)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print_machine(workdir, mrsync)

    root = os.geteuid() == 0
    wrapper: list[str] = []
    if root:
        if shutil.which("unshare") is None or shutil.which("ip") is None:
            sys.exit("local_sync: running as root needs unshare and ip (iproute2) to isolate "
                     "mrsync in a private network namespace")
        probe = subprocess.run([*NETNS_WRAPPER, "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            sys.exit("local_sync: as root, mrsync runs in a private network namespace, but "
                     "`unshare -n` failed here; run as a normal user instead")
        wrapper = NETNS_WRAPPER
        print("network: root, so mrsync runs inside `unshare -n` (private namespace, only lo)")
    else:
        print("network: not root; mrsync pins its multicast to loopback (TTL 0)")
    have_rsync = shutil.which("rsync") is not None
    print("caches:  page cache NOT dropped (source is warm after the first read); "
          "sync before each timing")
    if not have_rsync:
        print("verify:  rsync not installed: only mrsync's exit status is checked")

    src = ensure_tree(workdir, TreeSpec(args.big_mib, args.small, args.seed))
    files, size = tree_bytes(src)
    print(f"tree:    {files} files, {size / MiB:.1f} MiB; {TARGETS} targets each "
          f"({TARGETS * size / MiB:.1f} MiB written per run)")

    m_targets = [workdir / f"mrsync-t{i}" for i in range(1, TARGETS + 1)]
    c_targets = [workdir / f"cp-t{i}" for i in range(1, TARGETS + 1)]
    mr = Tool("mrsync")
    cp = Tool(f"cp -a x{TARGETS}")
    failures: list[str] = []

    for run in range(1, args.runs + 1):
        remove(m_targets + c_targets)
        argv = [*wrapper, str(mrsync), "--no-progress", f"{src}/", *map(str, m_targets)]
        elapsed, proc = timed(argv)
        mr.times.append(elapsed)
        verdict = "exit 0"
        if proc.returncode != 0:
            verdict = f"EXIT {proc.returncode}"
            failures.append(f"run {run}: mrsync exited {proc.returncode}: {proc.stderr.strip()}")
        if have_rsync:
            bad = 0
            for t in m_targets:
                diff = rsync_differences(src, t).splitlines()
                if diff:
                    bad += 1
                    failures.append(f"run {run}: {t} differs from the source "
                                    f"({len(diff)} lines), first: {diff[:5]}")
            verdict += ", targets identical" if not bad else f", {bad} targets DIFFER"
        remove(m_targets)

        os.sync()
        t0 = time.perf_counter()
        cp_rc = 0
        for t in c_targets:
            cp_rc |= subprocess.run(["cp", "-a", f"{src}/.", str(t)], check=False).returncode
        cp.times.append(time.perf_counter() - t0)
        if cp_rc:
            failures.append(f"run {run}: cp -a failed")
        remove(c_targets)
        print(f"run {run}/{args.runs}: mrsync {elapsed:.2f} s ({verdict}); "
              f"cp -a x{TARGETS} {cp.times[-1]:.2f} s", flush=True)

    print()
    print(f"{'tool':<10} {'median s':>9} {'min s':>8} {'max s':>8} {'MiB/s':>9}")
    for tool in (mr, cp):
        med = statistics.median(tool.times)
        rate = TARGETS * size / MiB / med if med > 0 else float("inf")
        print(f"{tool.name:<10} {med:>9.2f} {min(tool.times):>8.2f} {max(tool.times):>8.2f} "
              f"{rate:>9.1f}")
    ratio = statistics.median(mr.times) / statistics.median(cp.times)
    print(f"mrsync / cp (median wall time): {ratio:.2f}x")
    print(f"(MiB/s = {size / MiB:.1f} MiB tree x {TARGETS} targets / median time; "
          f"{args.runs} run{'s' if args.runs != 1 else ''})")

    if failures:
        print("\nFAILURES:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
