"""rsync's include/exclude rules (the common cases) and the ``-l`` file globs.

:class:`Filter` follows ``man rsync``, "INCLUDE/EXCLUDE PATTERN RULES":

* rules are tried in command-line order and the first matching one decides; no match means
  "included";
* a pattern starting with ``/`` is anchored at the transfer root (paths here are manifest paths:
  relative to the transfer root, so for a SRC without a trailing slash they start with the
  directory's own name, as in rsync);
* a pattern with a ``/`` elsewhere (not counting a trailing one) or with ``**`` is matched
  against the full path, at any directory boundary (``sub/*.c`` matches ``sub/x.c`` and
  ``a/sub/x.c``); a pattern without either is matched against the last component only;
* a trailing ``/`` matches directories only; ``dir/***`` matches ``dir`` and everything in it;
* ``*`` matches anything but ``/``, ``**`` anything including ``/``, ``?`` one character but
  ``/``, ``[...]`` a character class (``[!...]`` or ``[^...]`` negated); a backslash escapes a
  wildcard, but only in a pattern that has a wildcard (as rsync does);
* an excluded directory excludes everything below it: the scanner does not descend into it.

Not supported (rare in practice): per-directory merge files, ``--filter`` modifiers, and the
``!`` list-clearing rule except in rule files (see :func:`read_rules_file`).

All matching is on bytes, so names that are not UTF-8 are matched exactly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

_WILD = re.compile(rb"[*?\[]")


def _class(pat: bytes, i: int) -> tuple[bytes, int] | None:
    """Translate the ``[...]`` class starting at ``pat[i] == b"["``; None if it is not closed."""
    j = i + 1
    negate = False
    if j < len(pat) and pat[j : j + 1] in (b"!", b"^"):
        negate = True
        j += 1
    start = j
    if j < len(pat) and pat[j : j + 1] == b"]":  # a "]" first is literal
        j += 1
    while j < len(pat) and pat[j : j + 1] != b"]":
        j += 1
    if j >= len(pat):
        return None
    body = pat[start:j]
    out = bytearray(b"[^/" if negate else b"[")
    k = 0
    while k < len(body):
        c = body[k : k + 1]
        if c == b"-" and 0 < k < len(body) - 1:
            out += b"-"
        elif c == b"\\" and k + 1 < len(body):
            k += 1
            out += b"\\" + body[k : k + 1]
        else:
            out += re.escape(c)
        k += 1
    out += b"]"
    if not negate:  # a class never matches "/": wrap it so that it cannot
        return b"(?!/)" + bytes(out), j + 1
    return bytes(out), j + 1


def translate(pat: bytes) -> bytes:
    """A regular expression (bytes) equivalent to one rsync wildcard pattern (no anchoring)."""
    escapes = bool(_WILD.search(pat))
    out = bytearray()
    i = 0
    while i < len(pat):
        c = pat[i : i + 1]
        if c == b"*":
            if pat[i : i + 2] == b"**":
                out += b".*"
                while pat[i : i + 1] == b"*":
                    i += 1
                continue
            out += b"[^/]*"
        elif c == b"?":
            out += b"[^/]"
        elif c == b"[":
            got = _class(pat, i)
            if got is None:
                out += re.escape(c)
            else:
                out += got[0]
                i = got[1]
                continue
        elif c == b"\\" and escapes and i + 1 < len(pat):
            i += 1
            out += re.escape(pat[i : i + 1])
        else:
            out += re.escape(c)
        i += 1
    return bytes(out)


class Rule:
    """One compiled include (``+``) or exclude (``-``) rule."""

    __slots__ = ("include", "pattern", "dir_only", "regex")

    def __init__(self, sign: str, pattern: str | bytes) -> None:
        if sign not in ("+", "-"):
            raise ValueError(f"filter rule must be '+' or '-', not {sign!r}")
        raw = os.fsencode(pattern) if isinstance(pattern, str) else pattern
        if not raw:
            raise ValueError("empty filter pattern")
        self.include = sign == "+"
        self.pattern = raw
        body = raw
        self.dir_only = False
        subtree = False
        if body.endswith(b"/***") and len(body) > 4:
            body, subtree = body[:-4], True
        elif body.endswith(b"/") and len(body) > 1:
            body, self.dir_only = body.rstrip(b"/") or b"/", True
        anchored = body.startswith(b"/")
        if anchored:
            body = body.lstrip(b"/")
        regex = translate(body)
        if subtree:
            regex += b"(?:/.*)?"
        if not anchored:
            # No "/" and no "**": only the last component can match, which the same
            # expression achieves because nothing but "**" crosses a "/".
            regex = b"(?:.*/)?" + regex
        self.regex = re.compile(regex, re.DOTALL)

    def matches(self, rel_path: bytes, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        return self.regex.fullmatch(rel_path) is not None

    def __repr__(self) -> str:
        return f"Rule({'+' if self.include else '-'!r}, {self.pattern!r})"


class Filter:
    """rsync's include/exclude list: ``Filter(options.rules).excluded(path, is_dir)``."""

    def __init__(self, rules: Iterable[tuple[str, str | bytes]]) -> None:
        self.rules: list[Rule] = []
        for sign, pattern in rules:
            if sign == "!":  # rsync's list-clearing rule
                self.rules.clear()
                continue
            self.rules.append(Rule(sign, pattern))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def excluded(self, rel_path: bytes, is_dir: bool) -> bool:
        """Whether ``rel_path`` (relative to the transfer root, b"/"-separated) is excluded.

        The root entry b"." is never excluded. Callers do not ask about anything below an
        excluded directory (rsync never looks there either).
        """
        if rel_path == b".":
            return False
        for rule in self.rules:
            if rule.matches(rel_path, is_dir):
                return not rule.include
        return False


def parse_rules_lines(lines: Iterable[str | bytes], sign: str = "-") -> list[tuple[str, str]]:
    """The rules of an ``--exclude-from`` (``sign="-"``) or ``--include-from`` (``"+"``) file.

    Blank lines and lines starting with ``#`` or ``;`` are skipped; a line starting with
    ``+ `` or ``- `` is an include or exclude whatever the default; a line ``!`` clears the
    rules before it (kept as ``("!", "")``, which :class:`Filter` understands). Only the line
    end is stripped: other whitespace is part of the pattern, as in rsync.
    """
    rules: list[tuple[str, str]] = []
    for line in lines:
        text = os.fsdecode(line) if isinstance(line, bytes) else line
        text = text.rstrip("\r\n")
        if not text.strip() or text[0] in "#;":
            continue
        if text == "!":
            rules.append(("!", ""))
        elif text.startswith(("+ ", "- ")):
            rules.append((text[0], text[2:]))
        else:
            rules.append((sign, text))
    return rules


def read_rules_file(path: str, sign: str = "-") -> list[tuple[str, str]]:
    """:func:`parse_rules_lines` of a file (``-`` reads standard input, as rsync does)."""
    if path == "-":
        import sys

        return parse_rules_lines(sys.stdin.buffer.read().split(b"\n"), sign)
    with open(path, "rb") as f:
        return parse_rules_lines(f.read().split(b"\n"), sign)


# ----------------------------------------------------------------------------------------------
# -l: shell globs relative to SRC


class OnlyMatcher:
    """``-l`` globs: ``matcher(rel)`` says whether a path (relative to SRC) is selected.

    Each comma-separated glob is matched component by component with shell semantics, as
    ``glob.glob(SRC/pattern)`` would: ``*`` and ``?`` never cross ``/``, ``[...]`` classes,
    and a name starting with ``.`` is matched only by a pattern component starting with ``.``.
    A glob that names a directory selects the directory's whole subtree. A leading ``/`` or
    ``./`` is ignored (globs are always relative to SRC); a trailing ``/`` selects directories
    only. ``**`` is not special (it is ``*`` twice), as in a shell without ``globstar``.
    """

    def __init__(self, globs: Iterable[str]) -> None:
        self.patterns: list[tuple[list[tuple[bool, re.Pattern[bytes]]], bool]] = []
        for glob in globs:
            for piece in glob.split(","):
                raw = os.fsencode(piece.strip())
                dir_only = raw.endswith(b"/")
                while raw.startswith(b"./"):
                    raw = raw[2:].lstrip(b"/")
                raw = raw.strip(b"/")
                if not raw or raw == b".":
                    raw = b"*"  # the whole of SRC
                comps = [
                    (c.startswith(b"."), re.compile(translate(c), re.DOTALL))
                    for c in raw.split(b"/")
                    if c and c != b"."
                ]
                self.patterns.append((comps, dir_only))

    @staticmethod
    def _comp_ok(pat: tuple[bool, re.Pattern[bytes]], name: bytes) -> bool:
        dot_ok, regex = pat
        if name.startswith(b".") and not dot_ok:
            return False
        return regex.fullmatch(name) is not None

    def __call__(self, rel_path: bytes, is_dir: bool = False) -> bool:
        """Whether ``rel_path`` is selected: it matches a glob, or lies below a match."""
        comps = rel_path.split(b"/")
        for pat, dir_only in self.patterns:
            n = len(pat)
            if len(comps) < n or not all(
                self._comp_ok(p, c) for p, c in zip(pat, comps, strict=False)
            ):
                continue
            if dir_only and len(comps) == n and not is_dir:
                continue
            return True
        return False

    def may_contain(self, dir_rel: bytes) -> bool:
        """Whether something below directory ``dir_rel`` could be selected (worth descending)."""
        comps = dir_rel.split(b"/")
        for pat, _ in self.patterns:
            if len(comps) < len(pat) and all(
                self._comp_ok(p, c) for p, c in zip(pat, comps, strict=False)
            ):
                return True
        return self(dir_rel, True)


def only_matcher(globs: Iterable[str]) -> OnlyMatcher:
    """The ``-l`` selection (see :class:`OnlyMatcher`)."""
    return OnlyMatcher(globs)


__all__ = [
    "Filter",
    "OnlyMatcher",
    "Rule",
    "only_matcher",
    "parse_rules_lines",
    "read_rules_file",
    "translate",
]
