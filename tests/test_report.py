"""The operator's view: the live per-target display (rendered, and captured from a real terminal
with tmux while mrsync runs to 8 lab targets), --stats, and the --json report validated against
its schema for a run where one target fails."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_tree, rsync_differences, run_mrsync
from netlab import RSH, Lab, missing_requirements

from mrsync import exitcodes
from mrsync.report import Reporter, TargetView

# -- the live display, rendered -------------------------------------------------------------


def _render(views: list[TargetView], *, total: int = 100 << 20, sent: int = 40 << 20,
            height: int = 24) -> list[str]:
    buf = io.StringIO()
    reporter = Reporter(verbose=0, progress=True, stream=buf, link_rate=12.5e6)
    reporter._console.size = (80, height)  # an 80x24 terminal
    reporter.begin_data(total, [v.name for v in views])
    reporter.sent(sent, False)
    reporter.sent(1 << 20, True)
    reporter.sent(1 << 19, True, parity=True)
    reporter.watch(lambda: views)
    reporter.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    frames = text.split("sent ")  # each redraw starts with the overall line
    return ("sent " + frames[-1]).splitlines()


def _views(n: int) -> list[TargetView]:
    states = ["receiving", "repairing", "sitting out", "done", "failed", "catching up"]
    return [TargetView(f"node{i:03d}:/srv/data", f"node{i:03d}", states[i % len(states)],
                       50 << 20, (i * 7 % 50) << 20, i * 10, 1.5) for i in range(n)]


def test_live_display_has_a_line_per_target_and_fits_80_columns() -> None:
    lines = _render(_views(8))
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].startswith("sent  40%") and "repairs 1.5M" in lines[0]
    assert "of the 100.0 Mbit/s cap" in lines[1]
    for i, state in enumerate(["receiving", "repairing", "sitting out", "done", "failed",
                               "catching up", "receiving", "repairing"]):
        row = next(line for line in lines if line.startswith(f"node{i:03d} "))
        assert row.rstrip().endswith(state), row
    assert len(lines) <= 24


def test_live_display_shows_the_slowest_few_of_many() -> None:
    lines = _render(_views(40))
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    rows = [line for line in lines if line.startswith("node")]
    assert len(rows) == 10
    more = lines[-1]
    assert more.startswith("… 30 more:"), more
    # The ones shown are the furthest behind of those still going (done 0 MiB first).
    assert rows[0].startswith("node000 ") or rows[0].startswith("node050 ")
    assert not any(row.rstrip().endswith(("done", "failed")) for row in rows)


def test_progress_log_lines_when_not_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from mrsync import report

    monkeypatch.setattr(report, "LOG_EVERY", 0.0)
    buf = io.StringIO()
    reporter = Reporter(verbose=1, progress=False, stream=buf)
    views = _views(3)
    reporter.watch(lambda: views)
    reporter.begin_data(100 << 20, [v.name for v in views])
    reporter.sent(25 << 20, False)
    reporter.tick(force=True)
    reporter.target_state("node001:/srv/data", "sitting out (2.1 s behind)")
    lines = buf.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d sending 100\.0 MiB to 3 targets", lines[0]), lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d progress: 25% of 100\.0 MiB sent, re-sent 0 B, "
                        r"[\d.]+ Mbit/s; 1 receiving, 1 repairing, 1 sitting out; "
                        r"slowest node000:/srv/data \(0%, 0 pages missing\)", lines[1]), lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d node001:/srv/data: sitting out \(2\.1 s behind\)",
                        lines[2]), lines
    assert "\x1b" not in buf.getvalue()


# -- the JSON report ------------------------------------------------------------------------

_COUNT = {"type": "integer", "minimum": 0}
_ERROR = {
    "type": "object",
    "required": ["path", "reason"],
    "properties": {"path": {"type": "string"}, "reason": {"type": "string"}},
    "additionalProperties": False,
}
TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "host", "user", "path", "result", "failure", "files_changed", "bytes",
                 "deleted", "needed_files", "needed_bytes", "sat_out", "missing_percent",
                 "duplicates", "errors", "counters"],
    "properties": {
        "name": {"type": "string"},
        "host": {"type": ["string", "null"]},
        "user": {"type": ["string", "null"]},
        "path": {"type": "string"},
        "result": {"enum": ["ok", "partial", "failed"]},
        "failure": {"type": ["string", "null"]},
        "files_changed": _COUNT,
        "bytes": _COUNT,
        "deleted": _COUNT,
        "needed_files": {"type": ["integer", "null"], "minimum": 0},
        "needed_bytes": {"type": ["integer", "null"], "minimum": 0},
        "sat_out": {"type": "boolean"},
        "missing_percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
        "duplicates": {"type": ["integer", "null"], "minimum": 0},
        "errors": {"type": "array", "items": _ERROR},
        "counters": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
    "additionalProperties": False,
}
TOTALS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["targets", "targets_ok", "targets_partial", "targets_failed", "files",
                 "files_transferred", "bytes_total", "bytes_transferred", "bytes_sent",
                 "bytes_resent", "parity_bytes", "wire_bytes", "pages_sent", "pages_resent",
                 "parity_sent", "polls", "feedback", "datagrams_dropped", "page_size",
                 "elapsed", "rate"],
    "properties": {
        **{k: _COUNT for k in (
            "targets", "targets_ok", "targets_partial", "targets_failed", "files",
            "files_transferred", "bytes_total", "bytes_transferred", "bytes_sent",
            "bytes_resent", "parity_bytes", "wire_bytes", "pages_sent", "pages_resent",
            "parity_sent", "polls", "feedback", "datagrams_dropped", "page_size")},
        "elapsed": {"type": "number", "minimum": 0},
        "rate": {"type": "number", "minimum": 0},
    },
    "additionalProperties": False,
}
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mrsync --json report",
    "type": "object",
    "required": ["version", "mrsync", "result", "exit_code", "error", "source", "dry_run",
                 "elapsed", "totals", "targets", "warnings"],
    "properties": {
        "version": {"const": 1},
        "mrsync": {"type": "string"},
        "result": {"enum": ["ok", "partial", "failed", "interrupted"]},
        "exit_code": {"enum": [0, 1, 12, 20, 23]},
        "error": {"type": ["string", "null"]},
        "source": {"type": "string"},
        "dry_run": {"type": "boolean"},
        "elapsed": {"type": "number", "minimum": 0},
        "totals": {"oneOf": [TOTALS_SCHEMA, {"type": "null"}]},
        "targets": {"type": "array", "items": TARGET_SCHEMA},
        "warnings": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}

_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def _errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """The subset of JSON Schema used above (type, enum, const, minimum, maximum, required,
    properties, additionalProperties, items, oneOf), so no dependency is needed; jsonschema
    checks the same schema too when it is installed."""
    out: list[str] = []
    if "oneOf" in schema:
        if sum(not _errors(value, s, where) for s in schema["oneOf"]) != 1:
            out.append(f"{where}: not exactly one of {schema['oneOf']}")
        return out
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(value, _TYPES[t]) and not (
            t in ("integer", "number") and isinstance(value, bool)) for t in types)
        if not ok:
            return [f"{where}: {value!r} is not {types}"]
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: {value} > {schema['maximum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{where}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                out += _errors(item, props[key], f"{where}.{key}")
            elif extra is False:
                out.append(f"{where}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                out += _errors(item, extra, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += _errors(item, schema["items"], f"{where}[{i}]")
    return out


def validate(document: Any) -> None:
    problems = _errors(document, REPORT_SCHEMA)
    assert not problems, "\n".join(problems)
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:
        return
    jsonschema.validate(document, REPORT_SCHEMA)


def test_the_schema_checker_catches_what_it_should() -> None:
    assert _errors({"a": 1}, {"type": "object", "required": ["b"]}) == ["$: missing 'b'"]
    assert _errors(True, {"type": "integer"})
    assert _errors(-1, _COUNT)
    assert _errors({"x": 1}, {"type": "object", "additionalProperties": False})
    assert _errors([{"path": 1, "reason": "r"}], {"type": "array", "items": _ERROR})
    assert not _errors(None, {"oneOf": [TOTALS_SCHEMA, {"type": "null"}]})


def test_json_report_and_stats_when_one_target_fails(tmp_path: Path, port: int) -> None:
    src = make_tree(tmp_path / "src")
    report = tmp_path / "report.json"
    rsh = "sh -c 'echo ssh: Could not resolve hostname $0 >&2; exit 255'"
    local = tmp_path / "local"
    res = run_mrsync("-P", str(port), "-I", "lo", "-e", rsh, "--stats", "--json", str(report),
                     f"{src}/", "ghost.invalid:/data", str(local))
    assert res.returncode == exitcodes.PARTIAL, res.stderr
    assert rsync_differences(src, local) == ""
    document = json.loads(report.read_text())
    validate(document)
    assert document["result"] == "partial" and document["exit_code"] == exitcodes.PARTIAL
    by_name = {t["name"]: t for t in document["targets"]}
    ghost = by_name["ghost.invalid:/data"]
    assert ghost["result"] == "failed" and ghost["host"] == "ghost.invalid"
    assert "Could not resolve hostname ghost.invalid" in ghost["failure"]
    ok = by_name[str(local)]
    assert ok["result"] == "ok" and ok["host"] is None and ok["failure"] is None
    files = sum(1 for p in src.rglob("*")
                if p.is_file() and not p.is_symlink() and p.stat().st_size)
    assert ok["files_changed"] == files == document["totals"]["files_transferred"]
    assert ok["bytes"] == document["totals"]["bytes_transferred"] > 3 << 20
    assert ok["missing_percent"] == 0.0 and ok["counters"]["received"] > 0
    totals = document["totals"]
    assert totals["targets"] == 2 and totals["targets_ok"] == 1 and totals["targets_failed"] == 1
    assert totals["wire_bytes"] >= totals["bytes_sent"] >= totals["bytes_transferred"]
    # --stats: the rsync-like block on stdout
    out = res.stdout
    assert f"Number of files transferred: {files:,}" in out
    assert re.search(r"^Total transferred file size: [\d,]+ bytes$", out, re.M)
    for label in ("Bytes sent:", "Bytes re-sent:", "Parity bytes:", "Wire bytes:",
                  "Elapsed time:", "Rate:", "Targets: 2 (1 identical, 0 partial, 1 failed)"):
        assert label in out, out
    assert re.search(rf"^{re.escape(str(local))}\s+0\.00%\s+\d+\s+ok$", out, re.M), out
    assert re.search(r"^ghost\.invalid:/data\s+-\s+-\s+failed: ", out, re.M), out


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_json_report_with_a_file_error_on_stdout(tmp_path: Path, port: int) -> None:
    """A target whose disk is too small for one file: "partial", with the file's path and the
    reason, next to a target that is fine; the report on stdout (--json -)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "good").write_bytes(b"good\n")
    (src / "big").write_bytes(os.urandom(3 << 20))
    small = tmp_path / "small"
    small.mkdir()
    if os.system(f"mount -t tmpfs -o size=1m tmpfs {small} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        res = run_mrsync("-P", str(port), "--json", "-", f"{src}/", str(small),
                         str(tmp_path / "roomy"))
    finally:
        subprocess.run(["umount", str(small)], check=False)
    assert res.returncode == exitcodes.PARTIAL, res.stderr
    document = json.loads(res.stdout)
    validate(document)
    assert document["result"] == "partial"
    cramped, roomy = document["targets"]
    assert cramped["result"] == "partial" and roomy["result"] == "ok"
    assert [e["path"] for e in cramped["errors"]] == ["big"], cramped
    assert "No space left on device" in cramped["errors"][0]["reason"]
    assert cramped["files_changed"] == 1 and roomy["files_changed"] == 2
    assert document["totals"]["targets_partial"] == 1


def test_json_report_of_a_session_that_never_started(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    res = run_mrsync("--json", str(report), "-I", "no-such-if0", f"{tmp_path}/",
                     str(tmp_path / "d"))
    assert res.returncode == exitcodes.USAGE
    document = json.loads(report.read_text())
    validate(document)
    assert document["result"] == "failed" and "no-such-if0" in document["error"]
    unwritable = run_mrsync("--json", str(tmp_path / "no" / "such" / "dir" / "r.json"),
                            f"{tmp_path}/", str(tmp_path / "d"))
    assert unwritable.returncode == exitcodes.USAGE and "--json" in unwritable.stderr


def test_log_lines_are_timestamped_when_not_on_a_terminal(tmp_path: Path, port: int) -> None:
    src = make_tree(tmp_path / "src")
    res = run_mrsync("-P", str(port), "-v", "1", f"{src}/", str(tmp_path / "d"))
    assert res.returncode == 0, res.stderr
    assert re.search(r"^\d\d:\d\d:\d\d sending [\d.]+ \w+ to 1 targets$", res.stderr, re.M), \
        res.stderr
    assert "\x1b[" not in res.stderr  # no terminal codes in a log


# -- a real terminal, captured with tmux ----------------------------------------------------

_missing = missing_requirements() or (None if shutil.which("tmux") else "tmux is not installed")


@pytest.mark.skipif(_missing is not None, reason=_missing or "")
def test_tmux_shows_a_progress_line_per_target_while_it_runs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "small").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(40 << 20))
    for i in range(40):
        (src / "small" / f"f{i:02d}").write_bytes(os.urandom(3000 + i))
    sock = str(tmp_path / "tmux.sock")
    python = sys.executable
    with Lab(8, rate_mbit=100) as lab:
        lab.set_loss(lab.targets[5], 0.02)
        targets = [(f"{h.name}:{tmp_path / f't{i}'}", tmp_path / f"t{i}")
                   for i, h in enumerate(lab.targets)]
        argv = ["ip", "netns", "exec", lab.master.name, python, "-m", "mrsync", "-e", RSH,
                "--mrsync-path", f"{python} -m mrsync", "--rate", "100M", f"{src}/",
                *(spec for spec, _ in targets)]
        command = " ".join(f"'{a}'" for a in argv) + "; echo EXIT=$?; sleep 600"
        subprocess.run(["tmux", "-S", sock, "-f", "/dev/null", "new-session", "-d",
                        "-x", "80", "-y", "24", "sh", "-c", command], check=True)
        frames: list[str] = []
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                pane = subprocess.run(["tmux", "-S", sock, "capture-pane", "-p"],
                                      capture_output=True, text=True).stdout
                frames.append(pane)
                if "EXIT=" in pane:
                    break
                time.sleep(0.2)
        finally:
            subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)
    final = frames[-1]
    assert "EXIT=0" in final, final
    for _, dest in targets:
        assert rsync_differences(src, dest) == ""

    def rows(pane: str) -> dict[str, str]:
        """target host -> its line, from one captured frame."""
        found = {}
        for host in lab.targets:
            for line in pane.splitlines():
                if line.startswith(host.name + " "):
                    found[host.name] = line
        return found

    # Mid-transfer: a frame with every target's line, each receiving data, with its bytes.
    during = [f for f in frames if "EXIT=" not in f and len(rows(f)) == 8
              and sum("receiving" in line for line in rows(f).values()) == 8]
    assert during, "no frame showed all 8 targets receiving:\n" + "\n----\n".join(frames)
    pane = during[len(during) // 2]
    assert all(len(line) <= 80 for line in pane.splitlines())
    assert re.search(r"^sent +\d+% ", pane, re.M), pane
    assert re.search(r"% of the 100\.0 Mbit/s cap", pane), pane
    for line in rows(pane).values():
        assert re.search(r"\d+(\.\d)?[BKMG]/40\.\dM", line), line
    # At the end every target is shown done.
    assert all(line.rstrip().endswith("done") for line in rows(final).values()), final
    print("\n" + pane)
