"""What the operator sees: a live per-target display on a terminal, time-stamped log lines
otherwise, the summary at the end, ``--stats`` (rsync-like) and the ``--json`` report.

The live display (rich) shows one line per target, or the slowest few when there are many:
bytes it has of what it needs, its rate, the pages it still lacks and its state (starting,
planning, receiving, repairing, sitting out, catching up, caught up, done, failed), under an
overall line: bytes sent once to all, the send rate, and that rate against the ``--rate`` cap
(or the best rate seen). It is drawn from the job's ``progress_view`` a few times a second and
fits an 80x24 terminal. When stderr is not a terminal, ``-v 1`` gives time-stamped log lines
instead, with a progress line every few seconds.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    # rich is imported when the live display starts: without one (--no-progress, not a
    # terminal) it is a quarter of the master's start-up that nothing uses.
    from rich.console import Console, Group
    from rich.live import Live

    from mrsync.job import JobResult, Target

JSON_VERSION = 1
LIVE_EVERY = 0.2  # seconds between redraws of the live display
LOG_EVERY = 5.0  # seconds between progress log lines when not on a terminal
MAX_ROWS = 10  # targets shown by name in the live display; the rest are counted
NAME_WIDTH = 20
FINAL_STATES = ("done", "caught up", "failed")


def _in_units(n: float, units: tuple[str, ...], below: int) -> str:
    """``n`` bytes in the first unit (powers of 1024) where it is under ``below``."""
    i = 0
    while abs(n) >= below and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f}{units[i]}" if i == 0 else f"{n:.1f}{units[i]}"


def human(n: float) -> str:
    """Bytes for people: 999 B, 12.3 KiB, 1.0 MiB."""
    return _in_units(n, (" B", " KiB", " MiB", " GiB", " TiB"), 1024)


def short(n: float) -> str:
    """Bytes in at most 6 characters: 999B, 12.3K, 456.7M, 1.2G (powers of 1024)."""
    return _in_units(n, ("B", "K", "M", "G", "T"), 1000)


def mbit(bytes_per_second: float) -> str:
    return f"{bytes_per_second * 8 / 1e6:.1f} Mbit/s"


@dataclass
class TargetView:
    """One target as the live display shows it."""

    name: str
    host: str | None
    state: str
    wanted: int  # bytes of content it needs, -1 before it said
    done: int  # of those, bytes it has
    missing: int  # pages it last said it lacks, -1 before it said
    lost: float | None = None  # % of the datagrams sent to it that it did not receive


class _Meter:
    """Rate of a growing count over the last couple of seconds."""

    def __init__(self, span: float = 2.0) -> None:
        self._span = span
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        self._samples.append((now, value))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._span:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 - t0 >= 0.2 else 0.0


def _labels(views: list[TargetView]) -> dict[str, str]:
    """Short names: a host that appears once is shown by its host name alone."""
    hosts = Counter(v.host for v in views if v.host)
    return {v.name: v.host if v.host and hosts[v.host] == 1 else v.name for v in views}


def _fit(text: str, width: int) -> str:
    """Keep the end of a long name, where targets differ."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


class Reporter:
    def __init__(
        self,
        *,
        verbose: int,
        progress: bool,
        stream: TextIO | None = None,
        out: TextIO | None = None,
        link_rate: float | None = None,
    ) -> None:
        self.verbose = verbose
        self.stream = stream or sys.stderr  # progress, logs, summary
        self.out = out or sys.stdout  # what the user asked to see: dry-run list, --stats
        self.link_rate = link_rate  # bytes per second of the --rate cap, if any
        self._want_progress = progress
        self._console_made: Console | None = None
        self._live: Live | None = None
        self._provider: Callable[[], list[TargetView]] | None = None
        self._labels: dict[str, str] = {}
        self._meters: dict[str, _Meter] = {}
        self._send_meter = _Meter()
        self._best_rate = 0.0
        self._total = -1  # bytes of the data transfer, -1 before it starts
        self._targets_total = 0
        self._targets_done = 0
        self._sent = 0
        self._resent = 0
        self._parity = 0
        self._last_tick = 0.0
        self._last_log = 0.0
        self._start = time.monotonic()

    @property
    def _console(self) -> Console:
        if self._console_made is None:
            from rich.console import Console

            self._console_made = Console(file=self.stream, highlight=False,
                                         force_terminal=True if self._want_progress else None)
        return self._console_made

    # -- events from the job ----------------------------------------------------------------

    def watch(self, provider: Callable[[], list[TargetView]]) -> None:
        """The job's view of its targets; from now on the live display (if any) shows it."""
        self._provider = provider
        if self._want_progress and self._live is None:
            from rich.live import Live

            self._live = Live(console=self._console, auto_refresh=False, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
            self.tick(force=True)

    def warn(self, message: str) -> None:
        self._print(f"mrsync: warning: {message}")

    def log(self, level: int, message: str) -> None:
        if self.verbose >= level:
            self._print(self._stamp() + message)

    def begin_data(self, total_bytes: int, targets: list[str]) -> None:
        self._targets_total = len(targets)
        self._total = total_bytes
        self._last_log = time.monotonic()
        self.log(1, f"sending {human(total_bytes)} to {len(targets)} targets")

    def sent(self, nbytes: int, repair: bool, *, parity: bool = False) -> None:
        if parity:
            self._parity += nbytes
        elif repair:
            self._resent += nbytes
        else:
            self._sent += nbytes

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_tick < LIVE_EVERY:
            return
        self._last_tick = now
        if self._provider is None or (self._live is None and self.verbose < 1):
            return
        views = self._provider()
        self._measure(now, views)
        if self._live is not None:
            self._live.update(self._render(views), refresh=True)
        elif self._total > 0 and now - self._last_log >= LOG_EVERY:
            self._last_log = now
            self.log(1, self._progress_line(views))

    def target_done(self, name: str) -> None:
        self._targets_done += 1
        self.log(2, f"{name}: complete")

    def itemize(self, name: str, lines: list[str]) -> None:
        """A dry run's answer from one target, rsync -i style, one block per target."""
        self.close()
        print(f"{name}: {len(lines)} changes" + (":" if lines else ""), file=self.out, flush=True)
        for line in lines:
            print(f"  {line}", file=self.out, flush=True)

    def target_state(self, name: str, state: str) -> None:
        self.log(1, f"{name}: {state}")

    def target_failed(self, name: str, reason: str) -> None:
        self._print(f"{self._stamp()}mrsync: {name}: FAILED: {reason}")

    def close(self) -> None:
        if self._live is not None:
            if self._provider is not None:
                self._live.update(self._render(self._provider()), refresh=True)
            self._live.stop()
            self._live = None

    # -- the live display -------------------------------------------------------------------

    def _measure(self, now: float, views: list[TargetView]) -> None:
        self._send_meter.add(now, self._sent + self._resent + self._parity)
        rate = self._send_meter.rate()
        self._best_rate = max(self._best_rate, rate)
        for v in views:
            self._meters.setdefault(v.name, _Meter()).add(now, v.done)

    def _rate_of(self, name: str) -> float:
        meter = self._meters.get(name)
        return meter.rate() if meter is not None else 0.0

    def _overall(self, views: list[TargetView]) -> tuple[str, str]:
        elapsed = time.monotonic() - self._start
        clock = f"{int(elapsed) // 60}:{int(elapsed) % 60:02d}"
        states = Counter(v.state for v in views)
        finished = states["done"] + states["caught up"]
        failed = f", {states['failed']} failed" if states["failed"] else ""
        targets = f"targets {finished}/{len(views)} done{failed}"
        if self._total < 0:
            phase = "planning" if states["planning"] else "starting"
            return f"mrsync: {phase}, {len(views)} targets", f"{targets}   elapsed {clock}"
        sent = self._sent
        pct = 100 * sent / self._total if self._total else 100.0
        repair = self._resent + self._parity
        share = 100 * repair / sent if sent else 0.0
        line1 = (f"sent {pct:3.0f}%  {short(sent)} of {short(self._total)} once, "
                 f"repairs {short(repair)} ({share:.1f}%)   elapsed {clock}")
        rate = self._send_meter.rate()
        if self.link_rate:
            against = f"{100 * rate / self.link_rate:.0f}% of the {mbit(self.link_rate)} cap"
        else:
            against = f"best {mbit(self._best_rate)}"
        return line1, f"rate {mbit(rate)} ({against})   {targets}"

    def _rows(self, views: list[TargetView]) -> tuple[list[TargetView], str]:
        limit = max(3, min(MAX_ROWS, self._console.height - 6))
        if len(views) <= limit:
            return views, ""

        def behind(v: TargetView) -> tuple[float, str]:
            return (v.done / v.wanted if v.wanted > 0 else 1.0, v.name)

        active = sorted((v for v in views if v.state not in FINAL_STATES), key=behind)
        failed = [v for v in views if v.state == "failed"]
        finished = [v for v in views if v.state in ("done", "caught up")]
        shown = (active + failed + finished)[:limit]
        rest = Counter(v.state for v in views if v not in shown)
        more = ", ".join(f"{n} {state}" for state, n in rest.most_common())
        return shown, f"… {len(views) - len(shown)} more: {more}"

    def _render(self, views: list[TargetView]) -> Group:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        if len(self._labels) != len(views):
            self._labels = _labels(views)
        line1, line2 = self._overall(views)
        table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, show_header=True,
                      header_style="bold", expand=False)
        table.add_column("target", width=NAME_WIDTH, no_wrap=True, overflow="crop")
        table.add_column("", width=8, no_wrap=True)
        table.add_column("bytes", justify="right", width=13, no_wrap=True)
        table.add_column("rate", justify="right", width=8, no_wrap=True)
        table.add_column("missing", justify="right", width=7, no_wrap=True)
        table.add_column("lost", justify="right", width=5, no_wrap=True)
        table.add_column("state", width=11, no_wrap=True, overflow="crop")
        shown, more = self._rows(views)
        for v in shown:
            style = {"failed": "red", "done": "green", "caught up": "green",
                     "sitting out": "yellow", "catching up": "yellow"}.get(v.state, "")
            bar = ProgressBar(total=max(1, v.wanted), completed=v.done if v.wanted else 1,
                              width=8, complete_style=style or "cyan",
                              finished_style=style or "green")
            rate = self._rate_of(v.name)
            table.add_row(
                _fit(self._labels.get(v.name, v.name), NAME_WIDTH),
                bar if v.wanted >= 0 else "",
                f"{short(v.done)}/{short(v.wanted)}" if v.wanted >= 0 else "",
                f"{short(rate)}/s" if rate > 0 else "",
                str(v.missing) if v.missing >= 0 and v.state not in FINAL_STATES else "",
                f"{v.lost:.1f}%" if v.lost is not None else "",
                Text(v.state, style=style),
            )
        parts: list[Any] = [Text(line1), Text(line2), table]
        if more:
            parts.append(Text(more, no_wrap=True, overflow="ellipsis"))
        return Group(*parts)

    def _progress_line(self, views: list[TargetView]) -> str:
        pct = 100 * self._sent / self._total if self._total else 100.0
        states = Counter(v.state for v in views)
        counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        active = [v for v in views if v.state not in FINAL_STATES and v.wanted > 0]
        slowest = ""
        if active:
            v = min(active, key=lambda v: v.done / v.wanted)
            slowest = (f"; slowest {v.name} ({100 * v.done / v.wanted:.0f}%, "
                       f"{max(0, v.missing)} pages missing)")
        parity = f", parity {human(self._parity)}" if self._parity else ""
        return (f"progress: {pct:.0f}% of {human(self._total)} sent, re-sent "
                f"{human(self._resent)}{parity}, {mbit(self._send_meter.rate())}; "
                f"{counts}{slowest}")

    # -- the end ----------------------------------------------------------------------------

    def summary(self, result: JobResult) -> None:
        self.close()
        for target, error in result.file_errors:
            self._print(f"mrsync: {target.name}: {error.path}: {error.reason}")
        ok = [t for t in result.targets if result.identical(t)]
        s = result.sender_stats
        data = s.get("bytes_sent", 0)
        resent = s.get("bytes_resent", 0)
        parity = s.get("parity_bytes", 0)
        rate = (data + resent + parity) / result.elapsed if result.elapsed > 0 else 0.0
        if result.dry_run:
            self._print(f"dry run: {len(result.targets) - len(result.failed)} of "
                        f"{len(result.targets)} targets answered; nothing was changed")
            for t in result.failed:
                self._print(f"failed: {t.name} ({t.failure})")
            return
        lines = [
            f"{len(ok)} of {len(result.targets)} targets identical; "
            f"{result.union_files} files, {human(result.union_bytes)} sent once to all "
            f"in {result.elapsed:.2f} s ({human(rate)}/s); "
            f"re-sent {human(resent)} ({100 * resent / data if data else 0:.1f}%)"
            + (f", parity {human(parity)} ({100 * parity / data if data else 0:.1f}%)"
               if parity else ""),
        ]
        if self.verbose >= 2:
            lines.append(
                f"data bytes: {data} first pass, {resent} re-sent, "
                f"{s.get('wire_bytes', 0)} in datagrams on the group"
            )
        if self.verbose >= 1:
            for t in result.targets:
                if t.result is not None:
                    r = t.result
                    drops = sum(v for k, v in r.counters.items() if k.startswith("dropped_"))
                    lines.append(
                        f"  {t.name}: {r.files_written} files, {human(r.bytes_written)} written, "
                        f"{r.deleted} deleted, {len(r.errors)} errors, "
                        f"{drops} datagrams dropped"
                    )
                if self.verbose >= 2 and t.result is not None:
                    lines.append(f"    counters: {t.result.counters}")
        failed = result.failed
        if failed:
            lines.append("failed: " + ", ".join(f"{t.name} ({t.failure})" for t in failed))
        if self.verbose >= 1 or failed or result.file_errors or self._want_progress:
            for line in lines:
                self._print(line)

    def stats(self, result: JobResult, stream: TextIO | None = None) -> None:
        """``--stats``: the rsync-like block, on stdout unless told otherwise."""
        self.close()
        out = stream or self.out
        for line in stats_lines(result):
            print(line, file=out)
        out.flush()

    def _stamp(self) -> str:
        # At -v 2 every line carries the seconds since start: where the time went. Logs that
        # do not go to a live display carry the time of day.
        if self.verbose >= 2:
            return f"[{time.monotonic() - self._start:7.3f}] "
        if self.verbose == 1 and self._live is None:
            return time.strftime("%H:%M:%S ")
        return ""

    def _print(self, message: str) -> None:
        if self._live is not None:
            self._live.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(message, file=self.stream, flush=True)


# -- statistics and the JSON report ---------------------------------------------------------


def missing_percent(t: Target) -> float | None:
    """Of the data datagrams sent while this target listened, the share that never reached it
    (from its own counters: the highest sequence number it saw, and how many it received)."""
    if t.result is None:
        return None
    seen = t.result.counters.get("seq_seen", 0)
    received = t.result.counters.get("received", 0)
    if seen <= 0:
        return 0.0
    return max(0.0, 100 * (seen - received) / seen)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def target_result(result: JobResult, t: Target) -> str:
    if t.failure is not None or (t.result is None and not result.dry_run):
        return "failed"
    if t.result is not None and t.result.errors:
        return "partial"
    return "ok"


def _group(n: int) -> str:
    return f"{n:,}"


def stats_lines(result: JobResult) -> list[str]:
    from mrsync.plan.manifest import Kind

    entries = result.manifest.entries
    kinds = Counter(e.kind for e in entries)
    total_size = sum(e.size for e in entries if e.kind == Kind.FILE)
    s = result.sender_stats
    sent = s.get("bytes_sent", 0)
    resent = s.get("bytes_resent", 0)
    parity = s.get("parity_bytes", 0)
    wire = s.get("wire_bytes", 0)
    elapsed = result.elapsed
    rate = (sent + resent + parity) / elapsed if elapsed > 0 else 0.0
    results = Counter(target_result(result, t) for t in result.targets)

    def pct(part: int) -> str:
        return f" ({100 * part / sent:.2f}%)" if sent else ""

    lines = [
        f"Number of files: {_group(len(entries))} (reg: {_group(kinds[Kind.FILE])}, "
        f"dir: {_group(kinds[Kind.DIR])}, link: {_group(kinds[Kind.SYMLINK])})",
        f"Number of files transferred: {_group(result.union_files)}",
        f"Total file size: {_group(total_size)} bytes",
        f"Total transferred file size: {_group(result.union_bytes)} bytes",
        f"Bytes sent: {_group(sent)}",
        f"Bytes re-sent: {_group(resent)}{pct(resent)}",
        f"Parity bytes: {_group(parity)}{pct(parity)}",
        f"Wire bytes: {_group(wire)} (datagrams on the group, headers included)",
        f"Elapsed time: {elapsed:.2f} s",
        f"Rate: {human(rate)}/s ({mbit(rate)})",
        f"Targets: {len(result.targets)} ({results['ok']} identical, {results['partial']} "
        f"partial, {results['failed']} failed)",
    ]
    width = max([len("target"), *(len(t.name) for t in result.targets)])
    lines.append(f"{'target':<{width}}  {'missing':>8}  {'duplicates':>10}  result")
    for t in result.targets:
        miss = missing_percent(t)
        dups = t.result.counters.get("duplicates") if t.result is not None else None
        outcome = target_result(result, t)
        if t.failure is not None:
            outcome += f": {t.failure}"
        elif t.result is not None and t.result.errors:
            outcome += f": {len(t.result.errors)} files failed"
        lines.append(
            f"{t.name:<{width}}  "
            f"{f'{miss:.2f}%' if miss is not None else '-':>8}  "
            f"{dups if dups is not None else '-':>10}  {outcome}"
        )
    return lines


def _session_result(exit_code: int) -> str:
    from mrsync import exitcodes

    return {
        exitcodes.OK: "ok",
        exitcodes.PARTIAL: "partial",
        exitcodes.INTERRUPTED: "interrupted",
    }.get(exit_code, "failed")


def json_report(result: JobResult, exit_code: int) -> dict[str, Any]:
    """The ``--json`` document: one record per target and the session totals (the schema is
    in the README and checked by tests/test_report.py)."""
    from mrsync import __version__
    from mrsync.plan.manifest import Kind

    s = result.sender_stats
    entries = result.manifest.entries
    elapsed = result.elapsed
    sent, resent = s.get("bytes_sent", 0), s.get("bytes_resent", 0)
    parity = s.get("parity_bytes", 0)
    targets = []
    for t in result.targets:
        r = t.result
        targets.append({
            "name": t.name,
            "host": t.spec.host,
            "user": t.spec.user,
            "path": t.spec.path,
            "result": target_result(result, t),
            "failure": t.failure,
            "files_changed": r.files_written if r is not None else 0,
            "bytes": r.bytes_written if r is not None else 0,
            "deleted": r.deleted if r is not None else 0,
            "needed_files": t.needs.files if t.needs is not None else None,
            "needed_bytes": t.needs.size if t.needs is not None else None,
            "sat_out": t.sat_out,
            "missing_percent": _round(missing_percent(t)),
            "duplicates": r.counters.get("duplicates", 0) if r is not None else None,
            "errors": [{"path": e.path, "reason": e.reason} for e in r.errors]
            if r is not None else [],
            "counters": dict(r.counters) if r is not None else {},
        })
    results = Counter(str(t["result"]) for t in targets)
    totals = {
        "targets": len(targets),
        "targets_ok": results["ok"],
        "targets_partial": results["partial"],
        "targets_failed": results["failed"],
        "files": len(entries),
        "files_transferred": result.union_files,
        "bytes_total": sum(e.size for e in entries if e.kind == Kind.FILE),
        "bytes_transferred": result.union_bytes,
        "bytes_sent": sent,
        "bytes_resent": resent,
        "parity_bytes": parity,
        "wire_bytes": s.get("wire_bytes", 0),
        "pages_sent": s.get("pages_sent", 0),
        "pages_resent": s.get("pages_resent", 0),
        "parity_sent": s.get("parity_sent", 0),
        "polls": s.get("polls", 0),
        "feedback": s.get("feedback", 0),
        "datagrams_dropped": sum(v for k, v in s.items() if k.startswith("dropped_")),
        "page_size": result.page_size,
        "elapsed": round(elapsed, 3),
        "rate": round((sent + resent + parity) / elapsed, 1) if elapsed > 0 else 0.0,
    }
    return {
        "version": JSON_VERSION,
        "mrsync": __version__,
        "result": _session_result(exit_code),
        "exit_code": exit_code,
        "error": None,
        "source": result.source,
        "dry_run": result.dry_run,
        "elapsed": round(elapsed, 3),
        "totals": totals,
        "targets": targets,
        "warnings": list(result.warnings),
    }


def json_failure(source: str, exit_code: int, error: str, elapsed: float) -> dict[str, Any]:
    """The ``--json`` document of a session that ended before it had a result."""
    from mrsync import __version__

    return {
        "version": JSON_VERSION,
        "mrsync": __version__,
        "result": _session_result(exit_code),
        "exit_code": exit_code,
        "error": error,
        "source": source,
        "dry_run": False,
        "elapsed": round(elapsed, 3),
        "totals": None,
        "targets": [],
        "warnings": [],
    }
