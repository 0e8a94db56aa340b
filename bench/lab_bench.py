"""Lab benchmark: mrsync against rsync, uftp and udpcast on the network lab of namespaces.

    .venv/bin/python bench/lab_bench.py [--targets 1,4,8,16] [--loss 0,2] [--data file,tree]
        [--tools mrsync,rsync,uftp,udpcast] [--rate-mbit 200] [--unshaped] [--runs R]
        [--file-mib 256] [--tree-files 2000] [--mrsync-args "..."] [--workdir DIR]
    make lab-bench BENCH_ARGS="--targets 4 --runs 1"

For every cell of the matrix (link rate x N targets x loss x data) each tool runs on the same
data, in the same lab (tools interleaved run by run, targets emptied before each run), and is
timed from the start of its sending command until every process of the transfer has exited
(mrsync; all rsync clients; uftp; udp-sender and every udp-receiver pipeline). Then, untimed,
every target is checked: a tree with `rsync -anci --delete SRC/ DEST/`, the file by size and
SHA-256. Daemons (rsyncd, uftpd) and receivers are started and seen listening before the clock
starts. Settings of the anchors follow /work/shared/ANCHORS.md (see bench/README.md).

Root only (the lab needs it). Network safety: the script runs only in a network namespace of
its own whose sole interface is lo; started anywhere else it re-executes itself under
`unshare -n -m`. Every tool then runs inside lab namespaces, addressed by lab addresses only.

The targets write into a tmpfs mounted in the bench's own mount namespace (gone when it exits):
the lab's 16 "machines" share one disk and one page cache, which real targets do not, so the
disk is left out of the picture for every tool alike. Two artifacts came with writing to this
host's disk. Its root is ext4 without a journal, where the kernel skips every inode freed in
the last minutes when it allocates one (recently_deleted()); each run frees the previous run's
thousands of files, and creating a file cost a target up to a third of its CPU (perf,
unshaped tree), more with every run. A fresh journaled ext4 on a loop device (`--dest-fs
ext4`) avoids that, but 8 x 256 MiB of dirty pages, cached twice (the loop's filesystem and
its backing file), brought writeback throttling instead. `--dest-fs dir` writes into WORKDIR.

The table is printed and written to bench/RESULTS.md (--output), with the machine, the tool
versions, the command line and the runs per cell. A run that did not deliver (timeout, exit
status, a target that differs) is shown as such; the median is over the verified runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local_sync import cpu_model  # bench/ is on the path: the scripts share it

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

MiB = 1024 * 1024
KiB = 1024
TOOLS = ("mrsync", "rsync", "uftp", "udpcast")
REEXEC_ENV = "MRSYNC_LAB_BENCH_NETNS"
RSYNC_PORT = 873
UFTP_PORT = 1044
READY_TIMEOUT = 15.0


# --- network safety -------------------------------------------------------------------------


def _own_mount_ns() -> bool:
    """True in the namespaces ``ensure_private_netns`` re-executed us into."""
    return os.environ.get(REEXEC_ENV) == "1"


def ensure_private_netns() -> None:
    """Run only in a network namespace of our own whose sole interface is lo, and a mount
    namespace of our own (for the targets' filesystem): re-exec under `unshare -n -m`."""
    others = [name for _, name in socket.if_nameindex() if name != "lo"]
    if _own_mount_ns():
        if others:
            sys.exit(f"lab_bench: still sees interfaces {others} after `unshare -n -m`;"
                     " refusing to run")
        return
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        sys.exit("lab_bench: needs unshare (util-linux) and ip (iproute2) to isolate itself")
    os.environ[REEXEC_ENV] = "1"
    argv = ["unshare", "-n", "-m", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
            sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    sys.stdout.flush()
    os.execvp(argv[0], argv)


# --- the machine and the tools --------------------------------------------------------------


def _out(argv: Sequence[str], timeout: float = 10) -> str:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({e.__class__.__name__})"
    return (res.stdout + res.stderr).strip()


def _dpkg_version(package: str) -> str:
    v = _out(["dpkg-query", "-W", "-f", "${Version}", package])
    return v if v and "no packages" not in v.lower() and not v.startswith("(") else "?"


def tool_versions() -> dict[str, str]:
    """Version strings. Runs in the script's private namespace (only lo), so udp-sender's
    banner probe cannot reach a real network: it finds no eth0, falls back to lo, gives up."""
    banner = _out(["udp-sender", "--nokbd", "--interface", "lo", "--start-timeout", "1",
                   "--file", "/dev/null"], timeout=5)
    udp = next((ln for ln in banner.splitlines() if ln.lower().startswith("udp-sender")), "?")
    commit = _out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _out(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"])
    return {
        "uftp": f"uftp {_dpkg_version('uftp')} (Debian package; uftp has no -v)",
        "udpcast": f"{udp} (Debian package {_dpkg_version('udpcast')})",
        "rsync": _out(["rsync", "--version"]).splitlines()[0],
        "mrsync": f"commit {commit}{' + uncommitted changes in src/' if dirty else ''}; "
                  f"{_out([sys.executable, '-m', 'mrsync', '--version'])}",
        "python": platform.python_version(),
    }


def machine() -> str:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return (f"nproc {usable} (of {os.cpu_count()}), {cpu_model()}, kernel "
            f"{platform.system()} {platform.release()} ({platform.machine()})")


# --- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    kind: str  # "file" or "tree"
    src: Path  # the directory that mrsync and rsync sync (SRC/)
    send: Path  # what uftp sends: the file itself, or the tree's directory
    size: int  # bytes of file data
    files: int
    sha256: str = ""  # the file's digest (kind "file")

    @property
    def label(self) -> str:
        if self.kind == "file":
            return f"file {self.size / MiB:g} MiB"
        return f"tree {self.files} files {self.size / MiB:.1f} MiB"


def _cached(meta: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    try:
        saved = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("params") == params else None


def ensure_file(workdir: Path, mib: int, seed: int) -> Data:
    base = workdir / "data" / f"file-{mib}MiB-s{seed}"
    meta, src = base / "meta.json", base / "src"
    params = {"kind": "file", "mib": mib, "seed": seed}
    saved = _cached(meta, params)
    if saved is None or not (src / "file.bin").is_file():
        print(f"data: writing a {mib} MiB random file (seed {seed}) in {base} ...", flush=True)
        shutil.rmtree(base, ignore_errors=True)
        src.mkdir(parents=True)
        rng = random.Random(seed)
        digest = hashlib.sha256()
        with open(src / "file.bin", "wb") as f:
            left = mib * MiB
            while left:
                chunk = rng.randbytes(min(left, 4 * MiB))
                digest.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        saved = {"params": params, "size": mib * MiB, "files": 1, "sha256": digest.hexdigest()}
        meta.write_text(json.dumps(saved) + "\n")
    return Data("file", src, src / "file.bin", saved["size"], 1, saved["sha256"])


def ensure_tree(workdir: Path, files: int, seed: int) -> Data:
    """`files` random files of 1-256 KiB (sizes triangular, mode 1 KiB: many small, few
    large), 100 to a directory, under a directory named "tree"."""
    base = workdir / "data" / f"tree-{files}f-s{seed}"
    meta, src = base / "meta.json", base / "tree"
    params = {"kind": "tree", "files": files, "seed": seed}
    saved = _cached(meta, params)
    if saved is None or not src.is_dir():
        print(f"data: writing a tree of {files} random files (seed {seed}) in {base} ...",
              flush=True)
        shutil.rmtree(base, ignore_errors=True)
        src.mkdir(parents=True)
        rng = random.Random(seed)
        total = 0
        for i in range(files):
            d = src / f"d{i // 100:03d}"
            d.mkdir(exist_ok=True)
            size = int(rng.triangular(1 * KiB, 256 * KiB, 1 * KiB))
            (d / f"f{i:05d}.bin").write_bytes(rng.randbytes(size))
            total += size
        saved = {"params": params, "size": total, "files": files}
        meta.write_text(json.dumps(saved) + "\n")
    return Data("tree", src, src, saved["size"], saved["files"])


# --- verification ---------------------------------------------------------------------------


@dataclass
class Verdict:
    content_ok: bool
    meta: set[str] = field(default_factory=set)  # what differs: "t of dirs", "p of files"...
    detail: str = ""


_META_FLAGS = {2: "c", 3: "s", 4: "t", 5: "p", 6: "o", 7: "g", 8: "u", 9: "a", 10: "x"}


def compare_tree(src: Path, dest: Path) -> Verdict:
    """rsync -anci --delete: a line whose first letter is not "." (a transfer, a creation, a
    deletion) means the content differs; "." lines differ in metadata only."""
    if not dest.is_dir():
        return Verdict(False, detail=f"{dest} missing")
    res = subprocess.run(["rsync", "-anci", "--delete", f"{src}/", f"{dest}/"],
                         capture_output=True, text=True, errors="replace", check=False)
    if res.returncode != 0:
        return Verdict(False, detail=f"rsync -anci exited {res.returncode}: "
                       f"{res.stderr.strip()[:200]}")
    verdict = Verdict(True)
    bad: list[str] = []
    for line in res.stdout.splitlines():
        item = line.split(" ", 1)[0]
        if line.startswith("*") or not item.startswith("."):
            bad.append(line)
            continue
        what = "dirs" if item[1:2] == "d" else "files"
        verdict.meta.update(f"{flag} of {what}" for pos, flag in _META_FLAGS.items()
                            if pos < len(item) and item[pos] not in ". ")
    if bad:
        verdict.content_ok = False
        verdict.detail = f"{len(bad)} items differ, e.g. {bad[0]!r}"
    return verdict


def compare_file(path: Path, size: int, sha256: str) -> Verdict:
    try:
        st = path.stat()
        if st.st_size != size:
            return Verdict(False, detail=f"{path.name}: {st.st_size} bytes, not {size}")
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        return Verdict(False, detail=f"{path}: {e.strerror}")
    if digest != sha256:
        return Verdict(False, detail=f"{path.name}: SHA-256 differs")
    return Verdict(True)


# --- running the tools ----------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    wall: float | None = None  # None: never finished
    wire: int = 0
    drops: int = 0
    status: str = "ok"  # "ok", "timeout after N s", "exit N", ...
    verified: str = "no"  # "yes", "content" (metadata differs), "no"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.wall is not None and self.verified in ("yes", "content")


class Procs:
    """The processes of one run, each the leader of its own process group, with output to a
    log file; `kill` ends them (and their children, e.g. a pipeline) by process group."""

    def __init__(self, lab: Any, logdir: Path, tag: str) -> None:
        self.lab, self.logdir, self.tag = lab, logdir, tag
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, host: Any, argv: Sequence[str], role: str) -> subprocess.Popen[bytes]:
        log = self.logdir / f"{self.tag}-{role}.log"
        with open(log, "wb") as f:
            proc: subprocess.Popen[bytes] = self.lab.popen(
                host, list(argv), stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, role: str) -> str:
        try:
            return (self.logdir / f"{self.tag}-{role}.log").read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def wait_all(procs: Sequence[subprocess.Popen[bytes]], deadline: float,
             fatal: dict[subprocess.Popen[bytes], str] | None = None) -> str | None:
    """Wait until all have exited (None), the deadline passed ("timeout"), or one of `fatal`
    (process: its name) exited non-zero: what it was, since the transfer cannot complete."""
    pending = list(procs)
    while True:
        pending = [p for p in pending if p.poll() is None]
        for proc, name in (fatal or {}).items():
            if proc.returncode:
                return f"{name} exited {proc.returncode}"
        if not pending:
            return None
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(0.002)


def wait_listening(lab: Any, hosts: Sequence[Any], proto: str, port: int | None,
                   name: str, procs: Sequence[subprocess.Popen[bytes]]) -> str | None:
    """Until `name` has a listening socket (TCP "t" / UDP "u") on every host; None when
    ready, else what went wrong."""
    deadline = time.monotonic() + READY_TIMEOUT
    waiting = list(hosts)
    while waiting:
        for proc in procs:
            if proc.poll() is not None:
                return f"{name} exited {proc.returncode} before it was ready"
        host = waiting[0]
        argv = ["ss", "-Hlnp", f"-{proto}"]
        if port is not None:
            argv += ["sport", "=", f":{port}"]
        res = lab.exec(host, argv, capture_output=True, text=True, check=False)
        if f'"{name}"' in res.stdout:
            waiting.pop(0)
            continue
        if time.monotonic() > deadline:
            return f"{name} not listening on {host.name} after {READY_TIMEOUT:g} s"
        time.sleep(0.02)
    return None


@dataclass
class Cell:
    lab: Any
    rate_mbit: float | None
    loss_pct: float
    data: Data
    dests: list[Path]
    logdir: Path
    timeout: float  # factor x physical limit, seconds; rsync's is x N
    slack: float  # seconds added to every timeout
    uftp_kbit: int
    mrsync_args: list[str]
    udp_sender_args: list[str]

    @property
    def n(self) -> int:
        return len(self.lab.targets)


def set_loss(cell: Cell, udp_only: bool) -> None:
    for t in cell.lab.targets:
        cell.lab.set_loss(t, cell.loss_pct / 100, udp_only=udp_only)


@contextlib.contextmanager
def dest_filesystem(root: Path, size: int, kind: str) -> Iterator[None]:
    """``root`` on a tmpfs of ``size`` bytes, or on a fresh journaled ext4 of that size (a
    sparse image next to it), for the duration; with kind "dir", just a directory."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "dir":
        yield
        return
    assert _own_mount_ns(), "the targets' filesystem must not be mounted on the host"
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "mrlab-dest",
                        str(root)], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", str(root)], check=False)
        return
    image = root.with_suffix(".img")
    with open(image, "wb") as f:
        f.truncate(size)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(root)], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", str(root)], check=False)
    finally:
        image.unlink(missing_ok=True)


def prepare_dests(dests: Sequence[Path]) -> None:
    for d in dests:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    os.sync()  # nobody pays for the previous run's dirty pages


def run_mrsync(cell: Cell, procs: Procs) -> list[subprocess.Popen[bytes]]:
    lab = cell.lab
    argv = [sys.executable, "-m", "mrsync", "--no-progress", "-e", "ip netns exec",
            "--mrsync-path", f"{sys.executable} -m mrsync", *cell.mrsync_args,
            f"{cell.data.src}/",
            *(f"{lab.hostname(t)}:{d}" for t, d in zip(lab.targets, cell.dests, strict=True))]
    return [procs.start(lab.master, argv, "mrsync")]


def start_rsyncd(cell: Cell, procs: Procs) -> str | None:
    lab = cell.lab
    daemons = []
    for i, (t, dest) in enumerate(zip(lab.targets, cell.dests, strict=True)):
        conf = cell.logdir / f"{procs.tag}-rsyncd{i}.conf"
        conf.write_text(
            "use chroot = no\n"
            "reverse lookup = no\n"
            f"log file = {cell.logdir / f'{procs.tag}-rsyncd{i}.log'}\n"
            "[bench]\n"
            f"    path = {dest}\n"
            "    read only = no\n"
            "    uid = 0\n"
            "    gid = 0\n"
            "    munge symlinks = no\n"
        )
        daemons.append(procs.start(t, ["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                       f"--address={t.addr}", f"--port={RSYNC_PORT}"],
                                   f"rsyncd{i}-out"))
    return wait_listening(lab, lab.targets, "t", RSYNC_PORT, "rsync", daemons)


def run_rsync(cell: Cell, procs: Procs) -> list[subprocess.Popen[bytes]]:
    lab = cell.lab
    return [procs.start(lab.master, ["rsync", "-a", f"{cell.data.src}/",
                                     f"rsync://{t.addr}/bench/"], f"rsync{i}")
            for i, t in enumerate(lab.targets)]


def _uftp_id(i: int) -> str:
    return f"0x{0x100 + i:08X}"


def start_uftpd(cell: Cell, procs: Procs) -> str | None:
    lab = cell.lab
    daemons = [procs.start(t, ["uftpd", "-d", "-q", "-U", _uftp_id(i), "-D", str(dest),
                               "-B", "8388608", "-c", "4194304"], f"uftpd{i}")
               for i, (t, dest) in enumerate(zip(lab.targets, cell.dests, strict=True))]
    return wait_listening(lab, lab.targets, "u", UFTP_PORT, "uftpd", daemons)


def run_uftp(cell: Cell, procs: Procs) -> list[subprocess.Popen[bytes]]:
    ids = ",".join(_uftp_id(i) for i in range(cell.n))
    argv = ["uftp", "-R", str(cell.uftp_kbit), "-b", "1400", "-r", "0.5:0.001:15", "-H", ids,
            "-S", "@LOG", str(cell.data.send)]
    return [procs.start(cell.lab.master, argv, "uftp")]


UDP_RECEIVER = ["udp-receiver", "--nokbd", "--interface", "eth0", "--start-timeout", "30",
                "--receive-timeout", "30", "--rcvbuf", "8388608"]


def start_udp_receivers(cell: Cell, procs: Procs) -> str | None:
    lab = cell.lab
    receivers = []
    for i, (t, dest) in enumerate(zip(lab.targets, cell.dests, strict=True)):
        if cell.data.kind == "file":
            argv = [*UDP_RECEIVER, "--file", str(dest / cell.data.send.name)]
        else:
            argv = ["bash", "-c", f"set -o pipefail; {shlex.join(UDP_RECEIVER)} | "
                    f"tar -x -C {shlex.quote(str(dest))}"]
        receivers.append(procs.start(t, argv, f"udp-receiver{i}"))
    return wait_listening(lab, lab.targets, "u", None, "udp-receiver", receivers)


def run_udp_sender(cell: Cell, procs: Procs) -> list[subprocess.Popen[bytes]]:
    sender = ["udp-sender", "--nokbd", "--interface", "eth0", "--min-receivers", str(cell.n),
              "--start-timeout", "30", "--rexmit-hello-interval", "100", *cell.udp_sender_args]
    if cell.data.kind == "file":
        argv = [*sender, "--file", str(cell.data.send)]
    else:
        argv = ["bash", "-c", f"set -o pipefail; tar -c -C {shlex.quote(str(cell.data.src))} . "
                f"| {shlex.join(sender)}"]
    return [procs.start(cell.lab.master, argv, "udp-sender")]


def run_tool(tool: str, cell: Cell, tag: str) -> Run:
    """One timed run of `tool` in `cell`, verified afterwards."""
    lab = cell.lab
    run = Run(tool)
    prepare_dests(cell.dests)
    set_loss(cell, udp_only=(tool != "rsync"))  # rsync is TCP: its loss drops all IP
    procs = Procs(lab, cell.logdir, tag)
    # rsync must send the data once per target at the least
    timeout = cell.timeout * (cell.n if tool == "rsync" else 1) + cell.slack
    try:
        setup = {"rsync": start_rsyncd, "uftp": start_uftpd, "udpcast": start_udp_receivers}
        problem = setup[tool](cell, procs) if tool in setup else None
        if problem:
            run.status = f"setup failed: {problem}"
            return run
        starter = {"mrsync": run_mrsync, "rsync": run_rsync, "uftp": run_uftp,
                   "udpcast": run_udp_sender}[tool]
        drops0 = sum(lab.loss_drops(t) for t in lab.targets)
        tx0 = lab.master_tx_bytes()
        t0 = time.monotonic()
        senders = starter(cell, procs)
        waited = list(senders)
        fatal = {}
        if tool == "udpcast":
            # The result is there when every receiver pipeline is done. A receiver that gave
            # up leaves udp-sender waiting for it for good: that run has failed.
            receivers = [p for p in procs.procs if p not in senders]
            waited += receivers
            fatal = {p: f"udp-receiver on t{i}" for i, p in enumerate(receivers)}
        problem = wait_all(waited, t0 + timeout, fatal)
        elapsed = time.monotonic() - t0
        run.wire = lab.master_tx_bytes() - tx0
        run.drops = sum(lab.loss_drops(t) for t in lab.targets) - drops0
        if problem is None:
            run.wall = elapsed
            codes = sorted({p.returncode for p in waited if p.returncode})
            if codes:
                run.status = f"exit {','.join(map(str, codes))}"
        elif problem == "timeout":
            run.status = f"timeout after {timeout:.1f} s"
        else:
            run.status = f"{problem} after {elapsed:.1f} s"
    finally:
        procs.kill()
    if tool == "uftp":
        line = next((ln for ln in procs.log("uftp").splitlines() if "UFTP version" in ln), "")
        if line:
            UFTP_BANNER[0] = line[line.index("UFTP version"):].split("  ")[0]
    verify(cell, tool, run)
    if not run.ok and run.status == "ok":
        run.status = "not delivered"
    return run


UFTP_BANNER = [""]


def verify(cell: Cell, tool: str, run: Run) -> None:
    data = cell.data
    verdicts = []
    for dest in cell.dests:
        if data.kind == "file":
            verdicts.append(compare_file(dest / data.send.name, data.size, data.sha256))
        else:
            # uftp sends the directory itself: it lands as DEST/tree
            got = dest / data.send.name if tool == "uftp" else dest
            verdicts.append(compare_tree(data.src, got))
    bad = [v for v in verdicts if not v.content_ok]
    meta = set().union(*(v.meta for v in verdicts))
    if bad:
        run.verified = "no"
        run.notes.append(f"{len(bad)}/{len(verdicts)} targets differ ({bad[0].detail})")
    elif meta:
        run.verified = "content"
        run.notes.append(f"metadata differs: {', '.join(sorted(meta))}")
    else:
        run.verified = "yes"


# --- the matrix -----------------------------------------------------------------------------


@dataclass
class CellResult:
    rate_mbit: float | None
    n: int
    loss_pct: float
    data: Data
    tool: str
    runs: list[Run]

    def limit(self) -> float | None:
        if self.rate_mbit is None:
            return None
        return self.data.size * 8 / (self.rate_mbit * 1e6)

    def row(self) -> list[str]:
        ok = [r for r in self.runs if r.ok]
        link = "unshaped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        wall = ratio = wire = "—"
        if ok:
            med = statistics.median(r.wall for r in ok if r.wall is not None)
            wall = f"{med:.2f}"
            lim = self.limit()
            if lim:
                ratio = f"{med / lim:.2f}"
            wire = f"{statistics.median(r.wire / self.data.size for r in ok):.2f}"
        elif self.runs:
            wall = "FAIL"
        if ok and len(ok) == len(self.runs):
            verified = "yes" if all(r.verified == "yes" for r in ok) else "content only"
        else:
            verified = f"no ({len(ok)}/{len(self.runs)} ok)"
        notes: list[str] = []
        for r in self.runs:
            for note in ([] if r.status == "ok" else [r.status]) + r.notes:
                if note not in notes:
                    notes.append(note)
        drops = statistics.median(r.drops for r in self.runs) if self.runs else 0
        if self.loss_pct:
            notes.append(f"loss drops {drops:.0f}")
        return [link, str(self.n), f"{self.loss_pct:g}%", self.data.label, self.tool, wall, ratio,
                wire, verified, "; ".join(notes)]


HEADERS = ["link", "N", "loss", "data", "tool", "median wall s", "x limit", "wire/data",
           "verified", "notes"]


def table(results: Sequence[CellResult]) -> str:
    rows = [HEADERS, ["---"] * len(HEADERS)] + [r.row() for r in results]
    return "\n".join("| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows)


def report(args: argparse.Namespace, versions: dict[str, str], datas: Sequence[Data],
           results: Sequence[CellResult], started: datetime.datetime, complete: bool) -> str:
    cmd = shlex.join(["python", "bench/lab_bench.py", *sys.argv[1:]])
    lines = [
        "# Lab benchmark: mrsync, rsync, uftp, udpcast",
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M %Z').strip()}"
        + ("" if complete else " (PARTIAL: the run did not finish)"),
        f"- machine: {machine()}",
        f"- command: `{cmd}`",
        f"- runs per cell: {args.runs} (median over the verified runs)",
        "- versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items())
        + (f"; uftp banner: {UFTP_BANNER[0]}" if UFTP_BANNER[0] else ""),
    ]
    for d in datas:
        limit = f", limit {d.size * 8 / (args.rate_mbit * 1e6):.2f} s at {args.rate_mbit:g} " \
                "Mbit/s" if args.rate_mbit else ""
        lines.append(f"- data: {d.label} ({d.size} bytes){limit}")
    lines += [
        "",
        "wall: start of the sending command to the exit of the last process of the transfer; "
        "x limit: wall / (data bytes / link rate); wire/data: bytes the master put on its link "
        "(Ethernet frames) / data bytes; verified: yes = every target identical to the source "
        "(`rsync -anci --delete`, or size + SHA-256 for the file), content only = same content "
        "but metadata differs (notes), no = not delivered. Loss: random drops on each target's "
        "eth0, UDP only for mrsync, uftp and udpcast, all IP for rsync (TCP).",
        "",
        table(results),
        "",
    ]
    return "\n".join(lines)


def parse_list(text: str, kind: type, name: str) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"lab_bench: bad {name}: {text!r}")



def run_cells(args: argparse.Namespace, targets: list[int], rates: list[float | None],
              losses: list[float], datas: list[Data], tools: list[str], workdir: Path,
              logdir: Path, results: list[CellResult], write: Any) -> None:
    """Every cell of the matrix, in order, its results appended to ``results`` as they come
    (``write`` rewrites the partial report after each cell)."""
    from netlab import Lab

    for n in targets:
        with Lab(n, rate_mbit=rates[0]) as lab:
            dests = [workdir / "dest" / f"t{i}" for i in range(n)]
            for rate in rates:
                lab.set_rate(rate)
                for loss in losses:
                    for data in datas:
                        ref_rate = rate or 200.0
                        limit = data.size * 8 / (ref_rate * 1e6)
                        cell = Cell(lab, rate, loss, data, dests, logdir,
                                    args.timeout_factor * limit, args.timeout_slack,
                                    round(rate * 1000 * 0.95) if rate else args.uftp_unshaped_kbit,
                                    shlex.split(args.mrsync_args),
                                    shlex.split(args.udp_sender_args))
                        cell_results = {t: CellResult(rate, n, loss, data, t, []) for t in tools}
                        results.extend(cell_results.values())
                        link = f"{rate:g}M" if rate else "unshaped"
                        for k in range(args.runs):
                            for tool in tools:
                                tag = f"{link}-n{n}-l{loss:g}-{data.kind}-{tool}-r{k + 1}"
                                run = run_tool(tool, cell, tag)
                                cell_results[tool].runs.append(run)
                                wall = f"{run.wall:.2f} s" if run.wall is not None else "—"
                                print(f"[{link} N={n} loss={loss:g}% {data.kind}] {tool} run "
                                      f"{k + 1}/{args.runs}: {wall}, wire "
                                      f"{run.wire / data.size:.2f}x, drops {run.drops}, "
                                      f"{run.status}, verified {run.verified}"
                                      + (f" ({'; '.join(run.notes)})" if run.notes else ""),
                                      flush=True)
                        write(False)
            for dest in dests:
                shutil.rmtree(dest, ignore_errors=True)


def byte_compile_mrsync() -> None:
    """Compile mrsync's modules, as installing a package does: from an editable install
    (scripts/venv.sh) every process that starts compiles each module whose byte code is
    missing or older than its source, and with PYTHONDONTWRITEBYTECODE set none is ever
    saved. Each run then paid it in the master and every target (measured: 12 stale modules,
    tens of milliseconds of each run's start-up on two cores). compileall writes whatever
    that variable says."""
    import compileall

    import mrsync

    for package_dir in mrsync.__path__:
        compileall.compile_dir(package_dir, quiet=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--targets", default="1,4,8,16", help="N targets, a list (1,4,8,16)")
    ap.add_argument("--loss", default="0,2", help="loss per target in %%, a list (0,2)")
    ap.add_argument("--data", default="file,tree", help="file, tree or both (file,tree)")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"a list ({','.join(TOOLS)})")
    ap.add_argument("--rate-mbit", type=float, default=200,
                    help="the master's link rate (200); 0: no shaped runs")
    ap.add_argument("--unshaped", action="store_true", help="also run with no rate limit")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell, median reported (3)")
    ap.add_argument("--file-mib", type=int, default=256, help="size of the file (256 MiB)")
    ap.add_argument("--tree-files", type=int, default=2000, help="files in the tree (2000)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the data (1)")
    ap.add_argument("--workdir", default="/tmp/mrsync-lab-bench",
                    help="data cache, targets and logs (/tmp/mrsync-lab-bench)")
    ap.add_argument("--dest-fs", choices=("tmpfs", "ext4", "dir"), default="tmpfs",
                    help="where targets write: a tmpfs (default), a fresh journaled ext4 image,"
                         " or WORKDIR/dest as it is")
    ap.add_argument("--mrsync-args", default="", help='extra mrsync options, e.g. "--rate 190M"')
    ap.add_argument("--udp-sender-args", default="",
                    help='extra udp-sender options, e.g. "--min-wait 1"')
    ap.add_argument("--uftp-unshaped-kbit", type=int, default=1000000,
                    help="uftp -R when unshaped, kbit/s (1000000; -1: no rate control)")
    ap.add_argument("--timeout-factor", type=float, default=20,
                    help="a run times out after FACTOR x the physical limit + SLACK (20; for "
                         "rsync x N; unshaped runs use the limit at 200 Mbit/s)")
    ap.add_argument("--timeout-slack", type=float, default=60, help="seconds (60)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "RESULTS.md"),
                    help="markdown report (bench/RESULTS.md); '-' for none")
    args = ap.parse_args()

    targets = parse_list(args.targets, int, "--targets")
    losses = parse_list(args.loss, float, "--loss")
    kinds = parse_list(args.data, str, "--data")
    tools = parse_list(args.tools, str, "--tools")
    rates: list[float | None] = [args.rate_mbit] if args.rate_mbit > 0 else []
    if args.unshaped:
        rates.append(None)
    if (not targets or not losses or not rates or args.runs < 1
            or any(n < 1 for n in targets) or any(not 0 <= x < 100 for x in losses)
            or set(kinds) - {"file", "tree"} or set(tools) - set(TOOLS) or not kinds or not tools):
        ap.error("bad matrix: check --targets, --loss, --data, --tools, --rate-mbit/--unshaped, "
                 "--runs")

    if os.geteuid() != 0:
        sys.exit("lab_bench: the network lab needs root")
    ensure_private_netns()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from netlab import missing_requirements

    reason = missing_requirements()
    missing = [t for t in ("rsync", "uftp", "uftpd", "udp-sender", "udp-receiver", "ss", "tar")
               if shutil.which(t) is None]
    if reason or missing:
        sys.exit(f"lab_bench: {reason or ''} {'missing: ' + ', '.join(missing) if missing else ''}"
                 " (scripts/bench-deps.sh installs them)")

    byte_compile_mrsync()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    logdir = workdir / "logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir()
    started = datetime.datetime.now().astimezone()
    versions = tool_versions()
    print(f"machine: {machine()}")
    for name, version in versions.items():
        print(f"{name}: {version}")

    datas = []
    if "file" in kinds:
        datas.append(ensure_file(workdir, args.file_mib, args.seed))
    if "tree" in kinds:
        datas.append(ensure_tree(workdir, args.tree_files, args.seed))
    for d in datas:
        print(f"data: {d.label}: {d.src}")

    results: list[CellResult] = []

    def write(complete: bool) -> None:
        if args.output != "-":
            Path(args.output).write_text(report(args, versions, datas, results, started,
                                                complete))

    # Room for the largest cell's targets, with slack for the filesystem's own blocks.
    dest_bytes = max(targets) * max(d.size for d in datas) * 23 // 20 + (512 << 20)
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(dest_filesystem(workdir / "dest", dest_bytes, args.dest_fs))
        run_cells(args, targets, rates, losses, datas, tools, workdir, logdir, results, write)

    text = report(args, versions, datas, results, started, True)
    print()
    print(text)
    write(True)
    if args.output != "-":
        print(f"written to {args.output}")
    return 0 if all(r.ok for c in results for r in c.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
