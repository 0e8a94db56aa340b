"""Command line -> one Job. Nothing else happens here."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from mrsync import __version__, config, exitcodes
from mrsync.io.net import DEFAULT_PORT, Endpoint, loopback_endpoint, network_endpoint
from mrsync.remote.targets import TargetSpec, host_target, parse_target, spawn_server

if TYPE_CHECKING:
    import subprocess

    from mrsync.plan.options import SyncOptions

DESCRIPTION = """\
Multicast rsync: make one or many target directories identical to SRC, sending every byte once
over IP multicast and repairing what each target lost.

  mrsync [OPTIONS] SRC DEST [DEST ...]         DEST: a directory, or [user@]host:path
  mrsync [OPTIONS] -s SRC -t DEST -m TARGETS   the original mrsync form (hosts in -m)

As with rsync, "SRC/" (trailing slash) syncs the directory's contents into DEST, and "SRC"
syncs the directory itself, as DEST/NAME. Receivers on hosts are started through the remote
shell (-e, ssh by default) as "mrsync --server"; their control stream is that command's
stdin/stdout and all file data travels over the multicast group. When every target is local,
the group is pinned to loopback with TTL 0: no packet is put on a network interface.
"""

EXAMPLES = """\
examples:
  mrsync -v 1 /srv/data/ node1:/srv/data node2:/srv/data /mnt/backup/data
  mrsync -s /srv/data -m hosts.txt --rate 800M --stats
  mrsync -e "ssh -i ~/.ssh/fleet" --json report.json -s /srv/data -m node1,node2,node3
  mrsync-rtt node1 node2           test the path to some hosts first
"""

CONFIG_HELP = f"""\
configuration files:
  {config.SYSTEM_CONFIG}, then {config.USER_CONFIG}, then --config FILE set defaults (TOML);
  later files override earlier ones and options override them all. Keys: rsh, mrsync_path,
  address, port, interface, ttl, rate, page_size, sitout_lag, fec, verbose, e.g.
      rsh = "ssh -o BatchMode=yes"
      rate = "800M"
  An unknown key or a value of the wrong type is an error (exit status 1).
"""


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits with our status 1 (argparse's own is 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(exitcodes.USAGE, f"{self.prog}: error: {message}\n")


def parse_rate_arg(text: str) -> float:
    try:
        return config.parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_defaults(argv: list[str], prog: str) -> dict[str, object] | int:
    """Defaults from the configuration files (``--config`` is looked for in ``argv``), or the
    exit status after a clear error."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config")
    try:
        explicit = pre.parse_known_args(argv)[0].config
    except argparse.ArgumentError:
        explicit = None  # the real parser reports it
    try:
        return config.load(explicit)
    except config.ConfigError as exc:
        print(f"{prog}: error: configuration: {exc}", file=sys.stderr)
        return exitcodes.USAGE


def data_plane(
    family: int, address: str | None, port: int, interface: str | None, ttl: int | None,
    *, local_only: bool,
) -> tuple[Endpoint, int]:
    """The multicast endpoint and TTL for a session (mrsync and mrsync-rtt alike): when every
    target is on this machine and no interface is named, the group is pinned to loopback with
    TTL 0, so nothing leaves the host; otherwise the named interface or the route to the
    group, TTL 1 unless told. Raises OSError when no interface fits."""
    if local_only and not interface:
        endpoint = loopback_endpoint(family, address, port)
    else:
        endpoint = network_endpoint(family, address, port, interface)
    if ttl is None:
        ttl = 0 if local_only and not interface else 1
    return endpoint, ttl


class _RuleAction(argparse.Action):
    """--include/--exclude/--exclude-from into one ordered rule list: rsync's first match wins,
    so their order on the command line matters."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        rules: list[tuple[str, str]] = list(getattr(namespace, self.dest, None) or [])
        value = str(values)
        if option_string == "--include":
            rules.append(("+", value))
        elif option_string == "--exclude":
            rules.append(("-", value))
        else:
            try:
                with open(value, encoding="utf-8", errors="surrogateescape") as f:
                    lines = f.read().splitlines()
            except OSError as exc:
                parser.error(f"--exclude-from {value}: {exc.strerror}")
            for line in lines:
                if not line.strip() or line[0] in "#;":
                    continue
                if line[:2] in ("+ ", "- "):
                    rules.append((line[0], line[2:]))
                else:
                    rules.append(("-", line))
        setattr(namespace, self.dest, rules)


def _sync_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of the SyncOptions the arguments ask for, checked. The SyncOptions itself
    is made once the targets are starting: it is a msgspec Struct, and msgspec was a fifth of
    the imports the master made before it could start them."""
    if args.delete_first and (args.backup or args.backup_dir):
        raise UsageError("--backup and -X cannot be combined")
    if args.only and args.delete:
        raise UsageError("-l syncs just the listed files and never deletes: drop --delete")
    backup = bool(args.backup or args.backup_dir)
    suffix = args.suffix if args.suffix is not None else ("" if args.backup_dir else "~")
    if backup and not args.backup_dir and suffix == "":
        raise UsageError("an empty --suffix needs --backup-dir (the backup would replace the file)")
    only = tuple(g.strip() for g in (args.only or "").split(",") if g.strip())
    return dict(
        checksum=args.checksum,
        size_only=args.size_only,
        update=args.update,
        ignore_existing=args.ignore_existing,
        delete=args.delete,
        delete_first=args.delete_first,
        backup=backup,
        suffix=suffix,
        backup_dir=args.backup_dir,
        hard_links=args.hard_links,
        numeric_ids=args.numeric_ids,
        dry_run=args.dry_run,
        rules=tuple(args.rules or ()),
        only=only,
    )


def add_group_options(p: argparse.ArgumentParser) -> None:
    """The multicast group: -A, -P, -6 (mrsync and mrsync-rtt alike)."""
    p.add_argument("-A", "--address", metavar="ADDR",
                   help="multicast group (default 239.255.67.92, or ff15::6d72:7379:6e63 "
                        "with -6)")
    p.add_argument("-P", "--port", type=int, default=DEFAULT_PORT,
                   help=f"UDP port of the group (default {DEFAULT_PORT})")
    p.add_argument("-6", "--ipv6", action="store_true", help="use IPv6 for the data plane")


def add_shell_options(p: argparse.ArgumentParser) -> None:
    """How receivers are started on the targets: -e, --mrsync-path."""
    p.add_argument("-e", "--rsh", metavar="CMD", default="ssh",
                   help='remote shell that starts receivers on hosts (default "ssh"; e.g. '
                        '"ssh -p 2222 -i KEY", or "ip netns exec" for a lab)')
    p.add_argument("--mrsync-path", metavar="PATH", default="mrsync",
                   help='mrsync on the targets (default "mrsync" on their PATH)')


def add_route_options(p: argparse.ArgumentParser) -> None:
    """Where the group goes out: -I, -T."""
    p.add_argument("-I", "--interface", metavar="NAME",
                   help="send the group on this interface (default: the route to the group)")
    p.add_argument("-T", "--ttl", type=int, metavar="N",
                   help="multicast TTL / hop limit (default 1; 0 when every target is local)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mrsync",
        description=DESCRIPTION,
        epilog=EXAMPLES + "\n" + CONFIG_HELP + "\n" + exitcodes.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="*", metavar="SRC DEST", help="source, then one or more targets")
    p.add_argument("-s", "--source", metavar="SRC", help="source directory (original form)")
    p.add_argument("-t", "--target-path", metavar="DIR",
                   help="destination directory on every target (original form; default: SRC)")
    p.add_argument("-m", "--machines", metavar="TARGETS",
                   help="targets: a file with one host per line (# comments) or h1,h2,...")
    add_group_options(p)
    add_shell_options(p)
    add_route_options(p)
    p.add_argument("--sitout-lag", type=float, default=2.0, metavar="SECONDS",
                   help="a target this far behind the sender sits out and is caught up by "
                        "unicast afterwards, so it never holds the others back (default 2)")
    p.add_argument("-v", "--verbose", type=int, choices=(0, 1, 2), default=0, metavar="0|1|2",
                   help="verbosity: 0 quiet (default), 1 per-target summary and time-stamped "
                        "log lines, 2 counters and timings")
    p.add_argument("--page-size", type=int, metavar="BYTES",
                   help="payload bytes per datagram (default: from the path MTU)")
    p.add_argument("--fec", type=float, default=0.0, metavar="PERCENT",
                   help="proactive parity: add PERCENT%% repair symbols to every block as it is "
                        "sent, for links known to be lossy (default 0: parity only on demand)")
    p.add_argument("--no-parity", dest="parity", action="store_false",
                   help="repair by resending lost pages only (no Reed-Solomon parity)")
    p.add_argument("--rate", type=parse_rate_arg, metavar="BITS",
                   help="cap the send rate, bits per second, e.g. 200M (default: no cap)")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show live progress, one line per target (default: when stderr is a "
                        "terminal; otherwise -v 1 logs progress lines)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no live progress display")
    p.add_argument("--stats", action="store_true",
                   help="print rsync-like statistics at the end (on stdout): files, bytes "
                        "sent, re-sent and parity, wire bytes, time, rate, and per target the "
                        "datagrams it missed and its duplicates")
    p.add_argument("--json", metavar="FILE",
                   help="write a JSON report to FILE (- for stdout): one record per target "
                        "(result, files changed, bytes, errors with paths and reasons, "
                        "counters) and the session totals")
    p.add_argument("--config", metavar="FILE",
                   help="read defaults from this TOML file too, after /etc/mrsync.toml and "
                        "~/.config/mrsync.toml (see below)")
    sel = p.add_argument_group("what to send (rsync semantics)")
    sel.add_argument("-c", "--checksum", action="store_true",
                     help="compare content digests, not size and mtime")
    sel.add_argument("--size-only", action="store_true",
                     help="a file of the same size is up to date")
    sel.add_argument("-u", "--update", action="store_true",
                     help="skip files that are newer on the target")
    sel.add_argument("--ignore-existing", action="store_true",
                     help="skip files that exist on the target")
    sel.add_argument("-l", "--list", metavar="PATTERNS", dest="only",
                     help="comma-separated shell globs relative to SRC: sync only these, "
                          "no tree comparison, no deletion (the original's -l)")
    sel.add_argument("--exclude", metavar="PATTERN", action=_RuleAction, dest="rules",
                     help="exclude files matching PATTERN (rsync rules)")
    sel.add_argument("--include", metavar="PATTERN", action=_RuleAction, dest="rules",
                     help="don't exclude files matching PATTERN")
    sel.add_argument("--exclude-from", metavar="FILE", action=_RuleAction, dest="rules",
                     help="read exclude patterns from FILE")
    sel.add_argument("-H", "--hard-links", action="store_true", help="preserve hard links")
    sel.add_argument("--numeric-ids", action="store_true",
                     help="owner and group by number (they are applied when run as root)")
    app = p.add_argument_group("how to apply it")
    app.add_argument("--delete", action="store_true",
                     help="delete what the source no longer has (not with -l)")
    app.add_argument("-X", "--delete-first", action="store_true",
                     help="delete the old file before writing the new one (nearly full disks)")
    app.add_argument("-b", "--backup", action="store_true",
                     help="keep replaced and deleted files (NAME~, see --suffix)")
    app.add_argument("--suffix", metavar="SUFFIX",
                     help='backup suffix (default "~", or none with --backup-dir)')
    app.add_argument("--backup-dir", metavar="DIR",
                     help="keep backups in DIR (relative to DEST unless absolute); implies -b")
    app.add_argument("-n", "--dry-run", action="store_true",
                     help="list what would change on each target, rsync -i style; touch nothing")
    p.add_argument("--version", action="version", version=f"mrsync {__version__}")
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    return p


def options_table(parser: argparse.ArgumentParser) -> str:
    """The parser's options as a Markdown table: the README's tables are this, verbatim
    (tests/test_config.py checks), so they cannot drift from --help."""
    rows = ["| option | meaning |", "|---|---|"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        metavar = ""
        if action.nargs != 0:
            metavar = " " + str(action.metavar or action.dest.upper())
        names = ", ".join(f"`{o}{metavar}`" for o in action.option_strings)
        text = " ".join(str(action.help or "").split()).replace("%%", "%")
        rows.append(f"| {names} | {text} |".replace("|`", "| `"))
    return "\n".join(row.replace("0|1|2", "0\\|1\\|2") for row in rows) + "\n"


def _read_machines(spec: str) -> list[str]:
    if os.path.isfile(spec):
        with open(spec) as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
        return [line for line in lines if line]
    return [h.strip() for h in spec.split(",") if h.strip()]


def _resolve(args: argparse.Namespace) -> tuple[str, list[TargetSpec]]:
    """(source, targets) from either command-line form."""
    if args.source or args.machines:
        if args.paths:
            raise UsageError("give either SRC DEST... or -s/-t/-m, not both")
        if not args.source or not args.machines:
            raise UsageError("the original form needs both -s SRC and -m TARGETS")
        hosts = _read_machines(args.machines)
        if not hosts:
            raise UsageError(f"no targets in {args.machines!r}")
        # The original form mirrors the directory: -s /srv/data makes each target's
        # /srv/data (or -t DIR) hold the contents of /srv/data, never /srv/data/data.
        source = args.source.rstrip("/") + "/"
        dest = args.target_path or os.path.abspath(args.source)
        specs: list[TargetSpec] = []
        for h in dict.fromkeys(hosts):
            spec = host_target(h, dest)
            if spec not in specs:  # every local host name is this one machine
                specs.append(spec)
        return source, specs
    if len(args.paths) < 2:
        raise UsageError("need SRC and at least one DEST")
    source, *dests = args.paths
    try:
        return source, [parse_target(d) for d in dests]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_paths(source: str, targets: list[TargetSpec]) -> None:
    if not os.path.lexists(source):
        raise UsageError(f"source {source!r} does not exist")
    src_real = os.path.realpath(source)
    seen: set[str] = set()
    for t in targets:
        key = os.path.realpath(t.path) if t.host is None else t.name
        if t.host is None and key == src_real:
            raise UsageError(f"destination {t.path!r} is the source itself")
        if key in seen:
            raise UsageError(f"target {t.name!r} is given twice")
        seen.add(key)


def _open_json(path: str) -> TextIO:
    if path == "-":
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in main)
    except OSError as exc:
        raise UsageError(f"--json {path}: {exc.strerror}") from None


def _write_json(f: TextIO, document: dict[str, object]) -> None:
    import json

    json.dump(document, f, indent=2)
    f.write("\n")
    f.flush()
    if f is not sys.stdout:
        f.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if "--server" in argv:
        # `mrsync --server` alone starts a receiver, before this parser (mrsync.launch).
        parser.error("--server takes no other arguments (the master starts it)")
    defaults = config_defaults(argv, parser.prog)
    if isinstance(defaults, int):
        return defaults
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    finally:
        sys.stdout.flush()


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    json_out: TextIO | None = None
    try:
        source, targets = _resolve(args)
        _check_paths(source, targets)
        settings = _sync_settings(args)
        if args.json is not None:
            json_out = _open_json(args.json)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"mrsync: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE

    # The receivers first: each takes a remote shell and an interpreter to come up, and the
    # master's own imports and set-up below (~40 ms) run meanwhile instead of before.
    spawned = [spawn_server(t, args.rsh, args.mrsync_path) for t in targets]
    try:
        from mrsync.plan.options import SyncOptions

        sync = SyncOptions(**settings)
        return _run_job(args, source, targets, sync, json_out, spawned)
    finally:
        for proc in spawned:  # reaped by the job; killed here if it never got that far
            if not isinstance(proc, OSError) and proc.returncode is None:
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.wait()


def _run_job(
    args: argparse.Namespace,
    source: str,
    targets: list[TargetSpec],
    sync: SyncOptions,
    json_out: TextIO | None,
    spawned: list[subprocess.Popen[bytes] | OSError],
) -> int:
    from mrsync.job import Job, JobOptions
    from mrsync.plan.scan import ScanError
    from mrsync.report import Reporter, json_failure, json_report

    family = socket.AF_INET6 if args.ipv6 else socket.AF_INET
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    local_only = all(t.host is None for t in targets)
    started = time.monotonic()

    def fail_json(code: int, error: str) -> int:
        if json_out is not None:
            _write_json(json_out, json_failure(source, code, error, time.monotonic() - started))
        return code

    try:
        endpoint, ttl = data_plane(family, args.address, args.port, args.interface, args.ttl,
                                   local_only=local_only)
    except OSError as exc:
        print(f"mrsync: error: cannot choose the multicast interface: {exc}", file=sys.stderr)
        return fail_json(exitcodes.USAGE, f"cannot choose the multicast interface: {exc}")
    options = JobOptions(
        source=source,
        targets=targets,
        endpoint=endpoint,
        ttl=ttl,
        rsh=args.rsh,
        mrsync_path=args.mrsync_path,
        sitout_lag=args.sitout_lag if args.sitout_lag > 0 else None,
        # Loopback has no link to find the capacity of: the window alone keeps local
        # receivers from being overrun, and probing would only slow a local sync down.
        rate_control=not (local_only and not args.interface),
        parity=args.parity,
        fec_ratio=max(0.0, args.fec) / 100,
        page_size=args.page_size,
        rate=args.rate / 8 if args.rate else None,
        verbose=args.verbose,
        progress=progress,
        sync=sync,
    )
    reporter = Reporter(verbose=args.verbose, progress=progress, link_rate=options.rate)
    try:
        result = Job(options, reporter, spawned=spawned).run()
    except KeyboardInterrupt:
        reporter.close()
        print("mrsync: interrupted", file=sys.stderr)
        return fail_json(exitcodes.INTERRUPTED, "interrupted")
    except ScanError as exc:
        reporter.close()
        print(f"mrsync: error: cannot read the source: {exc}", file=sys.stderr)
        return fail_json(exitcodes.SESSION_FAILED, f"cannot read the source: {exc}")
    except OSError as exc:
        reporter.close()
        print(f"mrsync: error: {exc}", file=sys.stderr)
        return fail_json(exitcodes.SESSION_FAILED, str(exc))
    reporter.summary(result)
    code = result.exit_code()
    if args.stats and not result.dry_run:
        reporter.stats(result, sys.stderr if args.json == "-" else sys.stdout)
    if json_out is not None:
        _write_json(json_out, json_report(result, code))
    return code
