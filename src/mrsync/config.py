"""Defaults from configuration files, for mrsync and mrsync-rtt.

Read in this order, each overriding the one before: ``/etc/mrsync.toml``, then
``~/.config/mrsync.toml``, then the file named by ``--config``; options on the command line
override them all. A missing system or user file is fine; a missing ``--config`` file, a file
that is not TOML, a key we do not know or a value of the wrong type is an error that names the
file and the key (a typo in a config file must never be silently ignored).

    # /etc/mrsync.toml
    rsh = "ssh -o BatchMode=yes"
    mrsync_path = "/opt/mrsync/bin/mrsync"
    address = "239.255.67.92"       # the multicast group
    port = 8888
    interface = "eth1"
    ttl = 1
    rate = "800M"                   # bits per second, or a number
    page_size = 8192
    sitout_lag = 2.0
    fec = 5                         # percent of proactive parity
    verbose = 1
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

SYSTEM_CONFIG = "/etc/mrsync.toml"
USER_CONFIG = "~/.config/mrsync.toml"


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file (and the key)."""


class Key(NamedTuple):
    dest: str  # the argparse destination it sets the default of
    kind: str  # what the value must be, for the error message
    check: Callable[[object], object]  # returns the value to use, or raises ValueError


def _string(value: object) -> object:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _integer(low: int, high: int) -> Callable[[object], object]:
    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer from {low} to {high}")
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}, not {value}")
        return value

    return check


def _number(low: float) -> Callable[[object], object]:
    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        if value < low:
            raise ValueError(f"must be at least {low:g}, not {value}")
        return float(value)

    return check


def parse_rate(text: str) -> float:
    """Bits per second with an optional k/M/G suffix (powers of 1000, as links are sold)."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}
    t = text.strip().lower().removesuffix("bit/s").removesuffix("bps")
    factor = scale.get(t[-1:], 1.0)
    number = t[:-1] if t[-1:] in scale else t
    try:
        bits = float(number) * factor
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (e.g. 200M)") from None
    if not bits > 0 or bits == float("inf"):
        raise ValueError(f"rate must be positive: {text!r}")
    return bits


def _rate(value: object) -> object:
    """Bits per second: a number, or a string with a k/M/G suffix as on the command line."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError('must be bits per second, a number or a string such as "200M"')
    return parse_rate(str(value))


KEYS: dict[str, Key] = {
    "rsh": Key("rsh", "string", _string),
    "mrsync_path": Key("mrsync_path", "string", _string),
    "address": Key("address", "string", _string),
    "port": Key("port", "integer", _integer(1, 65535)),
    "interface": Key("interface", "string", _string),
    "ttl": Key("ttl", "integer", _integer(0, 255)),
    "rate": Key("rate", "rate", _rate),
    "page_size": Key("page_size", "integer", _integer(64, 65000)),
    "sitout_lag": Key("sitout_lag", "number", _number(0.0)),
    "fec": Key("fec", "number", _number(0.0)),
    "verbose": Key("verbose", "integer", _integer(0, 2)),
}


def config_files(explicit: str | None) -> list[tuple[str, bool]]:
    """(path, required) in the order they are read."""
    files = [(SYSTEM_CONFIG, False), (os.path.expanduser(USER_CONFIG), False)]
    if explicit is not None:
        files.append((explicit, True))
    return files


def read_file(path: str, *, required: bool) -> dict[str, object]:
    """The settings of one file as {argparse dest: value}; {} for an absent optional file."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, once parsed)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file") from None
        return {}
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    # Only when there is a file: most runs have none, and the parser was a tenth of the
    # imports the master makes before it can start its targets.
    import tomllib

    with f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid TOML: not UTF-8") from None
    out: dict[str, object] = {}
    for name, value in data.items():
        key = KEYS.get(name)
        if key is None:
            known = ", ".join(KEYS)
            raise ConfigError(f"{path}: unknown key {name!r} (known keys: {known})")
        try:
            out[key.dest] = key.check(value)
        except ValueError as exc:
            raise ConfigError(f"{path}: key {name!r}: {exc}") from None
    return out


def load(
    explicit: str | None, files: Sequence[tuple[str, bool]] | None = None
) -> dict[str, object]:
    """All files merged, later ones overriding earlier ones."""
    merged: dict[str, object] = {}
    for path, required in files if files is not None else config_files(explicit):
        merged.update(read_file(path, required=required))
    return merged
