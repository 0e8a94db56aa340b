"""Command line -> one Job. Nothing else happens here."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from mrsync import __version__, exitcodes
from mrsync.io.net import DEFAULT_PORT, loopback_endpoint

DESCRIPTION = """\
Multicast rsync: make one or many target directories identical to SRC, sending every byte once
over IP multicast and repairing what each target lost.

  mrsync [OPTIONS] SRC DEST [DEST ...]     each DEST a local directory
  mrsync [OPTIONS] -s SRC -t DEST -m TARGETS   the original mrsync form

As with rsync, "SRC/" (trailing slash) syncs the directory's contents into DEST, and "SRC"
syncs the directory itself, as DEST/NAME. Local targets receive over multicast pinned to
loopback (TTL 0): a local sync never puts a packet on a network interface.
"""

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


class UsageError(Exception):
    pass


def _parse_rate(text: str) -> float:
    """Bits per second with an optional k/M/G suffix (powers of 1000, as links are sold)."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}
    t = text.strip().lower().removesuffix("bit/s").removesuffix("bps")
    factor = scale.get(t[-1:], 1.0)
    number = t[:-1] if t[-1:] in scale else t
    try:
        bits = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 200M)") from None
    if bits <= 0:
        raise argparse.ArgumentTypeError("rate must be positive")
    return bits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mrsync",
        description=DESCRIPTION,
        epilog=exitcodes.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="*", metavar="SRC DEST", help="source, then one or more targets")
    p.add_argument("-s", "--source", metavar="SRC", help="source directory (original form)")
    p.add_argument("-t", "--target-path", metavar="DIR",
                   help="destination directory on every target (original form; default: SRC)")
    p.add_argument("-m", "--machines", metavar="TARGETS",
                   help="targets: a file with one host per line (# comments) or h1,h2,...")
    p.add_argument("-A", "--address", metavar="ADDR",
                   help="multicast group (default 239.255.67.92, or ff15::6d72:7379:6e63 "
                        "with -6)")
    p.add_argument("-P", "--port", type=int, default=DEFAULT_PORT,
                   help=f"UDP port of the group (default {DEFAULT_PORT})")
    p.add_argument("-6", "--ipv6", action="store_true", help="use IPv6 for the data plane")
    p.add_argument("-v", "--verbose", type=int, choices=(0, 1, 2), default=0, metavar="0|1|2",
                   help="verbosity: 0 quiet (default), 1 per-target summary, 2 counters")
    p.add_argument("--page-size", type=int, metavar="BYTES",
                   help="payload bytes per datagram (default: from the path MTU)")
    p.add_argument("--rate", type=_parse_rate, metavar="BITS",
                   help="cap the send rate, bits per second, e.g. 200M (default: no cap)")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show live progress (default: when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--version", action="version", version=f"mrsync {__version__}")
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    return p


def _read_machines(spec: str) -> list[str]:
    if os.path.isfile(spec):
        with open(spec) as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
        return [line for line in lines if line]
    return [h.strip() for h in spec.split(",") if h.strip()]


def _resolve(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(source, local destination directories) from either command-line form."""
    if args.source or args.machines:
        if args.paths:
            raise UsageError("give either SRC DEST... or -s/-t/-m, not both")
        if not args.source or not args.machines:
            raise UsageError("the original form needs both -s SRC and -m TARGETS")
        hosts = _read_machines(args.machines)
        if not hosts:
            raise UsageError(f"no targets in {args.machines!r}")
        remote = [h for h in hosts if h not in LOCAL_HOSTS]
        if remote:
            raise UsageError(
                f"remote targets are not supported yet ({', '.join(remote)}); "
                "only localhost or local DEST directories"
            )
        dest = args.target_path or args.source
        return args.source, [dest] * len(set(hosts))
    if len(args.paths) < 2:
        raise UsageError("need SRC and at least one DEST")
    source, *dests = args.paths
    for d in dests:
        head = d.split("/", 1)[0]
        if ":" in head:
            raise UsageError(f"remote target {d!r}: host:path targets are not supported yet")
    return source, dests


def _check_paths(source: str, dests: list[str]) -> None:
    if not os.path.lexists(source):
        raise UsageError(f"source {source!r} does not exist")
    src_real = os.path.realpath(source)
    seen: set[str] = set()
    for d in dests:
        real = os.path.realpath(d)
        if real == src_real:
            raise UsageError(f"destination {d!r} is the source itself")
        if real in seen:
            raise UsageError(f"destination {d!r} is given twice")
        seen.add(real)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.server:
        from mrsync.remote.server import run_server

        return run_server()
    try:
        source, dests = _resolve(args)
        _check_paths(source, dests)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"mrsync: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE

    from mrsync.job import Job, JobOptions
    from mrsync.plan.scan import ScanError
    from mrsync.report import Reporter

    family = socket.AF_INET6 if args.ipv6 else socket.AF_INET
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    options = JobOptions(
        source=source,
        dests=dests,
        endpoint=loopback_endpoint(family, args.address, args.port),
        page_size=args.page_size,
        rate=args.rate / 8 if args.rate else None,
        verbose=args.verbose,
        progress=progress,
    )
    reporter = Reporter(verbose=args.verbose, progress=progress)
    try:
        result = Job(options, reporter).run()
    except KeyboardInterrupt:
        reporter.close()
        print("mrsync: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except ScanError as exc:
        reporter.close()
        print(f"mrsync: error: cannot read the source: {exc}", file=sys.stderr)
        return exitcodes.SESSION_FAILED
    except OSError as exc:
        reporter.close()
        print(f"mrsync: error: {exc}", file=sys.stderr)
        return exitcodes.SESSION_FAILED
    reporter.summary(result)
    good = [t for t in result.targets if t.failure is None and t.result and not t.result.errors]
    if len(good) == len(result.targets):
        return exitcodes.OK
    if not any(t.failure is None for t in result.targets):
        return exitcodes.SESSION_FAILED
    return exitcodes.PARTIAL
