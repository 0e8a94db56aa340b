"""What the operator sees: a live progress display on a terminal, log lines at -v, and the
summary at the end. Quiet when not on a terminal unless asked."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

if TYPE_CHECKING:
    from mrsync.job import JobResult


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Reporter:
    def __init__(
        self,
        *,
        verbose: int,
        progress: bool,
        stream: TextIO | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.verbose = verbose
        self.stream = stream or sys.stderr  # progress, logs, summary
        self.out = out or sys.stdout  # what the user asked to see: the dry run's itemized list
        self._console = Console(file=self.stream)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._want_progress = progress
        self._targets_total = 0
        self._targets_done = 0
        self._sent = 0
        self._resent = 0
        self._last_tick = 0.0
        self._start = time.monotonic()

    # -- events from the job ----------------------------------------------------------------

    def warn(self, message: str) -> None:
        self._print(f"mrsync: warning: {message}")

    def log(self, level: int, message: str) -> None:
        if self.verbose >= level:
            # At -v 2 every line carries the seconds since start: where the time went.
            stamp = f"[{time.monotonic() - self._start:7.3f}] " if self.verbose >= 2 else ""
            self._print(stamp + message)

    def begin_data(self, total_bytes: int, targets: list[str]) -> None:
        self._targets_total = len(targets)
        self.log(1, f"sending {human(total_bytes)} to {len(targets)} targets")
        if self._want_progress and total_bytes:
            self._progress = Progress(
                TextColumn("[bold]sync"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TextColumn("{task.fields[targets]}"),
                TimeElapsedColumn(),
                console=self._console,
                transient=True,
            )
            self._task = self._progress.add_task(
                "sync", total=total_bytes, targets=self._targets_text()
            )
            self._progress.start()

    def sent(self, nbytes: int, repair: bool) -> None:
        if repair:
            self._resent += nbytes
        else:
            self._sent += nbytes

    def tick(self) -> None:
        now = time.monotonic()
        if self._progress is None or self._task is None or now - self._last_tick < 0.1:
            return
        self._last_tick = now
        self._progress.update(self._task, completed=self._sent, targets=self._targets_text())

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
        self._print(f"mrsync: {name}: FAILED: {reason}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- the end ----------------------------------------------------------------------------

    def summary(self, result: JobResult) -> None:
        self.close()
        for target, error in result.file_errors:
            self._print(f"mrsync: {target.name}: {error.path}: {error.reason}")
        ok = [t for t in result.targets if result.identical(t)]
        s = result.sender_stats
        data = s.get("bytes_sent", 0)
        resent = s.get("bytes_resent", 0)
        rate = (data + resent) / result.elapsed if result.elapsed > 0 else 0.0
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
            f"re-sent {human(resent)} ({100 * resent / data if data else 0:.1f}%)",
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

    def _targets_text(self) -> str:
        return f"{self._targets_done}/{self._targets_total} targets done"

    def _print(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)
