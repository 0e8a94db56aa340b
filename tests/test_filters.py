"""rsync include/exclude rules and -l globs; cross-checked against real rsync where installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mrsync.plan.filters import Filter, only_matcher, parse_rules_lines, read_rules_file
from mrsync.plan.manifest import Kind
from mrsync.plan.options import SyncOptions
from mrsync.plan.scan import scan_source


def ex(rules: list[tuple[str, str]], path: bytes, is_dir: bool = False) -> bool:
    return Filter(rules).excluded(path, is_dir)


def test_unanchored_matches_last_component_anywhere() -> None:
    rules = [("-", "*.o")]
    assert ex(rules, b"x.o")
    assert ex(rules, b"a/b/x.o")
    assert not ex(rules, b"x.c")
    assert not ex(rules, b"x.o/y.c")  # only the last component
    assert ex([("-", "foo")], b"a/foo", True)
    assert not ex([("-", "foo")], b"a/foobar")


def test_anchored_and_slash_patterns() -> None:
    assert ex([("-", "/foo")], b"foo")
    assert not ex([("-", "/foo")], b"a/foo")
    # a "/" inside: matched against the full path, at any directory boundary
    assert ex([("-", "sub/*.c")], b"sub/x.c")
    assert ex([("-", "sub/*.c")], b"a/sub/x.c")
    assert not ex([("-", "sub/*.c")], b"xsub/x.c")
    assert not ex([("-", "sub/*.c")], b"sub/d/x.c")
    assert ex([("-", "/sub/*.c")], b"sub/x.c")
    assert not ex([("-", "/sub/*.c")], b"a/sub/x.c")


def test_wildcards() -> None:
    assert not ex([("-", "/a*")], b"a/b")  # "*" does not cross "/"
    assert ex([("-", "/a**")], b"a/b/c")  # "**" does
    assert ex([("-", "**/x")], b"a/b/x")
    assert ex([("-", "a/**/z")], b"a/b/c/z")
    assert ex([("-", "?.c")], b"d/x.c")
    assert not ex([("-", "?.c")], b"xy.c")
    assert ex([("-", "[ab].c")], b"b.c")
    assert not ex([("-", "[ab].c")], b"c.c")
    assert ex([("-", "[!ab].c")], b"c.c")
    assert not ex([("-", "[!ab].c")], b"a.c")
    assert ex([("-", "[a-c]x")], b"bx")
    assert ex([("-", "dir/***")], b"dir", True)
    assert ex([("-", "dir/***")], b"dir/a/b")
    assert ex([("-", r"\*.c")], b"*.c")  # escaped wildcard
    assert not ex([("-", r"\*.c")], b"x.c")
    assert ex([("-", "caf\udce9")], b"caf\xe9")  # non-UTF-8 names (surrogateescape)


def test_trailing_slash_matches_directories_only() -> None:
    assert ex([("-", "build/")], b"a/build", True)
    assert not ex([("-", "build/")], b"a/build", False)
    assert ex([("-", "build")], b"a/build", False)


def test_first_match_wins() -> None:
    rules = [("+", "*.c"), ("+", "*/"), ("-", "*")]
    assert not ex(rules, b"a.c")
    assert not ex(rules, b"d", True)
    assert not ex(rules, b"d/e/f.c")
    assert ex(rules, b"a.h")
    assert ex(rules, b"d/a.h")
    assert not ex([("+", "keep.o"), ("-", "*.o")], b"keep.o")
    assert ex([("-", "*.o"), ("+", "keep.o")], b"keep.o")
    assert not Filter([]).excluded(b"anything", False)
    assert not Filter([("-", "*")]).excluded(b".", True)  # the root is never excluded


def test_rule_file_parsing(tmp_path: Path) -> None:
    text = b"\n".join(
        [
            b"# a comment",
            b"; another",
            b"",
            b"   ",
            b"*.o",
            b"+ keep.tmp",
            b"- *.tmp",
            b"build/",
            b"trailing space ",
            b"dos\r",
        ]
    )
    f = tmp_path / "ex"
    f.write_bytes(text)
    rules = read_rules_file(str(f))
    assert rules == [
        ("-", "*.o"),
        ("+", "keep.tmp"),
        ("-", "*.tmp"),
        ("-", "build/"),
        ("-", "trailing space "),
        ("-", "dos"),
    ]
    assert parse_rules_lines(["a", "- b"], "+") == [("+", "a"), ("-", "b")]
    # "!" clears what came before
    assert not Filter(parse_rules_lines(["x", "!", "y"])).excluded(b"x", False)
    assert Filter(parse_rules_lines(["x", "!", "y"])).excluded(b"y", False)


def test_only_globs() -> None:
    m = only_matcher(["*.txt,sub/*.c", "data"])
    assert m(b"a.txt")
    assert not m(b"d/a.txt")  # "*" does not cross "/"
    assert m(b"sub/x.c")
    assert not m(b"sub/d/x.c")
    assert m(b"data", True)
    assert m(b"data/any/thing")  # a directory brings its whole subtree
    assert not m(b".hidden.txt")  # shell globs skip dot files ...
    assert only_matcher([".*"])(b".hidden.txt")  # ... unless the glob starts with "."
    assert m.may_contain(b"sub")
    assert not m.may_contain(b"other")
    assert only_matcher(["./a/b"])(b"a/b")
    assert not only_matcher(["d/"])(b"d", False)
    assert only_matcher(["d/"])(b"d", True)


# ----------------------------------------------------------------- scan with filters


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    files = [
        "a.c",
        "a.h",
        "a.o",
        "keep.o",
        ".hidden",
        "build/out.o",
        "build/log.txt",
        "sub/x.c",
        "sub/x.o",
        "sub/deep/y.c",
        "sub/deep/z.txt",
        "sub/build/b.c",
        "docs/readme.txt",
        "docs/sub/x.c",
        "foo",
        "foo.bak",
        "bar/foo",
        "bar/baz/foo",
        "emptyish/.keep",
    ]
    for name in files:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(name.encode())
    (root / "nothing").mkdir()
    os.symlink("a.c", root / "link.c")
    os.symlink("sub", root / "sublink")
    return root


RULE_SETS: list[list[tuple[str, str]]] = [
    [("-", "*.o")],
    [("+", "keep.o"), ("-", "*.o")],
    [("-", "*.o"), ("+", "keep.o")],
    [("+", "*.c"), ("+", "*/"), ("-", "*")],
    [("-", "build/")],
    [("-", "/build")],
    [("-", "sub/*.c")],
    [("-", "/sub/*.c")],
    [("-", "**/deep")],
    [("-", "sub/**")],
    [("-", "sub/***")],
    [("-", "foo")],
    [("-", "/foo")],
    [("-", "bar/foo")],
    [("-", "*/foo")],
    [("-", ".*")],
    [("-", "[ab].?")],
    [("+", "sub/"), ("+", "sub/deep/"), ("+", "sub/deep/*"), ("-", "*")],
    [("-", "*.txt"), ("-", "nothing/"), ("-", "*link*")],
    [("+", "*/"), ("+", "*.txt"), ("-", "*")],
]


def rsync_names(src: str, dest: Path, rules: list[tuple[str, str]]) -> set[bytes]:
    args = []
    for sign, pat in rules:
        args.append(("--include=" if sign == "+" else "--exclude=") + pat)
    out = subprocess.run(
        ["rsync", "-a", "--dry-run", "--out-format=%n", *args, src, f"{dest}/"],
        capture_output=True,
        check=True,
    ).stdout
    return {line.rstrip(b"/") or b"." for line in out.splitlines() if line}


def manifest_names(src: str, rules: list[tuple[str, str]]) -> set[bytes]:
    m = scan_source(src, options=SyncOptions(rules=tuple(rules)))
    return {e.path for e in m.entries}


needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")


@needs_rsync
@pytest.mark.parametrize("rules", RULE_SETS, ids=lambda r: " ".join(f"{s}{p}" for s, p in r))
@pytest.mark.parametrize("slash", [True, False], ids=["contents", "dir"])
def test_scan_matches_rsync(src: Path, tmp_path: Path, rules: list[tuple[str, str]], slash: bool):
    arg = str(src) + "/" if slash else str(src)
    dest = tmp_path / "dest"
    assert manifest_names(arg, rules) == rsync_names(arg, dest, rules)


@needs_rsync
@pytest.mark.parametrize(
    "rules",
    [[("-", "src")], [("-", "/src/")], [("-", "src/sub")], [("+", "src/"), ("-", "src/*")]],
)
def test_scan_matches_rsync_on_top_name(
    src: Path, tmp_path: Path, rules: list[tuple[str, str]]
) -> None:
    dest = tmp_path / "dest"
    assert manifest_names(str(src), rules) == rsync_names(str(src), dest, rules)


def test_excluded_directory_not_descended(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []
    real = os.scandir

    def spy(path: bytes) -> object:
        seen.append(os.fsencode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", spy)
    scan_source(str(src) + "/", options=SyncOptions(rules=(("-", "sub/"),)))
    assert not any(p.endswith(b"/sub") for p in seen)


def test_scan_only_globs(src: Path) -> None:
    m = scan_source(str(src) + "/", options=SyncOptions(only=("sub/deep/*.c,docs", "link.c")))
    assert [e.path for e in m.entries] == [
        b".",
        b"docs",
        b"docs/readme.txt",
        b"docs/sub",
        b"docs/sub/x.c",
        b"link.c",
        b"sub",
        b"sub/deep",
        b"sub/deep/y.c",
    ]
    st = os.lstat(src / "sub" / "deep")
    deep = m.entries[7]
    assert deep.kind == Kind.DIR and deep.mtime_ns == st.st_mtime_ns  # real parent metadata
    # Without the trailing slash the globs are still relative to SRC.
    m2 = scan_source(str(src), options=SyncOptions(only=("sub/deep/*.c",)))
    assert [e.path for e in m2.entries] == [
        b"src",
        b"src/sub",
        b"src/sub/deep",
        b"src/sub/deep/y.c",
    ]
    # Filters still apply.
    m3 = scan_source(str(src) + "/", options=SyncOptions(only=("docs",), rules=(("-", "*.c"),)))
    assert [e.path for e in m3.entries] == [b".", b"docs", b"docs/readme.txt", b"docs/sub"]
    # Nothing matches: just the root.
    assert [
        e.path for e in scan_source(str(src) + "/", options=SyncOptions(only=("zz",))).entries
    ] == [b"."]
