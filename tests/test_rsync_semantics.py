"""Issue 3: targets that differ from each other and from the source; one `mrsync --delete`
run makes every one of them what `rsync -a --delete` would, sending the union of what they
lacked once."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import rsync_differences, run_mrsync

from mrsync import exitcodes

MiB = 1024 * 1024


def _write(path: Path, data: bytes, mtime: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def _build_source(src: Path) -> None:
    _write(src / "docs" / "readme.txt", b"read me\n" * 100, 1_600_000_000)
    _write(src / "docs" / "guide.txt", os.urandom(200_000), 1_600_000_000)
    _write(src / "bin" / "tool", os.urandom(50_000), 1_600_000_000)
    (src / "bin" / "tool").chmod(0o755)
    _write(src / "was-dir", b"now a file\n", 1_600_000_000)  # a dir on target B
    (src / "was-file").mkdir()  # a file on target B
    _write(src / "was-file" / "inside", b"inside\n", 1_600_000_000)
    _write(src / "was-link", b"now a regular file\n", 1_600_000_000)  # a symlink on B
    _write(src / "big.bin", os.urandom(4 * MiB + 123), 1_600_000_000)
    _write(src / "hard" / "a", b"linked content\n" * 1000, 1_600_000_000)
    os.link(src / "hard" / "a", src / "hard" / "b")
    (src / "link-to-guide").symlink_to("docs/guide.txt")


def _rsync_judge(src: Path, dest: Path) -> str:
    out = subprocess.run(["rsync", "-anciH", "--delete", f"{src}/", f"{dest}/"],
                         capture_output=True, check=True)
    return out.stdout.decode(errors="backslashreplace")


def _wire_data_bytes(stderr: str) -> tuple[int, int]:
    m = re.search(r"data bytes: (\d+) first pass, (\d+) re-sent", stderr)
    assert m, stderr
    return int(m.group(1)), int(m.group(2))


def test_differing_targets_converge_in_one_run(tmp_path: Path, port: int) -> None:
    src = tmp_path / "src"
    _build_source(src)
    new = tmp_path / "new"  # empty
    old = tmp_path / "old"  # stale, extra, replaced and re-moded entries
    shutil.copytree(src, old, symlinks=True)
    _write(old / "docs" / "readme.txt", b"edited by hand!\n" * 50, 1_700_000_000)  # same size
    (old / "bin" / "tool").chmod(0o700)  # metadata only
    _write(old / "extra.txt", b"not in the source\n")
    _write(old / "extra-dir" / "deep" / "x", b"x")
    (old / "extra-link").symlink_to("/etc/passwd")
    (old / "was-dir").unlink()
    _write(old / "was-dir" / "child", b"a directory where a file belongs\n")
    shutil.rmtree(old / "was-file")
    _write(old / "was-file", b"a file where a directory belongs\n")
    (old / "was-link").unlink()
    (old / "was-link").symlink_to("docs/readme.txt")
    partial = tmp_path / "partial"  # has only the big file, up to date
    _write(partial / "big.bin", (src / "big.bin").read_bytes(), 1_600_000_000)

    res = run_mrsync("-P", str(port), "-v", "2", "--delete", "-H", f"{src}/",
                     str(new), str(old), str(partial))
    assert res.returncode == 0, res.stderr
    for dest in (new, old, partial):
        assert _rsync_judge(src, dest) == "", dest
    assert os.stat(new / "hard" / "a").st_ino == os.stat(new / "hard" / "b").st_ino
    assert not (old / "extra.txt").exists() and not (old / "extra-dir").exists()
    assert not os.path.lexists(old / "extra-link")
    # The union of what the targets lacked: everything (the new target lacks it all), the
    # hard link's second name excepted; every file sent once to all.
    lacked = sum(p.stat().st_size for p in src.rglob("*")
                 if p.is_file() and not p.is_symlink() and p.name != "b")
    first, resent = _wire_data_bytes(res.stderr)
    assert lacked <= first + resent <= 1.10 * lacked + 64 * 1024  # + the manifest


def test_only_what_is_lacked_is_sent(tmp_path: Path, port: int) -> None:
    src = tmp_path / "src"
    _build_source(src)
    t1, t2 = tmp_path / "t1", tmp_path / "t2"
    assert run_mrsync("-P", str(port), "-H", f"{src}/", str(t1), str(t2)).returncode == 0
    _write(t1 / "docs" / "guide.txt", os.urandom(200_000), 1_650_000_000)  # t1: stale
    (t2 / "bin" / "tool").unlink()  # t2: missing
    res = run_mrsync("-P", str(port), "-v", "2", "-H", f"{src}/", str(t1), str(t2))
    assert res.returncode == 0, res.stderr
    first, resent = _wire_data_bytes(res.stderr)
    lacked = 200_000 + 50_000
    assert lacked <= first + resent <= 1.10 * lacked + 64 * 1024
    for dest in (t1, t2):
        assert _rsync_judge(src, dest) == ""


def test_dry_run_itemizes_and_touches_nothing(tmp_path: Path, port: int) -> None:
    src = tmp_path / "src"
    _build_source(src)
    dest = tmp_path / "dest"
    _write(dest / "extra.txt", b"extra")
    before = sorted(p.name for p in dest.rglob("*"))
    res = run_mrsync("-P", str(port), "-n", "--delete", f"{src}/", str(dest))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in dest.rglob("*")) == before
    assert ">f+++++++++ docs/guide.txt" in res.stdout
    assert "*deleting" in res.stdout and "extra.txt" in res.stdout


def test_backup_keeps_replaced_and_deleted_files(tmp_path: Path, port: int) -> None:
    src = tmp_path / "src"
    _write(src / "f", b"new\n", 1_600_000_000)
    dest = tmp_path / "dest"
    _write(dest / "f", b"old\n", 1_500_000_000)
    _write(dest / "gone", b"deleted\n")
    res = run_mrsync("-P", str(port), "--delete", "--backup", f"{src}/", str(dest))
    assert res.returncode == 0, res.stderr
    assert (dest / "f").read_bytes() == b"new\n"
    assert (dest / "f~").read_bytes() == b"old\n"
    assert (dest / "gone~").read_bytes() == b"deleted\n"
    assert not (dest / "gone").exists()


def test_list_patterns_sync_only_matching_files(tmp_path: Path, port: int) -> None:
    src = tmp_path / "src"
    _build_source(src)
    dest = tmp_path / "dest"
    _write(dest / "keep-me", b"not deleted: -l never deletes\n")
    res = run_mrsync("-P", str(port), "-l", "docs/*.txt,bin/tool", f"{src}/", str(dest))
    assert res.returncode == 0, res.stderr
    assert (dest / "docs" / "guide.txt").read_bytes() == (src / "docs" / "guide.txt").read_bytes()
    assert (dest / "bin" / "tool").exists() and (dest / "keep-me").exists()
    assert not (dest / "big.bin").exists() and not (dest / "hard").exists()


def test_exclude_rules(tmp_path: Path, port: int) -> None:
    src = tmp_path / "src"
    _build_source(src)
    dest = tmp_path / "dest"
    _write(dest / "docs" / "local.log", b"excluded on the target: protected from --delete\n")
    res = run_mrsync("-P", str(port), "--delete", "--exclude", "*.log", "--exclude", "/big.bin",
                     f"{src}/", str(dest))
    assert res.returncode == 0, res.stderr
    assert not (dest / "big.bin").exists()
    assert (dest / "docs" / "local.log").exists()
    assert (dest / "docs" / "guide.txt").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_reports_keeps_old_copy_and_finishes_the_rest(tmp_path: Path, port: int) -> None:
    src = tmp_path / "src"
    _write(src / "huge.bin", os.urandom(3 * MiB), 1_600_000_000)
    _write(src / "small.txt", b"small file that fits\n", 1_600_000_000)
    dest = tmp_path / "full"
    dest.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(dest)], check=True)
    try:
        _write(dest / "huge.bin", b"old copy\n", 1_500_000_000)
        ok = tmp_path / "ok"
        res = run_mrsync("-P", str(port), f"{src}/", str(dest), str(ok))
        assert res.returncode == exitcodes.PARTIAL, res.stderr
        assert "huge.bin" in res.stderr and "No space left on device" in res.stderr
        assert (dest / "huge.bin").read_bytes() == b"old copy\n"
        assert (dest / "small.txt").read_bytes() == b"small file that fits\n"
        assert rsync_differences(src, ok) == ""
        assert not [n for n in os.listdir(dest) if ".mrsync." in n]  # no temp left behind
    finally:
        subprocess.run(["umount", str(dest)], check=True)


def test_sparse_file_past_4_gib_stays_sparse(tmp_path: Path, port: int) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse.img"
    with open(sparse, "wb") as f:
        f.write(b"head")
        f.seek(5 * 1024 * MiB - 4)
        f.write(b"tail")
    dest = tmp_path / "dest"
    res = run_mrsync("-P", str(port), f"{src}/", str(dest), timeout=600)
    assert res.returncode == 0, res.stderr
    st = os.stat(dest / "sparse.img")
    assert st.st_size == 5 * 1024 * MiB
    assert st.st_blocks * 512 < 64 * MiB  # holes stayed holes
    with open(dest / "sparse.img", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(-4, os.SEEK_END)
        assert f.read() == b"tail"


@pytest.mark.parametrize(
    ("option", "expect"),
    [
        # -u: the newer file on the target stays exactly as it is, mtime included.
        ("-u", {"content": b"newer on the target\n", "mtime": 1_700_000_000}),
        # --size-only: same size, so content stays; rsync -a still brings the mtime in line.
        ("--size-only", {"content": b"same-size-target\n", "mtime": 1_600_000_000}),
        # -c: same content, so nothing is sent; the mtime is brought in line.
        ("-c", {"content": b"same-size-source\n", "mtime": 1_600_000_000}),
    ],
)
def test_change_detection_modes_match_rsync(
    tmp_path: Path, port: int, option: str, expect: dict[str, object]
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _write(src / "f", b"same-size-source\n", 1_600_000_000)
    if option == "-u":
        _write(dest / "f", b"newer on the target\n", 1_700_000_000)
    elif option == "--size-only":
        _write(dest / "f", b"same-size-target\n", 1_500_000_000)
    else:
        _write(dest / "f", b"same-size-source\n", 1_500_000_000)
    judge = tmp_path / "judge"  # what real rsync makes of the same starting point
    shutil.copytree(dest, judge)
    subprocess.run(["rsync", "-a", option, f"{src}/", f"{judge}/"], check=True)
    res = run_mrsync("-P", str(port), "-v", "2", option, f"{src}/", str(dest))
    assert res.returncode == 0, res.stderr
    assert (dest / "f").read_bytes() == expect["content"] == (judge / "f").read_bytes()
    mtime = os.stat(dest / "f").st_mtime
    assert mtime == expect["mtime"] == os.stat(judge / "f").st_mtime
    first, resent = _wire_data_bytes(res.stderr)
    assert first == 0 or first < 4096  # no file content sent (the manifest only)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None,
                    reason="an immutable file (chattr +i) needs root")
def test_a_file_the_target_may_not_replace_is_reported_and_kept(tmp_path: Path,
                                                               port: int) -> None:
    """Root ignores permission bits, so the target refuses through the immutable attribute:
    that file fails with the system's reason, keeps its old copy, and the rest finishes."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    _write(src / "locked", b"new content\n", 1_600_000_000)
    _write(src / "free", b"free to change\n", 1_600_000_000)
    _write(dest / "locked", b"old content\n", 1_500_000_000)
    subprocess.run(["chattr", "+i", str(dest / "locked")], check=True)
    try:
        res = run_mrsync("-P", str(port), f"{src}/", str(dest))
    finally:
        subprocess.run(["chattr", "-i", str(dest / "locked")], check=True)
    assert res.returncode == exitcodes.PARTIAL, res.stderr
    assert re.search(r"locked: .*Operation not permitted", res.stderr), res.stderr
    assert (dest / "locked").read_bytes() == b"old content\n"
    assert (dest / "free").read_bytes() == b"free to change\n"
    assert not [n for n in os.listdir(dest) if ".mrsync." in n]
