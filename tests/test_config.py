"""Configuration files (/etc/mrsync.toml, ~/.config/mrsync.toml, --config) and the options
documented in the README against --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tree, rsync_differences

from mrsync import cli, config, exitcodes

README = Path(__file__).resolve().parent.parent / "README.md"


def _args(argv: list[str]) -> object:
    parser = cli.build_parser()
    defaults = cli.config_defaults(argv, parser.prog)
    if isinstance(defaults, int):
        return defaults
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A system file and a HOME of our own (the real /etc/mrsync.toml is never read)."""
    system = tmp_path / "etc" / "mrsync.toml"
    system.parent.mkdir()
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(system))
    monkeypatch.setenv("HOME", str(home))
    return system, home / ".config" / "mrsync.toml"


def test_later_files_override_earlier_and_options_override_all(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    system, user = files
    system.write_text('rsh = "ssh -p 2222"\nport = 9000\nrate = "100M"\nverbose = 1\n'
                      'address = "239.1.2.3"\n')
    user.write_text('port = 9100\nmrsync_path = "/opt/mrsync/bin/mrsync"\nfec = 5\n')
    extra = tmp_path / "extra.toml"
    extra.write_text("port = 9200\nsitout_lag = 0.5\npage_size = 8192\nttl = 3\n"
                     'interface = "eth1"\n')
    args = _args(["--config", str(extra), "-v", "2", "src/", "dest"])
    assert not isinstance(args, int)
    a = vars(args)
    assert a["rsh"] == "ssh -p 2222"  # system
    assert a["mrsync_path"] == "/opt/mrsync/bin/mrsync" and a["fec"] == 5.0  # user
    assert a["port"] == 9200 and a["sitout_lag"] == 0.5 and a["page_size"] == 8192  # --config
    assert a["ttl"] == 3 and a["interface"] == "eth1" and a["address"] == "239.1.2.3"
    assert a["rate"] == 100e6
    assert a["verbose"] == 2  # the command line wins
    a = vars(_args(["-P", "7000", "-e", "rsh", "--rate", "1G", "src/", "dest"]))
    assert a["port"] == 7000 and a["rsh"] == "rsh" and a["rate"] == 1e9 and a["verbose"] == 1


def test_no_files_no_change(files: tuple[Path, Path]) -> None:
    a = vars(_args(["src/", "dest"]))
    assert a["rsh"] == "ssh" and a["port"] == 8888 and a["rate"] is None and a["verbose"] == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1\n", "unknown key 'colour'"),
        ('port = "8888"\n', "key 'port': must be an integer"),
        ("port = 70000\n", "key 'port': must be from 1 to 65535"),
        ("verbose = 3\n", "key 'verbose': must be from 0 to 2"),
        ("verbose = true\n", "key 'verbose': must be an integer"),
        ('rate = "fast"\n', "key 'rate': not a rate"),
        ("rate = -5\n", "key 'rate': rate must be positive"),
        ("rsh = 1\n", "key 'rsh': must be a non-empty string"),
        ("sitout_lag = -1\n", "key 'sitout_lag': must be at least 0"),
        ("port = \n", "not valid TOML"),
        ("[section]\nport = 1\n", "unknown key 'section'"),
    ],
)
def test_bad_files_are_errors_naming_the_file_and_key(
    files: tuple[Path, Path], text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, user = files
    user.write_text(text)
    assert _args(["src/", "dest"]) == exitcodes.USAGE
    err = capsys.readouterr().err
    assert f"mrsync: error: configuration: {user}: " in err and message in err, err


def test_config_option_file_must_exist(files: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert _args(["--config", str(tmp_path / "nope.toml"), "a/", "b"]) == exitcodes.USAGE
    assert "nope.toml: no such file" in capsys.readouterr().err


def _run(argv: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=str(home))
    return subprocess.run([sys.executable, "-m", "mrsync", *argv], capture_output=True,
                          text=True, timeout=120, env=env)


def test_real_runs_take_their_defaults_from_home(tmp_path: Path, port: int) -> None:
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".config" / "mrsync.toml").write_text(f"port = {port}\nverbose = 1\n")
    src = make_tree(tmp_path / "src")
    res = _run([f"{src}/", str(tmp_path / "d1")], home)
    assert res.returncode == 0, res.stderr
    assert "1 of 1 targets identical" in res.stderr  # -v 1 from the file
    assert rsync_differences(src, tmp_path / "d1") == ""
    quiet = _run(["-v", "0", f"{src}/", str(tmp_path / "d2")], home)
    assert quiet.returncode == 0 and quiet.stderr == ""  # the command line wins
    (home / ".config" / "mrsync.toml").write_text("prot = 1\n")
    bad = _run([f"{src}/", str(tmp_path / "d3")], home)
    assert bad.returncode == exitcodes.USAGE
    assert "unknown key 'prot'" in bad.stderr and str(home) in bad.stderr
    assert not (tmp_path / "d3").exists()
    rtt = subprocess.run([sys.executable, "-m", "mrsync.rtt", "localhost"], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, HOME=str(home)))
    assert rtt.returncode == exitcodes.USAGE and "unknown key 'prot'" in rtt.stderr


def test_a_receiver_never_reads_config_files(tmp_path: Path) -> None:
    """`mrsync --server` takes everything from the master: a broken config file on a target
    must not break it (it then fails only for want of a Hello)."""
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".config" / "mrsync.toml").write_text("this is not toml\n")
    res = subprocess.run([sys.executable, "-m", "mrsync", "--server"], input=b"",
                         capture_output=True, timeout=60, env=dict(os.environ, HOME=str(home)))
    assert b"configuration" not in res.stderr
    assert b"control stream closed before the session began" in res.stderr


def test_usage_errors_exit_1_as_documented() -> None:
    res = subprocess.run([sys.executable, "-m", "mrsync", "--no-such-option", "a/", "b"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == exitcodes.USAGE


# -- the README against --help --------------------------------------------------------------


def _options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", help_text.split("exit status")[0]))


@pytest.mark.parametrize("module", ["mrsync", "mrsync.rtt"])
def test_readme_documents_every_option(module: str) -> None:
    """The README's options tables are ``cli.options_table`` of each parser, verbatim; and
    every option --help mentions is in them."""
    from mrsync import rtt

    parser = cli.build_parser() if module == "mrsync" else rtt.build_parser()
    readme = README.read_text()
    table = cli.options_table(parser)
    assert table in readme, f"regenerate the README table for {module}:\n{table}"
    help_text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    # options named in the help's prose (other programs', the receiver's) are not in the table
    wanted = _options(help_text) - {"-p", "-i", "-o", "--server"}
    missing = sorted(wanted - _options(table))
    assert not missing, f"README options table lacks {missing} ({module} --help)"
    for code in (exitcodes.OK, exitcodes.USAGE, exitcodes.SESSION_FAILED,
                 exitcodes.INTERRUPTED, exitcodes.PARTIAL):
        assert re.search(rf"^\| {code} \|", readme, re.M), code
        assert re.search(rf"^  {code} ", help_text, re.M), code
