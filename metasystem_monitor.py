#!/usr/bin/env python3
"""metasystem-monitor: metrics, anomalies, retries and alerts for one machine.

Standard library only, Python 3.9+. Copy this file onto a machine and run it;
the store is one SQLite file (~/.metasystem/metrics.db unless --db,
METASYSTEM_DB or METASYSTEM_HOME say otherwise).

The sections, in dependency order (what a part uses stands above it):
    Constants                limits and defaults, units in their names; exit codes
    Errors                   MonitorError and the subclasses a caller treats differently
    Configuration and units  paths, the INI file, durations, sizes, listen addresses, secrets
    Storage                  Store: the one SQLite connection (WAL, busy timeout, migrations)
    Anomalies                pure functions on numbers: baselines, scores, find_anomalies
    Metrics                  MetricsCollector: recording, window statistics, rollups, retention
    Retry and breakers       RetryConfig, AdaptiveRetry, CircuitBreaker, the error classifier
    Alerting                 the model; the channel registry, a class per type; settings; AlertingSystem
    Health checks            ranges, the machine's own figures, a function per check type, the registry
    Jobs                     the run wrapper: locks, timeouts, signals, the output's tail
    Summary                  system_summary(), read by the dashboard, --summary and serve
    Export and serve         Prometheus and OpenMetrics text, the textfile, serve, push
    CLI                      build_parser(), a cmd_* per subcommand, main()
    Demo                     the demo's made-up history

From cron:
    */10 * * * *  metasystem_monitor.py record-sync icloud --success --duration 2.5
    0 * * * *     df --output=avail / | tail -1 | sed 's/^/disk_avail_kb /' | metasystem_monitor.py record -
    */5 * * * *   metasystem_monitor.py check > /dev/null
    17 3 * * *    metasystem_monitor.py run backup --timeout 2h --lock -- rsync -a /home /mnt/backup

Exit codes:
    0  success (recording commands print nothing)
    1  runtime error: one line on stderr (-v adds the traceback); a bad configuration
    2  usage error: a bad option, argument or input value
    3  alert: some channels failed
    4  alert: no channel delivered
    check exits 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; run exits with its command's code
    (124 on timeout, 75 while its breaker is open)
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import os
import sqlite3
import stat
import sys
import time
from datetime import datetime, timezone
from enum import Enum
from typing import AbstractSet, Any, ContextManager, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

__version__ = "0.1.0"
__all__ = [  # sorted; also every name monitoring_dashboard.py uses
    "AdaptiveRetry",
    "Alert",
    "AlertChannel",
    "AlertSeverity",
    "AlertingSystem",
    "AnomalyReport",
    "BREAKER_STATE_WORDS",
    "CallOutcome",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigError",
    "DEFAULT_WINDOW_HOURS",
    "Delivery",
    "DeliveryReport",
    "MetricsCollector",
    "MonitorError",
    "RetryAfterTooLong",
    "RetryConfig",
    "SEVERITY_STATE_WORDS",
    "SUMMARY_METRICS",
    "SUMMARY_SECTION_ROWS",
    "Sample",
    "StorageError",
    "Store",
    "ValidationError",
    "check_age",
    "classify_error",
    "cli_clock",
    "decimal_number",
    "epoch_of",
    "find_anomalies",
    "format_bytes",
    "format_span",
    "inert_text",
    "iso_time",
    "json_text",
    "load_config",
    "local_time",
    "main",
    "mask_url",
    "parser_class",
    "percentile",
    "rate_state",
    "read_series",
    "read_summary",
    "resolve_config_path",
    "resolve_db_path",
    "series_figure",
    "summary_options",
    "system_summary",
    "window_hours",
    "zone_name",
]

log = logging.getLogger("metasystem")

## Constants ##################################################################

PROG = "metasystem_monitor.py"
SCHEMA_VERSION = 11
DEFAULT_HOME_DIRNAME = ".metasystem"
DB_FILENAME = "metrics.db"
CONFIG_FILENAME = "alerting-config.ini"
DEFAULT_BUSY_TIMEOUT_S = 5.0
DEFAULT_WINDOW_HOURS = 24.0
DEFAULT_RETENTION_DAYS = 30.0
DEFAULT_HOURLY_DAYS = 365.0
DEFAULT_DAILY_DAYS = 0.0  # 0 keeps daily rollups forever
DAY_S = 86400.0
TIER_NAMES = {0: "raw", 3600: "hourly", 86400: "daily"}
CLEANUP_INTERVAL_S = 86400.0
CLEANUP_BATCH_ROWS = 10_000
WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
MAINTENANCE_CHECK_INTERVAL_S = 60.0
ROLLUP_SPAN_S = 3600.0
ROLLUP_GRACE_S = 60.0
ROLLUP_SERIES_PER_SLICE = 2000  # series rolled up per transaction: what a writer may wait behind
ROLLUP_ROWS_PER_SLICE = 50_000  # ... and samples read, about (an hour is never split)
RAW_KEPT_SAMPLES = 2  # an hour with at most this many samples keeps them raw instead of a rollup row
KEPT_SEQ_OFFSET = 128  # a sample kept raw for its hour has seq - this: negative, and still one byte
LABEL_CACHE_SIZE = 10_000
MAX_NAME_CHARS = 200
MAX_TIMESTAMP_S = 253402300800.0  # 10000-01-01: what ISO 8601 and datetime can show
CLOCK_SKEW_S = 60.0  # a time this far in the future is from a clock set wrong or that jumped back
MAX_DURATION_S = 1000 * 365.25 * 86400.0  # the longest duration read from input: ends well before MAX_TIMESTAMP_S
MAX_LABELS = 16
MAX_LABEL_KEY_CHARS = 100
MAX_LABEL_VALUE_CHARS = 1000
SYNCHRONOUS_MODES = ("normal", "full")
ANOMALY_METHODS = ("robust", "zscore")
DEFAULT_Z_THRESHOLD = 2.0  # the original design's std_dev_threshold
DEFAULT_ROBUST_THRESHOLD = 3.5  # Iglewicz and Hoaglin's cut for the modified z-score
DEFAULT_MIN_SAMPLES = 8
MAD_TO_Z = 0.6745  # modified z = 0.6745 * (x - median) / MAD
MEAN_AD_SCALE = 1.253314  # where MAD is 0: modified z = (x - median) / (1.253314 * mean absolute deviation)
# Fetch candidates a hair beyond the cut, then decide in Python, so SQL rounding never drops one.
_CANDIDATE_MARGIN = 1.0 - 1e-9
BREAKER_STATES = {"closed": 0, "open": 1, "half_open": 2}

ERROR_LINE_CHARS = 1000  # an error naming a megabyte-long argument still fits a terminal and a cron mail
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_ALERT_PARTIAL = 3  # alert: some channels failed
EXIT_ALERT_NONE = 4  # alert: no channel delivered
EXIT_TEMPFAIL = 75  # run: the breaker is open; try again later (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130

_NO_LABELS = "{}"


## Errors #####################################################################

class MonitorError(Exception):
    """Base class for every error this module raises on purpose."""


class ValidationError(MonitorError, ValueError):
    """A value given to the module breaks one of its rules; nothing was stored."""


class ConfigError(MonitorError, ValueError):
    """The configuration file cannot be read or holds a bad value."""


class StorageError(MonitorError):
    """The store cannot be opened, read or written."""

    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = path


def _shown(value: Any, limit: int = 60) -> str:
    """repr() of a value, cut short so that an error stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def a_or_an(word: str) -> str:
    """``word`` after the article English gives it (by its first letter, as the names here need).

    >>> a_or_an("info"), a_or_an("anomaly"), a_or_an("disk")
    ('an info', 'an anomaly', 'a disk')
    """
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


## Configuration and units ####################################################

SECRET_SUFFIXES = ("", "_env", "_file")  # a secret KEY may be given as KEY, KEY_env or KEY_file
CONFIG_FILE_MAX_BYTES = 1024 * 1024  # a configuration file is a few kilobytes; larger is not one
SECRET_FILE_MAX_BYTES = 64 * 1024  # a token, a password, a URL

CONFIG_SECTIONS = ("storage", "alerting", "serve", "collect", "check", "dashboard")
DASHBOARD_KEYS = ("metrics",)  # shell globs of the series the faces show (default: the newest ten)
CHECK_RUN_KEYS = ("interval", "ping_url", "ping_url_env", "ping_url_file")  # [check]: about every run of check
SERVE_KEYS = ("listen", "token_file", "cache")
COLLECT_KEYS = ("load", "cpu", "memory", "disks", "network", "processes")  # each true or false
CONFIG_SECTION_PREFIXES = ("channel:", "check:", "job:", "maintenance:")
JOB_KEYS = ("ping_url", "ping_url_env", "ping_url_file")  # [job:NAME]: what every run of the job NAME does
STORAGE_KEYS = ("retention_days", "rollup_hourly_days", "rollup_daily_days", "synchronous", "busy_timeout")

SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
              "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}

_DURATION_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def default_home(environ: Optional[Dict[str, str]] = None) -> str:
    """The folder that holds the default store and configuration."""
    environ = os.environ if environ is None else environ
    home = environ.get("METASYSTEM_HOME")
    if home:
        return os.path.abspath(os.path.expanduser(home))
    return os.path.join(os.path.expanduser("~"), DEFAULT_HOME_DIRNAME)


def _path_text(path: str, what: str) -> str:
    if "\x00" in path:
        raise ValidationError(f"{what} {_shown(path)} holds a NUL character")
    return path


def resolve_db_path(option: Optional[str] = None, environ: Optional[Dict[str, str]] = None) -> str:
    """The store's path: --db, then METASYSTEM_DB, then METASYSTEM_HOME, then ~/.metasystem."""
    environ = os.environ if environ is None else environ
    chosen = option or environ.get("METASYSTEM_DB")
    if chosen:
        return os.path.abspath(os.path.expanduser(_path_text(chosen, "store path")))
    return os.path.join(default_home(environ), DB_FILENAME)


def resolve_config_path(option: Optional[str] = None, environ: Optional[Dict[str, str]] = None) -> str:
    """The INI file's path: --config, then METASYSTEM_CONFIG, then beside the default store."""
    environ = os.environ if environ is None else environ
    chosen = option or environ.get("METASYSTEM_CONFIG")
    if chosen:
        return os.path.abspath(os.path.expanduser(_path_text(chosen, "configuration path")))
    return os.path.join(default_home(environ), CONFIG_FILENAME)


def iso_time(ts: Optional[float]) -> Optional[str]:
    """Epoch seconds as ISO 8601 in UTC with its offset.

    >>> iso_time(0)
    '1970-01-01T00:00:00.000+00:00'
    """
    if ts is None:
        return None
    if not 0 <= ts < MAX_TIMESTAMP_S:  # the slow, general way (which raises past year 9999)
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")
    # Twice as fast as datetime, which matters when thousands of points are shown;
    # rounds to the microsecond as datetime.fromtimestamp does, then truncates.
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros // 1000:03d}+00:00"


def _moment(when: Any) -> Optional[datetime]:
    if when is None or when == "-" or when == "":
        return None
    try:
        if isinstance(when, str):
            return datetime.fromisoformat(when)
        return datetime.fromtimestamp(float(when), timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None


def epoch_of(when: Any) -> Optional[float]:
    """Epoch seconds of an ISO 8601 text (or of a number), None when it is not a time."""
    moment = _moment(when)
    return None if moment is None else moment.timestamp()


def zone_name(moment: Any = None, tz: Any = None) -> str:
    """The name of the time zone times are shown in (``EST``, ``UTC``), as of ``moment`` (default: now)."""
    moment = (moment or datetime.now(timezone.utc)).astimezone(tz)
    name = moment.strftime("%Z")
    return name if name and not name.startswith(("+", "-")) else moment.strftime("UTC%z")


def local_time(when: Any, tz: Any = None, *, seconds: bool = False, zone: bool = False) -> str:
    """A time for people: ``12-04 20:33`` in the local time zone (``TZ``), or in ``tz``; ``-`` when unknown.
    ``when`` is epoch seconds or the ISO 8601 text the JSON outputs keep; ``zone`` adds its name.

    >>> local_time(1_800_000_000, timezone.utc, zone=True), local_time("2027-01-15T08:00:00.000+00:00", timezone.utc)
    ('01-15 08:00 UTC', '01-15 08:00')
    """
    moment = _moment(when)
    if moment is None:
        return "-"
    try:
        moment = moment.astimezone(tz)
    except (OverflowError, ValueError, OSError):  # past year 9999 or before year 1 there: in UTC, named
        tz, zone = timezone.utc, True
        moment = moment.astimezone(tz)
    text = moment.strftime("%m-%d %H:%M:%S" if seconds else "%m-%d %H:%M")
    return f"{text} {zone_name(moment, tz)}" if zone else text


def _finite_only(value: Any, path: str, notes: List[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        notes.append(path or "value")
        return None
    if isinstance(value, dict):
        return {key: _finite_only(item, f"{path}.{key}" if path else str(key), notes) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_only(item, f"{path}[{index}]", notes) for index, item in enumerate(value)]
    return value


def ascii_digits(text: str) -> bool:
    """True when ``text`` is one or more of the digits 0-9: str.isdigit() alone also takes '²', which int()
    then refuses, and '١٢', which int() reads as 12.

    >>> ascii_digits("12"), ascii_digits("\u00b2"), ascii_digits("\u0661\u0662"), ascii_digits("")
    (True, False, False, False)
    """
    return text.isascii() and text.isdigit()


def _ascii_number_text(text: str) -> str:
    if not text.isascii() or "_" in text:  # int() and float() also read '١٢', '１２' and '1_000'
        raise ValueError(f"{_shown(text)} is not a number written in the digits 0-9")
    return text


def decimal_number(text: str) -> float:
    """float() of a number written with the digits 0-9 (a sign, a point, an exponent as float() takes them);
    ValueError for what float() alone would also read: '١٢', '１２', '1_000'.

    >>> decimal_number(" 2.5e3 ")
    2500.0
    """
    return float(_ascii_number_text(text))


def whole_number(text: str) -> int:
    """int() of a whole number written with the digits 0-9; ValueError for '١٢', '１２' or '1_000', which int()
    alone reads."""
    return int(_ascii_number_text(text))


def finite_number(value: Any, what: str = "value") -> float:
    """``value`` as a float if it is a finite number, else raise ValidationError."""
    if isinstance(value, (str, bytes)) or value is None:
        raise ValidationError(f"{what} must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValidationError(f"{what} must be a finite number, got {_shown(value)}") from None
    if not math.isfinite(number):
        raise ValidationError(f"{what} must be a finite number, got {number!r}")
    return number


def non_negative(value: Any, what: str) -> float:
    number = finite_number(value, what)
    if number < 0:
        raise ValidationError(f"{what} must not be negative, got {_shown(value)}")
    return number


# Every character str.splitlines() breaks a line on (the C0 controls among them, NEL, and the line and
# paragraph separators), DEL and the C1 controls: what _one_line() turns into spaces.
_LINE_BREAKING = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029], " ")


def _one_line(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1) and line or paragraph separator as a space: nothing
    str.splitlines() breaks on is left, so it is safe in a header, a subject, a syslog or a log line."""
    return text.translate(_LINE_BREAKING).strip()


def visible_text(text: str) -> str:
    """``text`` with what is not valid Unicode (bytes that were not UTF-8, carried as lone surrogates by
    ``surrogateescape``) replaced by U+FFFD, so it can be stored, sent and shown."""
    if text.isascii():
        return text  # the usual case, at C speed
    try:
        data = text.encode("utf-8", "surrogateescape")  # one U+FFFD for each byte that was not UTF-8
    except UnicodeEncodeError:  # a lone surrogate that came as text (JSON's "\ud83d"): one U+FFFD each
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return data.decode("utf-8", "replace")


def parse_listen(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port)."""
    host, _, port = str(text).strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not ascii_digits(port) or not 0 <= int(port) <= 65535:
        raise ValidationError(f"listen must be HOST:PORT, got {_shown(text)}")
    return host, int(port)


def parse_duration_s(text: str) -> float:
    """``90s``, ``5m``, ``2h`` or ``7d`` (a bare number is seconds) as seconds.

    >>> parse_duration_s("2h")
    7200.0
    """
    cleaned = text.strip().lower()
    unit = _DURATION_UNITS_S.get(cleaned[-1:], None)
    number = cleaned[:-1] if unit else cleaned
    try:
        seconds = decimal_number(number) * (unit or 1.0)
    except ValueError:
        raise ValidationError(f"{text!r} is not a duration such as 90s, 5m, 2h or 7d") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValidationError(f"{text!r} is not a duration such as 90s, 5m, 2h or 7d")
    if seconds > MAX_DURATION_S:  # it would end past what a timestamp can show (year 9999)
        raise ValidationError(f"{_shown(text)} is longer than {MAX_DURATION_S / (365.25 * DAY_S):.0f} years")
    return seconds


def _days_setting(section: Any, key: str, default: float) -> float:
    """A ``[storage]`` horizon in days: a number of days, or a duration such as ``12h``."""
    text = section.get(key)
    if text is None:
        return default
    try:
        return decimal_number(text) if ascii_digits(text.strip().replace(".", "", 1)) \
            else parse_duration_s(text) / DAY_S
    except ValidationError:
        raise ConfigError(f"[storage] {key} must be a number of days or a duration such as 12h, got {text!r}") from None


def storage_settings(config) -> Dict[str, Any]:
    """The ``[storage]`` keys this module reads, checked."""
    section = config["storage"] if config.has_section("storage") else {}
    synchronous = section.get("synchronous", "normal").strip().lower()
    if synchronous not in SYNCHRONOUS_MODES:
        raise ConfigError(f"[storage] synchronous must be normal or full, got {_shown(synchronous)}")
    busy_timeout_s = DEFAULT_BUSY_TIMEOUT_S
    if "busy_timeout" in section:
        try:
            busy_timeout_s = parse_duration_s(section["busy_timeout"])
        except ValidationError:
            busy_timeout_s = -1.0
        if not 0 < busy_timeout_s <= 3600:
            raise ConfigError(f"[storage] busy_timeout must be a duration such as 5s, at most 1h, "
                              f"got {section['busy_timeout']!r}")
    return {
        "synchronous": synchronous,
        "busy_timeout_s": busy_timeout_s,
        "retention_days": _days_setting(section, "retention_days", DEFAULT_RETENTION_DAYS),
        "hourly_days": _days_setting(section, "rollup_hourly_days", DEFAULT_HOURLY_DAYS),
        "daily_days": _days_setting(section, "rollup_daily_days", DEFAULT_DAILY_DAYS),
    }


def _duration_setting(items: Dict[str, str], section: str, key: str, default: float,
                      problems: List[Tuple[str, str, str]], positive: bool = False) -> float:
    if key not in items:
        return default
    try:
        seconds = parse_duration_s(items[key])
    except ValidationError as err:
        problems.append((section, key, str(err)))
        return default
    if positive and seconds <= 0:
        problems.append((section, key, "must be more than 0"))
        return default
    return seconds


def _bool_setting(items: Dict[str, str], section: str, key: str, default: bool,
                  problems: List[Tuple[str, str, str]]) -> bool:
    text = items.get(key)
    if text is None:
        return default
    value = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}.get(text.strip().lower())
    if value is None:
        problems.append((section, key, f"{_shown(text)} is not true or false"))
        return default
    return value


def name_problem(name: str, what: str) -> Optional[str]:
    """Why ``name`` cannot name a channel, check, job or maintenance window, or None. A name is letters,
    digits, '-', '_' and '.': it reaches completion scripts, labels, lock files and URLs.

    >>> name_problem("nas-1.disk", "check"), name_problem("$(reboot)", "check")
    (None, "a check name takes letters, digits, '-', '_' and '.'")
    """
    if name and all(ch.isalnum() or ch in "-_." for ch in name):
        return None
    return f"a {what} name takes letters, digits, '-', '_' and '.'"


def _check_sections(config, problems: List[Tuple[str, str, str]]) -> None:
    if not hasattr(config, "sections"):
        return
    for section in config.sections():
        if section not in CONFIG_SECTIONS and not section.startswith(CONFIG_SECTION_PREFIXES):
            problems.append((section, "", "unknown section"))
    if config.has_section("storage"):
        for key in config["storage"]:
            if key not in STORAGE_KEYS:
                problems.append(("storage", key, "unknown key"))
        try:
            storage_settings(config)
        except ConfigError as err:
            problems.append(("storage", "", str(err).replace("[storage] ", "")))
    if config.has_section("dashboard"):
        problems += [("dashboard", key, "unknown key") for key in config["dashboard"] if key not in DASHBOARD_KEYS]
    if config.has_section("collect"):
        for key in config["collect"]:
            if key not in COLLECT_KEYS:
                problems.append(("collect", key, "unknown key"))
            else:
                _bool_setting(dict(config["collect"]), "collect", key, True, problems)
    if config.has_section("serve"):
        for key in config["serve"]:
            if key not in SERVE_KEYS:
                problems.append(("serve", key, "unknown key"))
        if "listen" in config["serve"]:
            try:
                parse_listen(config["serve"]["listen"])
            except ValidationError as err:
                problems.append(("serve", "listen", str(err)))
        _duration_setting(dict(config["serve"]), "serve", "cache", 0.0, problems)


def _stat_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def read_regular_file(path: str, limit_bytes: int) -> Tuple[bytes, os.stat_result]:
    """(the bytes, the status) of the regular file at ``path``; OSError when it cannot be opened, ValueError
    (naming the path, never the content) for anything but a regular file of at most ``limit_bytes``.

    What is not a regular file is refused before it is opened: a FIFO would block the read until a writer
    came, /dev/zero would never end, and opening some devices does something by itself.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is {_stat_kind(mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # swapped for something else since the stat above
            raise ValueError(f"{path} is {_stat_kind(info.st_mode)}, not a regular file")
        data = handle.read(limit_bytes + 1)
    if len(data) > limit_bytes:
        raise ValueError(f"{path} is larger than {limit_bytes:,} bytes: not what it should hold")
    return data, info


def problem_lines(path: str, problems: Iterable[Tuple[str, str, str]]) -> List[str]:
    """``FILE: [section] key: what is wrong``, a line for each problem (the section left out when it is
    about the file's lines)."""
    return [f"{path}: " + (f"[{section}] " if section else "") + (f"{key}: " if key else "") + text
            for section, key, text in problems]


def cycle_through(edges: Dict[str, str], start: str) -> Optional[List[str]]:
    """The cycle ``start`` lies on when each name leads to at most one other (``fallback``, ``escalate_to``,
    ``depends_on``), as the path ``start -> ... -> start``; None when following the edges never returns.

    >>> cycle_through({"a": "b", "b": "a", "c": "a"}, "a"), cycle_through({"a": "b", "b": "a", "c": "a"}, "c")
    (['a', 'b', 'a'], None)
    """
    path, node = [start], edges.get(start)
    while node is not None and node not in path:
        path.append(node)
        node = edges.get(node)
    return path + [start] if node == start else None


def acyclic(edges: Dict[str, str]) -> Dict[str, str]:
    """``edges`` without those on a cycle: at run time a cycle (a mistake ``config --check`` reports) must
    never hold back or hide anything."""
    return {name: other for name, other in edges.items() if cycle_through(edges, name) is None}


def cycle_problems(edges: Dict[str, str], section_of, key: str) -> List[Tuple[str, str, str]]:
    """One problem per cycle of ``edges``, in the section of its first name in sorted order."""
    problems = []
    for name in sorted(edges):
        cycle = cycle_through(edges, name)
        if cycle is not None and name == min(cycle):
            problems.append((section_of(name), key, f"a cycle: {' -> '.join(cycle)} (nothing on it is ever "
                                                    "followed; break it)"))
    return problems


def read_secret_file(path: str) -> str:
    """The secret a file holds, stripped; OSError if it cannot be read, ValueError if it is not a small
    regular file of UTF-8 text.

    A file other users can read draws one warning, as a configuration file holding secrets does.
    """
    data, info = read_regular_file(path, SECRET_FILE_MAX_BYTES)
    if info.st_mode & 0o044:
        log.warning("%s holds a secret and other users can read it: chmod 600 %s", path, path)
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


def _secret(items: Dict[str, str], key: str, section: str, environ: Dict[str, str],
            problems: List[Tuple[str, str, str]]) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(value, where it came from, why it is missing) for KEY, KEY_env or KEY_file."""
    given = [key + suffix for suffix in SECRET_SUFFIXES if key + suffix in items]
    if len(given) > 1:
        problems.append((section, key, f"give only one of {', '.join(given)}"))
    if not given:
        return None, None, None
    chosen = given[0]
    text = items[chosen].strip()
    if chosen == key:
        return (text or None), "file", (None if text else f"{key} is empty")
    if chosen.endswith("_env"):
        value = environ.get(text, "").strip()
        if value != visible_text(value):
            return None, f"${text}", f"${text} is not UTF-8 text"
        return (value or None), f"${text}", (None if value else f"${text} is not set")
    path = os.path.expanduser(text)
    try:
        value = read_secret_file(path)
    except OSError as err:
        return None, f"file {path}", f"{path} cannot be read ({err.strerror or err})"
    except ValueError as err:
        return None, f"file {path}", str(err)
    return (value or None), f"file {path}", (None if value else f"{path} is empty")


def format_span(seconds: float, exact: bool = False) -> str:
    """A duration for people, rounded: ``45s``, ``12m``, ``1h 5m``, ``2d 3h``. ``exact``: in the largest
    unit that divides it, as parse_duration_s reads it back (a configured value shown again).

    >>> format_span(3900), format_span(3900, exact=True), format_span(90, exact=True), format_span(0.5, exact=True)
    ('1h 5m', '65m', '90s', '0.5s')
    """
    if not math.isfinite(seconds):
        return "-"
    if exact:
        size, unit = next(((size, unit) for unit, size in reversed(_DURATION_UNITS_S.items())
                           if size > 1 and seconds >= size and seconds % size == 0), (1, "s"))
        return f"{seconds / size:g}{unit}"
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days >= 100_000:  # past 270 years: a magnitude, not a count of days
        return f"{float(days):.3g}d"
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m" if minutes else f"{secs}s"


def format_bytes(count: float) -> str:
    """``52.3 GB``: powers of 1000, as disks are sold and df -H shows."""
    for unit in ("TB", "GB", "MB", "KB"):
        if abs(count) >= SIZE_UNITS[unit.lower()]:
            return f"{count / SIZE_UNITS[unit.lower()]:.1f} {unit}"
    return f"{count:.0f} B"


class _EmptyConfig:
    """What load_config() returns for a missing file: no sections."""

    @staticmethod
    def has_section(name: str) -> bool:
        return False

    @staticmethod
    def sections() -> List[str]:
        return []


_EMPTY_CONFIG = _EmptyConfig()


def storage_or_defaults(config) -> Dict[str, Any]:
    """storage_settings(), or the defaults when ``[storage]`` has a problem (which the configuration's
    problems say), with ``maintain`` False then: retention must not delete by horizons nobody chose."""
    try:
        return dict(storage_settings(config), maintain=True)
    except ConfigError:
        return dict(storage_settings(_EMPTY_CONFIG), maintain=False)


YAML_HINT = "write it in the INI form instead (config --convert-yaml prints what this file says as INI)"


def yaml_sibling(path: str) -> Optional[str]:
    """The original design's ``alerting-config.yaml`` beside an ``.ini`` path, or None."""
    return path[:-len(".ini")] + ".yaml" if path.endswith(".ini") else None


def _yaml_scalar(text: str, where: str) -> str:
    """One flat YAML value: quoted ('...' with '' for ', "..." with backslash escapes) or bare (a
    ``#`` after a space starts a comment); true and false as themselves."""
    import re

    text = text.strip()
    if text[:1] == "'":
        found = re.fullmatch(r"'((?:[^']|'')*)'\s*(#.*)?", text)
        if found:
            return found.group(1).replace("''", "'")
    elif text[:1] == '"':
        found = re.fullmatch(r'"((?:[^"\\]|\\.)*)"\s*(#.*)?', text)
        if found:
            escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "/": "/"}
            body = found.group(1)
            if all(escaped in escapes for escaped in re.findall(r"\\(.)", body)):
                return re.sub(r"\\(.)", lambda m: escapes[m.group(1)], body)
    else:
        value = re.split(r"\s#", text, maxsplit=1)[0].strip()
        if value and value[0] not in "[]{}&*!|>%@`" and not value.startswith("- ") and value not in ("~", "null"):
            return {"true": "true", "false": "false"}.get(value.lower(), value)
    raise ConfigError(f"{where}: {_shown(text)} is not a plain value; {YAML_HINT}")


def _refuse_if_others_can_change(path: str, info: os.stat_result) -> None:
    """A configuration runs programs (command checks, the mail command): one that another user can change,
    or that another user owns, is theirs to run as us. As root it is refused, as sudo and OpenSSH refuse
    such files; otherwise it draws a warning."""
    me = os.geteuid()
    folder = os.path.dirname(os.path.abspath(path))
    try:
        folder_info = os.stat(folder)
    except OSError:
        folder_info = None
    why = None
    if info.st_mode & 0o022:
        why = "other users can change it"
    elif info.st_uid not in (me, 0):
        why = f"it belongs to another user (uid {info.st_uid})"
    elif folder_info is not None and folder_info.st_mode & 0o022 and not folder_info.st_mode & stat.S_ISVTX:
        why = f"other users can replace it (its folder {folder} is writable by them)"
    if why is None:
        return
    if me == 0:
        raise ConfigError(f"configuration file {path} is refused: {why}, and it could run programs as root "
                          f"(chown root and chmod go-w)")
    log.warning("configuration file %s: %s, and it can run programs as you (chmod go-w)", path, why)


def read_config_text(path: str) -> str:
    """The text of a configuration file: a small regular file of UTF-8, that only its owner can change;
    ConfigError otherwise."""
    try:
        data, info = read_regular_file(path, CONFIG_FILE_MAX_BYTES)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"configuration file {path} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"configuration file {path} is not UTF-8 text (byte {err.start + 1})") from None
    except ValueError as err:
        raise ConfigError(f"configuration file {err}") from None
    _refuse_if_others_can_change(path, info)
    return text


def read_flat_yaml(path: str) -> Dict[str, str]:
    """The flat ``key: value`` lines of the original design's YAML file (comments, quoted and bare
    scalars, true and false, numbers); anything nested or beyond that is refused with its line."""
    import re

    lines = read_config_text(path).splitlines()
    items: Dict[str, str] = {}
    written: Dict[str, Tuple[int, str]] = {}  # each key, lower case, as the INI reads it: (line, as written)
    for number, line in enumerate(lines, start=1):
        where = f"configuration file {path}: line {number}"
        if not line.strip() or line.lstrip().startswith("#") or (line.rstrip() == "---" and not items):
            continue
        found = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*:(?:[ \t]+(.*))?", line.rstrip())
        if line[:1] in " \t" or found is None:
            raise ConfigError(f"{where}: only flat 'key: value' lines are read here; {YAML_HINT}")
        key, value = found.group(1), found.group(2) or ""
        if not value.strip() or value.lstrip().startswith("#"):
            raise ConfigError(f"{where}: {key} has no value (a nested mapping or a list?); {YAML_HINT}")
        if key.lower() in written:
            first, spelled = written[key.lower()]
            raise ConfigError(f"{where}: {key} is given twice" + (
                "" if spelled == key else f" (line {first} has {spelled}: keys are read in any letter case)"))
        written[key.lower()] = (number, key)
        items[key.lower()] = _yaml_scalar(value, where)
        if not items[key.lower()].isprintable():  # a line break would start a line, or a section, of the INI
            raise ConfigError(f"{where}: {key} holds a line break or another control character")
    return items


def yaml_config(path: str):
    """The flat YAML file as the configuration: its keys are ``[alerting]``'s."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser["alerting"] = read_flat_yaml(path)
    return parser


def yaml_as_ini(path: str) -> str:
    """What the flat YAML file at ``path`` says, as the INI file to write instead."""
    shown = path if path.isprintable() else repr(path)  # the comment stays one line
    lines = [f"# converted from {shown}; it holds secrets: chmod 600 it", "[alerting]"]
    return "\n".join(lines + [f"{key} = {value}" for key, value in read_flat_yaml(path).items()]) + "\n"


def config_source(path: str) -> str:
    """The file the configuration at ``path`` is read from: itself, or when it is a missing ``.ini``
    file, the original design's YAML file beside it if that exists."""
    sibling = yaml_sibling(path)
    return sibling if sibling and not os.path.exists(path) and os.path.exists(sibling) else path


def _outside_sections(text: str) -> Tuple[str, List[Tuple[str, str, str]]]:
    """``text`` with the lines before its first ``[section]`` blanked (their numbers kept), and a problem
    for each that was more than a comment: configparser would refuse the whole file for one of them."""
    import re

    lines = text.split("\n")
    problems = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if re.match(r"\[.+\]", stripped):
            break
        if stripped and not stripped.startswith(("#", ";")):
            problems.append(("", "", f"line {number + 1}: {_shown(stripped)} stands before any [section]"))
            lines[number] = ""
    return "\n".join(lines), problems


def _given_twice(text: str) -> List[Tuple[int, str]]:
    """(line, what) for each section, and each key within a section, given a second time (keys in any
    letter case, as configparser reads them): it keeps the last, and the mistake must be said."""
    import re

    seen_sections: set = set()
    seen_keys: set = set()
    found = []
    for number, line in enumerate(text.split("\n"), start=1):
        header = re.match(r"\[(.+)\]", line.strip())
        if header and line[:1] not in " \t":
            section = header.group(1)
            if section in seen_sections:
                found.append((number, f"section [{section}] is given a second time"))
            seen_sections.add(section)
            seen_keys = set()
            continue
        key = re.match(r"([^=:\s#;][^=:]*?)\s*[=:]", line)
        if key and line[:1] not in " \t":
            name = key.group(1).strip().lower()
            if name in seen_keys:
                found.append((number, f"key {name!r} is given a second time in its section"))
            seen_keys.add(name)
    return found


def _parse_error_line(text: str) -> str:
    """The line configparser quotes in a ParsingError: as repr() before Python 3.13, as it is since."""
    import ast

    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        with contextlib.suppress(ValueError, SyntaxError):
            text = ast.literal_eval(text)
    return text.strip()


def parse_ini(text: str, path: str) -> Tuple[Any, List[Tuple[str, str, str]]]:
    """The INI ``text`` as a ConfigParser, and (section, key, text) for each line it could not take, in
    the order of the file. What is readable is kept: a broken line, a section or a key given twice costs
    that line, never the rest of the file (the checks and channels that are right must still work)."""
    import configparser

    text, problems = _outside_sections(text)
    found = [(number, why) for number, why in _given_twice(text)]
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(text, source=path)
    except configparser.ParsingError as err:  # the whole file was read; the broken lines are listed
        found += [(number, f"{_shown(_parse_error_line(line))} is not KEY = VALUE") for number, line in err.errors]
    return parser, problems + [("", "", f"line {number}: {why}") for number, why in sorted(found)]


def read_config(path: str, required: bool = False) -> Tuple[Any, List[Tuple[str, str, str]]]:
    """The configuration and the lines of it that could not be read, as (section, key, text) problems.
    The INI file (or a ``.yaml`` file named, or, when the INI file is missing, the original design's YAML
    file beside it); a missing file is an empty configuration unless ``required``. ConfigError when the
    file cannot be read at all (not a small regular file of UTF-8 text, or a YAML file beyond flat lines)."""
    path = config_source(path)
    if path.endswith((".yaml", ".yml")) and (required or os.path.exists(path)):
        return yaml_config(path), []
    if (not required and not os.path.exists(path)) or path == os.devnull:  # --config /dev/null: none at all
        return _EMPTY_CONFIG, []  # the usual cron run: no configparser to import
    return parse_ini(read_config_text(path), path)


def load_config(path: str, required: bool = False):
    """The configuration, as read_config() reads it; ConfigError for the first line it could not read."""
    config, problems = read_config(path, required)
    if problems:
        raise ConfigError(f"configuration file {config_source(path)}: {problems[0][2]}")
    return config


## Storage ####################################################################

# The series of the sync, agent, breaker, check and job families, in SQL: a family's series carries the label
# that names its entity, and its name matches one of the family's globs (the Summary section's
# _EXPORTED_SERIES, said in SQLite's GLOB, which is case-sensitive and whose ``?*`` is ``.+``). Every other
# series is the user's own: series.own says which when a series is created, once (an index condition
# would be said again on every write of last_ts); a change here needs a migration that says it again.
_FAMILY_GLOBS = (
    ("target", ("sync_?*_success", "sync_?*_failure", "sync_?*_files", "sync_?*_conflicts")),
    ("agent", ("agent_?*_success", "agent_?*_failure", "agent_?*_items")),
    ("breaker", ("circuit_breaker_?*_state", "circuit_breaker_?*_failures")),
    ("check", ("check_state", "check_value", "check_duration")),
    ("job", ("job_duration", "job_exit_code")),
)
_OWN_SERIES = "NOT ({})".format(" OR ".join(
    "(instr(labels, '\"{}\":') AND ({}))".format(label, " OR ".join(f"name GLOB '{glob}'" for glob in globs))
    for label, globs in _FAMILY_GLOBS))
# The series whose last_ts is kept: the user's own, and every series of failures (the worst-first sections
# find the sync targets and agents that failed in a window by it). The runs that succeed, the files, the
# breakers' states, the checks' values write no series row.
_TRACKED = "(own OR name GLOB '*_failure')"


def _fill_label_values(conn: sqlite3.Connection) -> None:
    """Schema 11's label_values, from the series there are: JSON that SQL alone cannot read everywhere."""
    import json

    texts = conn.execute("SELECT DISTINCT labels FROM series WHERE labels != ?", (_NO_LABELS,)).fetchall()
    conn.executemany("INSERT OR IGNORE INTO label_values (key, value) VALUES (?, ?)",
                     [pair for (text,) in texts for pair in json.loads(text).items()])


# Each entry is one schema version: SQL statements, or a function of the connection for what SQL cannot
# say, run in order in one transaction.
_MIGRATIONS: Tuple[Tuple[Any, ...], ...] = (
    (
        # One row per (name, labels); samples refer to it by a small integer.
        """CREATE TABLE series (
               id INTEGER PRIMARY KEY,
               name TEXT NOT NULL,
               labels TEXT NOT NULL,
               UNIQUE (name, labels))""",
        # Keyed on (series, time): a window query is one index range and a
        # sample costs about 25 bytes.  seq keeps two samples of one series at
        # the same instant apart; it is 0 unless that happens, and negative
        # for a sample kept raw in place of its hour's rollup (schema 9).
        """CREATE TABLE samples (
               series_id INTEGER NOT NULL,
               ts REAL NOT NULL,
               seq INTEGER NOT NULL,
               value REAL NOT NULL,
               PRIMARY KEY (series_id, ts, seq)) WITHOUT ROWID""",
        # One row per series and closed hour: what window queries read for
        # whole hours.  m2 is the sum of squared deviations from the hour's own
        # mean, so hours combine into an exact variance (Chan et al.).
        """CREATE TABLE rollups (
               series_id INTEGER NOT NULL,
               span INTEGER NOT NULL,
               bucket REAL NOT NULL,
               n INTEGER NOT NULL,
               total REAL NOT NULL,
               m2 REAL NOT NULL,
               lo REAL NOT NULL,
               hi REAL NOT NULL,
               first_ts REAL NOT NULL,
               last_ts REAL NOT NULL,
               last_value REAL NOT NULL,
               PRIMARY KEY (series_id, span, bucket)) WITHOUT ROWID""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    ),
    (
        # Every attempt and every call of AdaptiveRetry, from every process. Error
        # class names only: a message may hold a secret.
        """CREATE TABLE retry_attempts (
               operation TEXT NOT NULL,
               ts REAL NOT NULL,
               call_id TEXT NOT NULL,
               attempt INTEGER NOT NULL,
               duration_s REAL NOT NULL,
               error TEXT NOT NULL,
               category TEXT NOT NULL,
               slept_s REAL NOT NULL,
               PRIMARY KEY (operation, ts, call_id, attempt)) WITHOUT ROWID""",
        """CREATE TABLE retry_calls (
               operation TEXT NOT NULL,
               started REAL NOT NULL,
               call_id TEXT NOT NULL,
               ended REAL NOT NULL,
               attempts INTEGER NOT NULL,
               succeeded INTEGER NOT NULL,
               first_error TEXT NOT NULL,
               error TEXT NOT NULL,
               category TEXT NOT NULL,
               total_sleep REAL NOT NULL,
               stop_reason TEXT NOT NULL,
               PRIMARY KEY (operation, started, call_id)) WITHOUT ROWID""",
        "CREATE TABLE retry_budget (operation TEXT PRIMARY KEY, tokens REAL NOT NULL) WITHOUT ROWID",
        # One row per breaker: every process reads and changes it inside BEGIN IMMEDIATE.
        """CREATE TABLE breakers (
               name TEXT PRIMARY KEY,
               state TEXT NOT NULL,
               since REAL NOT NULL,
               open_until REAL NOT NULL,
               opens INTEGER NOT NULL,
               lease_owner TEXT NOT NULL,
               lease_until REAL NOT NULL,
               failure_threshold INTEGER NOT NULL,
               window_s REAL NOT NULL) WITHOUT ROWID""",
        "CREATE TABLE breaker_failures (name TEXT NOT NULL, ts REAL NOT NULL)",
        "CREATE INDEX breaker_failures_by_time ON breaker_failures (name, ts)",
        """CREATE TABLE breaker_transitions (
               name TEXT NOT NULL,
               ts REAL NOT NULL,
               from_state TEXT NOT NULL,
               to_state TEXT NOT NULL,
               reason TEXT NOT NULL,
               failures INTEGER NOT NULL)""",
        "CREATE INDEX breaker_transitions_by_time ON breaker_transitions (name, ts)",
    ),
    (
        # Every alert sent, tested or refused, and what each channel did with it. Secrets are
        # masked before they get here.
        """CREATE TABLE alerts (
               id INTEGER PRIMARY KEY,
               ts REAL NOT NULL,
               kind TEXT NOT NULL,
               dedup_key TEXT NOT NULL,
               severity TEXT NOT NULL,
               title TEXT NOT NULL,
               message TEXT NOT NULL,
               details TEXT NOT NULL)""",
        "CREATE INDEX alerts_by_time ON alerts (ts)",
        """CREATE TABLE alert_deliveries (
               alert_id INTEGER NOT NULL,
               channel TEXT NOT NULL,
               ts REAL NOT NULL,
               outcome TEXT NOT NULL,
               attempts INTEGER NOT NULL,
               http_status INTEGER,
               error_class TEXT,
               error TEXT,
               latency_ms REAL,
               PRIMARY KEY (alert_id, channel)) WITHOUT ROWID""",
        # Per dedup key and channel: the last successful delivery (the dedup window runs from it)
        # and the lease of the process sending it now.
        """CREATE TABLE alert_marks (
               dedup_key TEXT NOT NULL,
               channel TEXT NOT NULL,
               sent_at REAL,
               claim_owner TEXT NOT NULL,
               claim_until REAL NOT NULL,
               PRIMARY KEY (dedup_key, channel)) WITHOUT ROWID""",
    ),
    (
        # fire() and resolve(): one row per key, counting its runs.
        """CREATE TABLE alert_states (
               key TEXT PRIMARY KEY,
               state TEXT NOT NULL,
               title TEXT NOT NULL,
               message TEXT NOT NULL,
               severity TEXT NOT NULL,
               details TEXT NOT NULL,
               since REAL,
               recent TEXT NOT NULL,
               fail_streak INTEGER NOT NULL,
               pass_streak INTEGER NOT NULL,
               flips INTEGER NOT NULL,
               updated REAL NOT NULL) WITHOUT ROWID""",
        # Per key and channel: the last delivery (a RESOLVED is owed while the row exists), whether a
        # notification waits for the end of quiet hours, and the lease of the process sending one now.
        """CREATE TABLE alert_channel_states (
               key TEXT NOT NULL,
               channel TEXT NOT NULL,
               delivered_at REAL,
               severity TEXT,
               reminders INTEGER NOT NULL,
               held INTEGER NOT NULL,
               claim_owner TEXT NOT NULL,
               claim_until REAL NOT NULL,
               claim_kind TEXT NOT NULL,
               claim_severity TEXT NOT NULL,
               PRIMARY KEY (key, channel)) WITHOUT ROWID""",
        """CREATE TABLE alert_held (
               id INTEGER PRIMARY KEY,
               channel TEXT NOT NULL,
               key TEXT NOT NULL,
               kind TEXT NOT NULL,
               severity TEXT NOT NULL,
               title TEXT NOT NULL,
               ts REAL NOT NULL,
               claim_owner TEXT NOT NULL,
               claim_until REAL NOT NULL)""",
        """CREATE TABLE silences (
               id INTEGER PRIMARY KEY,
               match TEXT NOT NULL,
               starts REAL NOT NULL,
               ends REAL NOT NULL,
               comment TEXT NOT NULL)""",
        "ALTER TABLE alert_deliveries ADD COLUMN kind TEXT",
    ),
    (
        # One row per run of a job: inserted when it starts (a run in progress has no end), with the
        # tail of its output.
        """CREATE TABLE job_runs (
               run_id TEXT PRIMARY KEY,
               job TEXT NOT NULL,
               started REAL NOT NULL,
               ended REAL,
               exit_code INTEGER,
               outcome TEXT NOT NULL,
               attempts INTEGER NOT NULL,
               output BLOB NOT NULL,
               cut_bytes INTEGER NOT NULL)""",
        "CREATE INDEX job_runs_by_job ON job_runs (job, started)",
    ),
    (
        # The last verdict of each check, in words, for the dashboard and the summary.
        """CREATE TABLE check_results (
               name TEXT PRIMARY KEY,
               ts REAL NOT NULL,
               state TEXT NOT NULL,
               summary TEXT NOT NULL) WITHOUT ROWID""",
    ),
    (
        # Deliveries per channel and outcome since the store began: the history is pruned, these
        # are not, so an exported counter never goes down.
        """CREATE TABLE delivery_counts (
               channel TEXT NOT NULL,
               outcome TEXT NOT NULL,
               n INTEGER NOT NULL,
               PRIMARY KEY (channel, outcome)) WITHOUT ROWID""",
        "INSERT INTO delivery_counts SELECT channel, outcome, count(*) FROM alert_deliveries GROUP BY channel, outcome",
    ),
    (
        # A person's acknowledgement of a firing alert: no reminders until it resolves, ``until`` passes
        # (NULL: never) or its severity rises above the one acknowledged.
        """CREATE TABLE alert_acks (
               key TEXT PRIMARY KEY,
               by TEXT NOT NULL,
               comment TEXT NOT NULL,
               at REAL NOT NULL,
               until REAL,
               severity TEXT NOT NULL) WITHOUT ROWID""",
    ),
    (
        # Series with samples the roll-up kept raw in place of their hour's row (see roll_up()), and the
        # newest of them: window queries look for such samples only where they may be.
        """CREATE TABLE raw_kept (
               series_id INTEGER PRIMARY KEY,
               until REAL NOT NULL)""",
    ),
    (
        # The time of each series' newest sample (NULL without one), for the series that readers order by it:
        # the user's own (own: 1), whose newest are an index range instead of a look at every series, and
        # those of failures (see _TRACKED). The writes keep it in their transaction, and so do the deletes;
        # it may lag only for the few series that meta's lagging_series names, whose samples a reader asks
        # instead (see _keep_last_times()). Other series' last_ts says nothing.
        "ALTER TABLE series ADD COLUMN last_ts REAL",
        "ALTER TABLE series ADD COLUMN own INTEGER NOT NULL DEFAULT 0",
        f"UPDATE series SET own = {_OWN_SERIES}",
        f"UPDATE series SET last_ts = (SELECT max(ts) FROM samples WHERE series_id = series.id) WHERE {_TRACKED}",
        "CREATE INDEX own_series_by_time ON series (last_ts DESC, name, labels) WHERE own",
    ),
    (
        # Every label value a series carries, by key, written when a series is created: who the targets,
        # agents and breakers are without reading every series' labels.
        """CREATE TABLE label_values (
               key TEXT NOT NULL,
               value TEXT NOT NULL,
               PRIMARY KEY (key, value)) WITHOUT ROWID""",
        _fill_label_values,
        # The runs' series: which sync targets and agents failed in a window, by the failure series' last_ts,
        # and how many of the others succeeded, by the success series' samples (see _worst_first()).
        "CREATE INDEX failures_by_time ON series (last_ts) WHERE name GLOB '*_failure'",
        "CREATE INDEX success_series ON series (name) WHERE name GLOB '*_success'",
    ),
)

APPLICATION_ID = 0x4D4D4F4E  # "MMON" in the file's header: this SQLite file is a metasystem store

_SQLITE_MESSAGES = (
    ("database is locked", "is locked by another process (gave up after {timeout:g} s)"),
    ("database is busy", "is locked by another process (gave up after {timeout:g} s)"),
    ("file is not a database", "is not a SQLite database"),
    ("database disk image is malformed", "is damaged (database disk image is malformed)"),
    ("readonly database", "is read-only"),
    ("database or disk is full", "cannot be written: the disk is full"),
    ("disk i/o error", "cannot be written: disk I/O error"),
    ("unable to open database file", "cannot be opened"),
)

# The first migration's series and meta tables, word for word as SQLite keeps them: how a store made
# before the header carried APPLICATION_ID is told from another program's database.
_FIRST_TABLES = (_MIGRATIONS[0][0], _MIGRATIONS[0][3])


def _why_unopenable(path: str) -> str:
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f": folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f": folder {folder} is not writable"
    return ""


def _storage_error(err: sqlite3.Error, path: str, timeout_s: float, waited_s: Optional[float] = None) -> StorageError:
    """Turn a sqlite3 error into one line that names the store and the cause.

    ``waited_s``, where known, tells a lock given up at the busy timeout from a BUSY that SQLite
    returns at once (it skips its busy handler where waiting could deadlock).
    """
    text = str(err)
    lowered = text.lower()
    for needle, sentence in _SQLITE_MESSAGES:
        if needle in lowered:
            detail = sentence.format(timeout=timeout_s)
            if "locked" in detail and waited_s is not None and waited_s < 0.9 * timeout_s:
                detail = detail.replace(f"gave up after {timeout_s:g} s", f"busy at once, after {waited_s:.3f} s")
            if needle == "unable to open database file":
                detail += _why_unopenable(path)
            return StorageError(f"store {path} {detail}", path)
    return StorageError(f"store {path}: {text}", path)


def _checked_schema_version(conn: sqlite3.Connection, path: str) -> int:
    """The file's schema version; a file that is not ours to change raises StorageError.

    Ours: an empty file, a file whose header carries APPLICATION_ID, or a store from before the marker
    (application_id 0) whose first tables are exactly the ones migration 1 wrote. Anything else is
    another program's, whatever its user_version says.
    """
    # One statement, so one snapshot: read apart, a migration another process commits in between
    # would show its tables without its version, and the store would look like another program's.
    version, objects, app_id, first_tables = conn.execute(
        "SELECT (SELECT user_version FROM pragma_user_version), (SELECT count(*) FROM sqlite_master), "
        "(SELECT application_id FROM pragma_application_id), "
        "(SELECT count(*) FROM sqlite_master WHERE type = 'table' AND sql IN (?, ?))", _FIRST_TABLES).fetchone()
    empty = version == 0 and objects == 0 and app_id in (0, APPLICATION_ID)
    marked = app_id == APPLICATION_ID or (app_id == 0 and version > 0 and first_tables == len(_FIRST_TABLES))
    if not (empty or marked):
        raise StorageError(
            f"store {path} is a SQLite database of another program (it does not carry the "
            f"metasystem marker); it was left unchanged",
            path,
        )
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"store {path} was written by a newer version (schema {version}; "
            f"this program knows up to {SCHEMA_VERSION}); it was left unchanged",
            path,
        )
    return version


def refuse_foreign_symlinks(path: str, what: str, error: type = StorageError) -> None:
    """Refuse ``path`` if a symlink on it belongs to neither this user nor its folder's owner.

    The kernel's ``fs.protected_symlinks`` rule, applied by the program to every path it writes (the
    store, a lock, an output file) and on every system: root must not follow a link that another user
    planted in /tmp to a file of root's choosing.
    """
    me = os.geteuid()
    probe = ""
    for part in os.path.abspath(path).split(os.sep)[1:]:
        folder, probe = probe or os.sep, os.path.join(probe or os.sep, part)
        try:
            info = os.lstat(probe)
        except OSError:
            return  # the rest does not exist yet
        if stat.S_ISLNK(info.st_mode) and info.st_uid not in (me, os.stat(folder).st_uid):
            raise error(f"{what} {path} goes through a symlink owned by another user ({probe}); refused")


def _first_line_starts(path: str, prefixes: Tuple[str, ...]) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(200)
    except OSError:
        return False
    return head.startswith(tuple(prefix.encode("utf-8") for prefix in prefixes))


def _unreachable(path: str) -> str:
    """Why ``path`` cannot be reached though it may exist: the first part of it that is a file, not a
    folder, or a folder that cannot be searched."""
    parts = os.path.abspath(path).split(os.sep)
    for end in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:end]) or os.sep
        try:
            mode = os.stat(prefix).st_mode
        except PermissionError:
            return f"folder {os.path.dirname(prefix)} cannot be searched (permission denied)"
        except OSError:
            break
        if end < len(parts) and not stat.S_ISDIR(mode):
            return f"{prefix} is {_stat_kind(mode) if not stat.S_ISREG(mode) else 'a file'}, not a folder"
    return "it cannot be reached"


def output_target(path: str, option: str, *, ours: Tuple[str, ...], force: bool) -> str:
    """The regular file that writing ``path`` may replace, links resolved; ValidationError when it may not.

    Refused: anything but a regular file (a device such as /dev/null, a FIFO, a directory, a symlink
    to one of them or to nowhere), a symlink another user owns, and an existing file whose first line
    does not start with one of ``ours`` (a file this program did not write) unless ``force``.
    """
    refuse_foreign_symlinks(path, option, ValidationError)
    if os.path.islink(path) and not os.path.exists(path):
        raise ValidationError(f"{option} {path} is a symlink to nowhere; nothing was written")
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(real) or "."):
            raise MonitorError(f"cannot write {path}: folder {os.path.dirname(real)} does not exist") from None
        return real
    except OSError as err:
        why = _unreachable(real) if err.errno in (errno.ENOTDIR, errno.EACCES) else err.strerror or str(err)
        raise ValidationError(f"{option} {path} cannot be written: {why}; nothing was written") from None
    if not stat.S_ISREG(mode):
        raise ValidationError(f"{option} {path} is {_stat_kind(mode)}, not a regular file; nothing was written")
    if not force and not _first_line_starts(real, ours):
        raise ValidationError(f"{option} {path} exists and was not written by this program; "
                              "give --force to replace it")
    return real


def _refuse_special_file(path: str) -> None:
    """A store is a regular file: a device, FIFO, socket or folder (or a link to one) is refused by name,
    and so is a path that cannot be reached (a read would otherwise find it empty)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # missing: it will be created, or reads as an empty store
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.EACCES):
            raise StorageError(f"store {path} cannot be reached: {_unreachable(path)}", path) from None
        return  # a problem SQLite names itself
    if not stat.S_ISREG(mode):
        raise StorageError(f"store {path} is {_stat_kind(mode)}, not a regular file; it was left unchanged", path)


def _mark_as_ours(conn: sqlite3.Connection) -> None:
    if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")


def _prepare_store_file(path: str) -> None:
    """Create the store's folder (0700) and file (0600) if they are missing.

    Only folders created here are given 0700: an existing one such as /tmp is
    left as it is.  Modes are set explicitly, so the umask cannot widen them.
    A symlink another user owns is refused; a symlink to nowhere gets its
    target created, 0600 like any store.
    """
    refuse_foreign_symlinks(path, "store")
    _refuse_special_file(path)
    path = os.path.realpath(path)
    folder = os.path.dirname(path) or "."
    missing = []
    probe = folder
    while probe and not os.path.exists(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    for created in reversed(missing):
        try:
            os.mkdir(created, 0o700)
            os.chmod(created, 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise StorageError(f"store {path} cannot be created: {err.strerror}: {created}", path) from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as err:
        raise StorageError(f"store {path} cannot be created: {err.strerror}", path) from None
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class _WriteTransaction:
    """``with store.write() as conn``; a class, not a generator, as every record() pays for it."""

    __slots__ = ("store", "conn")

    def __init__(self, store: Store):
        self.store = store
        self.conn = store.connection

    def __enter__(self) -> sqlite3.Connection:
        started = time.monotonic()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise self.store.storage_error(err, time.monotonic() - started) from err
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            if exc_type is None:
                self.conn.execute("COMMIT")
            elif self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error as err:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise self.store.storage_error(err) from err
        if isinstance(exc, sqlite3.Error):
            raise self.store.storage_error(exc) from exc


def _bound(params: Iterable[Any]) -> Any:
    """A statement's parameters as sqlite3 takes them: a dict for ``:name`` ones, else a tuple."""
    return params if isinstance(params, dict) else tuple(params)


def _meta_times(conn: sqlite3.Connection, *keys: str) -> Tuple[Optional[float], ...]:
    """The meta values of ``keys``, as floats, None where unset; one query."""
    marks = dict(conn.execute(f"SELECT key, value FROM meta WHERE key IN ({', '.join('?' * len(keys))})",
                              keys).fetchall())
    return tuple(None if marks.get(key) is None else float(marks[key]) for key in keys)


class Store:
    """The one owner of the SQLite connection.

    WAL journal, a busy timeout, every write inside ``BEGIN IMMEDIATE`` (a
    deferred transaction that later upgrades to a write fails at once with
    "database is locked" instead of waiting), and the schema migrated forward
    on open.  A file from a newer version is refused and never touched.

    With ``readonly=True`` nothing is created or changed: a missing file reads
    as an empty store.
    """

    def __init__(
        self,
        path: str,
        *,
        readonly: bool = False,
        synchronous: str = "normal",
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ):
        self._conn: Optional[sqlite3.Connection] = None  # first, so close() always works
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValidationError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {_shown(synchronous)}")
        self.path = path
        self.readonly = readonly
        self.busy_timeout_s = busy_timeout_s
        started = time.monotonic()
        try:
            self._conn = self._connect_readonly() if readonly else self._connect(synchronous)
        except sqlite3.Error as err:
            raise self.storage_error(err, time.monotonic() - started) from err
        except UnicodeEncodeError as err:  # a lone surrogate: invalid UTF-8 on the command line
            raise ValidationError(f"{_shown(err.object)} is not valid text ({err.reason})") from None

    # -- opening ------------------------------------------------------------

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        _prepare_store_file(self.path)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            version = self._checked_version(conn)
            if version == 0:
                # Must precede the first table, or SQLite ignores it.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            if version == SCHEMA_VERSION:
                _mark_as_ours(conn)  # a store from before the marker (a migration marks the others)
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                log.warning("store %s: WAL journal not available on this filesystem", self.path)
            conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            # A WAL grown by a large purge is cut back to this when it restarts.
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES:d}")
            if synchronous == "full" and sys.platform == "darwin":
                conn.execute("PRAGMA fullfsync = ON")
            if version < SCHEMA_VERSION:
                self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        log.debug("store %s open: schema %d, journal %s, synchronous %s, busy timeout %g s", self.path,
                  SCHEMA_VERSION, conn.execute("PRAGMA journal_mode").fetchone()[0], synchronous, self.busy_timeout_s)
        return conn

    def _connect_readonly(self) -> sqlite3.Connection:
        refuse_foreign_symlinks(self.path, "store")
        _refuse_special_file(self.path)
        if not os.path.exists(self.path):
            conn = sqlite3.connect(":memory:", isolation_level=None)
            self._migrate(conn)
            return conn
        from urllib.parse import quote

        uri = "file:" + quote(self.path) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            try:
                version = self._checked_version(conn)
            except sqlite3.OperationalError:
                if os.access(os.path.dirname(self.path) or ".", os.W_OK):
                    raise
                # A WAL store in a folder nobody can write: SQLite cannot make its
                # -shm file, and no writer can change the store, so read it as is.
                conn.close()
                conn = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)
                version = self._checked_version(conn)
            if version == 0:  # an empty file: it reads as an empty store
                conn.close()
                conn = sqlite3.connect(":memory:", isolation_level=None)
                self._migrate(conn)
                return conn
            if version < SCHEMA_VERSION:
                raise StorageError(
                    f"store {self.path} has schema {version}; run a recording command once to upgrade it",
                    self.path,
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _checked_version(self, conn: sqlite3.Connection) -> int:
        return _checked_schema_version(conn, self.path)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read inside the lock: another process may have migrated already.
            version = self._checked_version(conn)
            _mark_as_ours(conn)  # in the same transaction as the tables: never one without the other
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    if callable(statement):
                        statement(conn)
                    else:
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- use ------------------------------------------------------------------

    @property
    def connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"store {self.path} is closed", self.path)
        return self._conn

    def storage_error(self, err: sqlite3.Error, waited_s: Optional[float] = None) -> StorageError:
        """One line naming this store and what went wrong with it."""
        return _storage_error(err, self.path, self.busy_timeout_s, waited_s)

    @contextlib.contextmanager
    def _translating_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as err:
            raise self.storage_error(err) from err
        except UnicodeEncodeError as err:  # a lone surrogate: invalid UTF-8 on the command line
            raise ValidationError(f"{_shown(err.object)} is not valid text ({err.reason})") from None

    def write(self) -> "_WriteTransaction":
        """A write transaction: BEGIN IMMEDIATE, then COMMIT, or ROLLBACK on any error."""
        return _WriteTransaction(self)

    def query(self, sql: str, params: Iterable[Any] = ()) -> List[tuple]:
        """Run one read-only statement and return all its rows (``params``: a sequence for ``?``, a dict for
        ``:name``)."""
        with self._translating_errors():
            return self.connection.execute(sql, _bound(params)).fetchall()

    @contextlib.contextmanager
    def rows(self, sql: str, params: Iterable[Any] = ()) -> Iterator[Iterator[tuple]]:
        """Run one read-only statement; its rows come as SQLite finds them, so a caller that has what it
        needs stops the statement there (``with store.rows(...) as rows: for row in rows: ...``)."""
        with self._translating_errors():
            cursor = self.connection.execute(sql, _bound(params))
            try:
                yield cursor
            finally:
                cursor.close()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """One read transaction around the queries inside, so that they all see the store as it was at the
        first of them, whatever other processes commit meanwhile (inside a transaction already: that one)."""
        conn = self.connection
        if conn.in_transaction:
            yield
            return
        with self._translating_errors():
            conn.execute("BEGIN")
        try:
            yield
        finally:
            if conn.in_transaction:
                with self._translating_errors():
                    conn.execute("COMMIT")

    def query_one(self, sql: str, params: Iterable[Any] = ()) -> Optional[tuple]:
        """Run one read-only statement and return its first row, or None."""
        with self._translating_errors():
            return self.connection.execute(sql, _bound(params)).fetchone()

    def meta_times(self, *keys: str) -> Tuple[Optional[float], ...]:
        """Times the store keeps about itself (rolled_until, daily_until, last_cleanup); None if unset."""
        with self._translating_errors():
            return _meta_times(self.connection, *keys)

    def tier_marks(self) -> Tuple[Optional[float], Optional[float]]:
        """(rolled_until, daily_until): how far hours are rolled up and folded into days."""
        return self.meta_times("rolled_until", "daily_until")

    def reclaim_space(self) -> None:
        """Give free pages back and checkpoint the WAL, so the file shrinks after a purge."""
        with self._translating_errors():
            # executescript, not execute: the pragma frees one page per step, and
            # execute() steps a statement without result columns only once.
            self.connection.executescript("PRAGMA incremental_vacuum;")
            # PASSIVE never makes a writer wait; the WAL is cut back to
            # journal_size_limit the next time it restarts.
            self.connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def close(self) -> None:
        """Close the connection; the store cannot be used after this."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __del__(self) -> None:
        # The original design never closes its collectors: close here rather
        # than leave it to sqlite3's finaliser, which warns from Python 3.13.
        self.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


## Anomalies ##################################################################

class Baseline(NamedTuple):
    """What normal looks like: a centre and the divisor that turns a distance from it into a score.

    ``basis`` says how the divisor was found: ``stddev`` (z-score), ``mad``,
    ``mean_absolute_deviation`` (MAD was 0) or ``flat`` (every value equal:
    any other value is anomalous, and has no score).
    """

    method: str
    n: int
    center: float
    divisor: float
    basis: str
    spread: float

    def describe(self) -> Dict[str, Any]:
        """The baseline as the CLI's JSON shows it."""
        if self.method == "zscore":
            return {"n": self.n, "mean": self.center, "stddev": self.spread}
        described = {"n": self.n, "median": self.center, "mad": self.spread if self.basis == "mad" else 0.0}
        if self.basis == "mean_absolute_deviation":
            described["mean_absolute_deviation"] = self.spread
        return described


def zscore_baseline(values: List[float]) -> Baseline:
    """Mean and sample standard deviation, by two passes.

    >>> zscore_baseline([1.0, 2.0, 3.0]).divisor
    1.0
    """
    n = len(values)
    mean = math.fsum(values) / n
    stddev = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Baseline("zscore", n, mean, stddev, "stddev" if stddev else "flat", stddev)


def _middle(sorted_values: List[float]) -> float:
    n = len(sorted_values)
    return (sorted_values[(n - 1) // 2] + sorted_values[n // 2]) / 2


def _kth_of_two_runs(a, len_a: int, b, len_b: int, k: int) -> float:
    """The k-th smallest (from 0) of two ascending runs given as index functions."""
    low, high = max(0, k + 1 - len_b), min(k + 1, len_a)
    while True:
        taken_a = (low + high) // 2  # how many of the k + 1 smallest come from a
        taken_b = k + 1 - taken_a
        if taken_a < len_a and taken_b > 0 and b(taken_b - 1) > a(taken_a):
            low = taken_a + 1
        elif taken_a > 0 and taken_b < len_b and a(taken_a - 1) > b(taken_b):
            high = taken_a - 1
        else:
            last = [a(taken_a - 1)] if taken_a else []
            return max(last + ([b(taken_b - 1)] if taken_b else []))


def median_absolute_deviation(sorted_values: List[float], median: float) -> float:
    """MAD of sorted values without sorting the deviations again.

    Below the median the deviations rise as the values fall, above it they
    rise with the values: two sorted runs, so their middle is a k-th-element
    search, O(log n).

    >>> median_absolute_deviation([1.0, 2.0, 4.0, 7.0], 3.0)
    1.5
    """
    import bisect

    n = len(sorted_values)
    split = bisect.bisect_left(sorted_values, median)

    def below(i: int) -> float:
        return median - sorted_values[split - 1 - i]

    def above(j: int) -> float:
        return sorted_values[split + j] - median

    runs = (below, split, above, n - split)
    return (_kth_of_two_runs(*runs, (n - 1) // 2) + _kth_of_two_runs(*runs, n // 2)) / 2


def robust_baseline(sorted_values: List[float]) -> Baseline:
    """Median and MAD of sorted values; the mean absolute deviation where MAD is 0.

    >>> robust_baseline([1.0, 2.0, 3.0, 4.0, 100.0]).spread
    1.0
    """
    n = len(sorted_values)
    median = _middle(sorted_values)
    mad = median_absolute_deviation(sorted_values, median)
    if mad > 0:
        return Baseline("robust", n, median, mad / MAD_TO_Z, "mad", mad)
    mean_ad = math.fsum(abs(v - median) for v in sorted_values) / n
    if mean_ad > 0:
        return Baseline("robust", n, median, MEAN_AD_SCALE * mean_ad, "mean_absolute_deviation", mean_ad)
    return Baseline("robust", n, median, 0.0, "flat", 0.0)


def anomaly_score(value: float, baseline: Baseline) -> Optional[float]:
    """Distance from the baseline's centre in its units; None on a flat baseline."""
    return None if baseline.basis == "flat" else (value - baseline.center) / baseline.divisor


def is_anomalous(value: float, baseline: Baseline, threshold: float) -> bool:
    """Beyond the threshold; on a flat baseline, any value that differs."""
    score = anomaly_score(value, baseline)
    return value != baseline.center if score is None else abs(score) > threshold


def _reason_template(baseline: Baseline) -> str:
    """The reason with two blanks, the score and the side: built once per baseline."""
    if baseline.basis == "flat":
        return f"flat baseline: every other value is {baseline.center:g}"
    if baseline.method == "zscore":
        return "{:.2f} standard deviations {} the mean " + f"{baseline.center:g}"
    via = " (from the mean absolute deviation; MAD is 0)" if baseline.basis == "mean_absolute_deviation" else ""
    return "modified z-score {:.2f} {} the median " + f"{baseline.center:g}{via}"


def anomaly_reason(value: float, baseline: Baseline) -> str:
    """Why a value was flagged, in words."""
    side = "above" if value > baseline.center else "below"
    return _reason_template(baseline).format(abs(anomaly_score(value, baseline) or 0.0), side)


class AnomalyReport(list):
    """The flagged points (a list of dicts, as the original design returns), plus how they were found.

    ``insufficient_data`` is true when the window held fewer than the minimum
    number of samples: no verdict, which is not the same as "no anomalies".
    """

    def __init__(self, points: Iterable[Dict[str, Any]] = (), *, method: str, threshold: float,
                 baseline: Optional[Baseline], n: int, min_samples: int):
        super().__init__(points)
        self.method = method
        self.threshold = threshold
        self.baseline = baseline
        self.n = n
        self.min_samples = min_samples
        self.insufficient_data = baseline is None

    def as_json(self) -> Dict[str, Any]:
        """Method, threshold, baseline and the flagged points, as the CLI prints them."""
        return {
            "method": self.method,
            "threshold": self.threshold,
            "insufficient_data": self.insufficient_data,
            "min_samples": self.min_samples,
            "baseline": self.baseline.describe() if self.baseline else {"n": self.n},
            "anomalies": [{key: point[key] for key in ("time", "timestamp", "value", "score", "reason")}
                          for point in self],
        }


def check_method(method: str, threshold: Optional[float], min_samples: int) -> Tuple[str, float, int]:
    """Validate the detector's settings; the threshold defaults by method."""
    if method not in ANOMALY_METHODS:
        raise ValidationError(f"anomaly method must be one of {', '.join(ANOMALY_METHODS)}, got {_shown(method)}")
    if threshold is None:
        threshold = DEFAULT_ROBUST_THRESHOLD if method == "robust" else DEFAULT_Z_THRESHOLD
    threshold = finite_number(threshold, "threshold")
    if threshold <= 0:
        raise ValidationError(f"threshold must be positive, got {_shown(threshold)}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 2:
        raise ValidationError(f"min_samples must be a whole number of at least 2, got {_shown(min_samples)}")
    return method, threshold, min_samples


def flag_points(points: Iterable[Tuple[float, float]], baseline: Baseline, threshold: float) -> List[Dict[str, Any]]:
    """The (timestamp, value) points that the baseline calls anomalous, as result dicts."""
    template = _reason_template(baseline)
    flat = baseline.basis == "flat"
    flagged = []
    for ts, value in points:
        score = None if flat else (value - baseline.center) / baseline.divisor
        if value != baseline.center if flat else abs(score) > threshold:
            flagged.append({
                "value": value, "z_score": score, "score": score, "timestamp": ts, "time": iso_time(ts),
                "method": baseline.method,
                "reason": template.format(abs(score or 0.0), "above" if value > baseline.center else "below"),
            })
    return flagged


def find_anomalies(
    points: List[Tuple[float, float]],
    method: str = "robust",
    threshold: Optional[float] = None,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> AnomalyReport:
    """Flag the outliers among (timestamp, value) points, judged against all of them."""
    method, threshold, min_samples = check_method(method, threshold, min_samples)
    values = [value for _, value in points]
    if len(values) < min_samples:
        return AnomalyReport(method=method, threshold=threshold, baseline=None, n=len(values), min_samples=min_samples)
    baseline = robust_baseline(sorted(values)) if method == "robust" else zscore_baseline(values)
    return AnomalyReport(flag_points(points, baseline, threshold), method=method, threshold=threshold,
                         baseline=baseline, n=len(values), min_samples=min_samples)


## Metrics ####################################################################

_INSERT_NEW = "INSERT OR IGNORE INTO samples (series_id, ts, seq, value) VALUES (?, ?, 0, ?)"
_INSERT_NEXT_SEQ = """INSERT INTO samples (series_id, ts, seq, value)
    VALUES (?, ?, (SELECT coalesce(max(seq) + 1, 0) FROM samples WHERE series_id = ? AND ts = ?), ?)"""
# "Latest" everywhere (stats, the summary, the export): the newest sample taken by now, give or take the
# clock skew between processes; one stamped further ahead (a clock set wrong, year 9999) waits for its time
# instead of hiding every real one.
LATEST_SQL = f"AND ts <= ? + {CLOCK_SKEW_S!r} ORDER BY ts DESC, seq DESC LIMIT 1"
_IN_WINDOW = "series_id IN (SELECT id FROM series WHERE name = ?) AND ts >= ? AND ts <= ?"
# series.last_ts (schema 10): a series may lag behind its samples only if meta's lagging_series, a list of at
# most LAGGING_SERIES_MAX ids, names it; _keep_last_times() says why.
LAGGING_SERIES_MAX = 64
_LAGGING = "SELECT value FROM meta WHERE key = 'lagging_series'"
# A write's newest time of a series, where it is newer (NULL, no sample yet, is older than any); and, after
# deleting samples below a bound, the newest left where the newest went. Plain ? only: Python 3.12 takes ?1
# for a named parameter, and 3.14 refuses a sequence for it.
_NEWER = f"UPDATE series SET last_ts = ? WHERE id = ? AND NOT coalesce(last_ts >= ?, 0) AND {_TRACKED}"
_CATCH_UP_BELOW = ("UPDATE series SET last_ts = (SELECT max(ts) FROM samples WHERE series_id = ?) "
                   "WHERE id = ? AND last_ts < ?")
_OF_NAME = "series_id IN (SELECT id FROM series WHERE name = ?)"
_NEW_SERIES = (f"INSERT OR IGNORE INTO series (name, labels, own) SELECT name, labels, {_OWN_SERIES} "
               "FROM (SELECT ? AS name, ? AS labels)")
# Chan's pairwise update: every right-hand side sees the row as it was.
_MERGE_ROLLUP = """INSERT INTO rollups (series_id, span, bucket, n, total, m2, lo, hi, first_ts, last_ts, last_value)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (series_id, span, bucket) DO UPDATE SET
        n = n + excluded.n,
        total = total + excluded.total,
        m2 = m2 + excluded.m2 + (excluded.total / excluded.n - total / n) * (excluded.total / excluded.n - total / n)
             * (1.0 * n * excluded.n / (n + excluded.n)),
        lo = min(lo, excluded.lo),
        hi = max(hi, excluded.hi),
        first_ts = min(first_ts, excluded.first_ts),
        last_value = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last_value ELSE last_value END,
        last_ts = max(last_ts, excluded.last_ts)"""
# A sample kept raw for its hour back to a plain one: its seq after every plain one of its instant's.
_UNMARK_KEPT = f"""UPDATE samples SET seq = seq + {KEPT_SEQ_OFFSET:d} + 1 + coalesce(
        (SELECT max(seq) FROM samples AS plain WHERE plain.series_id = samples.series_id AND plain.ts = samples.ts
         AND plain.seq >= 0), -1)
    WHERE series_id = ? AND ts >= ? AND ts < ? AND seq < 0"""

# Whole days of hourly rollups into one daily row each: counts and sums add up,
# and the spread combines exactly (each hour's m2 plus n * (its mean - the day's mean)**2).
_FOLD_DAYS = """WITH RECURSIVE days(d) AS (
        SELECT :start UNION ALL SELECT d + 86400.0 FROM days WHERE d + 86400.0 < :end)
    INSERT INTO rollups (series_id, span, bucket, n, total, m2, lo, hi, first_ts, last_ts, last_value)
    SELECT :series, 86400, d, sum(n), total(total), 0.0, min(lo), max(hi), min(first_ts), max(last_ts), 0.0
    FROM days JOIN rollups ON rollups.series_id = :series AND rollups.span = 3600
        AND rollups.bucket >= d AND rollups.bucket < d + 86400.0
    GROUP BY d"""
_FINISH_DAYS = """UPDATE rollups SET
        m2 = (SELECT total(h.m2 + h.n * (h.total / h.n - rollups.total / rollups.n)
                                         * (h.total / h.n - rollups.total / rollups.n))
              FROM rollups AS h WHERE h.series_id = rollups.series_id AND h.span = 3600
              AND h.bucket >= rollups.bucket AND h.bucket < rollups.bucket + 86400.0),
        last_value = (SELECT h.last_value FROM rollups AS h WHERE h.series_id = rollups.series_id AND h.span = 3600
                      AND h.bucket >= rollups.bucket AND h.bucket < rollups.bucket + 86400.0
                      ORDER BY h.last_ts DESC LIMIT 1)
    WHERE series_id = :series AND span = 86400 AND bucket >= :start AND bucket < :end"""

# Sums are taken of values times a power of two (1 unless a plain sum overflowed): exact, and finite
# for any finite values.
_RAW_PASS = "SELECT count(*), total(value * ?), min(value), max(value), min(ts), max(ts) FROM samples WHERE "
_ROLLED_PASS = "SELECT total(n), total(total * ?), min(lo), max(hi), min(first_ts), max(last_ts) FROM rollups WHERE "
_RAW_SQUARES = "SELECT total((value * ? - ?) * (value * ? - ?)) FROM samples WHERE "
_ROLLED_SQUARES = "SELECT total(m2 * ? + n * (total * ? / n - ?) * (total * ? / n - ?)) FROM rollups WHERE "


class Sample(NamedTuple):
    """One measurement, as ``record_many`` takes it."""

    name: str
    value: float
    labels: Optional[Dict[str, str]] = None
    timestamp: Optional[float] = None


def percentile(sorted_values: List[float], fraction: float) -> Optional[float]:
    """The value below which ``fraction`` of the data lies, interpolated linearly.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.5
    """
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def bucket_start(ts: float, span: float = ROLLUP_SPAN_S) -> float:
    """Start of the ``span``-second bucket holding ``ts``, exact at the edges.

    >>> bucket_start(7199.5)
    3600.0
    """
    start = math.floor(ts / span) * span
    if start > ts:
        start -= span
    elif ts >= start + span:
        start += span
    return start


def _hours_of(rows: List[tuple]) -> Iterator[Tuple[float, List[tuple]]]:
    """(hour, its rows) for rows that start with a time, in time order; hours by comparison, as bucket_start().

    >>> [(hour, len(rows)) for hour, rows in _hours_of([(10.0,), (3599.5,), (3600.0,)])]
    [(0.0, 2), (3600.0, 1)]
    """
    group: List[tuple] = []
    hour, hour_end = 0.0, -math.inf
    for row in rows:
        if row[0] >= hour_end:
            if group:
                yield hour, group
            hour = bucket_start(row[0])
            hour_end, group = hour + ROLLUP_SPAN_S, []
        group.append(row)
    if group:
        yield hour, group


class Summary(NamedTuple):
    """Count, sum, centred sum of squares, extremes and ends of a set of samples."""

    n: int
    total: float
    m2: float
    lo: float
    hi: float
    first_ts: float
    last_ts: float
    last_value: float


def _total(values: List[float]) -> float:
    """The exact sum, rounded once; infinite where that is out of range (as SQLite's total() is).

    >>> _total([1e308, 1e308, 0.5])
    inf
    """
    try:
        return math.fsum(values)
    except OverflowError:
        return sum(values)


def summarise(points: List[Tuple[float, float]]) -> Summary:
    """Summary of (timestamp, value) points; the later of two equal times wins ``last_value``.

    >>> summarise([(1.0, 2.0), (2.0, 4.0)]).m2
    2.0
    """
    values = [value for _, value in points]
    total = _total(values)
    mean = total / len(values)
    last_ts, last_value = max(points, key=lambda point: point[0])
    for ts, value in points:
        if ts == last_ts:
            last_value = value
    return Summary(
        len(values), total, _total([(v - mean) * (v - mean) for v in values]), min(values), max(values),
        min(ts for ts, _ in points), last_ts, last_value,
    )



def _hourly_row(series_id: int, hour: float, points: List[tuple]) -> tuple:
    """The _MERGE_ROLLUP parameters of one hour of a series, from its (ts, seq, value) rows."""
    return (series_id, int(ROLLUP_SPAN_S), hour, *summarise([(ts, value) for ts, _, value in points]))

def validate_name(name: Any, what: str = "metric name") -> str:
    """Return ``name`` if it is a usable metric name, else raise ValidationError."""
    if not isinstance(name, str):
        raise ValidationError(f"{what} must be a string, got {type(name).__name__} {_shown(name)}")
    if not name:
        raise ValidationError(f"{what} is empty")
    if len(name) > MAX_NAME_CHARS:
        raise ValidationError(f"{what} {_shown(name)} is {len(name)} characters long; the limit is {MAX_NAME_CHARS}")
    if not name.isprintable():
        raise ValidationError(f"{what} {_shown(name)} holds a control or other non-printable character")
    return name


def json_text(document: Any, *, indent: Optional[int] = 2, compact: bool = False) -> str:
    """``document`` as strict JSON (RFC 8259: no Infinity, no NaN), keys sorted.

    A float past the range of a double (an average of values near 1e308 that rollups summed to
    infinity) becomes null, and a top-level ``notes`` list says which, so every reader can parse it.

    >>> json_text({"avg": float("inf"), "n": 2}, indent=None)
    '{"avg": null, "n": 2, "notes": ["avg: out of the range of a double"]}'
    """
    import json

    notes: List[str] = []
    clean = _finite_only(document, "", notes)
    if notes and isinstance(clean, dict):
        clean["notes"] = list(clean.get("notes") or []) + [f"{path}: out of the range of a double" for path in notes]
    separators = (",", ":") if compact else None
    return json.dumps(clean, sort_keys=True, indent=indent, allow_nan=False, separators=separators,
                      ensure_ascii=not compact)


def window_hours(hours: Any) -> float:
    """A query window in hours: finite and more than 0."""
    hours = finite_number(hours, "hours")
    if hours <= 0:
        raise ValidationError(f"hours must be positive, got {_shown(hours)}")
    return hours


def valid_timestamp(value: Any, what: str = "timestamp") -> float:
    """``value`` as epoch seconds if it falls in years 1970 to 9999, else raise ValidationError."""
    ts = non_negative(value, what)
    if ts >= MAX_TIMESTAMP_S:
        raise ValidationError(f"{what} must be before the year 10000 ({MAX_TIMESTAMP_S:.0f}), got {_shown(value)}")
    return ts


def whole_count(value: Any, what: str) -> int:
    number = non_negative(value, what)
    if not number.is_integer():
        raise ValidationError(f"{what} must be a whole number, got {_shown(value)}")
    return int(number)


def _flag(value: Any, what: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ValidationError(f"{what} must be True or False, got {_shown(value)}")


def _breaker_state_name(state: Any) -> str:
    return str(state).lower().replace("-", "_")


def _breaker_code(state: Any) -> int:
    """0, 1 or 2 for closed, open or half_open (``half-open`` and any case accepted)."""
    code = BREAKER_STATES.get(_breaker_state_name(state))
    if code is None:
        raise ValidationError(f"breaker state must be one of {', '.join(BREAKER_STATES)}, got {_shown(state)}")
    return code


def _is_label_key(key: str) -> bool:
    return (
        0 < len(key) <= MAX_LABEL_KEY_CHARS
        and key.isascii()
        and (key[0].isalpha() or key[0] == "_")
        and key.replace("_", "a").isalnum()
    )


def canonical_labels(labels: Optional[Dict[str, str]]) -> str:
    """Labels as the sorted, compact JSON text the store keys series on."""
    if labels is None:
        return _NO_LABELS
    if not isinstance(labels, dict):
        raise ValidationError(f"labels must be a dict of strings, got {type(labels).__name__}")
    if not labels:
        return _NO_LABELS
    if len(labels) > MAX_LABELS:
        raise ValidationError(f"{len(labels)} labels given; the limit is {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValidationError(f"label {_shown(key)}={_shown(value)} is not a pair of strings")
        if not _is_label_key(key):
            raise ValidationError(
                f"label key {_shown(key)} must be letters, digits and underscores, not starting with a digit"
            )
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise ValidationError(f"label {key} is {len(value)} characters long; the limit is {MAX_LABEL_VALUE_CHARS}")
    import json  # here, not at the top: a cron run that records no labels never needs it

    return json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _Lazy:
    """A value made by ``make()`` the first time it is asked for, then kept."""

    def __init__(self, make):
        self._make, self._made = make, None

    def __call__(self) -> Any:
        if self._made is None:
            self._made = self._make()
        return self._made


def _set_meta(conn: sqlite3.Connection, key: str, value: float) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, repr(value)))


def lagging_ids(text: Optional[str]) -> AbstractSet[int]:
    """The series ids of meta's lagging_series text.

    >>> sorted(lagging_ids("7,3")), lagging_ids(None)
    ([3, 7], frozenset())
    """
    return frozenset(int(part) for part in text.split(",")) if text else frozenset()


class _Range(NamedTuple):
    """Part of a window: whole rolled-up hours or days (span 3600, 86400), or raw samples (span 0); ``kept``:
    the samples kept raw in place of the rollups of whole hours (the roll-up's negative seq)."""

    span: int
    start: float
    end: float
    end_inclusive: bool
    kept: bool = False

    def where(self) -> str:
        if self.kept:
            return ("series_id IN (SELECT id FROM series JOIN raw_kept ON series_id = id WHERE name = ? "
                    "AND until >= ?) AND ts >= ? AND ts < ? AND seq < 0")
        column = "bucket" if self.span else "ts"
        span = f" AND span = {self.span:d}" if self.span else ""
        return f"{_OF_NAME}{span} AND {column} >= ? AND {column} {'<=' if self.end_inclusive else '<'} ?"

    def tier(self) -> str:
        """The tier that answers for this part: samples kept for their hours stand in for the hourly one."""
        return TIER_NAMES[int(ROLLUP_SPAN_S) if self.kept else self.span]

    def params(self, name: str) -> Tuple[Any, ...]:
        """The parameters of where(), for metric ``name``."""
        return (name, self.start, self.start, self.end) if self.kept else (name, self.start, self.end)

    def is_empty(self) -> bool:
        return self.start > self.end or (self.start == self.end and not self.end_inclusive)


def _whole_buckets(start: float, end: float, span: float, limit: float) -> Optional[Tuple[float, float]]:
    """First and stop of the whole ``span`` buckets inside [start, end] that begin before ``limit``."""
    first = bucket_start(start, span)
    if first < start:
        first += span
    stop = min(bucket_start(end, span), limit)
    return (first, stop) if first < stop else None


def _scale_exponent(*values: float) -> int:
    """The power of two that brings every finite value in ``values`` within [-1, 1]."""
    return max((math.frexp(value)[1] for value in values if math.isfinite(value)), default=0)


def _unscaled(value: float, exponent: int) -> float:
    """``value * 2**exponent``; infinity where that is past the largest double."""
    try:
        return math.ldexp(value, exponent)
    except OverflowError:
        return math.copysign(math.inf, value)


class MetricsCollector:
    """Records metrics in the SQLite store and answers questions about them.

    Metric names follow the original design: ``record_sync_metric('icloud',
    ...)`` stores the duration as ``sync_icloud_success`` or
    ``sync_icloud_failure``, so ``get_success_rate('sync_icloud')`` and
    ``get_metric_stats('sync_icloud_success')`` work as its examples show.

    Writing also keeps the store tidy: the first write of each hour rolls up
    closed hours, the first of each day runs ``cleanup()``.  ``maintain=False``
    leaves that to a scheduled ``cleanup`` instead.
    """

    def __init__(
        self,
        db_path: Optional[str] = None,
        *,
        readonly: bool = False,
        synchronous: str = "normal",
        retention_days: float = DEFAULT_RETENTION_DAYS,
        hourly_days: float = DEFAULT_HOURLY_DAYS,
        daily_days: float = DEFAULT_DAILY_DAYS,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        maintain: bool = True,
        now=time.time,
        clock=time.monotonic,
    ):
        self.db_path = resolve_db_path(db_path)
        self.maintain = maintain
        self.retention_days = non_negative(retention_days, "retention_days")
        self.hourly_days = non_negative(hourly_days, "hourly_days")
        self.daily_days = non_negative(daily_days, "daily_days")
        self._now = now
        self._clock = clock
        self._series: Dict[Tuple[str, str], int] = {}
        self._plain_series: Dict[str, int] = {}
        self._label_texts: Dict[tuple, str] = {}
        # The lagging series as last read from the store, and whether the list was full: it only grows, so
        # what was read stays true. The series that keep no last_ts (_TRACKED), as this collector learned
        # them: a write looks at none of these, nor at the lagging ones.
        self._lagging: AbstractSet[int] = frozenset()
        self._lagging_full = False
        self._untracked: set = set()
        self._unkept: AbstractSet[int] = frozenset()
        self._next_maintenance = clock()
        self.store = Store(self.db_path, readonly=readonly, synchronous=synchronous, busy_timeout_s=busy_timeout_s)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "MetricsCollector":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- recording ------------------------------------------------------------

    def record(
        self,
        name: str,
        value: float,
        labels: Optional[Dict[str, str]] = None,
        timestamp: Optional[float] = None,
    ) -> None:
        """Store one sample; it is committed when this returns."""
        self.record_many(((name, value, labels, timestamp),))

    def record_many(self, samples: Iterable[Any]) -> int:
        """Store many samples in one transaction: all of them, or none if one is bad.

        Each sample is a ``Sample`` or a tuple ``(name, value[, labels[, timestamp]])``.
        Returns how many were stored.
        """
        prepared = self._prepare(samples)
        if not prepared[0]:
            return 0
        with self.store.write() as conn:  # writing() without its generator: this is the hot path
            created = self._write_prepared(conn, *prepared)
        self._remember(created)
        self._maintain_if_due()
        return len(prepared[0])

    def writing(self, samples: Iterable[Any] = ()) -> ContextManager[sqlite3.Connection]:
        """One write transaction: ``samples`` (validated before it starts) and whatever the caller writes
        on the connection it yields are committed together, or none of it."""
        return self._writing(self._prepare(samples))

    @contextlib.contextmanager
    def _writing(self, prepared: Tuple[List[tuple], List[int], float, Optional[float]]
                 ) -> Iterator[sqlite3.Connection]:
        with self.store.write() as conn:
            created = self._write_prepared(conn, *prepared) if prepared[0] else {}
            yield conn
        self._remember(created)
        self._maintain_if_due()

    def _write_prepared(self, conn: sqlite3.Connection, rows: List[tuple], new_keys: List[int], oldest: float,
                        now: Optional[float]) -> Dict[Tuple[str, str], Tuple[int, bool]]:
        """Write rows from _prepare() inside the caller's transaction; return the series it looked up by name
        (new to this collector), each with its id and whether it keeps a last_ts."""
        created: Dict[Tuple[str, str], Tuple[int, bool]] = {}
        for i in new_keys:
            key, ts, value = rows[i]
            if key not in created:
                created[key] = self._series_id(conn, key)
            rows[i] = (created[key][0], ts, value)
        self._insert_rows(conn, rows)
        # Series that lag, or keep no last_ts: nothing to keep, and no call (the steady state of most writes).
        if rows[0][0] not in self._unkept if len(rows) == 1 else not self._unkept.issuperset([row[0] for row in rows]):
            self._keep_last_times(conn, rows, {series_id for series_id, tracked in created.values() if not tracked})
        if oldest < (self._now() if now is None else now) - ROLLUP_GRACE_S:
            self._merge_late_rows(conn, rows)
        return created

    def _remember(self, created: Dict[Tuple[str, str], Tuple[int, bool]]) -> None:
        """Cache new series ids, and which of them keep no last_ts; only after COMMIT, as a rolled-back id may
        be taken by another process."""
        if created:
            self._series.update((key, sid) for key, (sid, _) in created.items())
            self._plain_series.update((key[0], sid) for key, (sid, _) in created.items() if key[1] == _NO_LABELS)
            self._untracked.update(sid for sid, tracked in created.values() if not tracked)
            self._unkept = self._lagging | self._untracked

    def _prepare(self, samples: Iterable[Any]) -> Tuple[List[tuple], List[int], float, Optional[float]]:
        """Validate every sample before anything is written; one pass, as it is the hot path.

        Returns rows of (series id, time, value), where a series not known yet
        stands as its (name, labels) key and its index is in the second list;
        then the oldest time, and the clock reading used for samples given
        without a time (or None).
        """
        now = None
        oldest = math.inf
        known, plain = self._series, self._plain_series
        rows: List[tuple] = []
        new_keys: List[int] = []
        for sample in samples:
            size = len(sample) if isinstance(sample, (tuple, list)) else 0
            if size == 4:
                name, value, labels, ts = sample
            elif size == 2:
                (name, value), labels, ts = sample, None, None
            elif size == 3:
                (name, value, labels), ts = sample, None
            else:
                raise ValidationError(
                    f"sample {len(rows)} is not (name, value[, labels[, timestamp]]): {_shown(sample)}")
            if labels is None:
                series = plain.get(name)
                key = (name, _NO_LABELS)
            else:
                key = (name, self._label_text(labels))
                series = known.get(key)
            if series is None:
                validate_name(name)
                new_keys.append(len(rows))
                series = key
            # Fast checks first: x - x is 0.0 only for a finite float.
            if type(value) is not float or value - value != 0.0:
                value = finite_number(value, f"value of {name}")
            if ts is None:
                if now is None:
                    now = self._now()
                ts = now
            elif type(ts) is not float or not 0.0 <= ts < MAX_TIMESTAMP_S:
                ts = valid_timestamp(ts)
            if ts < oldest:
                oldest = ts
            rows.append((series, ts, value))
        return rows, new_keys, oldest, now

    def _label_text(self, labels: Any) -> str:
        """canonical_labels(), remembered: most callers repeat the same few label sets."""
        try:
            cache_key = tuple(sorted(labels.items()))
            text = self._label_texts.get(cache_key)
        except (AttributeError, TypeError):
            return canonical_labels(labels)
        if text is None:
            text = canonical_labels(labels)
            if len(self._label_texts) < LABEL_CACHE_SIZE:
                self._label_texts[cache_key] = text
        return text

    @staticmethod
    def _series_id(conn: sqlite3.Connection, key: Tuple[str, str]) -> int:
        """The id of series (name, labels), created if it is new (whether it is the user's own said, and its
        labels put in label_values), and whether it keeps a last_ts."""
        if conn.execute(_NEW_SERIES, key).rowcount and key[1] != _NO_LABELS:
            import json

            conn.executemany("INSERT OR IGNORE INTO label_values (key, value) VALUES (?, ?)",
                             json.loads(key[1]).items())
        series_id, tracked = conn.execute(f"SELECT id, {_TRACKED} FROM series WHERE name = ? AND labels = ?",
                                          key).fetchone()
        return series_id, bool(tracked)

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, rows: List[Tuple[int, float, float]]) -> None:
        """Insert (series id, time, value) rows; a sample at an instant already taken gets the next seq."""
        if len(rows) == 1:
            before = conn.total_changes
            conn.execute(_INSERT_NEW, rows[0])
            if conn.total_changes == before:
                series_id, ts, value = rows[0]
                conn.execute(_INSERT_NEXT_SEQ, (series_id, ts, series_id, ts, value))
            return
        conn.execute("SAVEPOINT insert_samples")
        before = conn.total_changes
        conn.executemany(_INSERT_NEW, rows)
        if conn.total_changes - before != len(rows):
            # Some samples share a series and an instant: rare, so the slow way.
            conn.execute("ROLLBACK TO insert_samples")
            conn.executemany(_INSERT_NEXT_SEQ, ((sid, ts, sid, ts, value) for sid, ts, value in rows))
        conn.execute("RELEASE insert_samples")

    def _keep_last_times(self, conn: sqlite3.Connection, rows: List[Tuple[int, float, float]],
                         untracked: AbstractSet[int]) -> None:
        """Keep series.last_ts right for the series that ``rows`` were inserted into, in their transaction
        (``untracked``: those of them new to this collector that keep none).

        Only the series _TRACKED names keep one: the user's own and those of failures; a success, a file
        count, a breaker's state writes no series row. Catching a last_ts up adds a page or two to the
        commit, which would double the cost of a record(). So the first LAGGING_SERIES_MAX of those series a
        store is written to lag instead, for good: meta's lagging_series lists them, readers ask their
        samples, and as the list only ever grows, a writer that saw a series in it trusts that without
        another read: writing it again costs nothing more. Every other one's last_ts moves to the newest
        time of its rows where that is newer: an older sample, or a second one at the same instant, leaves
        it.
        """
        written = {row[0] for row in rows} - self._unkept - untracked  # _write_prepared() saw some to keep
        if written and not self._lagging_full:
            row = conn.execute(_LAGGING).fetchone()
            text = "" if row is None else row[0]
            self._lagging = lagging_ids(text)
            self._lagging_full = len(self._lagging) >= LAGGING_SERIES_MAX
            self._unkept = self._lagging | self._untracked
            written -= self._lagging
            joining = sorted(written)[:LAGGING_SERIES_MAX - len(self._lagging)]
            if joining:  # read as listed the next time, once committed
                text = ",".join(([text] if text else []) + [str(series_id) for series_id in joining])
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('lagging_series', ?)", (text,))
                written.difference_update(joining)
        if written:
            newest: Dict[int, float] = {}
            for series_id, ts, _ in rows:
                if series_id in written and not ts <= newest.get(series_id, -1.0):
                    newest[series_id] = ts
            conn.executemany(_NEWER, [(ts, series_id, ts) for series_id, ts in sorted(newest.items())])

    def lagging_series(self) -> AbstractSet[int]:
        """The ids of the series whose last_ts may lag behind their samples (at most LAGGING_SERIES_MAX): a
        reader of last_ts asks their samples instead."""
        row = self.store.query_one(_LAGGING)
        return lagging_ids(None if row is None else row[0])

    @staticmethod
    def _merge_late_rows(conn: sqlite3.Connection, rows: List[Tuple[int, float, float]]) -> None:
        """Fold samples that arrive for hours already rolled up into the rollup that covers them.

        That is their hour, or their day where the hours were folded into days.
        """
        rolled_until, daily_until, deleted_until, cursor, cursor_ts, chunk_start, chunk_end = _meta_times(
            conn, "rolled_until", "daily_until", "raw_deleted_until", "rollup_cursor", "rollup_cursor_ts",
            "rollup_chunk_start", "rollup_chunk_end")
        if rolled_until is None and cursor is None:
            return
        if deleted_until is not None and any(ts < deleted_until for _, ts, _ in rows):
            # Older than what the cleanup has deleted: the next one looks at every series again.
            conn.execute("DELETE FROM meta WHERE key = 'raw_deleted_until'")
        late: Dict[Tuple[int, int, float], List[Tuple[float, float]]] = {}
        for series_id, ts, value in rows:
            # Before the roll-up's mark, or in the range it is doing, where it has done this series' hour.
            if (rolled_until is not None and ts < rolled_until) or (
                    cursor is not None and chunk_start <= ts < chunk_end and (series_id < cursor or (
                        series_id == cursor and (cursor_ts is None or ts < cursor_ts)))):
                span = DAY_S if daily_until is not None and ts < daily_until else ROLLUP_SPAN_S
                late.setdefault((series_id, int(span), bucket_start(ts, span)), []).append((ts, value))
        for (series_id, span, bucket), points in late.items():
            conn.execute(_MERGE_ROLLUP, (series_id, span, bucket, *summarise(points)))

    def record_sync_metric(
        self,
        target: str,
        success: bool,
        duration: float,
        files_synced: int = 0,
        conflicts: int = 0,
        *,
        timestamp: Optional[float] = None,
    ) -> None:
        """Record one sync run: its duration under ``sync_TARGET_success`` or ``_failure``."""
        validate_name(target, "sync target")
        outcome = "success" if _flag(success, "success") else "failure"
        labels = {"target": target}
        prefix = f"sync_{target}_"
        self.record_many(
            (
                (prefix + outcome, non_negative(duration, "duration"), labels, timestamp),
                (prefix + "files", whole_count(files_synced, "files_synced"), labels, timestamp),
                (prefix + "conflicts", whole_count(conflicts, "conflicts"), labels, timestamp),
            )
        )

    def record_circuit_breaker_metric(
        self,
        breaker_name: str,
        state: str,
        failure_count: int = 0,
        *,
        timestamp: Optional[float] = None,
        previous_state: Optional[str] = None,
        reason: str = "",
    ) -> None:
        """Record a breaker's state (0 closed, 1 open, 2 half_open) and failure count.

        With ``previous_state``, the change is also kept as a transition
        (from, to, reason, time), in the same transaction.
        """
        with self.store.write() as conn:
            created = self._breaker_change(conn, breaker_name, previous_state, state, failure_count, reason, timestamp)
        self._remember(created)
        self._maintain_if_due()

    def record_breaker_change(self, conn: sqlite3.Connection, breaker_name: str, previous_state: Optional[str],
                              state: str, failure_count: int, reason: str, timestamp: float) -> None:
        """As record_circuit_breaker_metric(), inside the caller's write transaction on ``conn`` (a
        CircuitBreaker's own, so its state and the samples saying so commit together)."""
        self._breaker_change(conn, breaker_name, previous_state, state, failure_count, reason, timestamp)

    def _breaker_change(self, conn: sqlite3.Connection, breaker_name: str, previous_state: Optional[str], state: str,
                        failure_count: int, reason: str, timestamp: Optional[float]
                        ) -> Dict[Tuple[str, str], Tuple[int, bool]]:
        """Write a breaker's state samples, and its transition when it has a previous state."""
        validate_name(breaker_name, "breaker name")
        code = _breaker_code(state)
        labels = {"breaker": breaker_name}
        prefix = f"circuit_breaker_{breaker_name}_"
        prepared = self._prepare((
            (prefix + "state", code, labels, timestamp),
            (prefix + "failures", whole_count(failure_count, "failure_count"), labels, timestamp),
        ))
        created = self._write_prepared(conn, *prepared)
        if previous_state is not None:
            _breaker_code(previous_state)
            conn.execute(
                "INSERT INTO breaker_transitions (name, ts, from_state, to_state, reason, failures) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (breaker_name, prepared[0][0][1], _breaker_state_name(previous_state), _breaker_state_name(state),
                 str(reason), int(failure_count)),
            )
        return created

    def record_agent_metric(
        self,
        agent_name: str,
        duration: float,
        success: bool,
        items_processed: int = 0,
        *,
        timestamp: Optional[float] = None,
    ) -> None:
        """Record one agent run: its duration under ``agent_NAME_success`` or ``_failure``."""
        validate_name(agent_name, "agent name")
        outcome = "success" if _flag(success, "success") else "failure"
        labels = {"agent": agent_name}
        prefix = f"agent_{agent_name}_"
        self.record_many(
            (
                (prefix + outcome, non_negative(duration, "duration"), labels, timestamp),
                (prefix + "items", whole_count(items_processed, "items_processed"), labels, timestamp),
            )
        )

    # -- querying -------------------------------------------------------------

    def now(self) -> float:
        """The wall-clock time this collector stamps samples with (its ``now`` function)."""
        return self._now()

    def window(self, hours: float) -> Tuple[float, float]:
        """(since, until) of the last ``hours`` by this collector's clock."""
        hours = window_hours(hours)
        until = self._now()
        return until - hours * 3600.0, until

    def _ranges(self, since: float, until: float) -> List[_Range]:
        """Split [since, until] into whole days and hours already rolled up, and raw samples.

        Before the hourly horizon only days remain, so such a window starts at
        its first whole day.
        """
        rolled_until, daily_until = self.store.tier_marks()
        parts: List[_Range] = []
        start = since
        days = None if daily_until is None else _whole_buckets(since, until, DAY_S, daily_until)
        if days:
            parts += self._hours_and_raw(since, days[0], False, rolled_until)
            parts.append(_Range(int(DAY_S), days[0], days[1], False))
            start = days[1]
        parts += self._hours_and_raw(start, until, True, rolled_until)
        return [part for part in parts if not part.is_empty()]

    @staticmethod
    def _hours_and_raw(start: float, end: float, end_inclusive: bool, rolled_until: Optional[float]) -> List[_Range]:
        hours = None if rolled_until is None else _whole_buckets(start, end, ROLLUP_SPAN_S, rolled_until)
        if not hours:
            return [_Range(0, start, end, end_inclusive)]
        return [_Range(0, start, hours[0], False), _Range(int(ROLLUP_SPAN_S), *hours, False),
                _Range(0, *hours, False, kept=True), _Range(0, hours[1], end, end_inclusive)]

    def _first_pass(self, name: str, ranges: List[_Range], scale: float = 1.0) -> Tuple[
            int, float, Optional[float], Optional[float], Optional[float], Optional[float], List[str]]:
        """Count, sum (of values times ``scale``), min, max, first and last time over every range, and the
        tiers that held data."""
        count, total, lows, highs, firsts, lasts, tiers = 0, 0.0, [], [], [], [], []
        for part in ranges:
            n, part_total, low, high, first, last = self.store.query_one(
                (_ROLLED_PASS if part.span else _RAW_PASS) + part.where(), (scale, *part.params(name)))
            if n:
                count += int(n)
                total += part_total
                lows.append(low)
                highs.append(high)
                firsts.append(first)
                lasts.append(last)
                tiers.append(part.tier())
        tiers = sorted(set(tiers))
        if not count:
            return 0, 0.0, None, None, None, None, tiers
        return count, total, min(lows), max(highs), min(firsts), max(lasts), tiers

    def _squared_deviations(self, name: str, ranges: List[_Range], mean: float, scale: float = 1.0) -> float:
        """Sum of ((x - mean) * scale)**2 over every range: the second of two passes."""
        center = mean * scale
        return math.fsum(
            self.store.query_one(*(
                (_ROLLED_SQUARES + part.where(), (scale * scale, scale, center, scale, center, *part.params(name)))
                if part.span else
                (_RAW_SQUARES + part.where(), (scale, center, scale, center, *part.params(name)))
            ))[0]
            for part in ranges
        )

    def _mean(self, name: str, ranges: List[_Range], count: int, total: float, low: float, high: float) -> float:
        """The mean from the first pass; near the float limit, where the plain sum overflowed, from a scaled
        one (infinite only where rollups already hold an infinite sum)."""
        if math.isfinite(total):
            return total / count
        exponent = _scale_exponent(low, high)
        return _unscaled(self._first_pass(name, ranges, math.ldexp(1.0, -exponent))[1] / count, exponent)

    def _stddev(self, name: str, ranges: List[_Range], count: int, mean: float, low: float, high: float) -> float:
        """The sample standard deviation around ``mean``, scaled as _mean() is where squares overflow."""
        if not math.isfinite(mean):
            return math.inf
        squares = self._squared_deviations(name, ranges, mean)
        if math.isfinite(squares):
            return math.sqrt(squares / (count - 1))
        exponent = _scale_exponent(low, high, mean)
        squares = self._squared_deviations(name, ranges, mean, math.ldexp(1.0, -exponent))
        return _unscaled(math.sqrt(squares / (count - 1)), exponent)

    def _value_at(self, name: str, ts: float) -> Optional[float]:
        """The value of ``name`` at ``ts`` (the last recorded, if several), raw or rolled up."""
        row = self.store.query_one(
            f"SELECT value FROM samples WHERE {_OF_NAME} AND ts = ? ORDER BY seq DESC LIMIT 1", (name, ts)
        ) or self.store.query_one(f"SELECT last_value FROM rollups WHERE {_OF_NAME} AND last_ts = ?", (name, ts))
        return None if row is None else row[0]

    def get_metric_stats(self, name: str, hours: float = DEFAULT_WINDOW_HOURS, *,
                         percentiles: bool = False) -> Dict[str, Any]:
        """Count, avg, min, max, stddev and latest of ``name`` over the last ``hours``.

        Whole days and hours come from the rollups, the edges from raw samples;
        ``tiers`` says which of raw, hourly and daily held data.
        An empty window gives count 0 and None for the rest.  ``stddev`` is the
        sample standard deviation (None below two samples), from two passes.
        ``p50`` and ``p95`` are added when ``percentiles`` is true, at the cost
        of reading every raw value in the window.
        """
        since, until = self.window(hours)
        ranges = self._ranges(since, until)
        count, total, low, high, first, last, tiers = self._first_pass(name, ranges)
        stats: Dict[str, Any] = {
            "count": count,
            "avg": self._mean(name, ranges, count, total, low, high) if count else None,
            "min": low,
            "max": high,
            "stddev": None,
            "latest": None if last is None else self._value_at(name, last),
            "first_time": iso_time(first),
            "last_time": iso_time(last),
            "tiers": tiers,
        }
        if count > 1:
            stats["stddev"] = self._stddev(name, ranges, count, stats["avg"], low, high)
        if percentiles:
            values = sorted(row[0] for row in self.store.query(f"SELECT value FROM samples WHERE {_IN_WINDOW}",
                                                               (name, since, until)))
            stats.update(p50=percentile(values, 0.50), p95=percentile(values, 0.95))
        return stats

    def count_samples(self, name: str, hours: float = DEFAULT_WINDOW_HOURS) -> int:
        """How many samples of ``name`` fall in the last ``hours``."""
        since, until = self.window(hours)
        return self._first_pass(name, self._ranges(since, until))[0]

    def detect_anomalies(
        self,
        metric_name: str,
        hours: float = DEFAULT_WINDOW_HOURS,
        std_dev_threshold: float = DEFAULT_Z_THRESHOLD,
        *,
        method: str = "zscore",
        threshold: Optional[float] = None,
        min_samples: int = DEFAULT_MIN_SAMPLES,
    ) -> "AnomalyReport":
        """Samples of the last ``hours`` that stand out from the rest of the window.

        As the original design calls it, a z-score against the window's mean
        and standard deviation with ``std_dev_threshold``.  ``method="robust"``
        uses the modified z-score (median and MAD, threshold 3.5), which small
        samples and clusters of outliers do not fool.  Returns a list of dicts
        (``value``, ``z_score``, ``timestamp``, ``time``, ``method``, ``score``,
        ``reason``) that also says whether there was enough data to judge.
        """
        if method == "zscore" and threshold is None:
            threshold = std_dev_threshold
        method, threshold, min_samples = check_method(method, threshold, min_samples)
        since, until = self.window(hours)
        if method == "zscore":
            baseline = self._zscore_baseline(metric_name, since, until)
        else:
            baseline = self._robust_baseline(metric_name, since, until)
        n = baseline.n if baseline else 0
        if baseline is None or n < min_samples:
            return AnomalyReport(method=method, threshold=threshold, baseline=None, n=n, min_samples=min_samples)
        if baseline.basis == "flat":
            where, bounds = "value != ?", (baseline.center,)
        else:
            where, bounds = "abs(value - ?) > ?", (baseline.center, _CANDIDATE_MARGIN * threshold * baseline.divisor)
        candidates = self.store.query(
            f"SELECT ts, value FROM samples WHERE {_IN_WINDOW} AND {where} ORDER BY ts, seq",
            (metric_name, since, until, *bounds),
        )
        return AnomalyReport(flag_points(candidates, baseline, threshold), method=method, threshold=threshold,
                             baseline=baseline, n=n, min_samples=min_samples)

    def _zscore_baseline(self, name: str, since: float, until: float) -> Optional["Baseline"]:
        """Mean and standard deviation of the window, from the rollups where they can serve."""
        ranges = self._ranges(since, until)
        count, total, low, high = self._first_pass(name, ranges)[:4]
        if not count:
            return None
        mean = self._mean(name, ranges, count, total, low, high)
        stddev = self._stddev(name, ranges, count, mean, low, high) if count > 1 else 0.0
        return Baseline("zscore", count, mean, stddev, "stddev" if stddev else "flat", stddev)

    def _robust_baseline(self, name: str, since: float, until: float) -> Optional["Baseline"]:
        """Median and MAD of the raw samples in the window: order statistics need every value."""
        query = f"SELECT value FROM samples WHERE {_IN_WINDOW}"
        values = [row[0] for row in self.store.query(query, (name, since, until))]
        if not values:
            return None
        values.sort()
        return robust_baseline(values)

    def get_success_rate(self, name: str, hours: float = DEFAULT_WINDOW_HOURS) -> Optional[float]:
        """Percentage of ``NAME_success`` among ``NAME_success`` and ``NAME_failure``.

        None when the window holds no attempt at all: 0 % would claim every
        attempt failed and raise a false alarm.
        """
        successes, attempts = self.success_counts(name, hours)
        return None if attempts == 0 else 100.0 * successes / attempts

    def success_counts(self, name: str, hours: float = DEFAULT_WINDOW_HOURS) -> Tuple[int, int]:
        """(successes, attempts) of ``name`` in the last ``hours``."""
        successes = self.count_samples(f"{name}_success", hours)
        failures = self.count_samples(f"{name}_failure", hours)
        return successes, successes + failures

    def metric_names(self) -> List[str]:
        """Every metric name ever recorded, from the series table (no sample is read)."""
        return [name for (name,) in self.store.query("SELECT DISTINCT name FROM series ORDER BY name")]

    def list_metrics(self) -> List[Dict[str, Any]]:
        """Every metric name with how many series (label sets) it has and the time of its last sample:
        from the series table and one index seek per series, however many samples there are. A name
        whose raw samples are all gone (only rollups left) shows no time."""
        rows = self.store.query(
            "SELECT name, count(*), max((SELECT max(ts) FROM samples WHERE series_id = series.id)) FROM series "
            "GROUP BY name ORDER BY name")
        return [{"name": name, "series": count, "last_time": iso_time(last)} for name, count, last in rows]

    def latest(self, name: str) -> Optional[Tuple[float, float]]:
        """(timestamp, value) of the newest sample of ``name`` taken by now (LATEST_SQL), or None."""
        return self.store.query_one(
            f"SELECT ts, value FROM samples WHERE series_id IN (SELECT id FROM series WHERE name = ?) {LATEST_SQL}",
            (name, self._now()),
        )

    def future_sample_time(self, name: str) -> Optional[float]:
        """The first sample of ``name`` stamped past now and the clock skew (a clock set wrong), or None."""
        row = self.store.query_one(f"SELECT min(ts) FROM samples WHERE {_OF_NAME} AND ts > ?",
                                   (name, self._now() + CLOCK_SKEW_S))
        return None if row is None else row[0]

    def last_sample_time(self, name: str) -> Optional[float]:
        """When the newest sample of ``name`` was taken, or None."""
        latest = self.latest(name)
        return latest[0] if latest else None

    def sync_targets(self) -> List[str]:
        """Every sync target ever recorded (the ``target`` label)."""
        return self.entities("target")["target"]

    def baseline(self, name: str, hours: float = DEFAULT_WINDOW_HOURS) -> Optional["Baseline"]:
        """The robust baseline (median, MAD) of ``name`` over the window, or None without samples."""
        return self._robust_baseline(name, *self.window(hours))

    def unchanged_since(self, name: str, value: float) -> Optional[float]:
        """When ``name`` last took ``value``: the first sample after the last one that differed.

        Ordered by (time, seq), so two changes at the same instant are told apart.
        """
        differing = self.store.query_one(
            f"SELECT ts, seq FROM samples WHERE {_OF_NAME} AND value != ? ORDER BY ts DESC, seq DESC LIMIT 1",
            (name, value),
        )
        if differing is None:
            return self.store.query_one(f"SELECT min(ts) FROM samples WHERE {_OF_NAME}", (name,))[0]
        return self.store.query_one(
            f"SELECT min(ts) FROM samples WHERE {_OF_NAME} AND (ts > ? OR (ts = ? AND seq > ?))",
            (name, differing[0], differing[0], differing[1]),
        )[0]

    def get_system_summary(self, hours: float = DEFAULT_WINDOW_HOURS) -> Dict[str, Any]:
        """The current state of sync targets, circuit breakers, agents, recent alerts and health.

        This is the one summary that the dashboard, ``--summary`` and
        exporters read, so they always agree (``system_summary``).
        """
        # The one reference down the file from Metrics: the original design's method, kept, while the
        # summary itself is built in its own section from the collector's public queries.
        return system_summary(self, hours)

    def entities(self, *labels: str) -> Dict[str, List[str]]:
        """For each label (target, breaker, agent): the names it carries across all series, sorted (SQLite
        compares UTF-8 bytes, which sort as the code points that Python compares)."""
        return {label: [value for (value,) in self.store.query(
            "SELECT value FROM label_values WHERE key = ? ORDER BY value", (label,))] for label in labels}

    # -- rollups and retention -------------------------------------------------

    def roll_up(self, slices: Optional[int] = None) -> int:
        """Summarise the closed hours of every series into the rollups; return how many rows were added.

        An hour is closed a minute after it ends. An hour that holds at most
        RAW_KEPT_SAMPLES samples, between hours that hold no more, gets no
        row: its samples are kept raw in its place (marked by a negative seq,
        the series listed in raw_kept) until the hourly horizon, where they
        fold into days with the rest, so a sparse series costs one row a
        sample instead of two. The work goes series by series over the whole
        time still to do, in slices of at most ROLLUP_SERIES_PER_SLICE series
        and about ROLLUP_ROWS_PER_SLICE samples, one transaction each, so its
        cost follows the samples, and a writer never waits long behind it;
        ``slices`` bounds how many this call does (a write does one, and leaves
        the rest to the next writes and to cleanup). Until every series is
        done, ``rolled_until`` stays where it was and queries read the raw
        samples. Takes no write lock when there is nothing to do.
        """
        target = bucket_start(self._now() - ROLLUP_GRACE_S)
        added = done = 0
        while slices is None or done < slices:
            current, cursor = self.store.meta_times("rolled_until", "rollup_cursor")
            if cursor is None and current is not None and current >= target:
                break
            with self.store.write() as conn:
                count, finished = self._roll_up_slice(conn, target)
            added, done = added + count, done + 1
            if finished:
                break
        return added

    def _roll_up_slice(self, conn: sqlite3.Connection, target: float) -> Tuple[int, bool]:
        """One slice of the roll-up, in the caller's transaction: (rows added, nothing left to do).

        The meta marks say where it stands: the range [rollup_chunk_start,
        rollup_chunk_end) is done for the series before ``rollup_cursor``, and
        for that series below ``rollup_cursor_ts`` (all of it when unset).
        """
        rolled_until, cursor, cursor_ts, start, end = _meta_times(
            conn, "rolled_until", "rollup_cursor", "rollup_cursor_ts", "rollup_chunk_start", "rollup_chunk_end")
        if cursor is None:  # again, under the lock
            if rolled_until is not None and rolled_until >= target:
                return 0, True
            start, end, cursor, cursor_ts = -math.inf if rolled_until is None else rolled_until, target, 0.0, None
        rows_left, added = ROLLUP_ROWS_PER_SLICE, 0
        ids = conn.execute("SELECT id FROM series WHERE id >= ? ORDER BY id LIMIT ?",
                           (cursor if cursor_ts is not None else cursor + 1, ROLLUP_SERIES_PER_SLICE)).fetchall()
        for (series_id,) in ids:
            since = cursor_ts if series_id == cursor else start
            count, stopped_at, rows_left = self._roll_up_series(conn, series_id, since, end, rows_left)
            added += count
            if stopped_at is not None or rows_left <= 0:
                return added, self._save_rollup_cursor(conn, series_id, stopped_at, start, end)
        if len(ids) == ROLLUP_SERIES_PER_SLICE:  # more series may follow
            return added, self._save_rollup_cursor(conn, ids[-1][0], None, start, end)
        conn.execute("DELETE FROM meta WHERE key IN "
                     "('rollup_cursor', 'rollup_cursor_ts', 'rollup_chunk_start', 'rollup_chunk_end')")
        _set_meta(conn, "rolled_until", end)
        return added, True

    @staticmethod
    def _save_rollup_cursor(conn: sqlite3.Connection, series_id: int, stopped_at: Optional[float], start: float,
                            end: float) -> bool:
        """Remember where the roll-up stopped: within ``series_id`` at ``stopped_at``, or after it."""
        for key, value in (("rollup_cursor", float(series_id)), ("rollup_chunk_start", start),
                           ("rollup_chunk_end", end)):
            _set_meta(conn, key, value)
        if stopped_at is None:
            conn.execute("DELETE FROM meta WHERE key = 'rollup_cursor_ts'")
        else:
            _set_meta(conn, "rollup_cursor_ts", stopped_at)
        return False

    @staticmethod
    def _roll_up_series(conn: sqlite3.Connection, series_id: int, since: float, end: float, rows_left: int
                        ) -> Tuple[int, Optional[float], int]:
        """Roll up the closed hours of one series in [since, end), reading about ``rows_left`` samples at
        most; (rows added, the hour it stopped before or None when done, rows left).

        One ordered read of the series' samples: the cost follows the samples, not the hours.
        """
        rows = conn.execute("SELECT ts, seq, value FROM samples WHERE series_id = ? AND ts >= ? AND ts < ? "
                            "ORDER BY ts, seq LIMIT ?", (series_id, since, end, rows_left + 1)).fetchall()
        stopped_at = None
        if len(rows) > rows_left:  # more than the slice takes: stop at the start of the last hour read
            stopped_at = bucket_start(rows[-1][0])
            if stopped_at > since:
                rows = [row for row in rows if row[0] < stopped_at]
            else:  # one hour holds more than a slice: it is done whole
                rows = conn.execute("SELECT ts, seq, value FROM samples WHERE series_id = ? AND ts >= ? AND ts < ? "
                                    "ORDER BY ts, seq", (series_id, stopped_at, stopped_at + ROLLUP_SPAN_S)).fetchall()
                stopped_at += ROLLUP_SPAN_S
                if stopped_at >= end:
                    stopped_at = None
        summaries, kept = [], []
        hours = dict(_hours_of(rows))
        read_until = end if stopped_at is None else stopped_at
        for hour, points in hours.items():
            if len(points) > RAW_KEPT_SAMPLES or MetricsCollector._next_to_a_busy_hour(
                    conn, series_id, hour, hours, since, read_until):
                summaries.append(_hourly_row(series_id, hour, points))
            else:
                kept += [(series_id, ts, seq) for ts, seq, _ in points]
        conn.executemany(_MERGE_ROLLUP, summaries)
        if kept:
            conn.executemany(f"UPDATE samples SET seq = seq - {KEPT_SEQ_OFFSET:d} "
                             "WHERE series_id = ? AND ts = ? AND seq = ?", kept)
            conn.execute("INSERT INTO raw_kept (series_id, until) VALUES (?, ?) "
                         "ON CONFLICT (series_id) DO UPDATE SET until = max(until, excluded.until)",
                         (series_id, kept[-1][1]))
        return len(summaries), stopped_at, rows_left - len(rows)

    @staticmethod
    def _next_to_a_busy_hour(conn: sqlite3.Connection, series_id: int, hour: float, hours: Dict[float, list],
                             since: float, read_until: float) -> bool:
        """Whether the hour before or after ``hour`` holds more than RAW_KEPT_SAMPLES samples of the series.

        Such a small hour is the edge of a busy stretch (a machine going to sleep or waking up), not a
        sparse series: it gets its rollup row, so a busy series never has samples kept raw for its
        hours, and its window queries never look for them. ``hours`` are those read, from ``since`` to
        ``read_until``; outside them the store is asked: the rollup row of the hour before, a few
        samples of the hour after.
        """
        before, after = hour - ROLLUP_SPAN_S, hour + ROLLUP_SPAN_S
        if before >= since:
            busy_before = len(hours.get(before, ())) > RAW_KEPT_SAMPLES
        else:
            row = conn.execute("SELECT n FROM rollups WHERE series_id = ? AND span = 3600 AND bucket = ?",
                               (series_id, before)).fetchone()
            busy_before = row is not None and row[0] > RAW_KEPT_SAMPLES
        if busy_before:
            return True
        if after < read_until:
            return len(hours.get(after, ())) > RAW_KEPT_SAMPLES
        return conn.execute("SELECT count(*) FROM (SELECT 1 FROM samples WHERE series_id = ? AND ts >= ? AND ts < ? "
                            "LIMIT ?)", (series_id, after, after + ROLLUP_SPAN_S, RAW_KEPT_SAMPLES + 1)
                            ).fetchone()[0] > RAW_KEPT_SAMPLES

    def cleanup(self, retention_days: Optional[float] = None) -> Dict[str, int]:
        """The daily upkeep: roll up closed hours, delete expired raw samples, fold old hours into days.

        Raw samples older than ``retention_days`` go only once their hours are
        rolled up, so statistics keep their count, sum, min and max (samples
        kept raw for their hours stay); hourly rollups older than
        ``hourly_days``, and the kept samples, become daily ones; daily ones older
        than ``daily_days`` (if set) are dropped.  Every transaction touches at
        most CLEANUP_BATCH_ROWS rows, so a writer never waits long, and each
        step goes on until nothing expired is left.  Returns what was done.
        """
        retention_days = self.retention_days if retention_days is None else non_negative(retention_days, "days")
        now = self._now()
        report = {"rolled_up_hours": self.roll_up()}
        rolled_until = self.store.tier_marks()[0]
        series = _Lazy(lambda: [row[0] for row in self.store.query("SELECT id FROM series")])
        # Whole hours: a cleanup that finds nothing due costs a few meta reads, whatever the number of series.
        raw_cutoff = bucket_start(min(now - retention_days * DAY_S, rolled_until))
        report["deleted_samples"] = self._delete_past_mark("raw_deleted_until", raw_cutoff, lambda: sum(
            self._delete_raw_samples(sid, raw_cutoff) for sid in series()))
        report["folded_hours"], report["daily_rollups"] = self._fold_old_hours(series, now, rolled_until, raw_cutoff)
        report["deleted_days"] = 0
        if self.daily_days:
            day_cutoff = bucket_start(now - self.daily_days * DAY_S, DAY_S)
            report["deleted_days"] = self._delete_past_mark("days_deleted_until", day_cutoff, lambda: sum(
                self._delete_in_batches("rollups", "series_id = ? AND span = 86400", "bucket", (sid,), day_cutoff)
                for sid in series()))
        report["deleted_retry_records"] = self._delete_retry_records(now - retention_days * DAY_S)
        report["deleted_job_runs"] = self._delete_job_runs(now - retention_days * DAY_S)
        report["deleted_alerts"] = self._delete_alert_history(now - retention_days * DAY_S)
        with self.store.write() as conn:
            _set_meta(conn, "last_cleanup", now)
        if any(report[key] for key in ("deleted_samples", "folded_hours", "deleted_days", "deleted_retry_records",
                                       "deleted_job_runs", "deleted_alerts")):
            self.store.reclaim_space()
        return report

    def _delete_past_mark(self, mark: str, cutoff: float, delete) -> int:
        """``delete()``, unless the meta ``mark`` says everything below ``cutoff`` is gone already; then
        the mark is moved to ``cutoff``."""
        done = self.store.meta_times(mark)[0]
        if done is not None and done >= cutoff:
            return 0
        deleted = delete()
        with self.store.write() as conn:
            _set_meta(conn, mark, cutoff)
        return deleted

    def _delete_retry_records(self, cutoff: float) -> int:
        """AdaptiveRetry's attempts and calls older than the raw retention."""
        deleted = 0
        for table, column in (("retry_calls", "started"), ("retry_attempts", "ts")):
            for (operation,) in self.store.query(f"SELECT DISTINCT operation FROM {table}"):
                deleted += self._delete_in_batches(table, "operation = ?", column, (operation,), cutoff)
        return deleted

    def _delete_job_runs(self, cutoff: float) -> int:
        """``run`` records older than the raw retention, except each job's last (the job check reads it)."""
        expired = ("FROM job_runs WHERE started < ? AND started < "
                   "(SELECT max(started) FROM job_runs AS newer WHERE newer.job = job_runs.job)")
        if self.store.query_one(f"SELECT 1 {expired} LIMIT 1", (cutoff,)) is None:
            return 0  # idle: no write lock taken
        with self.store.write() as conn:
            return conn.execute(f"DELETE {expired}", (cutoff,)).rowcount

    def _delete_alert_history(self, cutoff: float) -> int:
        """History rows (alerts and their deliveries) older than the raw retention, in batches.

        Only the history: what fires now, its channels' last deliveries and the
        dedup marks live in other tables and are kept.
        """
        deleted = 0
        while True:
            ids = [row[0] for row in self.store.query("SELECT id FROM alerts WHERE ts < ? ORDER BY id LIMIT ?",
                                                      (cutoff, CLEANUP_BATCH_ROWS))]
            if not ids:
                return deleted
            with self.store.write() as conn:
                conn.execute("DELETE FROM alert_deliveries WHERE alert_id BETWEEN ? AND ? AND alert_id IN "
                             "(SELECT id FROM alerts WHERE ts < ?)", (ids[0], ids[-1], cutoff))
                deleted += conn.execute("DELETE FROM alerts WHERE id BETWEEN ? AND ? AND ts < ?",
                                        (ids[0], ids[-1], cutoff)).rowcount

    def cleanup_old_metrics(self, days: Optional[float] = None) -> int:
        """The original design's cleanup: ``cleanup()``, returning how many raw samples were deleted."""
        return self.cleanup(retention_days=days)["deleted_samples"]

    def _delete_raw_samples(self, series_id: int, cutoff: float) -> int:
        """Delete a series' raw samples below ``cutoff``, and catch its last_ts up in the same transactions
        where they held its newest. Samples kept for their hours stay until those hours fold into days."""
        def catch_up(conn: sqlite3.Connection, bound: float) -> None:
            conn.execute(_CATCH_UP_BELOW, (series_id, series_id, bound))

        return self._delete_in_batches("samples", "series_id = ? AND seq >= 0", "ts", (series_id,), cutoff,
                                       then=catch_up)

    def _delete_in_batches(self, table: str, where: str, column: str, params: tuple, cutoff: float,
                           then=None) -> int:
        """Delete the rows of ``table`` matching ``where`` whose ``column`` is below ``cutoff``, a batch at a time;
        ``then(conn, bound)`` runs in each batch's transaction, after it deleted the rows below ``bound``."""
        deleted = 0
        while True:
            row = self.store.query_one(
                f"SELECT {column} FROM {table} WHERE {where} AND {column} < ? ORDER BY {column} LIMIT 1 OFFSET ?",
                (*params, cutoff, CLEANUP_BATCH_ROWS - 1),
            )
            if row is None and not self.store.query_one(
                f"SELECT 1 FROM {table} WHERE {where} AND {column} < ? LIMIT 1", (*params, cutoff)
            ):
                return deleted  # nothing (left) to delete: no write lock taken
            bound = cutoff if row is None else math.nextafter(row[0], math.inf)
            with self.store.write() as conn:
                deleted += conn.execute(f"DELETE FROM {table} WHERE {where} AND {column} < ?",
                                        (*params, bound)).rowcount
                if then is not None:
                    then(conn, bound)
            if row is None:
                return deleted

    def _fold_old_hours(self, series, now: float, rolled_until: float, raw_cutoff: float) -> Tuple[int, int]:
        """Fold whole days of hourly rollups past the hourly horizon into daily ones; (hours, days).
        ``series()`` gives the ids of every series, read only when there is something to fold; samples kept
        raw for their hours join them, and stay as plain raw samples where younger than ``raw_cutoff``."""
        fold_until = bucket_start(min(now - self.hourly_days * DAY_S, rolled_until), DAY_S)
        start = self.store.tier_marks()[1]
        if start is not None and start >= fold_until:
            return 0, 0
        # About CLEANUP_BATCH_ROWS hourly rows per transaction, whatever the number of series.
        step = DAY_S * max(1, CLEANUP_BATCH_ROWS // (24 * max(1, len(series()))))
        folded = days = 0
        while True:
            start = self._first_day_to_fold(start, fold_until)  # days with nothing to fold are skipped
            end = min(fold_until, start + step)
            with self.store.write() as conn:
                if start >= fold_until:  # nothing left to fold: no series to look at
                    _set_meta(conn, "daily_until", fold_until)
                    return folded, days
                kept = {row[0] for row in conn.execute("SELECT series_id FROM raw_kept WHERE until >= ?", (start,))}
                for series_id in series():
                    if series_id in kept:
                        self._roll_up_kept(conn, series_id, start, end, raw_cutoff)
                    span = {"series": series_id, "start": start, "end": end}
                    before = conn.total_changes
                    conn.execute(_FOLD_DAYS, span)
                    days += conn.total_changes - before
                    conn.execute(_FINISH_DAYS, span)
                    folded += conn.execute(
                        "DELETE FROM rollups WHERE series_id = ? AND span = 3600 AND bucket >= ? AND bucket < ?",
                        (series_id, start, end),
                    ).rowcount
                conn.execute("DELETE FROM raw_kept WHERE until < ?", (end,))  # every kept sample folded
                _set_meta(conn, "daily_until", end)
            if end >= fold_until:
                return folded, days
            start = end

    def _first_day_to_fold(self, since: Optional[float], default: float) -> float:
        """Start of the day of the oldest hourly rollup, or sample kept raw for its hour, in [since, default),
        or ``default``: one index seek per series, and per series that has kept samples."""
        since = -math.inf if since is None else since
        hours = self.store.query_one(
            "SELECT min((SELECT min(bucket) FROM rollups WHERE series_id = series.id AND span = 3600 "
            "AND bucket >= ?)) FROM series", (since,))[0]
        kept = self.store.query_one(
            "SELECT min((SELECT min(ts) FROM samples WHERE series_id = raw_kept.series_id AND ts >= ? AND ts < ? "
            "AND seq < 0)) FROM raw_kept WHERE until >= ?", (since, default, since))[0]
        first = min((ts for ts in (hours, kept) if ts is not None), default=None)
        return default if first is None else min(default, max(bucket_start(first, DAY_S), since))

    @staticmethod
    def _roll_up_kept(conn: sqlite3.Connection, series_id: int, start: float, end: float, raw_cutoff: float
                      ) -> None:
        """The samples of one series kept raw for their hours in [start, end) become those hours' rollups,
        so they fold into days with the rest; in the caller's transaction. Those past the raw retention go;
        the others (where hours fold before raw samples expire) become plain raw samples, after any sample
        of the same instant."""
        rows = conn.execute("SELECT ts, seq, value FROM samples WHERE series_id = ? AND ts >= ? AND ts < ? "
                            "AND seq < 0 ORDER BY ts, seq", (series_id, start, end)).fetchall()
        if not rows:
            return
        conn.executemany(_MERGE_ROLLUP, [_hourly_row(series_id, hour, points) for hour, points in _hours_of(rows)])
        expired = (series_id, start, min(end, raw_cutoff))
        conn.execute("DELETE FROM samples WHERE series_id = ? AND ts >= ? AND ts < ? AND seq < 0", expired)
        conn.execute(_CATCH_UP_BELOW, (series_id, series_id, expired[2]))
        if end > raw_cutoff:
            conn.execute(_UNMARK_KEPT, (series_id, max(start, raw_cutoff), end))

    def _maintain_if_due(self) -> None:
        """After a write: roll up closed hours (hourly) and clean up (daily), across all processes.

        Each collector looks at most once a minute, so a busy writer pays one
        small query a minute.
        """
        if not self.maintain or self.store.readonly or self._clock() < self._next_maintenance:
            return
        self._next_maintenance = self._clock() + MAINTENANCE_CHECK_INTERVAL_S
        rolled_until, last_cleanup = self.store.meta_times("rolled_until", "last_cleanup")
        now = self._now()
        if last_cleanup is None or last_cleanup <= now - CLEANUP_INTERVAL_S:
            log.debug("daily cleanup: %s", self.cleanup())
        elif rolled_until is None or rolled_until < bucket_start(now - ROLLUP_GRACE_S):
            self.roll_up(slices=1)  # a bounded slice: the next writes, or cleanup, do the rest


## Retry and breakers #########################################################

TRANSIENT_HTTP_STATUSES = frozenset({408, 425, 429})  # and every 5xx
PERMANENT_HTTP_STATUSES = frozenset({400, 401, 403, 404, 405, 410, 413, 422})
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "EPIPE", "ETIMEDOUT", "EAGAIN",
                                      "EWOULDBLOCK", "EINTR", "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "EBUSY")
    if hasattr(errno, name)
)
_PERMANENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EACCES", "EPERM", "ENOENT", "ENOSPC", "EROFS", "EDQUOT", "EISDIR", "ENOTDIR")
    if hasattr(errno, name)
)
JITTER_MODES = ("proportional", "full", "decorrelated", "none")
PROPORTIONAL_JITTER = 0.2  # the original design's +/-20%
DEFAULT_RETRY_AFTER_MAX_S = 300.0
RETRY_BUDGET_MAX = 10.0  # tokens an operation can save up: retries allowed in a total outage
RETRY_BUDGET_DEPOSIT = 0.1  # each successful call; so retries stay near 10 % of calls
RETRY_BUDGET_COST = 1.0  # each retry
RECOMMEND_TARGET = 0.95  # the share of recoverable failures a recommendation must recover
RECOMMEND_FIRST_RETRY_SHARE = 0.25  # the first retry comes when this share of failures has cleared
INITIAL_BACKOFF_LIMITS_S = (0.1, 300.0)  # what a learned initial_backoff stays within
MAX_BACKOFF_LIMIT_S = 3600.0
RECOMMEND_MIN_EVIDENCE = 5
NEVER_RECOVERS_AFTER = 3  # failures of one error class with no recovery before it is called hopeless
DEFAULT_BREAKER_WINDOW_S = 1800.0
DEFAULT_OPEN_DURATION_S = 60.0


class CircuitOpenError(MonitorError):
    """The breaker is open (or another process is probing): the call was not made."""

    def __init__(self, name: str, retry_after_s: float, probing: bool = False):
        what = "is being probed by another caller" if probing else f"is open for {retry_after_s:.0f} s more"
        super().__init__(f"circuit breaker {name!r} {what}")
        self.name = name
        self.retry_after = retry_after_s
        self.probing = probing


class RetryAfterTooLong(MonitorError):
    """The server asked to wait longer than the deadline or the cap allows; nothing was slept."""

    def __init__(self, operation: str, retry_after_s: float, limit_s: float):
        super().__init__(f"{operation}: the server asked to retry after {retry_after_s:g} s, "
                         f"beyond the {limit_s:g} s allowed")
        self.retry_after = retry_after_s
        self.limit = limit_s


def _classify_os_error(error: BaseException) -> str:
    import socket

    if isinstance(error, socket.gaierror):
        if error.errno == socket.EAI_AGAIN:
            return "transient"
        return "permanent" if error.errno == socket.EAI_NONAME else "unknown"
    if isinstance(error, (ConnectionError, TimeoutError, BlockingIOError, InterruptedError, socket.timeout)):
        return "transient"
    if isinstance(error, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return "permanent"
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return "transient"
    if isinstance(error, OSError) and error.errno in _PERMANENT_ERRNOS:
        return "permanent"
    if isinstance(error, (ValueError, TypeError, KeyError)):
        return "permanent"
    return "unknown"


def classify_http_status(status: int) -> str:
    """``transient`` for 408, 425, 429 and 5xx; ``permanent`` for 400, 401, 403, 404, 405, 410, 413, 422."""
    if status in TRANSIENT_HTTP_STATUSES or 500 <= status <= 599:
        return "transient"
    return "permanent" if status in PERMANENT_HTTP_STATUSES else "unknown"


def classify_error(error: BaseException) -> str:
    """``transient``, ``permanent`` or ``unknown``: can trying again in a few seconds help?

    Connection resets and refusals, timeouts, a locked SQLite store, HTTP
    408/425/429/5xx and SMTP 4xx replies are transient; permissions, missing
    files, a full or read-only disk, HTTP 400/401/403/404/405/410/413/422, SMTP
    5xx replies and programming errors are permanent.  A ``URLError`` is judged
    by the error inside it.
    """
    from urllib.error import HTTPError, URLError

    if isinstance(error, HTTPError):
        return classify_http_status(error.code)
    smtp_code = getattr(error, "smtp_code", None)
    if isinstance(smtp_code, int):  # smtplib: 4xx is "try again later", 5xx is final
        return "transient" if 400 <= smtp_code < 500 else "permanent"
    if type(error).__name__ == "SMTPServerDisconnected":
        return "transient"
    if isinstance(error, URLError):
        reason = error.reason
        if isinstance(reason, BaseException):
            return classify_error(reason)
        return "transient" if "timed out" in str(reason) else "unknown"
    if isinstance(error, (StorageError, sqlite3.OperationalError)):
        text = str(error).lower()
        return "transient" if "locked" in text or "busy" in text else "permanent"
    return _classify_os_error(error)


def parse_retry_after(value: Any, now: float) -> Optional[float]:
    """Seconds to wait from a Retry-After value: seconds, or an HTTP date; None if unreadable.

    >>> parse_retry_after("7", now=0.0)
    7.0
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    text = str(value).strip()
    if ascii_digits(text):
        return float(text)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def retry_after_of(error: BaseException, now: float) -> Optional[float]:
    """The wait a failed call asked for: an attribute the callee set, or an HTTP error's header."""
    from urllib.error import HTTPError

    if isinstance(error, HTTPError):
        # Not getattr: on Python 3.9 an HTTPError without a body raises KeyError for unknown names.
        value = vars(error).get("retry_after")
        if value is None and error.headers is not None:
            value = error.headers.get("Retry-After")
    else:
        value = getattr(error, "retry_after", None)
    return parse_retry_after(value, now)


def nominal_delay(retry_number: int, initial: float, multiplier: float, cap: float) -> float:
    """``min(cap, initial * multiplier**(k-1))`` for retry k, without overflow.

    >>> [nominal_delay(k, 1.0, 2.0, 60.0) for k in (1, 2, 3, 7, 500)]
    [1.0, 2.0, 4.0, 60.0, 60.0]
    """
    exponent = retry_number - 1
    if multiplier > 1 and exponent * math.log(multiplier) > math.log(cap / initial):
        return cap
    return min(cap, initial * multiplier ** exponent)


def jittered_delay(nominal: float, mode: str, rng: Any, *, cap: float, initial: float, previous: float) -> float:
    """One delay drawn around ``nominal``; always inside [0, cap], never piled up on the cap.

    ``proportional``: uniform over [0.8 d, min(1.2 d, cap)] (the original +/-20%).
    ``full``: uniform over [0, d], the best published choice when many clients
    contend.  ``decorrelated``: uniform over [initial, min(cap, 3 * previous)].
    ``none``: d.
    """
    if mode == "proportional":
        return rng.uniform((1 - PROPORTIONAL_JITTER) * nominal, min((1 + PROPORTIONAL_JITTER) * nominal, cap))
    if mode == "full":
        return rng.uniform(0.0, nominal)
    if mode == "decorrelated":
        return rng.uniform(initial, max(initial, min(cap, 3.0 * previous)))
    return nominal


def _positive(value: Any, what: str) -> float:
    number = finite_number(value, what)
    if number <= 0:
        raise ValidationError(f"{what} must be positive, got {_shown(value)}")
    return number


class RetryConfig:
    """How to retry: attempts, backoff and jitter, and the limits on waiting.

    The original design's fields and defaults, plus ``jitter`` (one of
    JITTER_MODES; proportional when ``use_jitter``), ``deadline`` (seconds for
    the whole call, or None), ``retry_after_max`` (the longest Retry-After to
    honour) and ``budget`` (spend from the operation's retry budget).
    """

    __slots__ = ("max_attempts", "initial_backoff", "max_backoff", "backoff_multiplier", "use_jitter", "jitter",
                 "deadline", "retry_after_max", "budget")

    def __init__(self, max_attempts: int = 3, initial_backoff: float = 1.0, max_backoff: float = 60.0,
                 backoff_multiplier: float = 2.0, use_jitter: bool = True, *, jitter: Optional[str] = None,
                 deadline: Optional[float] = None, retry_after_max: float = DEFAULT_RETRY_AFTER_MAX_S,
                 budget: bool = True):
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValidationError(f"max_attempts must be a whole number of at least 1, got {_shown(max_attempts)}")
        self.max_attempts = max_attempts
        self.initial_backoff = _positive(initial_backoff, "initial_backoff")
        self.max_backoff = _positive(max_backoff, "max_backoff")
        if self.max_backoff < self.initial_backoff:
            raise ValidationError(f"max_backoff {max_backoff!r} is below initial_backoff {initial_backoff!r}")
        self.backoff_multiplier = finite_number(backoff_multiplier, "backoff_multiplier")
        if self.backoff_multiplier < 1:
            raise ValidationError(f"backoff_multiplier must be at least 1, got {_shown(backoff_multiplier)}")
        self.use_jitter = bool(use_jitter)
        self.jitter = jitter if jitter is not None else ("proportional" if use_jitter else "none")
        if self.jitter not in JITTER_MODES:
            raise ValidationError(f"jitter must be one of {', '.join(JITTER_MODES)}, got {_shown(jitter)}")
        self.deadline = None if deadline is None else _positive(deadline, "deadline")
        self.retry_after_max = _positive(retry_after_max, "retry_after_max")
        self.budget = bool(budget)

    def replace(self, **changes: Any) -> "RetryConfig":
        """A copy with some fields changed."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return RetryConfig(**fields)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, RetryConfig) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        return "RetryConfig(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__) + ")"


class CallOutcome(NamedTuple):
    """What one retried call did: returned per call, attached to the exception on failure."""

    operation: str
    attempts: int
    succeeded: bool
    total_sleep: float
    delays: Tuple[float, ...]
    category: str
    stop_reason: str


class _RetryCall:
    """The state of one retried call: attempts so far, delays, and their records."""

    def __init__(self, retry: AdaptiveRetry, operation: str, config: RetryConfig):
        self.retry, self.operation, self.config = retry, operation, config
        self.call_id = os.urandom(8).hex()
        self.started_at = retry._clock()
        self.started_wall = retry._now()
        self.attempt_started = self.started_at
        self.attempts = 0
        self.delays: List[float] = []
        self.first_error = ""

    def failed(self, error: Exception, category: str) -> Tuple[float, str]:
        """Record a failed attempt; return (the delay before the next, or a reason to stop)."""
        self.attempts += 1
        self.first_error = self.first_error or type(error).__name__
        self._record_attempt(type(error).__name__, category)
        config = self.config
        if category == "permanent":
            return 0.0, "permanent"
        if self.attempts >= config.max_attempts:
            return 0.0, "exhausted"
        previous = self.delays[-1] if self.delays else config.initial_backoff
        delay = jittered_delay(
            nominal_delay(self.attempts, config.initial_backoff, config.backoff_multiplier, config.max_backoff),
            config.jitter, self.retry._rng, cap=config.max_backoff, initial=config.initial_backoff, previous=previous,
        )
        elapsed = self.retry._clock() - self.started_at
        asked = retry_after_of(error, self.retry._now())
        if asked is not None:
            limit = config.retry_after_max if config.deadline is None else min(config.retry_after_max,
                                                                               config.deadline - elapsed)
            if asked > limit:
                self.finish(False, "retry_after", error, category)
                raise RetryAfterTooLong(self.operation, asked, limit) from error
            delay = max(delay, asked)
        if config.deadline is not None and elapsed + delay > config.deadline:
            return 0.0, "deadline"
        if config.budget and not self.retry._spend_budget(self.operation):
            return 0.0, "budget"
        return delay, ""

    def slept(self, delay: float) -> None:
        self.delays.append(delay)
        self.attempt_started = self.retry._clock()

    def finish(self, succeeded: bool, stop_reason: str, error: Optional[BaseException] = None,
               category: str = "") -> CallOutcome:
        """Store the call's outcome; attach it to the error, if any, and return it."""
        if succeeded:
            self.attempts += 1
            self._record_attempt("", "")
        outcome = CallOutcome(self.operation, self.attempts, succeeded, math.fsum(self.delays), tuple(self.delays),
                              category, stop_reason)
        self._store(lambda conn: self._write_call(conn, outcome, error))
        if error is not None:
            error.retry_info = outcome
        return outcome

    def _record_attempt(self, error: str, category: str) -> None:
        duration = self.retry._clock() - self.attempt_started
        slept = self.delays[-1] if self.delays and len(self.delays) == self.attempts - 1 else 0.0
        self._store(lambda conn: conn.execute(
            "INSERT INTO retry_attempts (operation, ts, call_id, attempt, duration_s, error, category, slept_s) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (self.operation, self.retry._now(), self.call_id, self.attempts, duration, error, category, slept),
        ))

    def _write_call(self, conn: sqlite3.Connection, outcome: CallOutcome, error: Optional[BaseException]) -> None:
        conn.execute(
            "INSERT INTO retry_calls (operation, started, call_id, ended, attempts, succeeded, first_error, error, "
            "category, total_sleep, stop_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self.operation, self.started_wall, self.call_id, self.retry._now(), outcome.attempts,
             int(outcome.succeeded), self.first_error, "" if error is None else type(error).__name__,
             outcome.category, outcome.total_sleep, outcome.stop_reason),
        )
        if outcome.succeeded:
            self.retry._deposit_budget(conn, self.operation)

    def _store(self, write) -> None:
        """Write a record; a store that fails is logged, never allowed to break the call being retried."""
        try:
            with self.retry.store.write() as conn:
                write(conn)
        except MonitorError as err:
            log.warning("%s: could not record a retry outcome: %s", self.operation, err)


class AdaptiveRetry:
    """Retry with backoff and jitter, errors classified first, every attempt stored.

    ``retry(name, func, *args, **kwargs)`` calls ``func`` until it returns, at
    most ``config.max_attempts`` times; a permanent error gets one attempt and
    no sleep; a deadline, a Retry-After beyond the limits, an open breaker or
    an empty retry budget stop early.  The original exception is raised, with
    ``retry_info`` (a CallOutcome) attached.  Outcomes go to the store, so
    ``get_retry_stats`` and ``analyze_failures`` cover every process.  With
    ``adaptive=True`` the attempts, deadline and backoff come from ``recommend()``.
    """

    def __init__(self, config: Optional[RetryConfig] = None, *, db_path: Optional[str] = None,
                 collector: Optional["MetricsCollector"] = None, adaptive: bool = False,
                 breaker: Optional["CircuitBreaker"] = None, classifier=classify_error,
                 classifiers: Optional[Dict[str, Any]] = None, max_attempts_limit: int = 10,
                 deadline_limit_s: float = 3600.0, clock=time.monotonic, now=time.time, sleep=None, rng=None):
        import random

        self.config = RetryConfig() if config is None else config
        self.collector = MetricsCollector(db_path, now=now, clock=clock) if collector is None else collector
        self.store = self.collector.store
        self.adaptive = adaptive
        self.breaker = breaker
        self.classifier = classifier
        self.classifiers = dict(classifiers or {})
        self.max_attempts_limit = max_attempts_limit
        self.deadline_limit_s = deadline_limit_s
        # time.sleep looked up now, not when this module was defined: a test that
        # forbids it catches every retry that would really wait.
        self._clock, self._now, self._sleep = clock, now, time.sleep if sleep is None else sleep
        self._rng = random.Random() if rng is None else rng

    # -- the original API ---------------------------------------------------

    def retry(self, operation_name: str, func, *args: Any, **kwargs: Any) -> Any:
        """``func(*args, **kwargs)``, retried; raises the last error when it gives up."""
        return self.run(operation_name, func, *args, **kwargs)[0]

    def retry_async(self, operation_name: str, func, *args: Any, **kwargs: Any) -> Any:
        """Like ``retry``, but returns None instead of raising when every attempt failed."""
        try:
            return self.retry(operation_name, func, *args, **kwargs)
        except Exception as err:
            log.info("%s: gave up after %s", operation_name, getattr(err, "retry_info", None) or type(err).__name__)
            return None

    def run(self, operation_name: str, func, *args: Any, **kwargs: Any) -> Tuple[Any, CallOutcome]:
        """``retry``, returning (result, CallOutcome): the statistics of this call, as a value."""
        validate_name(operation_name, "operation name")
        config, hopeless = self._policy(operation_name)
        classify = self.classifiers.get(operation_name, self.classifier)
        call = _RetryCall(self, operation_name, config)
        while True:
            try:
                result = self.breaker.call(func, *args, **kwargs) if self.breaker else func(*args, **kwargs)
            except CircuitOpenError as err:
                call.finish(False, "breaker", err, "permanent")
                raise
            except Exception as err:
                category = "permanent" if type(err).__name__ in hopeless else classify(err)
                delay, stop = call.failed(err, category)
                if stop:
                    call.finish(False, stop, err, category)
                    raise
                self._sleep(delay)
                call.slept(delay)
            else:
                return result, call.finish(True, "success")

    def get_retry_stats(self, operation_name: str, hours: float = DEFAULT_WINDOW_HOURS) -> Dict[str, Any]:
        """Calls, attempts, success rate and the most common errors of the last ``hours``, over every process.

        ``success_rate`` is a percentage, or None when there was no call.
        """
        since = self._now() - _positive(hours, "hours") * 3600.0
        calls, successes, attempts, sleep, first_try, recovered, permanent, exhausted = self.store.query_one(
            "SELECT count(*), total(succeeded), total(attempts), total(total_sleep), "
            "total(succeeded AND attempts = 1), total(succeeded AND attempts > 1), "
            "total(NOT succeeded AND attempts <= 1), total(NOT succeeded AND attempts > 1) "
            "FROM retry_calls WHERE operation = ? AND started >= ?",
            (operation_name, since),
        )
        errors = self.store.query(
            "SELECT error, count(*) FROM retry_attempts WHERE operation = ? AND ts >= ? AND error != '' "
            "GROUP BY error ORDER BY count(*) DESC, error LIMIT 5",
            (operation_name, since),
        )
        return {
            "operation": operation_name,
            "hours": hours,
            "calls": calls,
            "successes": int(successes),
            "failures": calls - int(successes),
            "success_rate": 100.0 * successes / calls if calls else None,
            "attempts": int(attempts),
            "retries": int(attempts) - calls,
            "first_try_successes": int(first_try),
            "recovered_after_retry": int(recovered),
            "failed_without_retry": int(permanent),
            "failed_after_retries": int(exhausted),
            "total_sleep_s": sleep,
            "common_errors": [(error, count) for error, count in errors],
        }

    def analyze_failures(self, operation_name: str, hours: Optional[float] = None) -> Dict[str, Any]:
        """Of the calls that met a failure: how many recovered on a retry (transient) and how many never did.

        ``transient_rate`` is 0.0 when there was no failure at all.
        """
        since = -math.inf if hours is None else self._now() - _positive(hours, "hours") * 3600.0
        rows = self.store.query(
            "SELECT first_error, count(*), total(succeeded) FROM retry_calls "
            "WHERE operation = ? AND started >= ? AND first_error != '' GROUP BY first_error ORDER BY first_error",
            (operation_name, since),
        )
        total = sum(count for _, count, _ in rows)
        transient = int(sum(recovered for _, _, recovered in rows))
        advice = self.recommend(operation_name)
        return {
            "operation": operation_name,
            "total_failures": total,
            "transient": transient,
            "permanent": total - transient,
            "transient_rate": 100.0 * transient / total if total else 0.0,
            "by_error": {error: {"failures": count, "recovered": int(recovered)} for error, count, recovered in rows},
            "recommendation": advice["summary"],
        }

    # -- learning ---------------------------------------------------------------

    def recommend(self, operation_name: str) -> Dict[str, Any]:
        """The smallest max_attempts and deadline that recovered 95 % of the recoverable failures, and
        the initial_backoff and max_backoff that fit how long failures took to clear.

        Read from the stored outcomes only, so the same data gives the same
        answer; bounded by the limits; never more attempts than configured
        while the last hour's failure rate is above 50 %; and it names the
        error classes that never recovered.  ``evidence`` says why.
        """
        calls = self.store.query(
            "SELECT attempts, succeeded, first_error, ended - started, started FROM retry_calls "
            "WHERE operation = ? AND first_error != '' ORDER BY started, call_id",
            (operation_name,),
        )
        recovered = sorted((attempts, elapsed) for attempts, ok, _, elapsed, _ in calls if ok)
        evidence: List[str] = []
        max_attempts, deadline = self.config.max_attempts, self.config.deadline
        if len(recovered) >= RECOMMEND_MIN_EVIDENCE:
            index = math.ceil(RECOMMEND_TARGET * len(recovered)) - 1
            needed = recovered[index][0]
            durations = sorted(elapsed for _, elapsed in recovered)
            max_attempts = max(2, min(self.max_attempts_limit, needed))
            deadline = min(self.deadline_limit_s, max(1.0, math.ceil(durations[index])))
            by_attempt = sum(1 for attempts, _ in recovered if attempts <= needed)
            share = 100.0 * by_attempt / len(recovered)
            evidence.append(f"{by_attempt} of {len(recovered)} recovered failures ({share:.0f} %) "
                            f"succeeded by attempt {needed}, within {durations[index]:.1f} s")
        else:
            evidence.append(f"only {len(recovered)} recovered failures on record: keeping max_attempts="
                            f"{max_attempts}")
        rate = self._recent_failure_rate(operation_name)
        if rate is not None and rate > 0.5 and max_attempts > self.config.max_attempts:
            max_attempts = self.config.max_attempts
            evidence.append(f"{rate * 100:.0f} % of the last hour's calls failed: not retrying harder than "
                            f"max_attempts={max_attempts}")
        hopeless = self._hopeless_errors(calls)
        evidence += [f"stop retrying {name}: 0 of {count} recovered" for name, count in hopeless]
        initial, longest = self._learned_backoff(operation_name, evidence)
        return {
            "operation": operation_name,
            "max_attempts": max_attempts,
            "deadline_s": deadline,
            "initial_backoff": initial,
            "max_backoff": longest,
            "stop_retrying": [name for name, _ in hopeless],
            "recoverable_failures": len(recovered),
            "failure_rate_1h": rate,
            "evidence": evidence,
            "summary": "; ".join(evidence),
        }

    def clear_times(self, operation_name: str) -> List[float]:
        """How long each recovered failure of the operation took to clear, sorted: from the call's start
        to halfway between the end of its last failed attempt and the start of the one that succeeded
        (the failure cleared somewhere in that gap)."""
        rows = self.store.query(
            "SELECT c.total_sleep, total(CASE WHEN a.error != '' THEN a.duration_s ELSE 0 END), "
            "total(CASE WHEN a.error = '' THEN a.slept_s ELSE 0 END) FROM retry_calls c JOIN retry_attempts a "
            "ON a.operation = c.operation AND a.call_id = c.call_id "
            "WHERE c.operation = ? AND c.succeeded AND c.attempts > 1 GROUP BY c.call_id", (operation_name,))
        return sorted(max(0.0, slept + failing - last_wait / 2) for slept, failing, last_wait in rows)

    def _learned_backoff(self, operation_name: str, evidence: List[str]) -> Tuple[float, float]:
        """(initial_backoff, max_backoff) from how long failures took to clear: the first retry when a
        quarter of them had cleared, no wait longer than it took 95 % to clear; the configured ones
        without enough evidence."""
        cleared = self.clear_times(operation_name)
        if len(cleared) < RECOMMEND_MIN_EVIDENCE:
            evidence.append(f"only {len(cleared)} cleared failures on record: keeping initial_backoff="
                            f"{self.config.initial_backoff:g} s, max_backoff={self.config.max_backoff:g} s")
            return self.config.initial_backoff, self.config.max_backoff
        first, typical, most = (percentile(cleared, share) for share in (RECOMMEND_FIRST_RETRY_SHARE, 0.5,
                                                                           RECOMMEND_TARGET))
        low, high = INITIAL_BACKOFF_LIMITS_S
        initial = min(high, max(low, round(first, 1)))
        longest = min(MAX_BACKOFF_LIMIT_S, max(initial, float(math.ceil(most))))
        evidence.append(f"{len(cleared)} recovered failures cleared after {first:.1f} s (a quarter), {typical:.1f} s "
                        f"(half), {most:.1f} s (95 %): first retry after {initial:g} s, no wait over {longest:g} s")
        return initial, longest

    @staticmethod
    def _hopeless_errors(calls: List[tuple]) -> List[Tuple[str, int]]:
        seen: Dict[str, List[int]] = {}
        for _, ok, first_error, _, _ in calls:
            counts = seen.setdefault(first_error, [0, 0])
            counts[0] += 1
            counts[1] += ok
        return [(name, count) for name, (count, ok) in sorted(seen.items())
                if ok == 0 and count >= NEVER_RECOVERS_AFTER]

    def _recent_failure_rate(self, operation_name: str) -> Optional[float]:
        calls, failures = self.store.query_one(
            "SELECT count(*), total(NOT succeeded) FROM retry_calls WHERE operation = ? AND started >= ?",
            (operation_name, self._now() - 3600.0),
        )
        return failures / calls if calls else None

    def _policy(self, operation_name: str) -> Tuple[RetryConfig, frozenset]:
        """The config for this call, and the error classes never to retry (adaptive mode only)."""
        if not self.adaptive:
            return self.config, frozenset()
        advice = self.recommend(operation_name)
        config = self.config.replace(max_attempts=advice["max_attempts"], deadline=advice["deadline_s"],
                                     initial_backoff=advice["initial_backoff"], max_backoff=advice["max_backoff"])
        return config, frozenset(advice["stop_retrying"])

    # -- the budget ---------------------------------------------------------------

    def _spend_budget(self, operation_name: str) -> bool:
        """Take one retry from the operation's budget, shared by every process; False when it is empty."""
        with self.store.write() as conn:
            row = conn.execute("SELECT tokens FROM retry_budget WHERE operation = ?", (operation_name,)).fetchone()
            tokens = RETRY_BUDGET_MAX if row is None else row[0]
            if tokens < RETRY_BUDGET_COST:
                return False
            conn.execute("INSERT OR REPLACE INTO retry_budget (operation, tokens) VALUES (?, ?)",
                         (operation_name, tokens - RETRY_BUDGET_COST))
            return True

    def _deposit_budget(self, conn: sqlite3.Connection, operation_name: str) -> None:
        conn.execute(
            "INSERT INTO retry_budget (operation, tokens) VALUES (?, ?) ON CONFLICT (operation) "
            "DO UPDATE SET tokens = min(?, tokens + ?)",
            (operation_name, RETRY_BUDGET_MAX, RETRY_BUDGET_MAX, RETRY_BUDGET_DEPOSIT),
        )


def breaker_status(store: Store, name: str, now: float) -> Dict[str, Any]:
    """One stored breaker: state, failures within its window, since when, and until when if open."""
    row = store.query_one("SELECT state, since, open_until, window_s FROM breakers WHERE name = ?", (name,))
    if row is None:
        raise MonitorError(f"no circuit breaker named {name!r} in {store.path}")
    state, since, open_until, window_s = row
    failures = store.query_one("SELECT count(*) FROM breaker_failures WHERE name = ? AND ts >= ?",
                               (name, now - window_s))[0]
    return {"name": name, "state": state, "failures": failures, "window_s": window_s, "since": iso_time(since),
            "open_until": iso_time(open_until) if state == "open" else None}


class CircuitBreaker:
    """A circuit breaker whose state lives in the store, so every process sees one breaker.

    ``failure_threshold`` failures within ``window`` seconds (a success resets
    the count; older failures age out) open it for ``open_duration`` seconds:
    calls then fail fast with CircuitOpenError.  After that exactly one caller,
    in any process, runs a probe under a lease that expires, so a crashed
    prober does not hold it; success closes the breaker, failure opens it again
    for twice as long, up to ``max_open_duration``.  Errors of the ``exclude``
    types neither count nor reset.  Use it as ``breaker.call(f, ...)``, as a
    decorator, or as a context manager.
    """

    def __init__(self, name: str, failure_threshold: int = 3, window: float = DEFAULT_BREAKER_WINDOW_S,
                 open_duration: float = DEFAULT_OPEN_DURATION_S, *, max_open_duration: Optional[float] = None,
                 probe_timeout: Optional[float] = None, exclude: Tuple[type, ...] = (),
                 db_path: Optional[str] = None, collector: Optional["MetricsCollector"] = None, now=time.time):
        self.name = validate_name(name, "breaker name")
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) or failure_threshold < 1:
            raise ValidationError(
                f"failure_threshold must be a whole number of at least 1, got {_shown(failure_threshold)}")
        self.failure_threshold = failure_threshold
        self.window = _positive(window, "window")
        self.open_duration = _positive(open_duration, "open_duration")
        self.max_open_duration = _positive(
            16 * self.open_duration if max_open_duration is None else max_open_duration, "max_open_duration")
        self.probe_timeout = _positive(self.open_duration if probe_timeout is None else probe_timeout, "probe_timeout")
        self.exclude = tuple(exclude)
        self.collector = MetricsCollector(db_path, now=now) if collector is None else collector
        self.store = self.collector.store
        self._now = now
        self._tickets: List[Optional[str]] = []

    # -- the three ways to use it -------------------------------------------

    def call(self, func, *args: Any, **kwargs: Any) -> Any:
        """``func(*args, **kwargs)`` if the breaker lets it through; its outcome counts."""
        ticket = self._admit()
        try:
            result = func(*args, **kwargs)
        except Exception as err:
            self._failed(ticket, err)
            raise
        self._succeeded(ticket)
        return result

    def __call__(self, func):
        import functools

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            return self.call(func, *args, **kwargs)

        return guarded

    def __enter__(self) -> "CircuitBreaker":
        self._tickets.append(self._admit())
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> bool:
        ticket = self._tickets.pop()
        if exc is None:
            self._succeeded(ticket)
        elif isinstance(exc, Exception):
            self._failed(ticket, exc)
        return False

    # -- state ----------------------------------------------------------------------

    def duration(self, opens: int) -> float:
        """How long the breaker stays open the ``opens``-th time in a row: doubling, bounded."""
        return nominal_delay(max(1, opens), self.open_duration, 2.0, self.max_open_duration)

    def status(self) -> Dict[str, Any]:
        """State, failures in the window, and since when, as stored; closed if it was never used."""
        if self.store.query_one("SELECT 1 FROM breakers WHERE name = ?", (self.name,)) is None:
            return {"name": self.name, "state": "closed", "failures": 0, "window_s": self.window, "since": None,
                    "open_until": None}
        return breaker_status(self.store, self.name, self._now())

    def reset(self) -> None:
        """Close the breaker by hand."""
        with self.store.write() as conn:
            row = self._row(conn, self._now())
            if row["state"] != "closed":
                self._change(conn, row, "closed", "reset by hand", self._now())

    def _row(self, conn: sqlite3.Connection, now: float) -> Dict[str, Any]:
        row = conn.execute("SELECT state, since, open_until, opens, lease_owner, lease_until FROM breakers "
                           "WHERE name = ?", (self.name,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO breakers VALUES (?, 'closed', ?, 0, 0, '', 0, ?, ?)",
                         (self.name, now, self.failure_threshold, self.window))
            row = ("closed", now, 0.0, 0, "", 0.0)
        return dict(zip(("state", "since", "open_until", "opens", "lease_owner", "lease_until"), row))

    def _failures(self, conn: sqlite3.Connection, now: float) -> int:
        conn.execute("DELETE FROM breaker_failures WHERE name = ? AND ts < ?", (self.name, now - self.window))
        return conn.execute("SELECT count(*) FROM breaker_failures WHERE name = ?", (self.name,)).fetchone()[0]

    def _change(self, conn: sqlite3.Connection, row: Dict[str, Any], state: str, reason: str, now: float,
                **fields: Any) -> None:
        """Move to ``state``, recording the transition once, in the same transaction."""
        values = dict(row, state=state, since=now, **fields)
        if state == "closed":
            values.update(opens=0, lease_owner="", lease_until=0.0, open_until=0.0)
            conn.execute("DELETE FROM breaker_failures WHERE name = ?", (self.name,))
        conn.execute("UPDATE breakers SET state = ?, since = ?, open_until = ?, opens = ?, lease_owner = ?, "
                     "lease_until = ?, failure_threshold = ?, window_s = ? WHERE name = ?",
                     (values["state"], now, values["open_until"], values["opens"], values["lease_owner"],
                      values["lease_until"], self.failure_threshold, self.window, self.name))
        failures = conn.execute("SELECT count(*) FROM breaker_failures WHERE name = ?", (self.name,)).fetchone()[0]
        self.collector.record_breaker_change(conn, self.name, row["state"], state, failures, reason, now)
        log.info("circuit breaker %s: %s -> %s (%s)", self.name, row["state"], state, reason)
        row.update(values)

    def _admit(self) -> Optional[str]:
        """Let a call through: None for an ordinary call, a lease token for the probe; else CircuitOpenError."""
        now = self._now()
        if self.store.query_one("SELECT state FROM breakers WHERE name = ?", (self.name,)) == ("closed",):
            return None  # the common case, decided without a write lock
        with self.store.write() as conn:
            row = self._row(conn, now)
            if row["state"] == "closed":
                return None
            if row["state"] == "open":
                duration = self.duration(row["opens"])
                if row["open_until"] - now > duration:
                    # The wall clock went back: never hold the breaker past a fresh full duration.
                    row["open_until"] = now + duration
                    conn.execute("UPDATE breakers SET open_until = ? WHERE name = ?", (row["open_until"], self.name))
                if now < row["open_until"]:
                    refusal = CircuitOpenError(self.name, row["open_until"] - now)
                else:
                    self._change(conn, row, "half_open", f"open for {duration:g} s", now)
                    refusal = None
            else:
                refusal = None
            if refusal is None and row["lease_owner"] and row["lease_until"] > now:
                refusal = CircuitOpenError(self.name, row["lease_until"] - now, probing=True)
            if refusal is None:
                token = os.urandom(8).hex()
                conn.execute("UPDATE breakers SET lease_owner = ?, lease_until = ? WHERE name = ?",
                             (token, now + self.probe_timeout, self.name))
                return token
        raise refusal

    def _failed(self, ticket: Optional[str], error: BaseException) -> None:
        now = self._now()
        with self.store.write() as conn:
            row = self._row(conn, now)
            probing = ticket is not None and row["state"] == "half_open" and row["lease_owner"] == ticket
            if isinstance(error, self.exclude):
                if probing:  # says nothing about health: let the next caller probe
                    conn.execute("UPDATE breakers SET lease_owner = '', lease_until = 0 WHERE name = ?", (self.name,))
                return
            if probing:
                opens = row["opens"] + 1
                self._change(conn, row, "open", f"probe failed: {type(error).__name__}", now, opens=opens,
                             open_until=now + self.duration(opens), lease_owner="", lease_until=0.0)
                return
            conn.execute("INSERT INTO breaker_failures (name, ts) VALUES (?, ?)", (self.name, now))
            failures = self._failures(conn, now)
            if row["state"] == "closed" and failures >= self.failure_threshold:
                self._change(conn, row, "open", f"{failures} failures within {self.window:g} s, the last "
                             f"{type(error).__name__}", now, opens=1, open_until=now + self.duration(1))

    def _succeeded(self, ticket: Optional[str]) -> None:
        now = self._now()
        if ticket is None and not self.store.query_one("SELECT 1 FROM breaker_failures WHERE name = ? LIMIT 1",
                                                       (self.name,)):
            return  # the common case: closed, nothing to reset, no write
        with self.store.write() as conn:
            row = self._row(conn, now)
            if ticket is not None and row["state"] == "half_open" and row["lease_owner"] == ticket:
                self._change(conn, row, "closed", "probe succeeded", now)
            elif row["state"] == "closed":
                conn.execute("DELETE FROM breaker_failures WHERE name = ?", (self.name,))


def list_breakers(store: Store, now: float) -> List[Dict[str, Any]]:
    """Every breaker the store knows, by name."""
    return [breaker_status(store, name, now) for (name,) in store.query("SELECT name FROM breakers ORDER BY name")]


def _recorded_breaker(collector: MetricsCollector, breaker: str) -> Dict[str, Any]:
    """State, failures and since of a breaker known only from its recorded samples."""
    prefix = f"circuit_breaker_{breaker}_"
    latest = collector.latest(prefix + "state")
    failures = collector.latest(prefix + "failures")
    if latest is None:
        return {"state": None, "failures": None, "since": None}
    code = latest[1]
    state = {number: text for text, number in BREAKER_STATES.items()}.get(int(code), "unknown")
    since = collector.unchanged_since(prefix + "state", code)
    return {"state": state, "failures": None if failures is None else int(failures[1]), "since": iso_time(since)}


def breaker_states(collector: MetricsCollector, recorded: List[str], until: float) -> Dict[str, Dict[str, Any]]:
    """State, failures and since of every breaker, by name: those in ``recorded`` (the ``breaker`` label
    of the samples) and those CircuitBreaker keeps, whose table is the fresher."""
    found = {name: _recorded_breaker(collector, name) for name in recorded}
    for entry in list_breakers(collector.store, until):
        found[entry["name"]] = {key: entry[key] for key in ("state", "failures", "since")}
    return dict(sorted(found.items()))


## Alerting ###################################################################

ALERT_SEVERITIES = ("info", "warning", "critical")  # lowest first
DEFAULT_DEDUP_WINDOW_S = 3600.0  # the original design's window
DEFAULT_ALERT_TIMEOUT_S = 10.0
DEFAULT_CHANNEL_BUDGET_S = 20.0
DEFAULT_RUN_BUDGET_S = 30.0  # what one run (a cron line) spends on its alerts, pings and Watchdog in all
DELIVERY_JOIN_GRACE_S = 2.0  # past the run's budget, before a channel that has not ended is given up
DELIVERY_ATTEMPTS = 3
DELIVERY_BACKOFF_S = 1.0
DELIVERY_BACKOFF_CAP_S = 8.0
DELIVERY_MIN_ATTEMPT_S = 0.5  # below this much budget left, another attempt is not started
DELIVERY_CLAIM_GRACE_S = 10.0  # a claim outlives the channel budget by this much
DELIVERY_CLAIM_POLL_S = 0.1
MAX_REPLY_BYTES = 64 * 1024
USER_AGENT = f"metasystem-monitor/{__version__} (Python urllib)"
TRUNCATION_MARKER = "… [truncated]"
SLACK_TEXT_CHARS = 3000
DISCORD_CONTENT_CHARS = 2000
DISCORD_TITLE_CHARS = 256
DISCORD_DESCRIPTION_CHARS = 4096
DISCORD_FIELD_NAME_CHARS = 256
DISCORD_FIELD_VALUE_CHARS = 1024
DISCORD_FIELDS = 25
DISCORD_FOOTER_CHARS = 2048
DISCORD_EMBED_TOTAL_CHARS = 6000
TELEGRAM_TEXT_CHARS = 4096
NTFY_BODY_BYTES = 4096
NTFY_TITLE_CHARS = 250
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
PAGERDUTY_SUMMARY_CHARS = 1024
PAGERDUTY_DEDUP_KEY_CHARS = 255
WATCHDOG_ALERT_NAME = "Watchdog"  # kube-prometheus' name for the alert that always fires
WATCHDOG_RUNS = 2  # the Watchdog outlives this many check intervals: one missed run is not a death
ALERTMANAGER_VALID_FOR_S = 25 * 3600.0  # a firing alert Alertmanager keeps without hearing again (reminders renew it)
LOG_LINE_CHARS = 1000  # classic syslog receivers cut lines near 1 KB
SYSLOG_SOCKETS = ("/dev/log", "/var/run/syslog")
SYSLOG_LEVELS = {"critical": 2, "warning": 4, "info": 6}
SYSLOG_FACILITIES = {"user": 1, "daemon": 3, **{f"local{n}": 16 + n for n in range(8)}}
TEAMS_CARD_BYTES = 20_000  # Teams refuses a card over 28 KB, and some were seen refused from 21 KB
TEAMS_COLORS = {"critical": "attention", "warning": "warning", "info": "accent", "resolved": "good"}
MATRIX_BODY_CHARS = 16_000  # an event must stay under 64 KiB, with its HTML copy and signatures
GOTIFY_PRIORITIES = {"critical": 8, "warning": 5, "info": 2, "resolved": 2}  # 8-10 vibrate, 4-7 sound
PUSHOVER_URL = "https://api.pushover.net/1/messages.json"
PUSHOVER_MESSAGE_CHARS = 1024
PUSHOVER_TITLE_CHARS = 250
PUSHOVER_PRIORITIES = {"critical": 1, "warning": 0, "info": -1, "resolved": 0}  # 2 would need retry and expire
MATTERMOST_TEXT_CHARS = 16_383  # a longer post is split in several
OPSGENIE_URL = "https://api.opsgenie.com"  # EU accounts: https://api.eu.opsgenie.com
OPSGENIE_MESSAGE_CHARS = 130
OPSGENIE_ALIAS_CHARS = 512
OPSGENIE_DESCRIPTION_CHARS = 15_000
OPSGENIE_PRIORITIES = {"critical": "P1", "warning": "P3", "info": "P5"}
SLACK_COLORS = {"critical": "#d00000", "warning": "#f2c744", "info": "#439fe0", "resolved": "#2eb67d"}
DISCORD_COLORS = {"critical": 0xD00000, "warning": 0xF2C744, "info": 0x439FE0, "resolved": 0x2EB67D}
NTFY_PRIORITIES = {"critical": "5", "warning": "4", "info": "3"}
NTFY_TAGS = {"critical": "rotating_light", "warning": "warning", "info": "information_source"}
DELIVERY_OUTCOMES = ("sent", "failed", "deduplicated", "not_configured", "silenced", "held", "inhibited")
ALERT_KINDS = ("alert", "test", "firing", "reminder", "resolved", "digest", "catchup", "acknowledged")
DEFAULT_REPEAT_INTERVALS_S = {"critical": 3600.0, "warning": 4 * 3600.0, "info": None}  # None: never
DEFAULT_FIRE_AFTER = 1
DEFAULT_RESOLVE_AFTER = 2
DEFAULT_MAX_MESSAGES_PER_RUN = 5
RECENT_RUNS_KEPT = 32  # per key, for "N within M" (M may not exceed it)
# The original design's [alerting] keys: each makes the channel of that name and type.
SEED_CHANNEL_KEYS = {"email_to": "email", "slack_webhook_url": "slack", "discord_webhook_url": "discord",
                     "webhook_url": "webhook"}

ALERTING_KEYS = ("dedup_window", "timeout", "channel_budget", "run_budget", "repeat_interval_critical",
                 "repeat_interval_warning", "repeat_interval_info", "fire_after", "resolve_after",
                 "max_messages_per_run")
CHANNEL_COMMON_KEYS = ("type", "enabled", "min_severity", "timeout", "channel_budget", "send_resolved",
                       "quiet_hours", "quiet_hours_bypass", "fallback", "escalate_after", "escalate_to",
                       "title_template", "message_template")
# The $fields of title_template and message_template: string.Template, so a literal $ is written $$.
TEMPLATE_FIELDS = ("title", "message", "severity", "kind", "key", "host", "since", "time", "details", "note")
EMAIL_METHODS = ("smtp", "mail", "sendmail")
EMAIL_SECURITY = {"starttls": 587, "ssl": 465, "none": 25}


# -- the model ----------------------------------------------------------------

class AlertSeverity(Enum):
    """How bad it is; the original design's three levels."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return ALERT_SEVERITIES.index(self.value)


class AlertChannel(Enum):
    """The original design's channel kinds; each selects every configured channel of that type."""

    EMAIL = "email"
    WEBHOOK = "webhook"
    SLACK = "slack"
    DISCORD = "discord"
    LOG = "log"


class DeliveryError(MonitorError):
    """One attempt to deliver failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: Optional[int] = None, retry_after: Optional[float] = None,
                 error_class: Optional[str] = None, category: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.error_class = error_class or ("http" if status is not None else "delivery")
        self.category = category or (classify_http_status(status) if status is not None else "permanent")


class Alert(NamedTuple):
    """What create_alert() returns and send_alert() delivers."""

    title: str
    message: str
    severity: AlertSeverity
    channels: Optional[Tuple[str, ...]]
    details: Dict[str, Any]
    created_at: float
    uid: str  # one per alert: the webhook-id and Message-ID, the same on every retry
    kind: str = "alert"  # one of ALERT_KINDS
    dedup: Optional[str] = None  # the key given to fire() and resolve()
    note: str = ""  # "still firing since ..., reminder #2", shown before the message
    started_at: Optional[float] = None  # when a firing alert started
    inhibited_by: Optional[str] = None  # why its notifications are held: the check it depends on fails

    @property
    def key(self) -> str:
        """The dedup key: the one given to fire(), else the original design's ``severity:title``."""
        return self.dedup or f"{self.severity.value}:{self.title}"

    @property
    def headline(self) -> str:
        label = "RESOLVED" if self.kind == "resolved" else self.severity.value.upper()
        return f"[{label}] {self.title}"

    @property
    def color(self) -> str:
        """The key of the color tables: the severity, or ``resolved``."""
        return "resolved" if self.kind == "resolved" else self.severity.value

    def detail_lines(self) -> List[str]:
        return [f"{key}: {_one_line(str(value))}" for key, value in sorted(self.details.items())]


class Delivery(NamedTuple):
    """What happened on one channel: one row of the history."""

    outcome: str  # one of DELIVERY_OUTCOMES
    attempts: int = 0
    http_status: Optional[int] = None
    error_class: Optional[str] = None
    error: Optional[str] = None
    latency_ms: Optional[float] = None


class DeliveryReport(dict):
    """``{channel: delivered}`` as the original design returns it, with each Delivery in ``outcomes``."""

    def __init__(self, outcomes: Dict[str, Delivery], external: Iterable[str] = (),
                 storage_error: Optional[StorageError] = None):
        super().__init__((name, d.outcome in ("sent", "deduplicated")) for name, d in outcomes.items())
        self.outcomes = outcomes
        self.external = [name for name in external if name in outcomes]
        self.storage_error = storage_error  # the store could not be written: sent without dedup or history

    def exit_code(self) -> int:
        """0 delivered or deduplicated; 1 delivered but the store could not be written; 3 some channels
        failed; 4 none delivered. A channel that was chosen but cannot be used (a secret missing, a name
        not configured) failed: the alert did not reach it."""
        judged = self.external or list(self)
        failed = [name for name in judged if self.outcomes[name].outcome in ("failed", "not_configured")]
        if not failed:
            return EXIT_RUNTIME if self.storage_error else EXIT_OK
        return EXIT_ALERT_PARTIAL if len(failed) < len(judged) else EXIT_ALERT_NONE


class ChannelSpec(NamedTuple):
    """One channel as configured: its plain settings, its secrets, and where each secret came from."""

    name: str
    kind: str
    section: str
    settings: Dict[str, str]
    secrets: Dict[str, str]
    sources: Dict[str, str]
    min_severity: str
    timeout_s: float
    budget_s: float
    enabled: bool = True
    missing: Optional[str] = None  # why the channel cannot be used now (a secret not set), or None
    send_resolved: bool = True
    quiet_hours: Optional[Tuple[int, int]] = None  # (start, end) in minutes after local midnight
    quiet_bypass: Optional[str] = None  # this severity and above go out in quiet hours
    fallback: Optional[str] = None  # the channel tried when this one fails
    templates: Optional[Dict[str, str]] = None  # "title" and "message": string.Template texts
    escalate_after_s: Optional[float] = None  # a critical alert unacknowledged this long here ...
    escalate_to: Optional[str] = None  # ... goes to this channel as well, once

    def is_quiet(self, local_minute: int, severity: str) -> bool:
        """True when a notification of ``severity`` is held back at this local time."""
        if self.quiet_hours is None:
            return False
        if self.quiet_bypass and ALERT_SEVERITIES.index(severity) >= ALERT_SEVERITIES.index(self.quiet_bypass):
            return False
        start, end = self.quiet_hours
        return start <= local_minute < end if start < end else local_minute >= start or local_minute < end


# -- channels -----------------------------------------------------------------

CHANNEL_TYPES: Dict[str, type] = {}  # kind -> channel class: the only list of channel types


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in a visible marker when cut."""
    if len(text) <= limit:
        return text
    return text[:max(0, limit - len(TRUNCATION_MARKER))] + TRUNCATION_MARKER[:limit]


def truncate_utf8(text: str, limit_bytes: int) -> bytes:
    """``text`` as UTF-8 of at most ``limit_bytes``, cut on a character boundary with the marker."""
    data = text.encode("utf-8")
    if len(data) <= limit_bytes:
        return data
    marker = TRUNCATION_MARKER.encode("utf-8")
    return data[:limit_bytes - len(marker)].decode("utf-8", "ignore").encode("utf-8") + marker


def mask_url(url: str) -> str:
    """A URL as it may be shown: scheme, host and port; path, query and credentials as ``***``.

    >>> mask_url("https://hooks.slack.com/services/T000/B000/XXXX")
    'https://hooks.slack.com/***'
    """
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "***"
    netloc = ("***@" if "@" in parts.netloc else "") + (f"[{host}]" if ":" in host else host)
    netloc += f":{port}" if port else ""
    path = "/***" if parts.path.strip("/") else parts.path
    return f"{parts.scheme}://{netloc}{path}" + ("?***" if parts.query else "")


def _encodings(secret: str) -> set:
    """``secret`` as it may appear in text: raw, percent-encoded (``+`` for spaces too) and base64, as an
    Authorization header carries it; Masker matches each in any letter case."""
    import base64
    from urllib.parse import quote, quote_plus

    return {secret, quote(secret, safe=""), quote(secret), quote_plus(secret, safe=""),
            base64.b64encode(secret.encode("utf-8", "surrogatepass")).decode("ascii")}


def _url_fragments(url: str) -> List[str]:
    """The parts of a URL that may be a secret: path segments, query values, user and password."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(url)
        # Words such as 'services' or 'webhooks' are not secrets; ids and tokens have digits or length.
        fragments = [segment for segment in parts.path.split("/")
                     if len(segment) >= 12 or any(ch.isdigit() for ch in segment)]
        fragments += [unquote(segment) for segment in fragments]
        fragments += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
        fragments += [parts.query, parts.username or "", parts.password or ""]
        if parts.username is not None:  # what basic auth sends, and what a receiver may echo
            fragments.append(f"{unquote(parts.username)}:{unquote(parts.password or '')}")
            fragments += [unquote(parts.username), unquote(parts.password or "")]
    except ValueError:
        return [url.partition("://")[2]]  # not even a URL: all of it after the scheme
    return [fragment for fragment in fragments if fragment]


class Masker:
    """Replaces every known secret, and the parts of secret URLs, with ``***`` in any text."""

    MIN_SECRET_CHARS = 4  # shorter fragments would mangle ordinary words

    def __init__(self, secrets: Iterable[str] = ()):
        self._urls: List[str] = []
        self._fragments: set = set()
        self._pattern: Any = None  # compiled on first use, again after add()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: Optional[str]) -> None:
        if not secret:
            return
        if "://" in secret:
            self._urls.append(secret)
            for fragment in _url_fragments(secret):
                self._fragments.update(_encodings(fragment))
        self._fragments.update(_encodings(secret))
        self._pattern = None

    def scrub(self, text: Any) -> str:
        """``text`` with each secret, in any of its encodings and in any letter case, as ``***``."""
        import re

        text = str(text)
        for url in sorted(self._urls, key=len, reverse=True):
            text = text.replace(url, mask_url(url))
        if self._pattern is None:
            fragments = sorted((f for f in self._fragments if len(f) >= self.MIN_SECRET_CHARS), key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, fragments)), re.IGNORECASE) if fragments else False
        return self._pattern.sub("***", text) if self._pattern else text


def unfinished(run: "RunBudget") -> "Delivery":
    """The outcome of a channel whose sending did not end within the run's budget (a thread given up)."""
    return Delivery("failed", 1, None, "timeout", f"no end within the run's budget of {run.seconds:g} s")


def _recipients(text: str) -> List[str]:
    return [address.strip() for address in text.split(",") if address.strip()]


def _checked_url(url: str) -> Any:
    """urlsplit() of an http(s) URL with a host and a valid port; a ValueError that never quotes the URL
    (it may hold a password) otherwise."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # raises for a port that is not a number from 0 to 65535
        port = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]
        if port and not ascii_digits(port):  # Python 3.9 reads '١٢', '1_0' and '+12' as ports; later ones do not
            raise ValueError(port)
    except ValueError:
        raise ValueError("the URL's host or port cannot be read (a '#', '/' or '@' in a password is written "
                         "%23, %2F or %40)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http or https URL with a host")
    if parts.port == 0:
        raise ValueError("the URL's port is 0")
    return parts


def _is_http_url(text: str) -> bool:
    """An http(s) URL with a host and a valid port, on one line (what a channel's ``url`` must be)."""
    try:
        _checked_url(text)
    except ValueError:
        return False
    return _one_line(text) == text


def _basic_auth(url: str) -> Tuple[str, Dict[str, str]]:
    """``url`` without its ``user:password@``, and the Authorization header that carries them instead."""
    import base64
    from urllib.parse import unquote, urlunsplit

    parts = _checked_url(url)
    if parts.username is None:
        return url, {}
    credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode("utf-8")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), {
        "Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")}


class HttpReply(NamedTuple):
    status: int
    headers: Any
    body: bytes


class ExchangeTimeout(TimeoutError):
    """An exchange with a peer did not end within its Deadline (the peer may be trickling its answer)."""


def _error_text(error: BaseException) -> str:
    """One line saying what went wrong, the inner error of a URLError unwrapped."""
    reason = getattr(error, "reason", None)
    inner = reason if isinstance(reason, BaseException) else error
    if isinstance(inner, (DeliveryError, ExchangeTimeout)):
        return _one_line(str(inner))
    return _one_line(f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__)


class Deadline:
    """A wall-clock end for one whole exchange with a peer: connecting, TLS, the request, the headers and
    the body, however slowly the peer answers. A socket timeout bounds each read, not the exchange: a
    server sending a byte every 2 s held a 10 s channel for minutes. When the time is up every socket
    the deadline watches is shut down, which ends the read or write in progress at once.

    ``with Deadline(10) as deadline``: ``deadline.watch(sock)`` for a socket made by hand,
    ``deadline.connection(http.client.HTTPConnection)`` for a class whose sockets it watches, and
    ``deadline.expired`` afterwards to tell a peer that hung up from one that ran out of time.
    """

    def __init__(self, seconds: float):
        import threading

        self.seconds = max(0.0, float(seconds))
        self.expired = False
        self._end = time.monotonic() + self.seconds  # real time: it bounds real sockets
        self._lock = threading.Lock()
        self._watched: List[int] = []  # duplicates of the sockets' descriptors: shut down, then closed
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._timer.cancel()
        with self._lock:
            for fd in self._watched:
                os.close(fd)
            self._watched = []

    def left(self) -> float:
        """Seconds until the end (a little more than none: a socket timeout of 0 would not block at all)."""
        return max(0.001, self._end - time.monotonic())

    def watch(self, sock: Any) -> Any:
        """``sock``, to be shut down at the end (at once, when the end has passed)."""
        with self._lock:
            fd = os.dup(sock.fileno())
            self._watched.append(fd)
            if self.expired:
                self._shut(fd)
        sock.settimeout(self.left())
        return sock

    def connection(self, base: type) -> type:
        """``base`` (an http.client connection class) whose sockets this deadline watches, made before any
        TLS handshake: a handshake trickled byte by byte is cut as well."""
        deadline = self

        class Watched(base):  # type: ignore[valid-type, misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                made = self._create_connection
                self._create_connection = lambda *a, **k: deadline.watch(made(*a, **k))

        return Watched

    @staticmethod
    def _shut(fd: int) -> None:
        import socket

        with contextlib.suppress(OSError):
            sock = socket.socket(fileno=fd)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.detach()  # the descriptor stays ours, closed in __exit__

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for fd in self._watched:
                self._shut(fd)

    def timeout_error(self) -> ExchangeTimeout:
        return ExchangeTimeout(f"no complete answer within {self.seconds:.3g} s")

    def check(self) -> None:
        """Raise ExchangeTimeout when the end has passed: what was read by then (a read cut short returns
        what came, without an error) is not the whole answer."""
        if self.expired:
            raise self.timeout_error()


def http_request(method: str, url: str, body: Optional[bytes], headers: Dict[str, str], timeout_s: float,
                 context: Any) -> HttpReply:
    """One request, the whole exchange within ``timeout_s`` (a Deadline); every status is returned, none
    raised; redirects are not followed. OSError when no whole answer came (socket.timeout when the time
    ran out), ValueError for a URL that cannot be asked."""
    import http.client
    import urllib.request
    from urllib.error import HTTPError

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None  # a webhook that moved is a failure to see, not to follow with a GET

    url, credentials = _basic_auth(url)  # user:password@ in a URL goes as basic auth, never to DNS
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"User-Agent": USER_AGENT, **credentials, **headers})
    with Deadline(timeout_s) as deadline:
        class Plain(urllib.request.HTTPHandler):
            def http_open(self, req: Any) -> Any:
                return self.do_open(deadline.connection(http.client.HTTPConnection), req)

        class Secure(urllib.request.HTTPSHandler):
            def https_open(self, req: Any) -> Any:
                return self.do_open(deadline.connection(http.client.HTTPSConnection), req, context=context)

        opener = urllib.request.build_opener(NoRedirect, Plain, Secure)  # proxies from the environment kept
        try:
            with opener.open(request, timeout=deadline.left()) as response:
                body = response.read(MAX_REPLY_BYTES)
                deadline.check()
                return HttpReply(response.status, response.headers, body)
        except HTTPError as err:
            try:
                with contextlib.closing(err):
                    reply = err.read(MAX_REPLY_BYTES) if err.fp is not None else b""
                deadline.check()
            except (OSError, http.client.HTTPException):
                if deadline.expired:
                    raise deadline.timeout_error() from None
                raise
            return HttpReply(err.code, err.headers, reply)
        except (OSError, http.client.HTTPException) as err:
            if deadline.expired:
                raise deadline.timeout_error() from None
            if isinstance(err, http.client.HTTPException):  # an answer cut short: a connection's failure
                raise ConnectionError(_error_text(err)) from None
            raise


def _verifies(spec: ChannelSpec) -> bool:
    """False only when the channel says ``tls_verify = false``."""
    return _bool_setting(spec.settings, spec.section, "tls_verify", True, [])


def tls_context(verify: bool) -> Any:
    """The default verifying context, or (asked for explicitly) one that accepts any certificate."""
    import ssl

    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _json_bytes(document: Any) -> bytes:
    return json_text(document, indent=None, compact=True).encode("utf-8")


def _reply_json(reply: HttpReply) -> Dict[str, Any]:
    import json

    try:
        document = json.loads(reply.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _reply_error(reply: HttpReply, now: float, retry_after: Any = None) -> DeliveryError:
    """The failure an HTTP reply means, with its Retry-After (header, or the body's) parsed."""
    text = _one_line(reply.body[:200].decode("utf-8", "replace"))
    header = reply.headers.get("Retry-After") if reply.headers is not None else None
    wait = parse_retry_after(retry_after if retry_after is not None else header, now)
    error_class = "rate_limited" if reply.status == 429 else "http"
    return DeliveryError(f"HTTP {reply.status}" + (f": {text}" if text else ""), status=reply.status,
                         retry_after=wait, error_class=error_class)


def register_channel(cls: type) -> type:
    """Make a channel class a ``type =`` of ``[channel:NAME]``: its keys, checks and sending come from it."""
    CHANNEL_TYPES[cls.kind] = cls
    return cls


def template_fields(alert: Alert, hostname: str) -> Dict[str, str]:
    """The values of TEMPLATE_FIELDS for one alert, as a channel's templates see them."""
    details = ", ".join(f"{key}={_one_line(str(value))}" for key, value in sorted(alert.details.items()))
    return {"title": alert.title, "message": alert.message, "severity": alert.severity.value, "kind": alert.kind,
            "key": alert.key, "host": hostname, "since": iso_time(alert.started_at) or "",
            "time": iso_time(alert.created_at), "details": details, "note": alert.note}


def template_problem(text: str) -> Optional[str]:
    """Why ``text`` is not a template of TEMPLATE_FIELDS (an unknown field, a lone $), or None."""
    import string

    for match in string.Template.pattern.finditer(text):
        name = match.group("named") or match.group("braced")
        if match.group("invalid") is not None:
            return f"a $ at character {match.start() + 1} names no field (write $$ for a $)"
        if name is not None and name not in TEMPLATE_FIELDS:
            return f"unknown field ${name}; the fields are ${', $'.join(TEMPLATE_FIELDS)}"
    return None


class _Channel:
    """One configured channel: renders an alert for its service and delivers it.

    A subclass declares what its ``[channel:NAME]`` section takes besides CHANNEL_COMMON_KEYS: its plain
    ``keys``, its ``secrets`` (each also as KEY_env and KEY_file, never shown), the ``required`` ones among
    both, and the ``problems()`` its values can have whatever the machine.
    """

    kind = ""
    keys: Tuple[str, ...] = ()
    secrets: Tuple[str, ...] = ()
    required: Tuple[str, ...] = ()

    @classmethod
    def problems(cls, section: str, settings: Dict[str, str], items: Dict[str, str]) -> List[Tuple[str, str, str]]:
        """(section, key, text) for each value that is wrong: ``settings`` are the plain keys given."""
        return []

    @classmethod
    def secret_problems(cls, section: str, secrets: Dict[str, str]) -> List[Tuple[str, str, str]]:
        """(section, key, text) for each secret whose value cannot work, however it was given (KEY, KEY_env
        or KEY_file); the text never quotes the value."""
        return []

    def __init__(self, spec: ChannelSpec, hostname: str):
        self.spec = spec
        self.name = spec.name
        self.hostname = hostname

    def describe(self) -> str:
        return self.spec.kind

    def templated(self, alert: Alert) -> Alert:
        """The alert with this channel's ``title_template`` and ``message_template`` filled in."""
        if not self.spec.templates:
            return alert
        import string

        fields = template_fields(alert, self.hostname)
        return alert._replace(**{part: string.Template(text).safe_substitute(fields)
                                 for part, text in self.spec.templates.items()})

    def render(self, alert: Alert) -> str:
        """The payload as --dry-run shows it (secrets are masked by the caller)."""
        raise NotImplementedError

    def send(self, alert: Alert, timeout_s: float, now: float) -> Optional[int]:
        """Deliver once; return the HTTP status if any; raise on failure."""
        raise NotImplementedError

    def body_text(self, alert: Alert) -> str:
        """The note, the message, the details, then this machine and the time; a ``host`` detail (the
        machine the alert is about) keeps its key, and this one is then the machine it was sent from."""
        lines = [alert.note] if alert.note else []
        lines += [alert.message] if alert.message else []
        if alert.details:
            lines += [""] + alert.detail_lines()
        machine = "sent from" if "host" in alert.details else "host"
        lines += ["", f"{machine}: {self.hostname}", f"time: {iso_time(alert.created_at)}"]
        return "\n".join(lines)


class _HttpChannel(_Channel):
    """A channel that POSTs JSON to a URL and reads the status."""

    keys = ("tls_verify",)
    secrets = ("url",)
    required = ("url",)
    content_type = "application/json"

    @classmethod
    def problems(cls, section: str, settings: Dict[str, str], items: Dict[str, str]) -> List[Tuple[str, str, str]]:
        problems: List[Tuple[str, str, str]] = []
        for key in ("url", "api_url"):
            text = items.get(key, "").strip()
            if text and not _is_http_url(text):  # the value itself is not shown: it may be a secret
                scheme = text.partition(":")[0] if ":" in text else ""
                shown = f" (it starts with {scheme!r})" if scheme.isalpha() and scheme not in ("http", "https") else ""
                problems.append((section, key, f"not an http or https URL{shown}"))
        _bool_setting(settings, section, "tls_verify", True, problems)
        return problems

    @classmethod
    def secret_problems(cls, section: str, secrets: Dict[str, str]) -> List[Tuple[str, str, str]]:
        # Each goes in a header or the URL, where http.client would refuse it quoting the whole value.
        return [(section, key, "holds a control character or line break: no URL, token or key has one")
                for key, value in sorted(secrets.items()) if any(ord(char) in _LINE_BREAKING for char in value)]

    def url(self) -> str:
        return self.spec.secrets["url"]

    def describe(self) -> str:
        return f"{self.spec.kind} POST {mask_url(self.url())}"

    def payload(self, alert: Alert) -> bytes:
        raise NotImplementedError

    def headers(self, alert: Alert, body: bytes, now: float) -> Dict[str, str]:
        return {"Content-Type": self.content_type}

    def render(self, alert: Alert) -> str:
        return self.payload(alert).decode("utf-8")

    def send(self, alert: Alert, timeout_s: float, now: float) -> Optional[int]:
        body = self.payload(alert)
        return self.request(self.method(alert), self.target(alert), body, self.headers(alert, body, now),
                            timeout_s, now)

    def request(self, method: str, url: str, body: bytes, headers: Dict[str, str], timeout_s: float,
                now: float) -> int:
        """One request with this channel's TLS settings; what check() refuses raises."""
        context = tls_context(_verifies(self.spec)) if url.startswith("https:") else None
        reply = http_request(method, url, body, headers, timeout_s, context)
        self.check(reply, now)
        return reply.status

    def method(self, alert: Alert) -> str:
        return "POST"

    def target(self, alert: Alert) -> str:
        """The URL this alert goes to: url(), unless the service names the alert in its path."""
        return self.url()

    def check(self, reply: HttpReply, now: float) -> None:
        if not 200 <= reply.status < 300:
            raise _reply_error(reply, now)


WORD_JOINER = "\u2060"  # invisible, and neither a letter nor a space: '@\u2060all' reads as @all, mentions no one


def _unmentioned(text: str) -> str:
    """``text`` with a word joiner after each ``@`` and ``<``: it reads the same, but a chat service finds no
    @channel, @all, @here or @user in it, nor Slack's <!channel>, <@id> or <url|link> that Mattermost and
    Rocket.Chat also read."""
    return text.replace("@", "@" + WORD_JOINER).replace("<", "<" + WORD_JOINER)


def _slack_escape(text: str) -> str:
    """Slack's three control characters as entities, so alert text never becomes a link or mention."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_cut(text: str) -> str:
    cut = truncate(text, SLACK_TEXT_CHARS)
    if cut != text:  # never leave half an entity before the marker
        head = cut[:-len(TRUNCATION_MARKER)]
        amp = head.rfind("&", max(0, len(head) - 5))
        if amp >= 0 and ";" not in head[amp:]:
            head = head[:amp]
        cut = head + TRUNCATION_MARKER
    return cut


@register_channel
class SlackChannel(_HttpChannel):
    """Slack incoming webhook: ``text`` always, one attachment colored by severity; success is 200 ``ok``."""

    kind = "slack"

    def payload(self, alert: Alert) -> bytes:
        body = _slack_escape(self.body_text(alert))
        return _json_bytes({
            "text": truncate(_slack_escape(alert.headline), SLACK_TEXT_CHARS),
            "attachments": [{
                "color": SLACK_COLORS[alert.color],
                "fallback": truncate(alert.headline, SLACK_TEXT_CHARS),
                "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": _slack_cut(body)}}],
            }],
        })

    def check(self, reply: HttpReply, now: float) -> None:
        if reply.status != 200 or reply.body.strip() != b"ok":
            raise _reply_error(reply, now)


def _discord_fields(details: Dict[str, Any], room: int) -> List[Dict[str, Any]]:
    """One inline field per detail, as many as fit in ``room`` characters (the last one cut)."""
    fields = []
    for key, value in sorted(details.items())[:DISCORD_FIELDS]:
        name = truncate(str(key), DISCORD_FIELD_NAME_CHARS) or "-"
        text = truncate(_one_line(str(value)), DISCORD_FIELD_VALUE_CHARS) or "-"
        if len(name) + len(text) > room:
            if room - len(name) <= len(TRUNCATION_MARKER):
                break
            text = truncate(text, room - len(name))
        fields.append({"name": name, "value": text, "inline": True})
        room -= len(name) + len(text)
    return fields


@register_channel
class DiscordChannel(_HttpChannel):
    """Discord webhook with ``?wait=true``, one embed, mentions disabled, within Discord's limits."""

    kind = "discord"
    keys = ("tls_verify", "username")

    def url(self) -> str:
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        parts = urlsplit(self.spec.secrets["url"])
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "wait"]
        return urlunsplit(parts._replace(query=urlencode(query + [("wait", "true")])))

    def payload(self, alert: Alert) -> bytes:
        title = truncate(alert.headline, DISCORD_TITLE_CHARS)
        footer = truncate(f"metasystem-monitor on {self.hostname}", DISCORD_FOOTER_CHARS)
        room = DISCORD_EMBED_TOTAL_CHARS - len(title) - len(footer)
        text = "\n".join(part for part in (alert.note, alert.message) if part)  # the note: reminder #n, fired for
        description = truncate(text or "-", min(DISCORD_DESCRIPTION_CHARS, room))
        embed = {"title": title, "description": description, "color": DISCORD_COLORS[alert.color],
                 "fields": _discord_fields(alert.details, room - len(description)), "footer": {"text": footer},
                 "timestamp": iso_time(alert.created_at)}
        document = {"content": truncate(alert.headline, DISCORD_CONTENT_CHARS), "embeds": [embed],
                    "allowed_mentions": {"parse": []}}
        if self.spec.settings.get("username"):
            document["username"] = self.spec.settings["username"]
        return _json_bytes(document)

    def check(self, reply: HttpReply, now: float) -> None:
        if reply.status not in (200, 204):
            raise _reply_error(reply, now, _reply_json(reply).get("retry_after") if reply.status == 429 else None)


def _fingerprint(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a webhook ``secret``: a ``whsec_`` one is the strict base64 after that prefix (Standard
    Webhooks), any other its UTF-8; ValueError, which never quotes the secret, for a ``whsec_`` one that is not."""
    import base64
    import re

    if not secret.startswith("whsec_"):
        return secret.encode("utf-8")
    encoded = secret[len("whsec_"):]
    if not encoded:
        raise ValueError("a whsec_ secret holds no key after the prefix")
    # Checked here, not by b64decode(validate=True), which lets '==' through on some Pythons and not others.
    if not re.fullmatch(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?", encoded):
        raise ValueError("a whsec_ secret is base64 after the prefix, and this one is not")
    return base64.b64decode(encoded)


def webhook_signature(secret: str, message_id: str, timestamp: int, body: bytes) -> Dict[str, str]:
    """Standard Webhooks headers: HMAC-SHA256 over ``id.timestamp.body`` with webhook_key(secret)."""
    import base64
    import hashlib
    import hmac

    key = webhook_key(secret)
    signed = f"{message_id}.{timestamp}.".encode("utf-8") + body
    digest = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": f"v1,{digest}"}


@register_channel
class WebhookChannel(_HttpChannel):
    """A JSON body an Alertmanager webhook receiver can read, optionally signed (Standard Webhooks)."""

    kind = "webhook"
    secrets = ("url", "secret")

    @classmethod
    def secret_problems(cls, section: str, secrets: Dict[str, str]) -> List[Tuple[str, str, str]]:
        problems = super().secret_problems(section, secrets)
        try:
            webhook_key(secrets.get("secret", ""))
        except ValueError as err:
            problems.append((section, "secret", str(err)))
        return problems

    def payload(self, alert: Alert) -> bytes:
        labels = {"alertname": alert.title, "severity": alert.severity.value, "instance": self.hostname,
                  "source": "metasystem"}
        annotations = {"summary": alert.title, "description": alert.message}
        status = "resolved" if alert.kind == "resolved" else "firing"
        ends = iso_time(alert.created_at) if status == "resolved" else "0001-01-01T00:00:00Z"
        return _json_bytes({
            "version": "4", "status": status, "receiver": self.name, "groupKey": alert.key,
            "truncatedAlerts": 0, "groupLabels": {"alertname": alert.title}, "commonLabels": labels,
            "commonAnnotations": annotations, "externalURL": "",
            "alerts": [{"status": status, "labels": labels, "annotations": annotations,
                        "startsAt": iso_time(alert.started_at or alert.created_at), "endsAt": ends,
                        "generatorURL": "", "fingerprint": _fingerprint(alert.key)}],
            "severity": alert.severity.value, "dedup_key": alert.key, "details": alert.details,
            "title": alert.title, "message": alert.message, "kind": alert.kind, "note": alert.note,
        })

    def headers(self, alert: Alert, body: bytes, now: float) -> Dict[str, str]:
        headers = super().headers(alert, body, now)
        secret = self.spec.secrets.get("secret")
        if secret:
            headers.update(webhook_signature(secret, alert.uid, int(now), body))
        return headers


def _header_text(text: str) -> str:
    """A header value: ASCII as it is, anything else as an RFC 2047 encoded word."""
    import base64

    text = _one_line(text)
    if text.isascii():
        return text
    return "=?UTF-8?B?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="


@register_channel
class NtfyChannel(_HttpChannel):
    """ntfy: the body is the message, Title, Priority and Tags are headers."""

    kind = "ntfy"
    secrets = ("url", "token")
    content_type = "text/plain; charset=utf-8"

    def payload(self, alert: Alert) -> bytes:
        return truncate_utf8(self.body_text(alert), NTFY_BODY_BYTES)

    def headers(self, alert: Alert, body: bytes, now: float) -> Dict[str, str]:
        headers = super().headers(alert, body, now)
        headers.update(Title=_header_text(truncate(alert.headline, NTFY_TITLE_CHARS)),
                       Priority=NTFY_PRIORITIES[alert.severity.value],
                       Tags="white_check_mark" if alert.kind == "resolved" else NTFY_TAGS[alert.severity.value])
        if self.spec.secrets.get("token"):
            headers["Authorization"] = f"Bearer {self.spec.secrets['token']}"
        return headers

    def render(self, alert: Alert) -> str:
        headers = self.headers(alert, b"", 0.0)
        shown = "".join(f"{key}: {value}\n" for key, value in headers.items() if key != "Authorization")
        return shown + "\n" + self.payload(alert).decode("utf-8")


@register_channel
class TelegramChannel(_HttpChannel):
    """Telegram Bot API sendMessage; the token sits in the path, so only the masked URL is ever shown."""

    kind = "telegram"
    keys = ("tls_verify", "chat_id", "api_url")
    secrets = ("token",)
    required = ("token", "chat_id")

    @classmethod
    def problems(cls, section: str, settings: Dict[str, str], items: Dict[str, str]) -> List[Tuple[str, str, str]]:
        problems = super().problems(section, settings, items)
        chat = settings.get("chat_id")
        if chat is not None and not (chat.isascii() and chat.lstrip("-@").replace("_", "").isalnum()):
            problems.append((section, "chat_id", f"{_shown(chat)} is not a chat id or @channel"))
        return problems

    def url(self) -> str:
        base = self.spec.settings.get("api_url", "https://api.telegram.org").rstrip("/")
        return f"{base}/bot{self.spec.secrets['token']}/sendMessage"

    def payload(self, alert: Alert) -> bytes:
        text = truncate(_unmentioned(f"{alert.headline}\n\n{self.body_text(alert)}"), TELEGRAM_TEXT_CHARS)
        return _json_bytes({"chat_id": self.spec.settings["chat_id"], "text": text,
                            "disable_web_page_preview": True})

    def check(self, reply: HttpReply, now: float) -> None:
        document = _reply_json(reply)
        if reply.status != 200 or document.get("ok") is not True:
            parameters = document.get("parameters")
            retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
            raise _reply_error(reply, now, retry_after)


@register_channel
class AlertmanagerChannel(_HttpChannel):
    """Alertmanager's API v2: the alert with labels a fleet can route, group and silence on; ``endsAt`` is
    the resolve time, or for a firing alert how long Alertmanager keeps it without hearing again."""

    kind = "alertmanager"
    keys = ("tls_verify", "valid_for", "watchdog")

    @classmethod
    def problems(cls, section: str, settings: Dict[str, str], items: Dict[str, str]) -> List[Tuple[str, str, str]]:
        problems = super().problems(section, settings, items)
        if settings.get("valid_for"):
            _duration_setting(settings, section, "valid_for", ALERTMANAGER_VALID_FOR_S, problems, positive=True)
        _bool_setting(settings, section, "watchdog", True, problems)
        return problems

    @property
    def wants_watchdog(self) -> bool:
        return _bool_setting(self.spec.settings, self.spec.name, "watchdog", True, [])  # checked with the section

    def watchdog_payload(self, now: float, valid_for_s: float) -> bytes:
        """The Watchdog alert as kube-prometheus makes it: always firing while ``check`` runs, severity
        none, so a dead man's switch behind Alertmanager hears of the machine when it stops."""
        labels = {"alertname": WATCHDOG_ALERT_NAME, "severity": "none", "instance": self.hostname,
                  "job": "metasystem"}
        annotations = {"summary": f"metasystem-monitor runs its checks on {self.hostname}",
                       "description": "This alert fires for as long as check runs here, on purpose: route it to a "
                                      "dead man's switch, which alerts when it stops (the machine or cron died)."}
        return _json_bytes([{"labels": labels, "annotations": annotations, "startsAt": iso_time(now),
                             "endsAt": iso_time(now + valid_for_s), "generatorURL": ""}])

    def send_watchdog(self, timeout_s: float, now: float, valid_for_s: float) -> None:
        self.request("POST", self.url(), self.watchdog_payload(now, valid_for_s),
                     {"Content-Type": self.content_type}, timeout_s, now)

    def url(self) -> str:
        return self.spec.secrets["url"].rstrip("/") + "/api/v2/alerts"

    def payload(self, alert: Alert) -> bytes:
        labels = {"alertname": alert.dedup or alert.title, "severity": alert.severity.value,
                  "instance": self.hostname, "job": "metasystem"}
        annotations = {"summary": alert.title, "description": self.body_text(alert)}
        valid_for = parse_duration_s(self.spec.settings.get("valid_for") or f"{ALERTMANAGER_VALID_FOR_S:g}s")
        ends = alert.created_at if alert.kind == "resolved" else alert.created_at + valid_for
        return _json_bytes([{"labels": labels, "annotations": annotations,
                             "startsAt": iso_time(alert.started_at or alert.created_at), "endsAt": iso_time(ends),
                             "generatorURL": ""}])


def bounded_key(key: str, limit: int) -> str:
    """An alert key where a service takes at most ``limit`` characters: as it is, else its SHA-256."""
    import hashlib

    return key if len(key) <= limit else hashlib.sha256(key.encode("utf-8")).hexdigest()


@register_channel
class TeamsChannel(_HttpChannel):
    """Microsoft Teams through a Workflows webhook: one Adaptive Card (the old Office 365 connectors are
    retired); 202 means accepted, not yet posted."""

    kind = "teams"

    def card(self, alert: Alert, text: str) -> bytes:
        card = {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "type": "AdaptiveCard",
                "version": "1.2", "body": [
                    {"type": "TextBlock", "text": alert.headline, "weight": "bolder", "size": "medium",
                     "color": TEAMS_COLORS[alert.color], "wrap": True},
                    {"type": "TextBlock", "text": text, "wrap": True}]}
        return _json_bytes({"type": "message", "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}]})

    def payload(self, alert: Alert) -> bytes:
        """The card, its text cut (by halving, as escapes make bytes and characters differ) to fit."""
        text = self.body_text(alert)
        body = self.card(alert, text)
        if len(body) <= TEAMS_CARD_BYTES:
            return body
        low, high = 0, len(text)  # the longest cut that fits lies in [low, high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if len(self.card(alert, truncate(text, middle))) <= TEAMS_CARD_BYTES \
                else (low, middle)
        return self.card(alert, truncate(text, low))


@register_channel
class MatrixChannel(_HttpChannel):
    """A Matrix room through the client-server API: an ``m.notice`` (never answered by bots) with an HTML
    copy that mentions no one; the alert's id is the transaction id, so a retried send never posts twice."""

    kind = "matrix"
    keys = ("tls_verify", "homeserver", "room_id")
    secrets = ("token",)
    required = ("homeserver", "room_id", "token")

    @classmethod
    def problems(cls, section: str, settings: Dict[str, str], items: Dict[str, str]) -> List[Tuple[str, str, str]]:
        problems = super().problems(section, settings, items)
        homeserver = settings.get("homeserver")
        if homeserver is not None and not _is_http_url(homeserver):
            problems.append((section, "homeserver", "not an http or https URL"))
        room = settings.get("room_id")
        if room is not None and not (room[:1] in "!#" and ":" in room):
            problems.append((section, "room_id", f"{_shown(room)} is not a room such as !abc:example.org"))
        return problems

    def url(self) -> str:
        return self.spec.settings["homeserver"].rstrip("/")

    def describe(self) -> str:
        return f"matrix PUT {mask_url(self.url())}/_matrix/client/v3/rooms/***/send/m.room.message/***"

    def method(self, alert: Alert) -> str:
        return "PUT"

    def target(self, alert: Alert) -> str:
        from urllib.parse import quote

        room = quote(self.spec.settings["room_id"], safe="")
        return f"{self.url()}/_matrix/client/v3/rooms/{room}/send/m.room.message/{quote(alert.uid, safe='')}"

    def headers(self, alert: Alert, body: bytes, now: float) -> Dict[str, str]:
        return dict(super().headers(alert, body, now), Authorization=f"Bearer {self.spec.secrets['token']}")

    def payload(self, alert: Alert) -> bytes:
        import html

        headline, text = _unmentioned(alert.headline), truncate(_unmentioned(self.body_text(alert)), MATRIX_BODY_CHARS)
        formatted = f"<strong>{html.escape(headline)}</strong><br>" + html.escape(text).replace("\n", "<br>")
        return _json_bytes({"msgtype": "m.notice", "body": f"{headline}\n\n{text}",
                            "format": "org.matrix.custom.html", "formatted_body": formatted,
                            "m.mentions": {}})  # mentions no one: no @room, no display name in the text notifies

    def check(self, reply: HttpReply, now: float) -> None:
        if reply.status != 200 or "event_id" not in _reply_json(reply):
            wait_ms = _reply_json(reply).get("retry_after_ms") if reply.status == 429 else None
            raise _reply_error(reply, now, wait_ms / 1000.0 if isinstance(wait_ms, (int, float)) else None)


@register_channel
class GotifyChannel(_HttpChannel):
    """A Gotify server: ``POST {url}/message`` with the application's token, priority by severity."""

    kind = "gotify"
    secrets = ("url", "token")
    required = ("url", "token")

    def url(self) -> str:
        return self.spec.secrets["url"].rstrip("/") + "/message"

    def headers(self, alert: Alert, body: bytes, now: float) -> Dict[str, str]:
        return dict(super().headers(alert, body, now), **{"X-Gotify-Key": self.spec.secrets["token"]})

    def payload(self, alert: Alert) -> bytes:
        return _json_bytes({"title": alert.headline, "message": self.body_text(alert),
                            "priority": GOTIFY_PRIORITIES[alert.color],
                            "extras": {"client::display": {"contentType": "text/plain"}}})


@register_channel
class PushoverChannel(_HttpChannel):
    """Pushover's message API, form-encoded: the application's token and the user (or group) key; a
    critical alert is high priority (emergency would need retry and expire)."""

    kind = "pushover"
    keys = ("tls_verify", "api_url", "device")
    secrets = ("token", "user")
    required = ("token", "user")
    content_type = "application/x-www-form-urlencoded"

    def url(self) -> str:
        return self.spec.settings.get("api_url") or PUSHOVER_URL

    def payload(self, alert: Alert) -> bytes:
        from urllib.parse import urlencode

        fields = {"token": self.spec.secrets["token"], "user": self.spec.secrets["user"],
                  "title": truncate(alert.headline, PUSHOVER_TITLE_CHARS),
                  "message": truncate(self.body_text(alert), PUSHOVER_MESSAGE_CHARS),
                  "priority": str(PUSHOVER_PRIORITIES[alert.color]), "timestamp": str(int(alert.created_at))}
        if self.spec.settings.get("device"):
            fields["device"] = self.spec.settings["device"]
        return urlencode(fields).encode("ascii")

    def render(self, alert: Alert) -> str:
        from urllib.parse import parse_qsl

        shown = dict(parse_qsl(self.payload(alert).decode("ascii")), token="***", user="***")
        return "\n".join(f"{key}={value}" for key, value in shown.items())

    def check(self, reply: HttpReply, now: float) -> None:
        if reply.status != 200 or _reply_json(reply).get("status") != 1:
            raise _reply_error(reply, now)


def _markdown_line_start(match: Any) -> str:
    indent, mark, number, dot = match.groups()
    return f"{indent}\\{mark}" if mark else f"{indent}{number}\\{dot}"


def markdown_inert(text: str) -> str:
    """``text`` as Markdown (CommonMark, Mattermost's) shows it, literally: mentions broken as _unmentioned()
    breaks them, links and images by a word joiner after each ``]``, and each character that would make
    emphasis, code, strikethrough or a table, or a heading, quote or list at the start of a line, escaped
    with a backslash (which Markdown does not show).

    >>> markdown_inert("*bold* 1_000 _x_") == r"\\*bold\\* 1_000 \\_x\\_"
    True
    """
    import re

    text = _unmentioned(text).replace("]", "]" + WORD_JOINER)
    text = re.sub(r"[\\`*~|]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])", r"\\\g<0>", text)
    return re.sub(r"(?m)^([ \t]*)(?:([#>+=-])|([0-9]{1,9})([.)]))", _markdown_line_start, text)


# Rocket.Chat's Markdown has no escape: its emphasis and code marks become their full-width look-alikes.
_ROCKETCHAT_MARKS = str.maketrans({"*": "\uff0a", "~": "\uff5e", "`": "\uff40"})


def rocketchat_inert(text: str) -> str:
    """``text`` as Rocket.Chat's message parser shows it, literally: mentions broken as _unmentioned() breaks
    them, links, images, spoilers and #channel links by a word joiner after ``]``, ``|`` and ``#``, and the
    marks of emphasis and code (an ``_`` only where it is not inside a word) as full-width look-alikes."""
    import re

    text = _unmentioned(text).translate(_ROCKETCHAT_MARKS)
    text = re.sub(r"(?<![0-9A-Za-z])_", "\uff3f", text)
    return re.sub(r"[]|#]", lambda match: match.group() + WORD_JOINER, text)


@register_channel
class MattermostChannel(_HttpChannel):
    """Mattermost incoming webhook: ``text`` in Markdown, the alert's own text shown literally (no mention,
    link or emphasis it holds works); success is 200."""

    kind = "mattermost"
    keys = ("tls_verify", "channel", "username")

    def payload(self, alert: Alert) -> bytes:
        headline = alert._replace(title=markdown_inert(alert.title)).headline
        text = f"**{headline}**\n\n{markdown_inert(self.body_text(alert))}"
        document = {"text": truncate(text, MATTERMOST_TEXT_CHARS)}
        document.update({key: value for key, value in self.spec.settings.items() if key in ("channel", "username")})
        return _json_bytes(document)


@register_channel
class RocketChatChannel(_HttpChannel):
    """Rocket.Chat incoming webhook: the headline, one attachment colored by severity whose title and text
    are plain (``mrkdwn_in`` empty); no mention, link or emphasis the alert holds works; success is
    ``{"success": true}``."""

    kind = "rocketchat"
    keys = ("tls_verify", "channel", "alias")

    def payload(self, alert: Alert) -> bytes:
        headline = alert._replace(title=rocketchat_inert(alert.title)).headline
        document = {"text": headline, "attachments": [
            {"title": _unmentioned(alert.title), "text": _unmentioned(self.body_text(alert)), "mrkdwn_in": [],
             "color": SLACK_COLORS[alert.color]}]}
        document.update({key: value for key, value in self.spec.settings.items() if key in ("channel", "alias")})
        return _json_bytes(document)

    def check(self, reply: HttpReply, now: float) -> None:
        if reply.status != 200 or _reply_json(reply).get("success") is not True:
            raise _reply_error(reply, now)


@register_channel
class OpsgenieChannel(_HttpChannel):
    """Opsgenie's Alert API v2: create with the alert's key as ``alias`` (one open alert per alias), and
    close by that alias when it resolves; 202 means the request was queued."""

    kind = "opsgenie"
    keys = ("tls_verify", "api_url")
    secrets = ("api_key",)
    required = ("api_key",)

    def url(self) -> str:
        return (self.spec.settings.get("api_url") or OPSGENIE_URL).rstrip("/")

    def describe(self) -> str:
        return f"opsgenie POST {mask_url(self.url())}/v2/alerts"

    def alias(self, alert: Alert) -> str:
        return bounded_key(alert.key, OPSGENIE_ALIAS_CHARS)

    def target(self, alert: Alert) -> str:
        from urllib.parse import quote

        if alert.kind == "resolved":
            return f"{self.url()}/v2/alerts/{quote(self.alias(alert), safe='')}/close?identifierType=alias"
        return f"{self.url()}/v2/alerts"

    def headers(self, alert: Alert, body: bytes, now: float) -> Dict[str, str]:
        return dict(super().headers(alert, body, now), Authorization=f"GenieKey {self.spec.secrets['api_key']}")

    def payload(self, alert: Alert) -> bytes:
        if alert.kind == "resolved":
            return _json_bytes({"source": self.hostname, "note": alert.note or "resolved"})
        return _json_bytes({
            "message": truncate(alert.title, OPSGENIE_MESSAGE_CHARS), "alias": self.alias(alert),
            "description": truncate(self.body_text(alert), OPSGENIE_DESCRIPTION_CHARS),
            "priority": OPSGENIE_PRIORITIES[alert.severity.value], "source": self.hostname, "entity": self.hostname,
            "tags": ["metasystem", alert.severity.value],
            "details": {str(key): _one_line(str(value)) for key, value in sorted(alert.details.items())}})

    def check(self, reply: HttpReply, now: float) -> None:
        if reply.status != 202:
            raise _reply_error(reply, now)


def pagerduty_dedup_key(key: str) -> str:
    """The alert key as PagerDuty's dedup_key: as it is when it fits in 255 characters, else its SHA-256."""
    return bounded_key(key, PAGERDUTY_DEDUP_KEY_CHARS)


@register_channel
class PagerDutyChannel(_HttpChannel):
    """PagerDuty Events API v2: trigger, and resolve under the same ``dedup_key`` (the alert's key)."""

    kind = "pagerduty"
    keys = ("tls_verify", "url")
    secrets = ("routing_key",)
    required = ("routing_key",)

    def url(self) -> str:
        return self.spec.settings.get("url") or PAGERDUTY_URL

    def describe(self) -> str:
        return f"pagerduty POST {mask_url(self.url())}"

    def payload(self, alert: Alert) -> bytes:
        event = {"routing_key": self.spec.secrets["routing_key"], "dedup_key": pagerduty_dedup_key(alert.key),
                 "event_action": "resolve" if alert.kind == "resolved" else "trigger"}
        if alert.kind != "resolved":
            summary = " - ".join(part for part in (alert.title, _one_line(alert.note or alert.message)) if part)
            event["payload"] = {"summary": truncate(summary, PAGERDUTY_SUMMARY_CHARS), "source": self.hostname,
                                "severity": alert.severity.value, "timestamp": iso_time(alert.created_at),
                                "custom_details": dict(alert.details, message=alert.message)}
        return _json_bytes(event)

    def check(self, reply: HttpReply, now: float) -> None:
        if reply.status != 202:
            raise _reply_error(reply, now)


def _stop_group(process: Any) -> None:
    """Kill a child's whole process group (it was started in a session of its own), reap it, and close
    its pipes without waiting for whatever else may still hold them."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


@register_channel
class EmailChannel(_Channel):
    """Email by SMTP (STARTTLS or implicit TLS, verified), by ``mail``, or by ``sendmail -t -oi``."""

    kind = "email"
    keys = ("method", "to", "from", "smtp_host", "smtp_port", "security", "username", "allow_insecure_auth",
            "tls_verify", "command")
    secrets = ("password",)
    required = ("to",)

    @classmethod
    def problems(cls, section: str, settings: Dict[str, str], items: Dict[str, str]) -> List[Tuple[str, str, str]]:
        problems: List[Tuple[str, str, str]] = []
        for key in ("tls_verify", "allow_insecure_auth"):
            _bool_setting(settings, section, key, True, problems)
        for address in _recipients(settings.get("to", "")):
            if address[0] in "-|" or any(ch.isspace() or ord(ch) < 32 or ch in "<>;\"'`$\\" for ch in address):
                problems.append((section, "to", f"{_shown(address)} is not a mail address"))
        sender = settings.get("from", "")
        if sender and (sender[0] in "-|" or any(ch.isspace() or ord(ch) < 32 for ch in sender)):
            problems.append((section, "from", f"{_shown(sender)} is not a mail address"))
        return problems + cls._delivery_problems(section, settings, items)

    @classmethod
    def _delivery_problems(cls, section: str, settings: Dict[str, str],
                           items: Dict[str, str]) -> List[Tuple[str, str, str]]:
        problems = []
        method = settings.get("method", "smtp" if "smtp_host" in settings else "mail")
        if method not in EMAIL_METHODS:
            problems.append((section, "method", f"{_shown(method)} is not one of {', '.join(EMAIL_METHODS)}"))
        security = settings.get("security", "starttls")
        if security not in EMAIL_SECURITY:
            problems.append((section, "security", f"{_shown(security)} is not one of {', '.join(EMAIL_SECURITY)}"))
        if method == "smtp" and not settings.get("smtp_host"):
            problems.append((section, "smtp_host", "required when method = smtp"))
        port = settings.get("smtp_port")
        if port is not None and not (ascii_digits(port) and 0 < int(port) < 65536):
            problems.append((section, "smtp_port", f"{_shown(port)} is not a port number"))
        if settings.get("username") and method == "smtp" and not any(
                key in items for key in ("password", "password_env", "password_file")):
            problems.append((section, "password", "required when username is set"))
        insecure = _bool_setting(settings, section, "allow_insecure_auth", False, [])
        if security == "none" and settings.get("username") and not insecure:
            problems.append((section, "username", "login over a connection without TLS sends the password in "
                                                  "clear; set allow_insecure_auth = true to allow it"))
        return problems

    def method(self) -> str:
        return self.spec.settings.get("method", "smtp" if "smtp_host" in self.spec.settings else "mail")

    def recipients(self) -> List[str]:
        return _recipients(self.spec.settings["to"])

    def describe(self) -> str:
        method = self.method()
        if method == "smtp":
            security = self.spec.settings.get("security", "starttls")
            where = f"smtp {self.spec.settings['smtp_host']}:{self._port()} ({security})"
        else:
            where = self._command()[0] if self._command() else method
        return f"email via {where} to {', '.join(self.recipients())}"

    def subject(self, alert: Alert) -> str:
        return _one_line(alert.headline)

    def message(self, alert: Alert) -> Any:
        from email.message import EmailMessage
        from email.utils import formatdate, make_msgid

        message = EmailMessage()
        message["Subject"] = self.subject(alert)
        message["From"] = self.spec.settings.get("from") or f"metasystem@{self.hostname}"
        message["To"] = ", ".join(self.recipients())
        message["Date"] = formatdate(alert.created_at, localtime=True)
        message["Message-ID"] = make_msgid(idstring=alert.uid, domain="metasystem.invalid")
        message["X-Metasystem-Severity"] = alert.severity.value
        message.set_content(self.body_text(alert) + "\n")
        return message

    def render(self, alert: Alert) -> str:
        if self.method() == "mail":
            return f"argv: {self._mail_argv(alert)}\n\n{self._mail_body(alert)}"
        return self.message(alert).as_string()

    def send(self, alert: Alert, timeout_s: float, now: float) -> Optional[int]:
        method = self.method()
        if method == "smtp":
            self._send_smtp(self.message(alert), timeout_s)
        elif method == "mail":
            self._run(self._mail_argv(alert), self._mail_body(alert).encode("utf-8"), timeout_s)
        else:
            self._run(self._command() + ["-t", "-oi"], self.message(alert).as_bytes(), timeout_s)
        return None

    def _port(self) -> int:
        security = self.spec.settings.get("security", "starttls")
        return int(self.spec.settings.get("smtp_port") or EMAIL_SECURITY[security])

    def _send_smtp(self, message: Any, timeout_s: float) -> None:
        import smtplib

        settings = self.spec.settings
        security = settings.get("security", "starttls")
        context = tls_context(_verifies(self.spec)) if security != "none" else None
        host, port = settings["smtp_host"], self._port()
        with Deadline(timeout_s) as deadline:  # the whole session, however slowly the server talks
            class Watched(smtplib.SMTP):
                def _get_socket(self, *args: Any) -> Any:
                    return deadline.watch(super()._get_socket(*args))

            class WatchedSSL(smtplib.SMTP_SSL, Watched):
                pass

            try:
                if security == "ssl":
                    client = WatchedSSL(host, port, timeout=deadline.left(), context=context)
                else:
                    client = Watched(host, port, timeout=deadline.left())
                with client:
                    client.ehlo()
                    if security == "starttls":
                        client.starttls(context=context)
                        client.ehlo()
                    if settings.get("username"):
                        client.login(settings["username"], self.spec.secrets.get("password", ""))
                    client.send_message(message)
            except (OSError, smtplib.SMTPException):
                if deadline.expired:
                    raise deadline.timeout_error() from None
                raise

    def _command(self) -> List[str]:
        import shutil

        configured = self.spec.settings.get("command")
        if configured:
            return [configured]
        name = "mail" if self.method() == "mail" else "sendmail"
        found = shutil.which(name) or (shutil.which(name, path="/usr/sbin:/usr/lib") if name == "sendmail" else None)
        return [found] if found else []

    def _mail_argv(self, alert: Alert) -> List[str]:
        return self._command()[:1] + ["-s", self.subject(alert), "--"] + self.recipients()

    def _mail_body(self, alert: Alert) -> str:
        # mailx reads a line starting with '~' as a command: a space in front makes it text.
        lines = self.body_text(alert).split("\n")
        return "\n".join(" " + line if line.startswith("~") else line for line in lines) + "\n"

    def _run(self, argv: List[str], data: bytes, timeout_s: float) -> None:
        import subprocess

        if not argv or not argv[0]:
            raise DeliveryError(f"no {self.method()} command found on PATH", error_class="command")
        try:  # a session of its own: at the timeout the whole group goes, a sendmail it started too
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       start_new_session=True)
        except OSError as err:
            raise DeliveryError(f"{argv[0]} cannot be run: {err.strerror or err}", error_class="command") from None
        try:
            _, said = process.communicate(data, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            raise DeliveryError(f"{os.path.basename(argv[0])} did not finish in {timeout_s:g} s",
                                error_class="timeout", category="transient") from None
        if process.returncode != 0:
            text = _one_line(said.decode("utf-8", "replace"))[:200]
            raise DeliveryError(f"{os.path.basename(argv[0])} exited with {process.returncode}"
                                + (f": {text}" if text else ""), error_class="command")


def _notice_severity(alert: Alert) -> str:
    """The level a log line carries: the alert's severity, but a resolved notice is news, not an alarm."""
    return "info" if alert.kind == "resolved" else alert.severity.value


LOG_LEVELS = {"critical": logging.CRITICAL, "warning": logging.WARNING, "info": logging.INFO}


def log_line(alert: Alert) -> str:
    """An alert as one line of at most LOG_LINE_CHARS: headline, note, message and details."""
    parts = [alert.headline] + [text for text in (alert.note, alert.message) if text] + alert.detail_lines()
    return truncate(_one_line(" | ".join(_one_line(part) for part in parts)), LOG_LINE_CHARS)


# Outcomes that mean a person has the alert, will have it, or chose not to: nothing more to say.
HEARD_OUTCOMES = ("sent", "deduplicated", "held", "silenced", "inhibited")


def unheard(outcomes: Dict[str, Delivery], external: Iterable[str]) -> bool:
    """True when no channel but a log took the alert and nobody chose to hold it back (a silence, quiet
    hours, a dependency): then only stderr is left to say it."""
    external = set(external)
    return not any(delivery.outcome in HEARD_OUTCOMES and (name in external or delivery.outcome != "sent")
                   for name, delivery in outcomes.items())


@register_channel
class LogChannel(_Channel):
    """syslog through its local socket (LOG_CRIT, LOG_WARNING, LOG_INFO), else the logging module."""

    kind = "log"
    keys = ("address", "facility")

    @classmethod
    def problems(cls, section: str, settings: Dict[str, str], items: Dict[str, str]) -> List[Tuple[str, str, str]]:
        facility = settings.get("facility", "user")
        if facility not in SYSLOG_FACILITIES:
            return [(section, "facility", f"{_shown(facility)} is not one of {', '.join(SYSLOG_FACILITIES)}")]
        return []

    def address(self) -> Optional[str]:
        configured = self.spec.settings.get("address")
        if configured:
            return None if configured == "none" else configured
        return next((path for path in SYSLOG_SOCKETS if os.path.exists(path)), None)

    def describe(self) -> str:
        address = self.address()
        return f"log to syslog at {address}" if address else "log to the 'metasystem.alert' logger"

    def render(self, alert: Alert) -> str:
        return log_line(alert)

    # True (the command line sets it): without syslog the line is a record at info, shown with -v, and
    # AlertingSystem says on stderr only what no other channel took; False: the logger gets the alert at
    # its own level, the library's record of last resort.
    quiet = False

    def send(self, alert: Alert, timeout_s: float, now: float) -> Optional[int]:
        """To syslog, else to the 'metasystem.alert' logger."""
        address = self.address()
        line = log_line(alert)
        if address:
            try:
                self._syslog(address, _notice_severity(alert), line, timeout_s)
                return None
            except OSError as err:
                log.info("syslog at %s refused the alert (%s); using the logger", address, err.strerror or err)
        logging.getLogger("metasystem.alert").log(logging.INFO if self.quiet else LOG_LEVELS[_notice_severity(alert)],
                                                  "%s", line)
        return None

    def _syslog(self, address: str, severity: str, line: str, timeout_s: float) -> None:
        import socket

        facility = SYSLOG_FACILITIES[self.spec.settings.get("facility", "user")]
        datagram = f"<{facility * 8 + SYSLOG_LEVELS[severity]}>metasystem[{os.getpid()}]: {line}".encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(address)
            sock.send(datagram)


def delivery_failure(error: BaseException) -> Tuple[str, str, Optional[int]]:
    """(category, error class, HTTP status) of a failed attempt, by the module's one classifier."""
    import socket
    import ssl

    if isinstance(error, DeliveryError):
        return error.category, error.error_class, error.status
    if isinstance(error, (socket.timeout, TimeoutError)):
        error_class = "timeout"
    elif isinstance(error, ssl.SSLError):
        error_class = "tls"
    elif isinstance(error, socket.gaierror):
        error_class = "dns"
    elif getattr(error, "smtp_code", None) is not None or type(error).__module__ == "smtplib":
        error_class = "smtp"
    elif isinstance(error, OSError):
        error_class = "connection"
    else:
        error_class = type(error).__name__
    reason = getattr(error, "reason", None)  # URLError wraps the socket error
    if isinstance(reason, BaseException):
        return delivery_failure(reason)[0], delivery_failure(reason)[1], None
    return classify_error(error), error_class, None


# -- settings -----------------------------------------------------------------

class Lifecycle(NamedTuple):
    """How fire() and resolve() behave over runs: reminders, hysteresis, digests."""

    repeat_s: Dict[str, Optional[float]]  # per severity; None: never remind
    fire_after: int = DEFAULT_FIRE_AFTER
    fire_within: Optional[int] = None  # "fire_after = 3 within 5": 3 failing runs among the last 5
    resolve_after: int = DEFAULT_RESOLVE_AFTER
    max_messages_per_run: int = DEFAULT_MAX_MESSAGES_PER_RUN

    def triggered(self, recent: str, fail_streak: int) -> bool:
        """Do these runs (``F`` failing, ``P`` passing, oldest first) make the alert fire?"""
        if self.fire_within:
            return recent[-self.fire_within:].count("F") >= self.fire_after
        return fail_streak >= self.fire_after


MAINTENANCE_KEYS = ("match", "daily", "weekly", "from", "until", "timezone")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _zone(name: Optional[str]) -> Any:
    """zoneinfo's zone of that name, or None for the machine's local time."""
    if not name:
        return None
    import zoneinfo

    return zoneinfo.ZoneInfo(name)


def _silence_matches(match: str, alert: "Alert") -> bool:
    """A silence's ``match``: ``key=K`` is that key exactly, any other text a part of the key or title."""
    if match.startswith("key="):
        return match[4:] == alert.key
    return match in alert.key or match in alert.title


def _minutes_range(text: str) -> Optional[Tuple[int, int]]:
    """``HH:MM-HH:MM`` as minutes after midnight, or None."""
    import re

    found = re.fullmatch(r"\s*([0-9]{1,2}):([0-9]{2})\s*-\s*([0-9]{1,2}):([0-9]{2})\s*", text)
    if not found:
        return None
    h1, m1, h2, m2 = map(int, found.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        return None
    return h1 * 60 + m1, (h2 * 60 + m2) % 1440


_FIRST_SHOWN_S = -62135596800.0  # 0001-01-01T00:00Z: the first instant iso_time shows (MAX_TIMESTAMP_S: past the last)


def _machine_epoch(wall: Any) -> float:
    """A naive datetime read as the machine's local time, in epoch seconds, as datetime.timestamp() reads
    it (fold 0: a repeated hour's first time, a skipped hour on the offset before the change), but from
    time.localtime's offsets, which do not overflow within a day of years 1 and 9999 as it does."""
    import datetime

    wanted = (wall - datetime.datetime(1970, 1, 1)).total_seconds()

    def offset(epoch: float) -> int:
        return time.localtime(epoch).tm_gmtoff

    guess = offset(wanted)
    first = wanted - guess
    other = offset(first - DAY_S) if offset(first) == guess else offset(first)
    second = wanted - other
    if other != guess and offset(second) == other:
        return second  # the earlier of two solutions, or the only one
    return first if offset(first) == guess else max(first, second)  # max: in a gap, the offset before it


def _wall_epoch(wall: Any, zone: Optional[str]) -> float:
    """Epoch seconds of the wall-clock time ``wall`` (a naive datetime) in ``zone``, or in the machine's
    local time; OverflowError, ValueError or OSError when it has none."""
    return wall.replace(tzinfo=_zone(zone)).timestamp() if zone else _machine_epoch(wall)


def _local_epoch(text: str, zone: Optional[str]) -> Tuple[Optional[float], Optional[str]]:
    """``YYYY-MM-DD`` or ``YYYY-MM-DD HH:MM`` in ``zone`` (or local time) as (epoch seconds, None), or
    (None, why not): not such a date, or one whose instant cannot be shown (before year 1 or after 9999
    in UTC)."""
    import datetime

    if not text.isascii():  # strptime() also reads other scripts' digits
        return None, "is not a date such as 2026-12-24 or 2026-12-24 18:00"
    for layout in ("%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            moment = datetime.datetime.strptime(text.strip(), layout)
        except ValueError:
            continue
        try:
            epoch = _wall_epoch(moment, zone)
        except (OverflowError, ValueError, OSError):
            epoch = math.inf if moment.year > 1 else -math.inf
        if epoch < _FIRST_SHOWN_S:
            return None, "is before the year 1 in UTC: too early to be shown"
        if epoch >= MAX_TIMESTAMP_S:
            return None, "is after the year 9999 in UTC: too late to be shown"
        return epoch, None
    return None, "is not a date such as 2026-12-24 or 2026-12-24 18:00"


def _maintenance_window(section: str, items: Dict[str, str], zone: Optional[str],
                        problems: List[Tuple[str, str, str]]) -> Optional[Dict[str, Any]]:
    given = [key for key in ("daily", "weekly", "from") if items.get(key)]
    if len(given) != 1:
        problems.append((section, "daily", "give one of daily, weekly or from (with until)"))
        return None
    if given == ["from"]:
        (starts, starts_problem), (ends, ends_problem) = (_local_epoch(items.get(key, ""), zone)
                                                          for key in ("from", "until"))
        for key, why in (("from", starts_problem), ("until", ends_problem)):
            if why:
                problems.append((section, key, f"{_shown(items.get(key, ''))} {why}"))
        if starts is not None and ends is not None and ends <= starts:
            problems.append((section, "until", "must be after from"))
        return {"starts": starts, "ends": ends}
    text = items[given[0]]
    days: Tuple[int, ...] = tuple(range(7))
    if given == ["weekly"]:
        names, _, text = text.partition(" ")
        picked = [name.strip().lower()[:3] for name in names.split(",")]
        if not all(name in WEEKDAYS for name in picked):
            problems.append((section, "weekly", f"{_shown(names)} is not a list of days such as Sun or Sat,Sun"))
            return None
        days = tuple(sorted({WEEKDAYS.index(name) for name in picked}))
    minutes = _minutes_range(text)
    if minutes is None:
        problems.append((section, given[0], f"{_shown(text)} is not a time range such as 02:00-04:00"))
        return None
    return {"days": days, "start": minutes[0], "end": minutes[1]}


class Maintenance(NamedTuple):
    """A planned maintenance window, ``[maintenance:NAME]``: what it silences, and when.

    ``days`` are the weekdays (0 Monday) its daily ``start``-``end`` (minutes after midnight, across it
    when end <= start) opens on; or ``starts``/``ends`` are epoch seconds for a one-off window.
    """

    name: str
    match: str
    days: Tuple[int, ...] = ()
    start: int = 0
    end: int = 0
    starts: Optional[float] = None
    ends: Optional[float] = None
    zone: Optional[str] = None  # an IANA name for zoneinfo; None: the machine's local time

    def matches(self, alert: "Alert") -> bool:
        return _silence_matches(self.match, alert)

    def windows(self, now: float) -> List[Tuple[float, float]]:
        """(start, end) of the windows that hold now or open in the next week, in order. A daily window
        opens and closes at the wall-clock times it names, in its zone: on the day clocks change it is an
        hour longer or shorter. A day past year 9999 or before year 1 has none."""
        if self.starts is not None:
            return [(self.starts, self.ends)] if self.ends > now else []
        import datetime

        try:
            zone = _zone(self.zone)
            today = datetime.datetime.fromtimestamp(now, zone).date() if zone else datetime.date.fromtimestamp(now)
        except (OverflowError, ValueError, OSError):
            return []
        found = []
        for offset in range(-1, 8):
            try:
                day = today + datetime.timedelta(days=offset)
                if day.weekday() not in self.days:
                    continue
                closes = day + datetime.timedelta(days=1) if self.end <= self.start else day
                start, end = (_wall_epoch(datetime.datetime.combine(when, datetime.time(minute // 60, minute % 60)),
                                          self.zone) for when, minute in ((day, self.start), (closes, self.end)))
            except (OverflowError, ValueError, OSError):
                continue
            if now < end and start < end and _FIRST_SHOWN_S <= start and end < MAX_TIMESTAMP_S:
                found.append((start, end))
        return found

    def holds(self, now: float) -> bool:
        return any(start <= now < end for start, end in self.windows(now))


def maintenance_windows(config, problems: List[Tuple[str, str, str]]) -> List[Maintenance]:
    """The ``[maintenance:NAME]`` sections: a ``match``, and ``daily = 03:00-03:30``, ``weekly = Sun
    02:00-04:00`` (days may be listed, ``Sat,Sun``) or ``from``/``until`` dates, in local time or in
    ``timezone``. Every problem is appended, none raised."""
    found = []
    for section in config.sections() if hasattr(config, "sections") else ():
        if not section.startswith("maintenance:"):
            continue
        items = {key: value.strip() for key, value in config[section].items()}
        start = len(problems)
        why = name_problem(section[len("maintenance:"):], "maintenance")
        if why:
            problems.append((section, "", why))
        problems += [(section, key, "unknown key") for key in items if key not in MAINTENANCE_KEYS]
        if not items.get("match"):
            problems.append((section, "match", "required: the key or title text it silences (key=K: one key)"))
        zone = items.get("timezone") or None
        if zone:
            try:
                _zone(zone)
            except (ImportError, ValueError, KeyError, OSError):  # zoneinfo.ZoneInfoNotFoundError is a KeyError
                problems.append((section, "timezone", f"{_shown(zone)} is not a time zone this machine knows"))
                zone = None
        window = _maintenance_window(section, items, zone, problems)
        if window is not None and len(problems) == start:
            found.append(Maintenance(section[len("maintenance:"):], items["match"], zone=zone, **window))
    return found


class AlertingSettings(NamedTuple):
    """Everything alerting reads from the INI file, checked; problems are (section, key, text)."""

    path: str
    channels: Dict[str, ChannelSpec]
    dedup_window_s: float
    timeout_s: float
    budget_s: float
    problems: List[Tuple[str, str, str]]
    inline_secrets: List[str]  # "[section] key" of each secret written in the file itself
    lifecycle: Lifecycle = Lifecycle(dict(DEFAULT_REPEAT_INTERVALS_S))
    maintenance: Tuple[Maintenance, ...] = ()
    run_budget_s: float = DEFAULT_RUN_BUDGET_S

    def masker(self) -> Masker:
        return Masker(secret for spec in self.channels.values() for secret in spec.secrets.values())

    def problem_lines(self) -> List[str]:
        return problem_lines(self.path, self.problems)


def _count_setting(items: Dict[str, str], key: str, default: int, problems: List[Tuple[str, str, str]]) -> int:
    text = items.get(key, "").strip()
    if not text:
        return default
    if not ascii_digits(text) or int(text) < 1:
        problems.append(("alerting", key, f"{_shown(text)} is not a whole number of at least 1"))
        return default
    return int(text)


def _lifecycle_settings(items: Dict[str, str], problems: List[Tuple[str, str, str]]) -> Lifecycle:
    repeat: Dict[str, Optional[float]] = {}
    for severity in ALERT_SEVERITIES:
        key = f"repeat_interval_{severity}"
        text = items.get(key, "").strip().lower()
        if text in ("never", "0"):
            repeat[severity] = None
        elif text:
            repeat[severity] = _duration_setting(items, "alerting", key, 3600.0, problems, positive=True)
        else:
            repeat[severity] = DEFAULT_REPEAT_INTERVALS_S[severity]
    fire_after, within = DEFAULT_FIRE_AFTER, None
    text = items.get("fire_after", "").strip().lower()
    if text:
        count, _, window = (part.strip() for part in text.partition("within"))
        if not ascii_digits(count) or int(count) < 1 or (window and not (ascii_digits(window)
                                                                      and int(count) <= int(window) <= RECENT_RUNS_KEPT)):
            problems.append(("alerting", "fire_after", f"{_shown(text)} is not N or 'N within M' "
                                                        f"(1 <= N <= M <= {RECENT_RUNS_KEPT})"))
        else:
            fire_after, within = int(count), int(window) if window else None
    resolve_after = _count_setting(items, "resolve_after", DEFAULT_RESOLVE_AFTER, problems)
    max_per_run = _count_setting(items, "max_messages_per_run", DEFAULT_MAX_MESSAGES_PER_RUN, problems)
    return Lifecycle(repeat, fire_after, within, resolve_after, max_per_run)


def _channel_secrets(items: Dict[str, str], keys: Tuple[str, ...], section: str, environ: Dict[str, str],
                     problems: List[Tuple[str, str, str]], inline: List[str], seed_key: Optional[str]
                     ) -> Tuple[Dict[str, str], Dict[str, str], Dict[str, str]]:
    """(values, where each came from, why each missing one is missing) of a channel's secret keys."""
    secrets: Dict[str, str] = {}
    sources: Dict[str, str] = {}
    why_missing: Dict[str, str] = {}
    for key in keys:
        value, source, why = _secret(items, key, section, environ, problems)
        if source == "file":
            inline.append(f"[{section}] {seed_key or key}")
        if value:
            secrets[key], sources[key] = value, source
        elif why:
            why_missing[key] = why
    return secrets, sources, why_missing


def _minute_of_day(text: str) -> int:
    hours, _, minutes = text.strip().partition(":")
    if not (ascii_digits(hours) and ascii_digits(minutes) and len(minutes) == 2 and int(hours) < 24
            and int(minutes) < 60):
        raise ValueError(text)
    return int(hours) * 60 + int(minutes)


def parse_quiet_hours(text: str) -> Tuple[int, int]:
    """``22:00-07:30`` as (start, end) minutes after midnight; the range may cross midnight.

    >>> parse_quiet_hours("22:00-07:30")
    (1320, 450)
    """
    try:
        start, end = (_minute_of_day(part) for part in text.split("-"))
    except ValueError:
        raise ValidationError(f"{_shown(text)} is not a time range such as 22:00-07:30") from None
    if start == end:
        raise ValidationError(f"{_shown(text)} is an empty time range")
    return start, end


def _quiet_settings(items: Dict[str, str], section: str,
                    problems: List[Tuple[str, str, str]]) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    quiet = None
    if items.get("quiet_hours", "").strip():
        try:
            quiet = parse_quiet_hours(items["quiet_hours"])
        except ValidationError as err:
            problems.append((section, "quiet_hours", str(err)))
    bypass = items.get("quiet_hours_bypass", "").strip().lower() or None
    if bypass == "none":
        bypass = None
    if bypass is not None and bypass not in ALERT_SEVERITIES:
        problems.append((section, "quiet_hours_bypass", f"{_shown(bypass)} is not none or one of "
                                                        f"{', '.join(ALERT_SEVERITIES)}"))
        bypass = None
    return quiet, bypass


def _channel_spec(name: str, section: str, items: Dict[str, str], environ: Dict[str, str],
                  problems: List[Tuple[str, str, str]], inline: List[str], timeout_s: float, budget_s: float,
                  seed_key: Optional[str] = None) -> ChannelSpec:
    """One channel from its section's items; every problem found is appended, none raised."""
    start = len(problems)
    kind = items.get("type", "").strip().lower()
    channel = CHANNEL_TYPES.get(kind)
    if channel is None:
        shown = f"unknown channel type {_shown(kind)}" if kind else "missing"
        problems.append((section, "type", f"{shown}; one of {', '.join(sorted(CHANNEL_TYPES))}"))
        return ChannelSpec(name, kind, section, {}, {}, {}, "info", timeout_s, budget_s, False)
    allowed = set(CHANNEL_COMMON_KEYS) | set(channel.keys)
    allowed |= {f"{key}{suffix}" for key in channel.secrets for suffix in SECRET_SUFFIXES}
    for key in items:
        if key not in allowed:
            problems.append((section, key, f"unknown key for {a_or_an(kind)} channel"))
    settings = {key: items[key].strip() for key in channel.keys if key in items}
    secrets, sources, why_missing = _channel_secrets(items, channel.secrets, section, environ, problems, inline,
                                                     seed_key)
    missing = None
    for key in channel.required:
        if settings.get(key) or key in secrets:
            continue
        if not any(f"{key}{suffix}" in items for suffix in SECRET_SUFFIXES):
            problems.append((section, key, f"required for {a_or_an(kind)} channel"))
        elif missing is None:
            missing = why_missing.get(key, f"{key} is empty")
    min_severity = items.get("min_severity", "info").strip().lower()
    if min_severity not in ALERT_SEVERITIES:
        problems.append((section, "min_severity", f"{_shown(min_severity)} is not one of {', '.join(ALERT_SEVERITIES)}"))
        min_severity = "info"
    enabled = _bool_setting(items, section, "enabled", True, problems)
    channel_timeout = _duration_setting(items, section, "timeout", timeout_s, problems, positive=True)
    channel_budget = _duration_setting(items, section, "channel_budget", budget_s, problems, positive=True)
    problems += channel.problems(section, settings, items) + channel.secret_problems(section, secrets)
    if seed_key:  # name the key as the user wrote it
        written = {"url": seed_key, "to": seed_key}
        problems[start:] = [(s, written.get(k, k), t) for s, k, t in problems[start:]]
        missing = missing and missing.replace("url", seed_key, 1).replace("to is", f"{seed_key} is", 1)
    send_resolved = _bool_setting(items, section, "send_resolved", True, problems)
    quiet, bypass = _quiet_settings(items, section, problems)
    fallback = items.get("fallback", "").strip() or None
    escalate_after = _duration_setting(items, section, "escalate_after", 0.0, problems, positive=True) or None
    escalate_to = items.get("escalate_to", "").strip() or None
    if (escalate_after is None) != (escalate_to is None):
        given, needed = ("escalate_after", "escalate_to") if escalate_after else ("escalate_to", "escalate_after")
        problems.append((section, needed, f"{given} needs {needed} too"))
    templates = {part: items[f"{part}_template"] for part in ("title", "message") if f"{part}_template" in items}
    for part, text in templates.items():
        why = template_problem(text)
        if why:
            problems.append((section, f"{part}_template", why))
    usable = len(problems) == start
    return ChannelSpec(name, kind, section, settings, secrets, sources, min_severity, channel_timeout,
                       channel_budget, enabled and usable, missing, send_resolved, quiet, bypass, fallback, templates,
                       escalate_after, escalate_to)


def _channel_graph_problems(channels: Dict[str, ChannelSpec],
                            problems: List[Tuple[str, str, str]]) -> List[Tuple[str, str, str]]:
    """``fallback`` and ``escalate_to`` read as graphs: each names another channel that exists and is
    enabled, and following them never comes back to where it started."""
    found = []
    broken = {section for section, _, _ in problems}
    for key in ("fallback", "escalate_to"):
        edges = {name: getattr(spec, key) for name, spec in channels.items() if getattr(spec, key)}
        for name, other in edges.items():
            spec, target = channels[name], channels.get(other)
            if other == name or target is None:
                found.append((spec.section, key, "names itself" if other == name else
                              f"names {other!r}, which is not a channel"))
            elif spec.enabled and not target.enabled and target.section not in broken:
                found.append((spec.section, key, f"names {other!r}, which is disabled: it would never be told"))
        found += cycle_problems({n: o for n, o in edges.items() if o != n and o in channels},
                                lambda name: channels[name].section, key)
    return found


def escalation_only(specs: Dict[str, ChannelSpec]) -> set:
    """The channels that get only escalations: each one a usable channel escalates to, unless the two
    lie on one cycle (then neither would hear anything)."""
    edges = {name: spec.escalate_to for name, spec in specs.items() if spec.escalate_to}
    return {spec.escalate_to for name, spec in specs.items()
            if spec.escalate_to and spec.enabled and not spec.missing and cycle_through(edges, name) is None}


def alerting_settings(config, path: str, environ: Optional[Dict[str, str]] = None) -> AlertingSettings:
    """Read and check the ``[alerting]`` and ``[channel:NAME]`` sections; never raises for bad values."""
    environ = os.environ if environ is None else environ
    path = config_source(path)  # problems name the file they are in
    problems: List[Tuple[str, str, str]] = []
    inline: List[str] = []
    _check_sections(config, problems)
    alerting = dict(config["alerting"]) if config.has_section("alerting") else {}
    timeout_s = _duration_setting(alerting, "alerting", "timeout", DEFAULT_ALERT_TIMEOUT_S, problems, positive=True)
    budget_s = _duration_setting(alerting, "alerting", "channel_budget", DEFAULT_CHANNEL_BUDGET_S, problems,
                                 positive=True)
    window_s = _duration_setting(alerting, "alerting", "dedup_window", DEFAULT_DEDUP_WINDOW_S, problems)
    run_budget_s = _duration_setting(alerting, "alerting", "run_budget", DEFAULT_RUN_BUDGET_S, problems,
                                     positive=True)
    seed_keys = {f"{key}{suffix}" for key in SEED_CHANNEL_KEYS for suffix in SECRET_SUFFIXES
                 if key != "email_to" or not suffix}  # email_to is an address, not a secret
    for key in alerting:
        if key not in ALERTING_KEYS and key not in seed_keys:
            problems.append(("alerting", key, "unknown key"))
    channels: Dict[str, ChannelSpec] = {}
    for key, name in SEED_CHANNEL_KEYS.items():
        target = "to" if name == "email" else "url"
        items = {target + suffix: alerting[key + suffix] for suffix in SECRET_SUFFIXES if key + suffix in alerting
                 and key + suffix in seed_keys}
        if items:
            channels[name] = _channel_spec(name, "alerting", {"type": name, **items}, environ, problems, inline,
                                           timeout_s, budget_s, seed_key=key)
    for section in config.sections():
        if not section.startswith("channel:"):
            continue
        name = section[len("channel:"):].strip()
        why = name_problem(name, "channel")
        if why:
            problems.append((section, "", why))
            continue
        if name in channels:
            problems.append((section, "", f"channel {name!r} is also made by a key in [alerting]"))
            continue
        channels[name] = _channel_spec(name, section, dict(config[section]), environ, problems, inline,
                                       timeout_s, budget_s)
    if "log" not in channels:
        channels["log"] = ChannelSpec("log", "log", "", {}, {}, {}, "info", timeout_s, budget_s)
    problems += _channel_graph_problems(channels, problems)
    lifecycle = _lifecycle_settings(alerting, problems)
    maintenance = tuple(maintenance_windows(config, problems))
    return AlertingSettings(path, channels, window_s, timeout_s, budget_s, problems, inline, lifecycle, maintenance,
                            run_budget_s)


def warn_if_shared(settings: "AlertingSettings") -> None:
    """One warning when secrets are written in a configuration file that other users can read."""
    try:
        shared = bool(os.stat(settings.path).st_mode & 0o044)
    except OSError:
        return
    if shared and settings.inline_secrets:
        log.warning("%s holds secrets (%s) and other users can read it: chmod 600 %s", settings.path,
                    ", ".join(settings.inline_secrets), settings.path)


# -- the alerting system ------------------------------------------------------

class RunBudget:
    """What one run may spend on sending: ``seconds`` in all (``[alerting] run_budget``), and on each
    channel at most its ``channel_budget`` in all, however many alerts the run carries. The command line
    makes one for its whole run (alerts, the Watchdog, pings); the library one per call."""

    def __init__(self, seconds: float, clock=time.monotonic):
        import threading

        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds
        self._spent: Dict[str, float] = {}
        self._lock = threading.Lock()

    def left(self) -> float:
        return max(0.0, self._end - self._clock())

    def channel_left(self, name: str, channel_budget_s: float) -> float:
        """What ``name`` may still spend: the rest of its own budget, within the run's."""
        with self._lock:
            return max(0.0, min(self.left(), channel_budget_s - self._spent.get(name, 0.0)))

    def spend(self, name: str, seconds: float) -> None:
        with self._lock:
            self._spent[name] = self._spent.get(name, 0.0) + max(0.0, seconds)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine): a claim or a run of a dead one is stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def claim_owner_gone(owner: str) -> bool:
    """True when a claim's owner (``PID-RANDOM``) is a process that no longer runs: whatever the clock
    says (a fixed METASYSTEM_NOW never reaches a lease's end), its claim is over."""
    pid = owner.partition("-")[0]
    return pid.isascii() and pid.isdigit() and not process_alive(int(pid))


class _Plan(NamedTuple):
    """One notification to send: the channel and the alert as that channel gets it."""

    channel: _Channel
    alert: Alert


class _Call:
    """What one fire() or resolve() decided: plans to send, and outcomes already known."""

    def __init__(self, alert: Alert, kind: str):
        self.alert = alert
        self.kind = kind
        self.plans: List[_Plan] = []
        self.outcomes: Dict[str, Delivery] = {}


class _Batch:
    """The calls of one AlertingSystem.batch(); ``report`` is set when it ends."""

    def __init__(self) -> None:
        self.calls: List[_Call] = []
        self.report: Optional[DeliveryReport] = None


def _lifecycle_key(key: Any) -> str:
    text = _one_line(visible_text(str(key)))
    if not text or len(text) > MAX_NAME_CHARS:
        raise ValidationError(f"an alert key must be 1 to {MAX_NAME_CHARS} characters, got {_shown(key)}")
    return text


def _local_minute(ts: float) -> int:
    """Minutes after local midnight: what quiet hours are written in."""
    local = time.localtime(ts)
    return local.tm_hour * 60 + local.tm_min


def _local_hhmm(ts: float) -> str:
    return time.strftime("%H:%M", time.localtime(ts))


def _severity(value: Any) -> AlertSeverity:
    if isinstance(value, AlertSeverity):
        return value
    try:
        return AlertSeverity(str(value).lower())
    except ValueError:
        raise ValidationError(f"severity must be one of {', '.join(ALERT_SEVERITIES)}, got {_shown(value)}") from None


def _channel_selector(value: Any) -> str:
    if isinstance(value, AlertChannel):
        return value.value
    text = str(value).strip()
    if not text:
        raise ValidationError("a channel name cannot be empty")
    return text


def _detail_values(details: Optional[Dict[Any, Any]]) -> Dict[str, Any]:
    """An alert's details as every channel and the store can take them: text keys and values made valid
    Unicode, numbers, booleans and None as they are, anything else (a list, an object) as its JSON text."""
    import json

    if details is None:
        return {}
    if not isinstance(details, dict):
        raise ValidationError(f"details must be a mapping of KEY: VALUE, got {_shown(details)}")
    plain = (str, int, float, bool, type(None))
    return {visible_text(str(key)): visible_text(value) if isinstance(value, str) else value if isinstance(
        value, plain) else visible_text(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str))
            for key, value in details.items()}


class AlertingSystem:
    """Alerts to every configured channel, deduplicated across processes through the store.

    ``create_alert`` then ``send_alert`` (or ``send_critical_alert`` and
    friends) deliver to each selected channel with classified retries inside
    a time budget, and record every outcome: ``get_alert_history``.  Alerts
    with the same severity and title go out once per channel within the dedup
    window; a channel that failed is tried again by the next call.
    """

    def __init__(self, config_path: Optional[str] = None, *, db_path: Optional[str] = None,
                 environ: Optional[Dict[str, str]] = None, now=time.time, clock=time.monotonic, sleep=None,
                 rng=None, store: Optional[Store] = None, settings: Optional[AlertingSettings] = None,
                 synchronous: str = "normal", readonly: bool = False,
                 busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S, strict: bool = True, say_unheard: bool = False,
                 budget: Optional[RunBudget] = None):
        """``strict``: a configuration with a problem is refused (ConfigError); without it, the channels
        that are right are used and the caller says what is wrong (the command line does). ``say_unheard``:
        an alert that no channel but a log took goes to the logger at its level (for stderr). ``budget``:
        the run's, shared by every call (the command line's); without it each call has a run_budget."""
        import random
        import socket

        environ = os.environ if environ is None else environ
        self.config_path = resolve_config_path(config_path, environ)
        if settings is None:
            settings = alerting_settings(load_config(self.config_path), self.config_path, environ)
        if settings.problems and strict:
            lines = settings.problem_lines()
            more = f" (and {len(lines) - 1} more; see 'config --check')" if len(lines) > 1 else ""
            raise ConfigError(lines[0] + more)
        warn_if_shared(settings)
        for spec in settings.channels.values():
            if spec.enabled and not _verifies(spec):
                log.warning("channel %s: TLS certificates are not verified (tls_verify = false)", spec.name)
        self.settings = settings
        self.masker = settings.masker()
        self.hostname = socket.gethostname()
        self.channels = {name: CHANNEL_TYPES[spec.kind](spec, self.hostname)
                         for name, spec in settings.channels.items() if spec.enabled and not spec.missing}
        self.say_unheard = say_unheard
        for channel in self.channels.values():
            if isinstance(channel, LogChannel):
                channel.quiet = say_unheard
        self._store = store
        self._db_path = resolve_db_path(db_path, environ)
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        self._readonly = readonly  # for reading the history: a missing store reads as an empty one
        self._now, self._clock = now, clock
        self._sleep = time.sleep if sleep is None else sleep
        self._rng = random.Random() if rng is None else rng
        self._owner = f"{os.getpid()}-{os.urandom(6).hex()}"  # who holds a claim: dead, it holds nothing
        self.budget = budget
        self._call_budget: Optional[RunBudget] = None
        self.store_warning_given = False  # a store that cannot be written is said once per run
        self._batch: Optional[_Batch] = None

    @property
    def store(self) -> Store:
        """The store, opened on first use: a dry run or a configuration check never creates one."""
        if self._store is None:
            self._store = Store(self._db_path, synchronous=self._synchronous, readonly=self._readonly,
                                busy_timeout_s=self._busy_timeout_s)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> "AlertingSystem":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- the original API ---------------------------------------------------

    def create_alert(self, title: str, message: str, severity: AlertSeverity = AlertSeverity.WARNING,
                     channels: Optional[Iterable[Any]] = None, details: Optional[Dict[str, Any]] = None) -> Alert:
        """An alert, not yet sent. ``channels``: AlertChannel kinds or channel names; None is every channel."""
        title = _one_line(visible_text(str(title)))
        if not title:
            raise ValidationError("an alert needs a title")
        severity = _severity(severity)
        chosen = None if channels is None else tuple(_channel_selector(channel) for channel in channels)
        return self._masked(Alert(title, visible_text(str(message or "")), severity, chosen,
                                  _detail_values(details), self._now(), os.urandom(8).hex()))

    def _masked(self, alert: Alert) -> Alert:
        """The alert with every configured secret masked in its text, details and key: nothing that
        follows (payloads, the history, dedup marks, log lines) can carry one."""
        scrub = self.masker.scrub
        return alert._replace(title=scrub(alert.title), message=scrub(alert.message),
                              details={scrub(key): scrub(value) if isinstance(value, str) else value
                                       for key, value in alert.details.items()},
                              dedup=None if alert.dedup is None else scrub(alert.dedup))

    def send_alert(self, alert: Alert) -> DeliveryReport:
        """Deliver to each selected channel; ``{name: delivered}``, never raising for a channel's failure."""
        return self._deliver(self._masked(alert), kind="alert")

    def send_critical_alert(self, title: str, message: str = "", channels: Optional[Iterable[Any]] = None,
                            details: Optional[Dict[str, Any]] = None) -> DeliveryReport:
        return self.send_alert(self.create_alert(title, message, AlertSeverity.CRITICAL, channels, details))

    def send_warning_alert(self, title: str, message: str = "", channels: Optional[Iterable[Any]] = None,
                           details: Optional[Dict[str, Any]] = None) -> DeliveryReport:
        return self.send_alert(self.create_alert(title, message, AlertSeverity.WARNING, channels, details))

    def send_info_alert(self, title: str, message: str = "", channels: Optional[Iterable[Any]] = None,
                        details: Optional[Dict[str, Any]] = None) -> DeliveryReport:
        return self.send_alert(self.create_alert(title, message, AlertSeverity.INFO, channels, details))

    def send_test(self, channels: Optional[Iterable[Any]] = None) -> DeliveryReport:
        """A labelled test to ``channels``, or to every enabled channel whatever its routing (min_severity,
        quiet hours), past the dedup window and leaving it untouched."""
        if channels is None:
            channels = [name for name, spec in self.settings.channels.items() if spec.enabled]
        alert = self.create_alert(f"Test alert from metasystem-monitor on {self.hostname}",
                                  "If you can read this, the channel works. Nothing is wrong.",
                                  AlertSeverity.INFO, channels, {"test": "true"})
        return self._deliver(alert, kind="test")

    def get_alert_history(self, hours: float = DEFAULT_WINDOW_HOURS) -> List[Dict[str, Any]]:
        """Alerts of the last ``hours``, newest first, each with its per-channel outcomes."""
        import json

        since = self._now() - float(hours) * 3600.0
        alerts = self.store.query("SELECT id, ts, kind, severity, title, message, details FROM alerts "
                                  "WHERE ts >= ? ORDER BY ts DESC, id DESC", (since,))
        history = []
        for alert_id, ts, kind, severity, title, message, details in alerts:
            rows = self.store.query("SELECT channel, outcome, attempts, http_status, error_class, error, latency_ms, "
                                    "kind FROM alert_deliveries WHERE alert_id = ? ORDER BY channel", (alert_id,))
            history.append({
                "id": alert_id, "time": iso_time(ts), "timestamp": ts, "kind": kind, "severity": severity,
                "title": title, "message": message, "details": json.loads(details),
                "channels": {row[0]: dict(zip(("outcome", "attempts", "http_status", "error_class", "error",
                                               "latency_ms", "kind"), row[1:])) for row in rows},
            })
        return history

    # -- selection ------------------------------------------------------------

    def selected(self, alert: Alert) -> Tuple[List[_Channel], Dict[str, str]]:
        """(channels to try, and each selected one that cannot be used with the reason). Routed by
        severity, a disabled channel is never selected: it stays silent. Named, it is skipped, and said."""
        specs = self.settings.channels
        missing: Dict[str, str] = {}
        if alert.channels is None:  # routed: a channel some channel escalates to gets only escalations
            escalations = escalation_only(specs)
            chosen = [name for name, spec in specs.items() if spec.enabled and name not in escalations
                      and ALERT_SEVERITIES.index(spec.min_severity) <= alert.severity.rank]
        else:
            chosen = []
            for selector in alert.channels:
                names = [selector] if selector in specs else [n for n, s in specs.items() if s.kind == selector]
                chosen += [name for name in names if name not in chosen]
                if not names:
                    missing.setdefault(selector, "not configured")
        for name in chosen:
            if name not in self.channels:
                spec = specs[name]
                missing[name] = "disabled" if not spec.enabled else self.masker.scrub(spec.missing or "")
        for name, why in missing.items():
            log.info("channel %s skipped (%s)", name, why)
        return [self.channels[name] for name in chosen if name in self.channels], missing

    # -- delivery ---------------------------------------------------------------

    @contextlib.contextmanager
    def _run(self) -> Iterator[RunBudget]:
        """The budget what is sent now spends: the run's, or one for this call (and the calls within it)."""
        if self.budget is not None or self._call_budget is not None:
            yield self.budget or self._call_budget
            return
        self._call_budget = RunBudget(self.settings.run_budget_s, self._clock)
        try:
            yield self._call_budget
        finally:
            self._call_budget = None

    def _in_parallel(self, jobs: Dict[str, Any], run: RunBudget) -> Dict[str, Any]:
        """``{name: job()}`` with each job in a thread of its own (a channel that hangs must not take the
        others' time), for those that end within the run's budget and a moment more."""
        import threading

        if len(jobs) <= 1:
            return {name: job() for name, job in jobs.items()}
        results: Dict[str, Any] = {}

        def work(name: str, job: Any) -> None:
            try:
                results[name] = job()
            except Exception as error:  # a bug of ours: said, and the channel counts as not done
                log.error("sending to %s stopped: %s", name, self.masker.scrub(_error_text(error)))

        threads = [threading.Thread(target=work, args=item, name=f"deliver {item[0]}", daemon=True)
                   for item in jobs.items()]
        for thread in threads:
            thread.start()
        end = time.monotonic() + run.left() + DELIVERY_JOIN_GRACE_S
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))
        return {name: results[name] for name in jobs if name in results}

    def _deliver(self, alert: Alert, kind: str) -> DeliveryReport:
        with self._run() as run:
            return self._deliver_within(alert, kind, run)

    def _deliver_within(self, alert: Alert, kind: str, run: RunBudget) -> DeliveryReport:
        channels, missing = self.selected(alert)
        storage_errors: List[StorageError] = []
        silence = None
        try:
            if kind != "test":
                self._release_held(self._now())
                silence = self._active_silence(alert)
            alert_id: Optional[int] = self._record_alert(alert, kind, missing)
        except StorageError as err:
            # A full disk or a broken store must not swallow the alert that may be about it.
            log.error("%s: sending without deduplication or history", err)
            storage_errors.append(err)
            alert_id = None
        outcomes = {name: Delivery("not_configured", error=why) for name, why in missing.items()}
        dedup = kind != "test"
        decided = {channel.name: (Delivery("silenced", error=silence), False) if silence is not None else
                   self._before_send(channel, alert, alert_id, dedup, storage_errors) for channel in channels}
        sent = self._in_parallel({channel.name: lambda channel=channel: self._attempts(channel, alert)
                                  for channel in channels if decided[channel.name][0] is None}, run)
        for channel in channels:
            known, claimed = decided[channel.name]
            if known is not None and known.outcome == "silenced":
                outcomes[channel.name] = self._record_outcome(alert_id, channel.name, known)
                continue
            delivery = known or sent.get(channel.name) or unfinished(run)
            outcomes[channel.name] = self._after_send(channel, alert, alert_id, claimed, delivery, dedup, storage_errors)
        for channel in channels:
            for fallback in self._try_fallbacks(channel, alert, outcomes, [c.name for c in channels]):
                self._record_outcome(alert_id, fallback.name, outcomes[fallback.name])
        if storage_errors and alert_id is not None:
            log.error("%s: some of this alert's history or dedup marks were not saved", storage_errors[0])
        external = [name for name in outcomes if self.settings.channels.get(name) is None
                    or self.settings.channels[name].kind != "log"]
        report = DeliveryReport(outcomes, external, storage_errors[0] if storage_errors else None)
        if kind != "test":
            self._if_unheard(alert, outcomes, external)
        return report

    def _record_outcome(self, alert_id: Optional[int], channel: str, delivery: Delivery) -> Delivery:
        """A history row for an outcome reached without the dedup claim (silenced, a fallback)."""
        if alert_id is not None:
            with contextlib.suppress(StorageError), self.store.write() as conn:
                self._write_delivery(conn, alert_id, channel, delivery)
        return delivery

    def _active_silence(self, alert: Alert) -> Optional[str]:
        with self.store.write() as conn:
            return self._silence_for(conn, alert, self._now())

    def _fallback_for(self, channel: _Channel, delivery: Delivery, outcomes: Dict[str, Delivery],
                      targets: List[str]) -> Optional[_Channel]:
        """The channel to try when ``channel`` failed: its ``fallback``, unless that one has it already."""
        name = channel.spec.fallback
        if delivery.outcome != "failed" or not name or name in targets or name in outcomes:
            return None
        fallback = self.channels.get(name)
        if fallback is not None:
            log.warning("channel %s failed: trying its fallback %s", channel.name, name)
        return fallback

    def _try_fallbacks(self, channel: _Channel, alert: Alert, outcomes: Dict[str, Delivery],
                       targets: List[str]) -> List[_Channel]:
        """Follow ``channel``'s fallbacks while each one fails (a cycle ends where it began): the channels
        tried, each one's outcome put in ``outcomes``."""
        tried = []
        while True:
            fallback = self._fallback_for(channel, outcomes[channel.name], outcomes, targets)
            if fallback is None:
                return tried
            delivery = self._logged(fallback, self._attempts(fallback, alert))
            outcomes[fallback.name] = delivery._replace(error=delivery.error or f"fallback for {channel.name}")
            tried.append(fallback)
            channel = fallback

    def _record_alert(self, alert: Alert, kind: str, missing: Dict[str, str]) -> int:
        with self.store.write() as conn:
            alert_id = self._insert_alert(conn, alert, kind)
            for name, why in missing.items():
                self._write_delivery(conn, alert_id, name, Delivery("not_configured", error=why), kind)
        return alert_id

    def _insert_alert(self, conn: sqlite3.Connection, alert: Alert, kind: str) -> int:
        """The history row of an alert, secrets masked."""
        import json

        details = json.dumps(alert.details, sort_keys=True, default=str)
        return conn.execute(
            "INSERT INTO alerts (ts, kind, dedup_key, severity, title, message, details) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self._now(), kind, alert.key, alert.severity.value, self.masker.scrub(alert.title),
             self.masker.scrub(alert.message), self.masker.scrub(details)),
        ).lastrowid

    def _if_unheard(self, alert: Alert, outcomes: Dict[str, Delivery], external: Iterable[str]) -> None:
        """No channel but a log took the alert. With ``say_unheard`` (the command line) it goes to the
        logger at its level, which the command line shows on stderr and cron mails; only then, for when
        another channel has it, a second copy by mail is noise. Otherwise the log channel gets it, if it
        had not: on record somewhere."""
        if not unheard(outcomes, external):
            return
        if self.say_unheard:
            logging.getLogger("metasystem.alert").log(LOG_LEVELS[_notice_severity(alert)], "%s", log_line(alert))
        elif "log" not in outcomes and "log" in self.channels and self.channels["log"].spec.kind == "log":
            with contextlib.suppress(Exception):  # the last resort: nothing may stop the run here
                self.channels["log"].send(alert, self.settings.timeout_s, self._now())

    def _before_send(self, channel: _Channel, alert: Alert, alert_id: Optional[int], dedup: bool,
                     storage_errors: List[StorageError]) -> Tuple[Optional[Delivery], bool]:
        """(the outcome already known, or None to send; whether the dedup claim was taken) on ``channel``:
        deduplicated, or held for the end of quiet hours. A store that fails costs the dedup and the
        history row, never the delivery."""
        if alert_id is None or not dedup:
            return None, False
        try:
            if not self._claim(channel, alert):
                log.info("channel %s: %s already sent within the dedup window", channel.name, alert.key)
                return Delivery("deduplicated"), False
        except StorageError as err:
            storage_errors.append(err)
            return None, False
        if channel.spec.is_quiet(_local_minute(self._now()), alert.severity.value):
            with contextlib.suppress(StorageError), self.store.write() as conn:
                self._hold(conn, channel.name, alert, self._now())  # the catch-up at the end carries it
            return Delivery("held"), True
        return None, True

    def _after_send(self, channel: _Channel, alert: Alert, alert_id: Optional[int], claimed: bool,
                    delivery: Delivery, dedup: bool, storage_errors: List[StorageError]) -> Delivery:
        """Record what happened on ``channel``, and settle the claim taken before it."""
        if alert_id is not None:
            try:
                with self.store.write() as conn:
                    self._write_delivery(conn, alert_id, channel.name, delivery, "alert" if dedup else "test")
                    if claimed:
                        self._settle_claim(conn, channel.name, alert.key, delivery.outcome in ("sent", "held"))
            except StorageError as err:
                storage_errors.append(err)
        return self._logged(channel, delivery)

    @staticmethod
    def _logged(channel: _Channel, delivery: Delivery) -> Delivery:
        if delivery.outcome == "failed":
            log.warning("channel %s failed after %d attempt%s: %s", channel.name, delivery.attempts,
                        "" if delivery.attempts == 1 else "s", delivery.error)
        return delivery

    def _claim(self, channel: _Channel, alert: Alert) -> bool:
        """Take the right to send ``alert`` on ``channel``; False when it was sent within the window.

        A claim is a lease in the store: another process sending the same alert
        waits for it to settle, then sees the delivery (or the failure, and
        tries itself).  A claim whose process is gone is over at once; one that
        outlasts its lease (measured here, on the monotonic clock: a wall clock
        fixed by METASYSTEM_NOW never reaches its end) or the run's time is
        taken over.
        """
        lease_s = channel.spec.budget_s + DELIVERY_CLAIM_GRACE_S
        run = self.budget or self._call_budget
        give_up = self._clock() + min(lease_s, run.left() if run is not None else lease_s)
        while True:
            with self.store.write() as conn:
                now = self._now()
                row = conn.execute("SELECT sent_at, claim_owner, claim_until FROM alert_marks "
                                   "WHERE dedup_key = ? AND channel = ?", (alert.key, channel.name)).fetchone()
                sent_at, owner, until = row if row else (None, "", 0.0)
                if sent_at is not None and now - self.settings.dedup_window_s < sent_at <= now + CLOCK_SKEW_S:
                    return False
                over = not owner or until <= now or owner == self._owner or claim_owner_gone(owner)
                if not over and self._clock() >= give_up:
                    log.warning("channel %s: another run has been sending %s for too long; sending it here",
                                channel.name, alert.key)
                    over = True
                if over:
                    conn.execute("INSERT INTO alert_marks (dedup_key, channel, sent_at, claim_owner, claim_until) "
                                 "VALUES (?, ?, ?, ?, ?) ON CONFLICT (dedup_key, channel) DO UPDATE SET "
                                 "claim_owner = excluded.claim_owner, claim_until = excluded.claim_until",
                                 (alert.key, channel.name, sent_at, self._owner, now + lease_s))
                    return True
            self._sleep(DELIVERY_CLAIM_POLL_S)

    def _settle_claim(self, conn: sqlite3.Connection, channel: str, key: str, sent: bool) -> None:
        if sent:
            conn.execute("UPDATE alert_marks SET sent_at = ?, claim_owner = '', claim_until = 0 "
                         "WHERE dedup_key = ? AND channel = ?", (self._now(), key, channel))
        else:
            conn.execute("UPDATE alert_marks SET claim_owner = '', claim_until = 0 "
                         "WHERE dedup_key = ? AND channel = ? AND claim_owner = ?", (key, channel, self._owner))

    def _write_delivery(self, conn: sqlite3.Connection, alert_id: int, channel: str, delivery: Delivery,
                        kind: str = "alert") -> None:
        conn.execute(
            "INSERT INTO alert_deliveries (alert_id, channel, ts, outcome, attempts, http_status, error_class, "
            "error, latency_ms, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (alert_id, channel, self._now(), delivery.outcome, delivery.attempts, delivery.http_status,
             delivery.error_class, delivery.error, delivery.latency_ms, kind),
        )
        counted = conn.execute("UPDATE delivery_counts SET n = n + 1 WHERE channel = ? AND outcome = ?",
                               (channel, delivery.outcome))
        if counted.rowcount == 0:
            conn.execute("INSERT INTO delivery_counts (channel, outcome, n) VALUES (?, ?, 1)",
                         (channel, delivery.outcome))

    def _attempts(self, channel: _Channel, alert: Alert) -> Delivery:
        """Send with classified retries: transient failures again after jittered backoff (Retry-After as
        a floor), permanent ones never, a timeout at most twice, all inside what the channel has left of
        its budget in this run (and of the run's)."""
        run = self.budget or self._call_budget or RunBudget(self.settings.run_budget_s, self._clock)
        started = self._clock()
        try:
            return self._attempts_within(channel, alert, started + run.channel_left(channel.name,
                                                                                   channel.spec.budget_s))
        finally:
            run.spend(channel.name, self._clock() - started)

    def _attempts_within(self, channel: _Channel, alert: Alert, deadline: float) -> Delivery:
        spec = channel.spec
        started = self._clock()
        if deadline - started < DELIVERY_MIN_ATTEMPT_S:
            return Delivery("failed", 0, None, "timeout", "not tried: this run's time for the channel is spent")
        attempts = timeouts = 0
        while True:
            attempts += 1
            timeout_s = max(0.001, min(spec.timeout_s, deadline - self._clock()))
            try:
                status = channel.send(channel.templated(alert), timeout_s, self._now())
            except Exception as error:  # every failure is classified and recorded, none escapes
                category, error_class, status = delivery_failure(error)
                text = self.masker.scrub(_error_text(error))
                timeouts += error_class == "timeout"
                wait, stop = self._next_wait(error, category, attempts, timeouts, deadline)
                if stop is not None:
                    latency = (self._clock() - started) * 1000.0
                    return Delivery("failed", attempts, status, error_class, text + stop, round(latency, 1))
                log.info("channel %s attempt %d failed (%s); again in %.1f s", spec.name, attempts, text, wait)
                self._sleep(wait)
                continue
            return Delivery("sent", attempts, status, None, None, round((self._clock() - started) * 1000.0, 1))

    def _next_wait(self, error: BaseException, category: str, attempts: int, timeouts: int,
                   deadline: float) -> Tuple[float, Optional[str]]:
        """(seconds to wait, None) to try again, or (0, what to add to the error) to stop."""
        if category != "transient" or attempts >= DELIVERY_ATTEMPTS:
            return 0.0, ""
        if timeouts >= 2:
            return 0.0, " (timed out twice; it may have arrived)"
        nominal = nominal_delay(attempts, DELIVERY_BACKOFF_S, 2.0, DELIVERY_BACKOFF_CAP_S)
        wait = jittered_delay(nominal, "full", self._rng, cap=DELIVERY_BACKOFF_CAP_S, initial=DELIVERY_BACKOFF_S,
                              previous=nominal)
        asked = error.retry_after if isinstance(error, DeliveryError) else None
        left = deadline - self._clock()
        if asked is not None and asked + DELIVERY_MIN_ATTEMPT_S > left:
            return 0.0, f" (asked to retry after {asked:g} s, beyond the {max(left, 0):.0f} s left of the budget)"
        wait = max(wait, asked or 0.0)
        if wait + DELIVERY_MIN_ATTEMPT_S > left:
            return 0.0, " (the channel's time budget is spent)"
        return wait, None

    # -- the lifecycle: fire, resolve, reminders, silences, quiet hours, digests -----

    def fire(self, key: str, title: str, message: str = "", severity: AlertSeverity = AlertSeverity.WARNING,
             details: Optional[Dict[str, Any]] = None, *, inhibited_by: Optional[str] = None) -> DeliveryReport:
        """One run in which ``key`` is failing: notify on change, remind on schedule, else stay quiet.

        The first fire (after ``fire_after`` failing runs) is delivered to every
        channel; later ones only when the severity rises or the reminder
        interval of the severity has passed since the last delivery. With
        ``inhibited_by`` (why: the check it depends on is CRITICAL), what is due
        is recorded as ``inhibited`` and owed until a run without it.
        """
        key = self.masker.scrub(_lifecycle_key(key))
        alert = self.create_alert(title, message, _severity(severity), None, details)._replace(
            dedup=key, inhibited_by=inhibited_by)
        return self._observe_and_notify(alert, failing=True)

    def resolve(self, key: str, message: Optional[str] = None, *, after: Optional[int] = None) -> DeliveryReport:
        """One run in which ``key`` passes: after ``resolve_after`` such runs (or ``after``), one RESOLVED
        goes to each channel that received the FIRING (and only to those)."""
        key = self.masker.scrub(_lifecycle_key(key))
        alert = self.create_alert(key, message or "", AlertSeverity.INFO, None, None)._replace(dedup=key)
        return self._observe_and_notify(alert, failing=False, resolve_after=after)

    @contextlib.contextmanager
    def batch(self) -> Iterator["_Batch"]:
        """Gather the notifications of several fire() and resolve() calls (one cron run) and send them
        at the end; more than ``max_messages_per_run`` for one channel go as one digest."""
        if self._batch is not None:
            raise MonitorError("batches do not nest")
        self._batch = _Batch()
        try:
            yield self._batch
        finally:
            batch, self._batch = self._batch, None
            batch.report = self._deliver_calls(batch.calls)

    def send_watchdog(self, valid_for_s: float) -> None:
        """The Watchdog alert to each alertmanager channel that wants it, valid for ``valid_for_s``; one
        that cannot take it is a warning line (the next run sends it again), never the run's verdict."""
        with self._run() as run:
            for name, channel in sorted(self.channels.items()):
                if isinstance(channel, AlertmanagerChannel) and channel.wants_watchdog:
                    left, started = run.channel_left(name, channel.spec.budget_s), self._clock()
                    try:
                        if left < DELIVERY_MIN_ATTEMPT_S:
                            raise DeliveryError("this run's time for the channel is spent")
                        channel.send_watchdog(min(channel.spec.timeout_s, left), self._now(), valid_for_s)
                    except Exception as error:  # reported, as every delivery failure is
                        log.warning("channel %s: the Watchdog was not sent: %s", name,
                                    self.masker.scrub(_error_text(error)))
                    finally:
                        run.spend(name, self._clock() - started)

    def firing(self) -> List[Dict[str, Any]]:
        """What is firing now: since when, at which severity, how many runs in a row found it failing (the
        quiet repeats are counted here, not in the history), and the last delivery to each channel."""
        import json

        rows = self.store.query("SELECT key, title, message, severity, details, since, flips, recent, fail_streak "
                                "FROM alert_states WHERE state = 'firing' ORDER BY since, key")
        acks = {key: {"by": by, "comment": comment, "at": iso_time(at), "until": iso_time(until)}
                for key, by, comment, at, until in self.store.query(
                    "SELECT key, by, comment, at, until FROM alert_acks WHERE until IS NULL OR until > ?",
                    (self._now(),))}
        found = []
        for key, title, message, severity, details, since, flips, recent, runs in rows:
            channels = self.store.query("SELECT channel, delivered_at, severity, reminders, held "
                                        "FROM alert_channel_states WHERE key = ? ORDER BY channel", (key,))
            found.append({
                "key": key, "title": title, "message": message, "severity": severity, "details": json.loads(details),
                "since": iso_time(since), "flips": flips, "recent_runs": recent, "failing_runs": runs,
                "acknowledged": acks.get(key),
                "channels": {channel: {"last_delivered": iso_time(at), "severity": sev, "reminders": reminders,
                                       "held": bool(held)} for channel, at, sev, reminders, held in channels},
            })
        return found

    def _observe_and_notify(self, alert: Alert, failing: bool, resolve_after: Optional[int] = None) -> DeliveryReport:
        now = self._now()
        try:
            self._release_held(now)
            with self.store.write() as conn:
                state = self._observe(conn, alert, failing, now, resolve_after)
                if failing:
                    call = self._plan_firing(conn, state, alert, now) if state["state"] == "firing" else None
                else:
                    call = self._plan_resolved(conn, state, alert, now)
        except StorageError as err:
            return self._notify_without_store(alert, failing, err)
        if call is None:
            return DeliveryReport({})
        if self._batch is not None:
            self._batch.calls.append(call)
            return DeliveryReport(dict(call.outcomes))
        return self._deliver_calls([call])

    def _notify_without_store(self, alert: Alert, failing: bool, err: StorageError) -> DeliveryReport:
        """The store cannot be written (a full disk, a lock held too long): a failure is still sent, straight
        to its channels, without dedup or reminders; a RESOLVED waits, as who got the FIRING is unknown."""
        if not self.store_warning_given:
            log.warning("%s: %s", err, f"{alert.key} sent without its history" if failing else
                        f"the RESOLVED of {alert.key} waits until the store can be written")
            self.store_warning_given = True
        if not failing:
            return DeliveryReport({}, [], err)
        channels, missing = self.selected(alert)
        outcomes = {name: Delivery("not_configured", error=why) for name, why in missing.items()}
        with self._run() as run:
            sent = self._in_parallel({channel.name: lambda channel=channel: self._attempts(channel, alert)
                                      for channel in channels}, run)
        for channel in channels:
            outcomes[channel.name] = self._logged(channel, sent.get(channel.name) or unfinished(run))
        external = [name for name in outcomes if name not in self.settings.channels
                    or self.settings.channels[name].kind != "log"]
        self._if_unheard(alert, outcomes, external)
        return DeliveryReport(outcomes, external, err)

    def _observe(self, conn: sqlite3.Connection, alert: Alert, failing: bool, now: float,
                 resolve_after: Optional[int] = None) -> Dict[str, Any]:
        """Count this run into the key's state (streaks, recent runs, flips); return the new state."""
        import json

        columns = ("state", "title", "message", "severity", "details", "since", "recent", "fail_streak",
                   "pass_streak", "flips")
        row = conn.execute(f"SELECT {', '.join(columns)} FROM alert_states WHERE key = ?", (alert.key,)).fetchone()
        state = dict(zip(columns, row)) if row else {
            "state": "ok", "title": alert.title, "message": "", "severity": "info", "details": "{}", "since": None,
            "recent": "", "fail_streak": 0, "pass_streak": 0, "flips": 0}
        lifecycle = self.settings.lifecycle
        state["recent"] = (state["recent"] + ("F" if failing else "P"))[-RECENT_RUNS_KEPT:]
        state["fail_streak"] = state["fail_streak"] + 1 if failing else 0
        state["pass_streak"] = 0 if failing else state["pass_streak"] + 1
        if failing:
            state.update(title=alert.title, message=alert.message, severity=alert.severity.value,
                         details=json.dumps(alert.details, sort_keys=True, default=str))
            if state["state"] != "firing" and lifecycle.triggered(state["recent"], state["fail_streak"]):
                state.update(state="firing", since=now, flips=state["flips"] + 1)
        elif state["state"] == "firing" and state["pass_streak"] >= (resolve_after or lifecycle.resolve_after):
            state.update(state="ok", flips=state["flips"] + 1)
            conn.execute("DELETE FROM alert_acks WHERE key = ?", (alert.key,))  # the next failure is news
        conn.execute(
            "INSERT OR REPLACE INTO alert_states (key, state, title, message, severity, details, since, recent, "
            "fail_streak, pass_streak, flips, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (alert.key, state["state"], self.masker.scrub(state["title"]), self.masker.scrub(state["message"]),
             state["severity"], self.masker.scrub(state["details"]), state["since"], state["recent"],
             state["fail_streak"], state["pass_streak"], state["flips"], now))
        return state

    def _plan_firing(self, conn: sqlite3.Connection, state: Dict[str, Any], alert: Alert, now: float) -> "_Call":
        """Per channel: a FIRING, a reminder, or nothing; claimed, silenced or held as the store says."""
        alert = alert._replace(kind="firing", started_at=state["since"])
        call = _Call(alert, "firing")
        silence = self._silence_for(conn, alert, now)
        acknowledged = self._acknowledged(conn, alert.key, state["severity"], now)
        minute = _local_minute(now)
        for channel in self.selected(alert)[0]:
            row = self._channel_state(conn, alert.key, channel.name, now)
            if row["claimed"] or row["held"]:
                continue  # another process is sending it, or the end of quiet hours will
            kind, note = self._due(row, state, now)
            if kind is None or (kind == "reminder" and acknowledged):
                continue
            if silence is not None:
                call.outcomes[channel.name] = Delivery("silenced", error=silence)
            elif alert.inhibited_by:
                call.outcomes[channel.name] = Delivery("inhibited", error=alert.inhibited_by)
            elif channel.spec.is_quiet(minute, alert.severity.value):
                if kind != "reminder":  # a reminder is not worth keeping for the catch-up
                    self._hold(conn, channel.name, alert._replace(kind=kind), now)
                    call.outcomes[channel.name] = Delivery("held")
            else:
                self._claim_channel(conn, alert.key, channel, kind, alert.severity.value, now)
                call.plans.append(_Plan(channel, alert._replace(kind=kind, note=note)))
        if silence is None and not alert.inhibited_by and not acknowledged:
            self._plan_escalations(conn, call, state, alert, now)
        return call

    def _plan_escalations(self, conn: sqlite3.Connection, call: "_Call", state: Dict[str, Any], alert: Alert,
                          now: float) -> None:
        """A critical alert firing ``escalate_after`` (counted from the start of the firing) on a channel,
        unacknowledged, goes to its ``escalate_to`` as well: once (that channel then holds it, and gets its
        RESOLVED). A channel that got it by escalation escalates in turn: a chain is followed, a run at a
        time."""
        if state["severity"] != "critical":
            return
        planned = {plan.channel.name for plan in call.plans}
        routed = self.selected(alert)[0]
        escalated = [self.channels[name] for (name,) in conn.execute(
            "SELECT channel FROM alert_channel_states WHERE key = ? AND delivered_at IS NOT NULL ORDER BY channel",
            (alert.key,)) if name in self.channels and self.channels[name] not in routed]
        for channel in routed + escalated:
            after, target = channel.spec.escalate_after_s, self.channels.get(channel.spec.escalate_to or "")
            if after is None or target is None or now - state["since"] < after or target.name in planned:
                continue
            row = self._channel_state(conn, alert.key, target.name, now)
            if row["claimed"] or row["delivered_at"] is not None:
                continue  # escalated before (or now, by another run), or it had the alert anyway
            note = (f"escalated from {channel.name}: firing for {format_span(now - state['since'])} "
                    f"without an acknowledgement")
            self._claim_channel(conn, alert.key, target, "firing", alert.severity.value, now)
            call.plans.append(_Plan(target, alert._replace(kind="firing", note=note)))
            planned.add(target.name)

    def _due(self, row: Dict[str, Any], state: Dict[str, Any], now: float) -> Tuple[Optional[str], str]:
        """(kind, note) owed to a channel now: ("firing", ...), ("reminder", ...), or (None, "")."""
        severity = state["severity"]
        if row["delivered_at"] is None:
            return "firing", ""
        if ALERT_SEVERITIES.index(severity) > ALERT_SEVERITIES.index(row["severity"]):
            return "firing", f"severity raised from {row['severity']} to {severity}"
        repeat = self.settings.lifecycle.repeat_s[severity]
        if repeat is not None and now - row["delivered_at"] >= repeat:
            return "reminder", (f"still firing since {iso_time(state['since'])}, "
                                f"reminder #{row['reminders'] + 1}")
        return None, ""

    def _plan_resolved(self, conn: sqlite3.Connection, state: Dict[str, Any], alert: Alert,
                       now: float) -> Optional["_Call"]:
        """A RESOLVED for each channel that got the FIRING and still has none; nothing while firing."""
        if state["state"] == "firing":
            return None
        rows = conn.execute("SELECT channel FROM alert_channel_states WHERE key = ?", (alert.key,)).fetchall()
        if not rows:
            return None
        severity = _severity(state["severity"])
        since = state["since"] or now
        alert = alert._replace(kind="resolved", title=state["title"], severity=severity, started_at=since,
                               message=alert.message or state["message"],
                               note=f"resolved after {format_span(now - since)} (firing since {iso_time(since)})")
        call = _Call(alert, "resolved")
        minute = _local_minute(now)
        for (name,) in rows:
            row = self._channel_state(conn, alert.key, name, now)
            channel = self.channels.get(name)
            if row["claimed"]:
                continue
            if row["delivered_at"] is None or channel is None or not channel.spec.send_resolved:
                if row["held"]:  # the FIRING waits in the catch-up: tell its end there too
                    self._hold(conn, name, alert, now)
                conn.execute("DELETE FROM alert_channel_states WHERE key = ? AND channel = ?", (alert.key, name))
            elif channel.spec.is_quiet(minute, severity.value):
                if not row["held"]:
                    self._hold(conn, name, alert, now)
                    call.outcomes[name] = Delivery("held")
            else:
                self._claim_channel(conn, alert.key, channel, "resolved", severity.value, now)
                call.plans.append(_Plan(channel, alert))
        return call if call.plans or call.outcomes else None

    def _channel_state(self, conn: sqlite3.Connection, key: str, channel: str, now: float) -> Dict[str, Any]:
        """One channel's state for a key. A claim whose process died (killed right after the service
        answered, perhaps) counts as delivered: a duplicate is worse than a late reminder."""
        columns = ("delivered_at", "severity", "reminders", "held", "claim_owner", "claim_until", "claim_kind",
                   "claim_severity")
        row = conn.execute(f"SELECT {', '.join(columns)} FROM alert_channel_states WHERE key = ? AND channel = ?",
                           (key, channel)).fetchone()
        state = dict(zip(columns, row)) if row else dict(zip(columns, (None, None, 0, 0, "", 0.0, "", "")))
        if state["claim_owner"] and (state["claim_until"] <= now or claim_owner_gone(state["claim_owner"])):
            log.warning("channel %s: a run stopped while sending %s for %s; counted as delivered",
                        channel, state["claim_kind"], key)
            self._settle_channel(conn, key, channel, state["claim_kind"], state["claim_severity"], True,
                                 state["claim_until"])
            return self._channel_state(conn, key, channel, now)
        state["claimed"] = bool(state["claim_owner"])
        return state

    def _claim_channel(self, conn: sqlite3.Connection, key: str, channel: _Channel, kind: str, severity: str,
                       now: float) -> None:
        lease = now + channel.spec.budget_s + DELIVERY_CLAIM_GRACE_S
        conn.execute(
            "INSERT INTO alert_channel_states (key, channel, delivered_at, severity, reminders, held, claim_owner, "
            "claim_until, claim_kind, claim_severity) VALUES (?, ?, NULL, NULL, 0, 0, ?, ?, ?, ?) "
            "ON CONFLICT (key, channel) DO UPDATE SET claim_owner = excluded.claim_owner, "
            "claim_until = excluded.claim_until, claim_kind = excluded.claim_kind, "
            "claim_severity = excluded.claim_severity",
            (key, channel.name, self._owner, lease, kind, severity))

    def _settle_channel(self, conn: sqlite3.Connection, key: str, channel: str, kind: str, severity: str,
                        sent: bool, at: float) -> None:
        """After a delivery: a FIRING or reminder marks the channel, a RESOLVED ends its state."""
        if not sent:
            conn.execute("UPDATE alert_channel_states SET claim_owner = '', claim_until = 0 "
                         "WHERE key = ? AND channel = ?", (key, channel))
        elif kind == "resolved":
            conn.execute("DELETE FROM alert_channel_states WHERE key = ? AND channel = ?", (key, channel))
        else:
            conn.execute(
                "INSERT INTO alert_channel_states (key, channel, delivered_at, severity, reminders, held, "
                "claim_owner, claim_until, claim_kind, claim_severity) VALUES (?, ?, ?, ?, 0, 0, '', 0, '', '') "
                "ON CONFLICT (key, channel) DO UPDATE SET delivered_at = excluded.delivered_at, "
                "severity = excluded.severity, reminders = CASE WHEN ? THEN reminders + 1 ELSE 0 END, held = 0, "
                "claim_owner = '', claim_until = 0", (key, channel, at, severity, kind == "reminder"))

    # -- silences -------------------------------------------------------------

    # -- acknowledgements -----------------------------------------------------

    def acknowledge(self, key: str, by: str, comment: str = "", duration_s: Optional[float] = None) -> Dict[str, Any]:
        """Stop the reminders of the firing alert ``key`` (its RESOLVED still goes out) until it resolves,
        ``duration_s`` passes, or its severity rises; the history records who did it and when."""
        key, by, comment = (self.masker.scrub(_one_line(text)) for text in (key, by, comment))
        now = self._now()
        until = None if duration_s is None else now + non_negative(duration_s, "acknowledgement duration")
        with self.store.write() as conn:
            row = conn.execute("SELECT title, severity FROM alert_states WHERE key = ? AND state = 'firing'",
                               (key,)).fetchone()
            if row is None:
                firing = [name for (name,) in conn.execute("SELECT key FROM alert_states WHERE state = 'firing' "
                                                           "ORDER BY key")]
                raise MonitorError(f"no firing alert {key!r}" + (f" (firing: {', '.join(firing)})" if firing
                                                                  else " (nothing fires)"))
            title, severity = row
            conn.execute("INSERT OR REPLACE INTO alert_acks (key, by, comment, at, until, severity) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (key, by, comment, now, until, severity))
            message = f"acknowledged by {by}" + (f": {comment}" if comment else "") + (
                f" for {format_span(duration_s)}" if duration_s is not None else "")
            conn.execute("INSERT INTO alerts (ts, kind, dedup_key, severity, title, message, details) "
                         "VALUES (?, 'acknowledged', ?, ?, ?, ?, '{}')", (now, key, severity, title, message))
        return {"key": key, "by": by, "comment": comment, "at": iso_time(now), "until": iso_time(until)}

    def unacknowledge(self, key: str) -> bool:
        """Take an acknowledgement back: reminders are due again. False when there was none."""
        with self.store.write() as conn:
            return conn.execute("DELETE FROM alert_acks WHERE key = ?", (key,)).rowcount > 0

    @staticmethod
    def _acknowledged(conn: sqlite3.Connection, key: str, severity: str, now: float) -> bool:
        """True while ``key`` is acknowledged at ``severity`` or above; a rise or an expiry ends it."""
        row = conn.execute("SELECT severity, until FROM alert_acks WHERE key = ?", (key,)).fetchone()
        if row is None:
            return False
        if ALERT_SEVERITIES.index(severity) > ALERT_SEVERITIES.index(row[0]) or (row[1] is not None and now >= row[1]):
            conn.execute("DELETE FROM alert_acks WHERE key = ?", (key,))
            return False
        return True

    def add_silence(self, match: str, duration_s: float, comment: str = "") -> int:
        """Silence alerts whose key or title contains ``match`` (``key=K``: the key K exactly)."""
        match = _one_line(str(match))
        if not match or match == "key=":
            raise ValidationError("a silence needs a --match text")
        duration_s = non_negative(duration_s, "silence duration")
        if duration_s <= 0:
            raise ValidationError("a silence needs a duration of more than 0")
        now = self._now()
        if now + duration_s >= MAX_TIMESTAMP_S:
            raise ValidationError(f"a silence of {duration_s:g} s would end past the year 9999")
        with self.store.write() as conn:
            return conn.execute("INSERT INTO silences (match, starts, ends, comment) VALUES (?, ?, ?, ?)",
                                (match, now, now + duration_s, _one_line(comment))).lastrowid

    def planned_maintenance(self) -> List[Dict[str, Any]]:
        """Each ``[maintenance:NAME]`` with its next window (or the one that holds now), soonest first;
        one whose windows are all past is left out."""
        now = self._now()
        planned = []
        for window in self.settings.maintenance:
            upcoming = window.windows(now)
            if upcoming:
                starts, ends = upcoming[0]
                planned.append({"name": window.name, "match": window.match, "starts": iso_time(starts),
                                "ends": iso_time(ends), "active": starts <= now < ends, "timezone": window.zone})
        return sorted(planned, key=lambda entry: (entry["starts"], entry["name"]))

    def list_silences(self, include_expired: bool = False) -> List[Dict[str, Any]]:
        now = self._now()
        rows = self.store.query("SELECT id, match, starts, ends, comment FROM silences WHERE ends > ? ORDER BY id",
                                (float("-inf") if include_expired else now,))
        return [{"id": id_, "match": match, "starts": iso_time(starts), "ends": iso_time(ends), "comment": comment,
                 "active": starts <= now < ends} for id_, match, starts, ends, comment in rows]

    def remove_silence(self, silence_id: int) -> bool:
        with self.store.write() as conn:
            return conn.execute("DELETE FROM silences WHERE id = ?", (int(silence_id),)).rowcount > 0

    def _silence_for(self, conn: sqlite3.Connection, alert: Alert, now: float) -> Optional[str]:
        """What silences the alert now: ``silence #ID`` (one matching its key or title), or ``maintenance
        NAME`` (a planned window that holds), or None."""
        for silence_id, match in conn.execute("SELECT id, match FROM silences WHERE starts <= ? AND ends > ? "
                                              "ORDER BY id", (now, now)):
            if _silence_matches(match, alert):
                return f"silence #{silence_id}"
        for window in self.settings.maintenance:
            if window.matches(alert) and window.holds(now):
                return f"maintenance {window.name}"
        return None

    # -- quiet hours ----------------------------------------------------------

    def _hold(self, conn: sqlite3.Connection, channel: str, alert: Alert, now: float) -> None:
        """Keep a notification for the catch-up message at the end of the channel's quiet hours."""
        conn.execute("INSERT INTO alert_held (channel, key, kind, severity, title, ts, claim_owner, claim_until) "
                     "VALUES (?, ?, ?, ?, ?, ?, '', 0)",
                     (channel, alert.key, alert.kind, alert.severity.value, self.masker.scrub(alert.title), now))
        if alert.dedup:
            conn.execute("UPDATE alert_channel_states SET held = 1 WHERE key = ? AND channel = ?",
                         (alert.key, channel))
            conn.execute("INSERT OR IGNORE INTO alert_channel_states (key, channel, delivered_at, severity, reminders, "
                         "held, claim_owner, claim_until, claim_kind, claim_severity) "
                         "VALUES (?, ?, NULL, NULL, 0, 1, '', 0, '', '')", (alert.key, channel))

    def _release_held(self, now: float) -> List[DeliveryReport]:
        """Send one catch-up message to each channel whose quiet hours are over."""
        minute = _local_minute(now)
        reports = []
        free = sorted({name for name, owner, until in self.store.query(
            "SELECT DISTINCT channel, claim_owner, claim_until FROM alert_held")
            if until <= now or claim_owner_gone(owner)})  # a claim whose sender died is over, whatever the clock
        for name in free:
            channel = self.channels.get(name)
            if channel is None or channel.spec.is_quiet(minute, "info"):
                continue
            with self.store.write() as conn:
                held = [row[:6] for row in conn.execute(
                    "SELECT id, key, kind, severity, title, ts, claim_owner, claim_until FROM alert_held "
                    "WHERE channel = ? ORDER BY ts, id", (name,)) if row[7] <= now or claim_owner_gone(row[6])]
                conn.executemany("UPDATE alert_held SET claim_owner = ?, claim_until = ? WHERE id = ?",
                                 [(self._owner, now + channel.spec.budget_s + DELIVERY_CLAIM_GRACE_S, row[0])
                                  for row in held])
            if held:
                reports.append(self._send_catch_up(channel, held, now))
        return reports

    def _send_catch_up(self, channel: _Channel, held: List[tuple], now: float) -> DeliveryReport:
        worst = max((row[3] for row in held), key=ALERT_SEVERITIES.index)
        lines = [f"{_local_hhmm(ts)} {kind.upper()} [{severity.upper()}] {title}"
                 for _, _, kind, severity, title, ts in held]
        alert = self.create_alert(f"{len(held)} notification{'s' if len(held) > 1 else ''} held during quiet hours",
                                  "\n".join(lines), worst)._replace(kind="catchup")
        delivery = self._logged(channel, self._attempts(channel, alert))
        sent = delivery.outcome == "sent"
        with self.store.write() as conn:
            alert_id = self._insert_alert(conn, alert, "catchup")
            self._write_delivery(conn, alert_id, channel.name, delivery, "catchup")
            for row_id, key, kind, severity, _, _ in held:
                if not sent:
                    conn.execute("UPDATE alert_held SET claim_owner = '', claim_until = 0 WHERE id = ?", (row_id,))
                    continue
                conn.execute("DELETE FROM alert_held WHERE id = ?", (row_id,))
                firing = conn.execute("SELECT 1 FROM alert_states WHERE key = ? AND state = 'firing'",
                                      (key,)).fetchone()
                if kind in ("firing", "reminder") and firing:
                    self._settle_channel(conn, key, channel.name, kind, severity, True, now)
                elif kind == "resolved":
                    self._settle_channel(conn, key, channel.name, kind, severity, True, now)
        return DeliveryReport({channel.name: delivery})

    # -- sending what was planned ----------------------------------------------

    def _deliver_calls(self, calls: List["_Call"]) -> DeliveryReport:
        """Send every plan: one message each, or one digest per channel with more than the limit; the
        channels at once, each within what it has of the run's budget."""
        with self._run() as run:
            return self._deliver_calls_within(calls, run)

    def _channel_messages(self, channel: _Channel, entries: List[Tuple["_Call", "_Plan"]]) -> Dict[int, Delivery]:
        """One channel's share of a run: each plan's outcome by its call, or one digest for them all."""
        if len(entries) > self.settings.lifecycle.max_messages_per_run:
            delivery = self._logged(channel, self._attempts(channel, self._digest([plan.alert for _, plan in entries])))
            return {id(call): delivery._replace(error=delivery.error or "in a digest") for call, _ in entries}
        return {id(call): self._logged(channel, self._attempts(channel, plan.alert)) for call, plan in entries}

    def _deliver_calls_within(self, calls: List["_Call"], run: RunBudget) -> DeliveryReport:
        by_channel: Dict[str, List[Tuple["_Call", "_Plan"]]] = {}
        for call in calls:
            for plan in call.plans:
                by_channel.setdefault(plan.channel.name, []).append((call, plan))
        results: Dict[int, Dict[str, Delivery]] = {id(call): dict(call.outcomes) for call in calls}
        done = self._in_parallel({name: lambda entries=entries: self._channel_messages(entries[0][1].channel, entries)
                                  for name, entries in by_channel.items()}, run)
        for name, entries in by_channel.items():
            for call, _ in entries:
                results[id(call)][name] = done[name][id(call)] if name in done else unfinished(run)
        external = [name for name, spec in self.settings.channels.items() if spec.kind != "log"]
        for call in calls:
            self._fall_back(call, results[id(call)])
            self._record_call(call, results[id(call)])
            if results[id(call)]:
                self._if_unheard(call.plans[0].alert if call.plans else call.alert, results[id(call)], external)
        merged: Dict[str, Delivery] = {}
        for call in calls:
            for name, delivery in results[id(call)].items():
                if name not in merged or delivery.outcome == "failed":  # a failure anywhere is reported
                    merged[name] = delivery
        return DeliveryReport(merged, [name for name in merged if name in external])

    def _fall_back(self, call: "_Call", outcomes: Dict[str, Delivery]) -> None:
        """Each failed plan goes to its channel's fallback, which then counts as having the alert."""
        targets = [plan.channel.name for plan in call.plans]
        for plan in list(call.plans):
            for fallback in self._try_fallbacks(plan.channel, plan.alert, outcomes, targets):
                call.plans.append(_Plan(fallback, plan.alert))

    def _record_call(self, call: "_Call", outcomes: Dict[str, Delivery]) -> None:
        """History rows, and the channels' states settled, in one transaction. A run of a firing alert
        that owed no channel anything (a quiet repeat) leaves no row: its count is the alert's failing runs."""
        if not outcomes:
            return
        now = self._now()
        kinds = {plan.channel.name: plan.alert.kind for plan in call.plans}
        with self.store.write() as conn:
            alert_id = self._insert_alert(conn, call.alert, call.kind)
            for name, delivery in outcomes.items():
                self._write_delivery(conn, alert_id, name, delivery, kinds.get(name, call.kind))
                if name in kinds:
                    self._settle_channel(conn, call.alert.key, name, kinds[name], call.alert.severity.value,
                                         delivery.outcome == "sent", now)

    @staticmethod
    def _digest(alerts: List[Alert]) -> Alert:
        worst = max((alert.severity for alert in alerts), key=lambda severity: severity.rank)
        lines = [alert.headline + (f" ({alert.note})" if alert.note else "") for alert in alerts]
        first = alerts[0]
        return first._replace(title=f"{len(alerts)} alerts", message="\n".join(lines), severity=worst,
                              details={}, kind="digest", dedup=None, note="", uid=os.urandom(8).hex())

    # -- dry run ------------------------------------------------------------

    def render(self, alert: Alert) -> List[str]:
        """What each selected channel would send, secrets masked: the --dry-run output."""
        channels, missing = self.selected(alert)
        blocks = [f"--- {name}: skipped ({why})" for name, why in missing.items()]
        for channel in channels:
            text = f"--- {channel.name}: {channel.describe()}\n{channel.render(channel.templated(alert))}"
            blocks.append(self.masker.scrub(text.rstrip("\n")))
        return blocks


def _lifecycle_lines(lifecycle: Lifecycle) -> List[str]:
    lines = [f"repeat_interval_{severity} = {format_span(seconds, exact=True) if seconds else 'never'}"
             for severity, seconds in sorted(lifecycle.repeat_s.items(), key=lambda item: -ALERT_SEVERITIES.index(
                 item[0]))]
    within = f" within {lifecycle.fire_within}" if lifecycle.fire_within else ""
    return lines + [f"fire_after = {lifecycle.fire_after}{within}", f"resolve_after = {lifecycle.resolve_after}",
                    f"max_messages_per_run = {lifecycle.max_messages_per_run}"]


def _routing_lines(spec: ChannelSpec) -> List[str]:
    """A channel's routing keys that differ from the defaults."""
    lines = [f"min_severity = {spec.min_severity}"] if spec.min_severity != "info" else []
    if spec.quiet_hours:
        start, end = spec.quiet_hours
        lines.append(f"quiet_hours = {start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}")
    if spec.quiet_bypass:
        lines.append(f"quiet_hours_bypass = {spec.quiet_bypass}")
    if spec.fallback:
        lines.append(f"fallback = {spec.fallback}")
    if spec.escalate_to:
        lines += [f"escalate_after = {format_span(spec.escalate_after_s or 0, exact=True)}",
                  f"escalate_to = {spec.escalate_to}"]
    if not spec.send_resolved:
        lines.append("send_resolved = false")
    lines += [f"{part}_template = {text}" for part, text in (spec.templates or {}).items()]
    return lines


def unusable_channels(settings: AlertingSettings) -> List[Tuple[str, str, str]]:
    """Each enabled channel that cannot be used here and now (its secret's variable unset, its file
    unreadable), as a problem: it would miss every alert, so ``config --check`` must not say OK."""
    masker = settings.masker()
    return [(spec.section or f"channel:{name}", "", f"channel {name} cannot be used here: {masker.scrub(spec.missing)}")
            for name, spec in sorted(settings.channels.items()) if spec.enabled and spec.missing]


def effective_configuration(settings: AlertingSettings) -> List[str]:
    """The configuration as alerting reads it, every secret masked: what ``config`` prints."""
    masker = settings.masker()
    lines = [f"# {settings.path}" + ("" if os.path.exists(settings.path) else " (does not exist: defaults)"),
             "[alerting]", f"dedup_window = {format_span(settings.dedup_window_s, exact=True)}",
             f"timeout = {format_span(settings.timeout_s, exact=True)}",
             f"channel_budget = {format_span(settings.budget_s, exact=True)}",
             f"run_budget = {format_span(settings.run_budget_s, exact=True)}"]
    lines += _lifecycle_lines(settings.lifecycle)
    for name, spec in sorted(settings.channels.items()):
        made_by = "" if spec.section.startswith("channel:") or not spec.section else f"  # from [{spec.section}]"
        lines += ["", f"[channel:{name}]{made_by}", f"type = {spec.kind}"]
        if not spec.section:
            lines.append("# always on: the record of last resort")
        lines += [f"{key} = {value}" for key, value in sorted(spec.settings.items())]
        for key, value in sorted(spec.secrets.items()):
            shown = mask_url(value) if "://" in value else "***"
            lines.append(f"{key} = {shown}  # from {spec.sources[key]}")
        lines += _routing_lines(spec)
        if not spec.enabled:
            lines.append("# disabled")
        elif spec.missing:
            lines.append(f"# not configured: {masker.scrub(spec.missing)}; the channel is skipped")
    return [masker.scrub(line) for line in lines]


## Health checks ##############################################################

CHECK_STATES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")  # the Monitoring Plugins exit codes 0 to 3
STATE_RANK = {"OK": 0, "WARNING": 1, "UNKNOWN": 2, "CRITICAL": 3}  # which state is worse
# The units a threshold may carry; a number without a unit is in the check's own unit.
PLAIN, BYTES, PERCENT, SECONDS = ("",), ("B", ""), ("%",), ("s", "")
ANY_UNIT = ("", "B", "%", "s")
CHECK_COMMON_KEYS = ("type", "warning", "critical", "timeout", "interval", "depends_on")
CONFIGURATION_CHECK = "configuration"  # the run's own check: what is wrong in the configuration file
DEFAULT_CHECK_INTERVAL_S = 3600.0  # how often cron runs check: a verdict older than this is stale
CHECK_STALE_GRACE_S = 60.0  # cron starts on the minute, and a run records its verdicts when its checks end
DEFAULT_CHECK_TIMEOUT_S = 10.0
CHECK_TIMEOUT_GRACE_S = 1.0  # past a check's timeout, before its thread is given up
DEFAULT_DISK_WARNING = "10GB:,10%:"  # the original design's scenario: warn under 10 GB or 10 % free
DEFAULT_DISK_CRITICAL = "5GB:,5%:"  # ... and critical under 5 GB or 5 % free
DEFAULT_SYNC_WARNING = "~:24h"  # the age of the last successful sync
DEFAULT_SYNC_CRITICAL = "~:48h"
DEFAULT_ANOMALY_WARNING = "3.5"  # the robust score (modified z) of the latest sample: Iglewicz and Hoaglin's cut
DEFAULT_ANOMALY_CRITICAL = "7"
BREAKER_CRITICAL_OPEN_S = 3600.0
QUICK_CHECK_INTERVAL_S = DAY_S  # quick_check reads every page of the store: once a day is enough
METRIC_STATISTICS = ("latest", "avg", "min", "max", "count", "stddev")
CHECK_OUTPUT_LINE_CHARS = 300
CHECK_OUTPUT_KEEP_BYTES = 65536  # of a command check's output: its first line is the verdict

_NOT_A_RANGE = "is not a range such as 10, 10:, ~:10, 10:20 or @10:20"


class Threshold(NamedTuple):
    """One range of the Monitoring Plugins guidelines: alert outside [low, high], or inside with ``@``."""

    low: float
    high: float
    inside: bool
    unit: str  # "" (a plain number), "B" (bytes), "%" or "s"
    text: str

    def alerts(self, value: float) -> bool:
        within = self.low <= value <= self.high
        return within if self.inside else not within


def _threshold_number(text: str, units: set, whole: str) -> float:
    cleaned = text.strip().lower()
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz%")
    unit = cleaned[len(number):]
    try:
        value = decimal_number(number)
    except ValueError:
        raise ValidationError(f"{_shown(whole)} {_NOT_A_RANGE}") from None
    if unit in SIZE_UNITS:
        units.add("B")
        return value * SIZE_UNITS[unit]
    if unit == "%":
        units.add("%")
        return value
    if unit in _DURATION_UNITS_S:
        units.add("s")
        return value * _DURATION_UNITS_S[unit]
    if unit:
        raise ValidationError(f"{_shown(whole)}: unknown unit {unit!r} (B, KB, MB, GB, TB, KiB..TiB, %, s, m, h, d)")
    units.add("")
    return value


def parse_threshold(text: str) -> Threshold:
    """``10``, ``10:``, ``~:10``, ``10:20`` or ``@10:20``; each number may carry a unit: ``5GB``, ``90%``, ``24h``.

    >>> parse_threshold("10GB:").alerts(5e9), parse_threshold("~:24h").alerts(90000)
    (True, True)
    """
    spec = text.strip()
    inside = spec.startswith("@")
    body = spec[1:] if inside else spec
    low_text, sep, high_text = body.partition(":")
    if not low_text.strip() and not high_text.strip():
        raise ValidationError(f"{_shown(text)} {_NOT_A_RANGE}")
    if not sep:
        low_text, high_text = "0", body
    units = set()
    low = -math.inf if low_text == "~" else _threshold_number(low_text or "0", units, text)
    high = math.inf if not high_text and sep else _threshold_number(high_text, units, text)
    if len(units - {""}) > 1 or low > high:
        raise ValidationError(f"{_shown(text)} {_NOT_A_RANGE}")
    return Threshold(low, high, inside, max(units, key=len) if units else "", spec)


def parse_thresholds(text: Optional[str]) -> List[Threshold]:
    """A comma-separated list of ranges: the state applies when any of them alerts."""
    return [parse_threshold(part) for part in (text or "").split(",") if part.strip()]


class CheckResult(NamedTuple):
    """One check's verdict: a Monitoring Plugins state, a one-line summary, and its measurements."""

    name: str
    state: str  # one of CHECK_STATES
    summary: str
    value: Optional[float] = None
    unit: str = ""
    warning: str = ""
    critical: str = ""
    perfdata: Tuple[str, ...] = ()
    duration_s: float = 0.0
    keep: Tuple[Tuple[str, float], ...] = ()  # (key, time) the store keeps for the check's next run

    def as_json(self) -> Dict[str, Any]:
        return {"name": self.name, "state": self.state, "summary": self.summary, "value": self.value,
                "unit": self.unit, "warning": self.warning or None, "critical": self.critical or None,
                "duration_s": round(self.duration_s, 3)}


def judge(value: float, units: Tuple[str, ...], warning: List[Threshold], critical: List[Threshold]) -> str:
    """CRITICAL if a critical range in one of ``units`` alerts, else WARNING if a warning one does, else OK."""
    if any(t.alerts(value) for t in critical if t.unit in units):
        return "CRITICAL"
    if any(t.alerts(value) for t in warning if t.unit in units):
        return "WARNING"
    return "OK"


def worst_state(states: Iterable[str]) -> str:
    return max(states, key=STATE_RANK.__getitem__, default="OK")


def _perf_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def _range_text(threshold: Threshold) -> str:
    """A range in base units (bytes, seconds), as perfdata wants it."""
    low = "~" if threshold.low == -math.inf else _perf_number(threshold.low)
    high = "" if threshold.high == math.inf else _perf_number(threshold.high)
    text = high if low == "0" and high else f"{low}:{high}"
    return ("@" if threshold.inside else "") + text


def perfdata_item(label: str, value: float, unit: str = "", warning: Iterable[Threshold] = (),
                  critical: Iterable[Threshold] = (), minimum: Optional[float] = None,
                  maximum: Optional[float] = None, units: Optional[Tuple[str, ...]] = None) -> str:
    """``'label'=value[UOM];[warn];[crit];[min];[max]``, the label quoted; the first threshold in one of
    ``units`` (default: the value's unit) is shown."""
    def ranges(thresholds: Iterable[Threshold]) -> str:
        found = [t for t in thresholds if t.unit in (units or (unit,))]
        return _range_text(found[0]) if found else ""

    quoted = "'" + label.replace("'", "''") + "'"
    fields = [f"{quoted}={_perf_number(value)}{'' if unit == '' else unit}", ranges(warning), ranges(critical),
              "" if minimum is None else _perf_number(minimum), "" if maximum is None else _perf_number(maximum)]
    return ";".join(fields).rstrip(";")


class CheckSpec(NamedTuple):
    """One ``[check:NAME]`` section, or a default check."""

    name: str
    kind: str
    settings: Dict[str, str]
    warning: List[Threshold]
    critical: List[Threshold]
    timeout_s: float


def _texts(thresholds: List[Threshold]) -> str:
    return ",".join(t.text for t in thresholds)


def check_disk(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """Free space of the filesystem holding ``path`` (default: the store), in bytes and percent."""
    path = os.path.expanduser(spec.settings.get("path") or os.path.dirname(ctx.store_path) or ".")
    stats = os.statvfs(path)
    free, total = stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize
    percent = 100.0 * free / total if total else 0.0
    state = worst_state([judge(free, BYTES, spec.warning, spec.critical),
                         judge(percent, PERCENT, spec.warning, spec.critical)])
    summary = f"{format_bytes(free)} free of {format_bytes(total)} ({percent:.1f}%) on {path}"
    perf = (perfdata_item(f"{spec.name}_free", free, "B", spec.warning, spec.critical, 0, total, BYTES),
            perfdata_item(f"{spec.name}_free_percent", round(percent, 2), "%", spec.warning, spec.critical, 0, 100))
    return CheckResult(spec.name, state, summary, free, "B", _texts(spec.warning), _texts(spec.critical), perf)


def check_inodes(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """Free inodes of the filesystem holding ``path`` (default: the store), in number and percent."""
    path = os.path.expanduser(spec.settings.get("path") or os.path.dirname(ctx.store_path) or ".")
    stats = os.statvfs(path)
    if not stats.f_files:
        return CheckResult(spec.name, "UNKNOWN", f"the filesystem of {path} does not count inodes")
    free, total = stats.f_favail, stats.f_files
    percent = 100.0 * free / total
    state = worst_state([judge(free, PLAIN, spec.warning, spec.critical),
                         judge(percent, PERCENT, spec.warning, spec.critical)])
    perf = (perfdata_item(f"{spec.name}_free", free, "", spec.warning, spec.critical, 0, total),
            perfdata_item(f"{spec.name}_free_percent", round(percent, 2), "%", spec.warning, spec.critical, 0, 100))
    return CheckResult(spec.name, state, f"{free:,} inodes free of {total:,} ({percent:.1f}%) on {path}", free, "",
                       _texts(spec.warning), _texts(spec.critical), perf)


def read_meminfo(path: str = "/proc/meminfo") -> Dict[str, int]:
    """Linux's memory figures in bytes (``MemTotal``, ``MemAvailable``, ``SwapTotal``, ``SwapFree``...)."""
    figures = {}
    with open(path, encoding="ascii", errors="replace") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            words = rest.split()
            if words and words[0].isdigit():
                figures[key] = int(words[0]) * (1024 if words[1:2] == ["kB"] else 1)
    return figures


# Filesystems that hold no user data: collect and the disk figures skip them.
PSEUDO_FILESYSTEMS = ("proc", "sysfs", "devtmpfs", "devpts", "tmpfs", "cgroup", "cgroup2", "mqueue", "debugfs",
                      "tracefs", "securityfs", "pstore", "bpf", "configfs", "fusectl", "hugetlbfs", "autofs",
                      "binfmt_misc", "rpc_pipefs", "nsfs", "overlay", "squashfs", "efivarfs", "ramfs")


def read_cpu_ticks(path: str = "/proc/stat") -> Tuple[int, int]:
    """(total, idle) ticks of all CPUs since boot; busy % is the share of the total's growth not idle.
    Guest time is counted in user time already (htop), and iowait is idle."""
    with open(path, encoding="ascii") as handle:
        fields = [int(word) for word in handle.readline().split()[1:]]
    fields += [0] * (8 - len(fields))
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + idle + iowait + irq + softirq + steal, idle + iowait


def real_mounts(path: str = "/proc/mounts") -> List[str]:
    """The mount points of filesystems that hold data (pseudo filesystems left out), each once."""
    found: List[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split()
            point = fields[1].replace("\\040", " ") if len(fields) > 2 else ""
            if point and fields[2] not in PSEUDO_FILESYSTEMS and point not in found:
                found.append(point)
    return found


def read_network_bytes(path: str = "/proc/net/dev") -> Dict[str, Tuple[int, int]]:
    """(received, transmitted) bytes since boot of each network interface."""
    found = {}
    with open(path, encoding="ascii", errors="replace") as handle:
        for line in handle.readlines()[2:]:
            name, _, rest = line.partition(":")
            fields = rest.split()
            if len(fields) >= 9:
                found[name.strip()] = (int(fields[0]), int(fields[8]))
    return found


def host_samples(chosen: Dict[str, bool], previous_cpu: Optional[Tuple[float, float]],
                 now: float) -> Tuple[List[Sample], Optional[Tuple[int, int]]]:
    """The machine's own figures as samples under ``host_``, and the CPU ticks to keep for the next run
    (busy % is measured between two runs); a source the system lacks is left out, never guessed."""
    samples: List[Sample] = []

    def add(name: str, value: float, **labels: str) -> None:
        samples.append(Sample(f"host_{name}", float(value), labels or None, now))

    if chosen["load"]:
        for minutes, average in zip((1, 5, 15), os.getloadavg()):
            add(f"load{minutes}", average)
    ticks = None
    if chosen["cpu"] and os.path.exists("/proc/stat"):
        ticks = read_cpu_ticks()
        if previous_cpu and ticks[0] > previous_cpu[0]:
            add("cpu_busy_percent", 100.0 * (1 - (ticks[1] - previous_cpu[1]) / (ticks[0] - previous_cpu[0])))
    if chosen["memory"] and os.path.exists("/proc/meminfo"):
        memory = read_meminfo()
        if memory.get("MemTotal") and "MemAvailable" in memory:
            add("memory_available_bytes", memory["MemAvailable"])
            add("memory_available_percent", 100.0 * memory["MemAvailable"] / memory["MemTotal"])
        if memory.get("SwapTotal"):
            add("swap_used_percent", 100.0 * (memory["SwapTotal"] - memory.get("SwapFree", 0)) / memory["SwapTotal"])
    if chosen["disks"] and os.path.exists("/proc/mounts"):
        for mount in real_mounts():
            try:
                stats = os.statvfs(mount)
            except OSError:
                continue
            if stats.f_blocks:
                add("disk_free_bytes", stats.f_bavail * stats.f_frsize, mount=mount)
                add("disk_used_percent", 100.0 * (1 - stats.f_bavail / stats.f_blocks), mount=mount)
            if stats.f_files:
                add("inodes_used_percent", 100.0 * (1 - stats.f_favail / stats.f_files), mount=mount)
    if chosen["network"] and os.path.exists("/proc/net/dev"):
        for interface, (received, transmitted) in read_network_bytes().items():
            add("network_receive_bytes", received, interface=interface)
            add("network_transmit_bytes", transmitted, interface=interface)
    if chosen["processes"] and os.path.isdir("/proc/self"):
        add("processes", sum(1 for entry in os.listdir("/proc") if entry.isdigit()))
    return samples, ticks


def check_memory(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """Memory available for new programs, in percent of the total (Linux's MemAvailable), and swap used
    in percent, judged by ``swap_warning`` and ``swap_critical``; UNKNOWN where there is no /proc/meminfo."""
    try:
        figures = read_meminfo()
    except OSError as err:
        return CheckResult(spec.name, "UNKNOWN", f"memory cannot be read here: {err.strerror or err}")
    if not figures.get("MemTotal") or "MemAvailable" not in figures:
        return CheckResult(spec.name, "UNKNOWN", "no MemTotal and MemAvailable in /proc/meminfo (Linux before 3.14)")
    total, available = figures["MemTotal"], figures["MemAvailable"]
    percent = 100.0 * available / total
    swap_total = figures.get("SwapTotal", 0)
    swap_used = 100.0 * (swap_total - figures.get("SwapFree", 0)) / swap_total if swap_total else 0.0
    swap_warning, swap_critical = (parse_thresholds(spec.settings.get(key, "")) for key in ("swap_warning",
                                                                                           "swap_critical"))
    state = worst_state([judge(percent, PERCENT, spec.warning, spec.critical),
                         judge(swap_used, PERCENT + PLAIN, swap_warning, swap_critical)])
    perf = (perfdata_item(f"{spec.name}_available_percent", round(percent, 2), "%", spec.warning, spec.critical, 0,
                          100),
            perfdata_item(f"{spec.name}_available", available, "B", minimum=0, maximum=total),
            perfdata_item(f"{spec.name}_swap_used_percent", round(swap_used, 2), "%", swap_warning, swap_critical,
                          0, 100, units=PERCENT + PLAIN))
    swap = f", swap {swap_used:.1f}% used" if swap_total else ", no swap"
    return CheckResult(spec.name, state, f"{format_bytes(available)} available of {format_bytes(total)} "
                                         f"({percent:.1f}%){swap}", percent, "%", _texts(spec.warning),
                       _texts(spec.critical), perf)


def running_processes() -> List[Tuple[int, str, str]]:
    """(pid, name, command line) of every process this user can see: from /proc, else from ``ps``."""
    if os.path.isdir("/proc/self"):
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
                with open(f"/proc/{entry}/comm", "rb") as handle:
                    name = handle.read().strip()
            except OSError:  # it ended meanwhile, or it is not ours to read
                continue
            command = b" ".join(part for part in argv if part).decode("utf-8", "replace")
            found.append((int(entry), name.decode("utf-8", "replace"), command))
        return found
    import subprocess

    listing = subprocess.run(["ps", "-axo", "pid=,comm=,args="], capture_output=True, check=True, timeout=10)
    rows = (line.split(None, 2) for line in listing.stdout.decode("utf-8", "replace").splitlines())
    return [(int(row[0]), os.path.basename(row[1]), row[2] if len(row) > 2 else row[1]) for row in rows if row]


def process_usage(pids: List[int]) -> Optional[Tuple[float, float]]:
    """(resident bytes, CPU percent of one CPU over each one's life, as ps shows it) summed over ``pids``:
    from /proc, else from ``ps``; None when neither can say."""
    if os.path.isdir("/proc/self"):
        ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = float(handle.read().split()[0])
        rss = cpu = 0.0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()  # the name, in (), may hold anything
            except OSError:  # it ended meanwhile
                continue
            busy, started = (int(fields[11]) + int(fields[12])) / ticks, int(fields[19]) / ticks
            rss += int(fields[21]) * page
            cpu += 100.0 * busy / max(uptime - started, 1.0 / ticks)
        return rss, cpu
    import subprocess

    listing = subprocess.run(["ps", "-o", "rss=,pcpu=", "-p", ",".join(map(str, pids))], capture_output=True,
                             timeout=10)
    rows = [line.split() for line in listing.stdout.decode("ascii", "replace").splitlines() if line.strip()]
    try:
        return sum(float(row[0]) * 1024 for row in rows), sum(float(row[1]) for row in rows)
    except (ValueError, IndexError):
        return None


PIDFILE_MAX_BYTES = 4096  # a pid, and at most a few lines more (PostgreSQL's postmaster.pid)


def _pidfile_pid(path: str) -> int:
    """The process id a pid file starts with: OSError, or ValueError saying why there is none (a FIFO, a
    device or a large file is refused unread: a symlink to /dev/zero would never end)."""
    words = read_regular_file(path, PIDFILE_MAX_BYTES)[0].split()
    if not words or not words[0].isdigit():
        raise ValueError("it does not start with a process id")
    return int(words[0])


def check_process(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """How many processes are called ``name``, hold ``match`` in their command line, or have the pid in
    ``pidfile``; by default CRITICAL when there is none (``critical = 1:``). A threshold in bytes judges
    their resident memory together, one in percent their CPU use (of one CPU, over their life, as ps)."""
    settings = spec.settings
    if settings.get("pidfile"):
        what = f"pid in {settings['pidfile']}"
        try:
            pids = {_pidfile_pid(os.path.expanduser(settings["pidfile"]))}
        except (OSError, ValueError) as err:
            why = getattr(err, "strerror", None) or err
            return CheckResult(spec.name, "CRITICAL", f"{what}: cannot be read ({why})")
    else:
        pids = None
        what = f"named {settings['name']!r}" if settings.get("name") else f"matching {settings.get('match', '')!r}"

    def wanted(pid: int, name: str, command: str) -> bool:
        if pids is not None:
            return pid in pids
        if settings.get("name"):
            return settings["name"] in (name, os.path.basename(command.split(" ")[0]))
        return settings.get("match", "") in command

    matches = [pid for pid, name, command in running_processes() if pid != os.getpid() and wanted(pid, name, command)]
    states = [judge(len(matches), PLAIN, spec.warning, spec.critical)]
    perf = (perfdata_item(f"{spec.name}_processes", len(matches), "", spec.warning, spec.critical, 0),)
    shown = f" (pid {', '.join(map(str, sorted(matches)[:5]))}{', ...' if len(matches) > 5 else ''})" if matches else ""
    usage = process_usage(matches) if matches else None
    if usage is not None:
        rss, cpu = usage
        states += [judge(rss, ("B",), spec.warning, spec.critical), judge(cpu, PERCENT, spec.warning, spec.critical)]
        perf += (perfdata_item(f"{spec.name}_rss", int(rss), "B", spec.warning, spec.critical, 0),
                 perfdata_item(f"{spec.name}_cpu_percent", round(cpu, 2), "%", spec.warning, spec.critical, 0))
        shown += f", {format_bytes(rss)} resident, {cpu:.1f}% CPU"
    return CheckResult(spec.name, worst_state(states), f"{len(matches)} process{'' if len(matches) == 1 else 'es'} "
                       f"{what}{shown}", len(matches), "", _texts(spec.warning), _texts(spec.critical), perf)


def _one_process_key(section: str, items: Dict[str, str]) -> List[Tuple[str, str, str]]:
    given = [key for key in ("name", "match", "pidfile") if items.get(key, "").strip()]
    if len(given) != 1:
        return [(section, "name", "give exactly one of name, match or pidfile" + (
            f" (not {', '.join(given)})" if given else ""))]
    return []


def _tls_settings_context(settings: Dict[str, str]) -> Any:
    """The TLS context a check's ``tls_verify`` and ``ca_file`` ask for (the system's store by default)."""
    import ssl

    context = ssl.create_default_context(cafile=os.path.expanduser(settings["ca_file"])
                                         if settings.get("ca_file") else None)
    if not _bool_setting(settings, "", "tls_verify", True, []):  # its value was checked with the section
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _days_left(certificate: Optional[Dict[str, Any]], now: float) -> Optional[float]:
    import ssl

    if not certificate or "notAfter" not in certificate:
        return None
    return (ssl.cert_time_to_seconds(certificate["notAfter"]) - now) / DAY_S


def _statuses(text: str) -> List[Tuple[int, int]]:
    """``200``, ``200-299``, ``200,301`` as ranges of statuses."""
    ranges = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        ranges.append((whole_number(low), whole_number(high or low)))
    return ranges


HTTP_CHECK_REDIRECTS = 10  # followed at most, as curl's and browsers' limits are of this order
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)


def http_check_headers(settings: Dict[str, str], section: str) -> Dict[str, str]:
    """The request headers of an http check: ``headers`` (one ``Name: value`` a line), the URL's
    ``user:password@`` as Basic credentials, and the secret ``authorization`` (KEY, KEY_env or KEY_file);
    ValueError naming what is missing, never its value."""
    headers = {"User-Agent": USER_AGENT}
    for line in settings.get("headers", "").splitlines():
        if line.strip():
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
    headers.update(_basic_auth(settings["url"])[1])
    problems: List[Tuple[str, str, str]] = []
    value, _, missing = _secret(settings, "authorization", section, os.environ, problems)
    if missing:
        raise ValueError(missing)
    if value is not None:
        headers["Authorization"] = value
    return headers


def _http_once(url: str, method: str, headers: Dict[str, str], spec: CheckSpec, now: float,
               deadline: Deadline) -> Tuple[Any, bytes, Optional[float]]:
    """One request, redirects not followed, within ``deadline``: (response, its first MAX_REPLY_BYTES, days
    the certificate has left for https)."""
    import http.client

    parts = _checked_url(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    extra = {"context": _tls_settings_context(spec.settings)} if parts.scheme == "https" else {}
    connection = deadline.connection(connection_class)(parts.hostname, parts.port, timeout=deadline.left(), **extra)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, headers=headers)
        # Read now: the connection gives its socket away once the answer says it will close.
        days = _days_left(connection.sock.getpeercert(), now) if parts.scheme == "https" else None
        response = connection.getresponse()
        body = response.read(MAX_REPLY_BYTES)
        deadline.check()
        return response, body, days
    finally:
        connection.close()


# What a redirect to another origin keeps of the check's headers: those that cannot carry a credential.
# Authorization, Cookie, X-Api-Key and any other name the ``headers`` key may give stay behind.
HTTP_PORTABLE_HEADERS = ("accept", "accept-encoding", "accept-language", "cache-control", "content-type", "pragma",
                         "user-agent")


def _origin(url: str) -> Tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, the port its default when not written: what a redirect
    must keep for the credentials to follow it."""
    parts = _checked_url(url)
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _http_redirected(url: str, response: Any, method: str, headers: Dict[str, str]) -> Tuple[str, str]:
    """Where a redirect leads, and with which method (303, and 301/302 after a POST, become GET, as
    browsers do). When it changes the scheme, host or port, only HTTP_PORTABLE_HEADERS go on (any
    letter case), for this hop and every later one, as curl drops credentials. ValueError when the
    target is not an http(s) URL."""
    from urllib.parse import urljoin

    target = urljoin(url, response.getheader("Location", ""))
    if _origin(target) != _origin(url):
        for name in [name for name in headers if name.lower() not in HTTP_PORTABLE_HEADERS]:
            del headers[name]
    if response.status == 303 or (response.status in (301, 302) and method == "POST"):
        method = "GET"
    return target, method


def check_http(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """One HTTP(S) request to ``url``: the status among ``status`` (default 200-399), the body holding
    ``contains`` or matching ``regex``, the seconds it took; for https the certificate verified (unless
    ``tls_verify = false``; ``ca_file`` for a private CA) and its days left as perfdata. Redirects are
    judged as they come unless ``follow_redirects = true``."""
    import http.client
    import re

    settings = spec.settings
    url, shown, method = settings["url"], mask_url(settings["url"]), settings.get("method", "GET").upper()
    follow = _bool_setting(settings, spec.name, "follow_redirects", False, [])  # checked with the section
    try:
        headers = http_check_headers(settings, spec.name)
    except ValueError as err:
        return CheckResult(spec.name, "UNKNOWN", f"{shown}: {err}")
    url = _basic_auth(url)[0]
    started = time.monotonic()
    with Deadline(spec.timeout_s) as deadline:  # every hop, and each one's body, within the check's timeout
        try:
            for hops in range(HTTP_CHECK_REDIRECTS + 1):
                response, body, days = _http_once(url, method, headers, spec, ctx.now, deadline)
                if not (follow and response.status in _REDIRECT_STATUSES and response.getheader("Location")):
                    break
                url, method = _http_redirected(url, response, method, headers)
            else:
                return CheckResult(spec.name, "CRITICAL", f"{shown}: more than {HTTP_CHECK_REDIRECTS} redirects")
            took = time.monotonic() - started
        except (OSError, ValueError, http.client.HTTPException) as err:
            why = str(deadline.timeout_error()) if deadline.expired else _error_text(err)
            return CheckResult(spec.name, "CRITICAL", f"{shown}: {why}"[:CHECK_OUTPUT_LINE_CHARS])
    perf = (perfdata_item(f"{spec.name}_time", round(took, 6), "s", spec.warning, spec.critical, 0, units=SECONDS),
            perfdata_item(f"{spec.name}_size", len(body), "B", minimum=0))
    if days is not None:
        perf += (perfdata_item(f"{spec.name}_cert_days_left", round(days, 1), "", minimum=0),)
    text = body.decode("utf-8", "replace")
    status = f"HTTP {response.status}" + (f" after {hops} redirect{'s' if hops > 1 else ''}" if hops else "")
    if not any(low <= response.status <= high for low, high in _statuses(settings.get("status", "200-399"))):
        problem = status
    elif settings.get("contains") and settings["contains"] not in text:
        problem = f"{status}, the body does not hold {settings['contains']!r}"
    elif settings.get("regex") and not re.search(settings["regex"], text):
        problem = f"{status}, the body does not match {settings['regex']!r}"
    else:
        state = judge(took, SECONDS, spec.warning, spec.critical)
        return CheckResult(spec.name, state, f"{shown}: {status} in {took * 1000:.0f} ms, {len(body):,} bytes",
                           took, "s", _texts(spec.warning), _texts(spec.critical), perf)
    return CheckResult(spec.name, "CRITICAL", f"{shown}: {problem}", took, "s", perfdata=perf)


def _http_header_problems(section: str, items: Dict[str, str]) -> List[Tuple[str, str, str]]:
    """Header lines that are not ``Name: value``."""
    problems: List[Tuple[str, str, str]] = []
    for line in items.get("headers", "").splitlines():
        name = line.partition(":")[0].strip()
        if line.strip() and (":" not in line or not name or not all(33 <= ord(c) <= 126 for c in name)):
            problems.append((section, "headers", f"{_shown(line.strip())} is not a header such as Accept: text/html"))
            continue
        value = line.partition(":")[2].strip()
        wrong = next((char for char in value if (ord(char) in _LINE_BREAKING and char != "\t") or ord(char) > 0xFF),
                     None)
        if wrong is not None:  # http.client sends Latin-1 only, and a control would end the header
            problems.append((section, "headers", f"the value of {name} holds {wrong!r}, which a header cannot carry"))
    return problems


def check_tls_cert(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """Days until the certificate of ``address`` (HOST:PORT; ``server_name`` for SNI) expires, its chain
    verified against the system's store (or ``ca_file``): warning under 21 days, critical under 7."""
    import socket

    host, port = parse_listen(spec.settings["address"])
    name = spec.settings.get("server_name") or host
    with Deadline(spec.timeout_s) as deadline:  # a handshake trickled byte by byte is cut too
        try:
            with deadline.watch(socket.create_connection((host, port), timeout=deadline.left())) as raw:
                with _tls_settings_context(spec.settings).wrap_socket(raw, server_hostname=name) as wrapped:
                    certificate = wrapped.getpeercert()
        except OSError as err:
            why = str(deadline.timeout_error()) if deadline.expired else _error_text(err)
            return CheckResult(spec.name, "CRITICAL", f"{host}:{port}: {why}"[:CHECK_OUTPUT_LINE_CHARS])
    days = _days_left(certificate, ctx.now)
    if days is None:
        return CheckResult(spec.name, "UNKNOWN", f"{host}:{port}: no certificate to read (tls_verify = false?)")
    state = judge(days, PLAIN, spec.warning, spec.critical)
    perf = (perfdata_item(f"{spec.name}_days_left", round(days, 1), "", spec.warning, spec.critical),)
    return CheckResult(spec.name, state, f"{name}: the certificate expires in {days:.0f} days "
                                         f"({local_time(ctx.now + days * DAY_S, zone=True)})", days, "",
                       _texts(spec.warning), _texts(spec.critical), perf)


def check_load(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """The load average over ``minutes`` (1, 5 or 15; default 5), per CPU unless ``per_cpu = false``."""
    minutes = spec.settings.get("minutes", "5")
    averages = dict(zip(("1", "5", "15"), os.getloadavg()))
    cpus = os.cpu_count() or 1
    per_cpu = _bool_setting(spec.settings, spec.name, "per_cpu", True, [])
    value = averages[minutes] / cpus if per_cpu else averages[minutes]
    state = judge(value, PLAIN, spec.warning, spec.critical)
    shown = " ".join(f"{average:.2f}" for average in averages.values())
    what = f"{minutes}-minute load per CPU {value:.2f} ({cpus} CPUs)" if per_cpu else f"{minutes}-minute load"
    perf = tuple(perfdata_item(f"{spec.name}_load{key}", round(average, 2), "", minimum=0)
                 for key, average in averages.items())
    if per_cpu:
        perf += (perfdata_item(f"{spec.name}_load{minutes}_per_cpu", round(value, 3), "", spec.warning,
                               spec.critical, 0),)
    return CheckResult(spec.name, state, f"load {shown}; {what}", value, "", _texts(spec.warning),
                       _texts(spec.critical), perf)


TCP_SEND_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\", "0": b"\0"}  # and \xHH, one byte


def tcp_send_bytes(text: str) -> bytes:
    r"""What a tcp check's ``send`` puts on the wire: the escapes ``\r \n \t \\ \0`` and ``\xHH`` (that one
    byte), every other character as UTF-8; ValueError naming the first backslash that starts no escape.

    >>> tcp_send_bytes(r"GET /€ HTTP/1.0\r\n\xff")
    b'GET /\xe2\x82\xac HTTP/1.0\r\n\xff'
    """
    import re

    sent = bytearray()
    for match in re.finditer(r"\\(x[0-9A-Fa-f]{2}|[rnt0\\])|(\\.?)|[^\\]+", text, re.DOTALL):
        escape, wrong = match.groups()
        if wrong is not None:
            raise ValueError(f"{wrong} at character {match.start() + 1} is not an escape (\\r \\n \\t \\\\ \\0 \\xHH; "
                             f"\\\\ is a backslash)")
        if escape is None:
            sent += match.group().encode("utf-8")
        else:
            sent += bytes([int(escape[1:], 16)]) if escape[0] == "x" else TCP_SEND_ESCAPES[escape]
    return bytes(sent)


def _tcp_reply(connection: Any, settings: Dict[str, str], timeout_s: float) -> str:
    """What the peer says after ``send`` (its escapes read by tcp_send_bytes()) until it holds ``expect``."""
    if settings.get("send"):
        connection.sendall(tcp_send_bytes(settings["send"]))
    expect = settings.get("expect", "")
    received = b""
    connection.settimeout(timeout_s)
    while expect and expect.encode("utf-8") not in received and len(received) < 4096:
        chunk = connection.recv(4096)
        if not chunk:
            break
        received += chunk
    return received.decode("utf-8", "replace")


def check_tcp(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """A TCP connection to ``address`` (HOST:PORT): its time to connect in seconds, and optionally the
    reply to ``send`` holding ``expect``; refused, unreachable or an unexpected reply is CRITICAL."""
    import socket

    host, port = parse_listen(spec.settings["address"])
    started = time.monotonic()
    with Deadline(spec.timeout_s) as deadline:  # the connection and the whole reply, however it trickles
        try:
            with deadline.watch(socket.create_connection((host, port), timeout=deadline.left())) as connection:
                took = time.monotonic() - started
                reply = _tcp_reply(connection, spec.settings, deadline.left())
        except OSError as err:
            why = "no answer in time" if isinstance(err, socket.timeout) else (err.strerror or str(err)).lower()
            return CheckResult(spec.name, "CRITICAL", f"{host}:{port}: {why}")
        expect = spec.settings.get("expect", "")
        if deadline.expired and expect not in reply:
            return CheckResult(spec.name, "CRITICAL", f"{host}:{port}: {deadline.timeout_error()}")
    perf = (perfdata_item(f"{spec.name}_time", round(took, 6), "s", spec.warning, spec.critical, 0, units=SECONDS),)
    if expect and expect not in reply:
        return CheckResult(spec.name, "CRITICAL", f"{host}:{port}: the reply does not hold {expect!r}: "
                                                  f"{_one_line(reply)[:80]!r}", took, "s", perfdata=perf)
    state = judge(took, SECONDS, spec.warning, spec.critical)
    return CheckResult(spec.name, state, f"{host}:{port} answered in {took * 1000:.1f} ms", took, "s",
                       _texts(spec.warning), _texts(spec.critical), perf)


SYSTEMD_WARNING_STATES = ("activating", "deactivating", "reloading")  # on the way somewhere: not yet wrong


def systemd_unit_state(unit: str, timeout_s: float) -> Dict[str, str]:
    """The unit's LoadState, ActiveState and SubState from ``systemctl show``; OSError when systemctl is
    missing or cannot ask systemd (no systemd here, as in most containers and on macOS)."""
    import shutil
    import subprocess

    if shutil.which("systemctl") is None:
        raise OSError("systemctl is not on PATH: no systemd here")
    shown = subprocess.run(["systemctl", "show", "--property=LoadState,ActiveState,SubState", "--", unit],
                           capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout_s)
    if shown.returncode != 0:
        why = _one_line(shown.stderr.decode("utf-8", "replace")) or f"exit code {shown.returncode}"
        raise OSError(f"systemctl show failed: {why}"[:CHECK_OUTPUT_LINE_CHARS])
    lines = shown.stdout.decode("utf-8", "replace").splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def check_systemd_unit(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """A systemd unit's ActiveState: one of ``expect`` (default active) is OK, on its way somewhere
    (activating, reloading, deactivating) WARNING, anything else, or a unit systemd does not know,
    CRITICAL; UNKNOWN where there is no systemd to ask."""
    unit = spec.settings["unit"]
    expected = [word.strip() for word in spec.settings.get("expect", "active").split(",") if word.strip()]
    try:
        state = systemd_unit_state(unit, spec.timeout_s)
    except OSError as err:
        return CheckResult(spec.name, "UNKNOWN", f"{unit}: {err}")
    active, sub = state.get("ActiveState", "?"), state.get("SubState", "?")
    if state.get("LoadState") == "not-found":
        return CheckResult(spec.name, "CRITICAL", f"{unit}: no such unit")
    verdict = "OK" if active in expected else "WARNING" if active in SYSTEMD_WARNING_STATES else "CRITICAL"
    return CheckResult(spec.name, verdict, f"{unit} is {active} ({sub})"
                       + ("" if verdict == "OK" else f", expected {' or '.join(expected)}"))


def check_database(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """The store answers quick_check, at most once a day as it reads the whole store (integrity_check
    with --deep, every time); its size and WAL size."""
    path = ctx.collector.db_path
    size = os.path.getsize(path) if os.path.exists(path) else 0
    wal = os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
    perf = (perfdata_item(f"{spec.name}_size", size, "B", minimum=0), perfdata_item(f"{spec.name}_wal", wal, "B",
                                                                                    minimum=0))
    sizes = f"{format_bytes(size)}, WAL {format_bytes(wal)}"
    (checked_at,) = ctx.collector.store.meta_times("quick_check_ok_at")
    if not ctx.deep and checked_at is not None and 0 <= ctx.now - checked_at < QUICK_CHECK_INTERVAL_S:
        return CheckResult(spec.name, "OK", f"quick_check ok {format_span(ctx.now - checked_at)} ago, {sizes}",
                           size, "B", perfdata=perf)
    pragma = "integrity_check" if ctx.deep else "quick_check"
    verdict = [row[0] for row in ctx.collector.store.query(f"PRAGMA {pragma}")]
    if verdict != ["ok"]:
        return CheckResult(spec.name, "CRITICAL", f"{pragma} failed: {' '.join(verdict[:3])}"[:CHECK_OUTPUT_LINE_CHARS],
                           size, "B", perfdata=perf)
    return CheckResult(spec.name, "OK", f"{pragma} ok, {sizes}", size, "B", perfdata=perf,
                       keep=(("quick_check_ok_at", ctx.now),))


def check_sync_recency(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """Age of the last successful sync of ``target``."""
    target = spec.settings["target"]
    last = ctx.collector.last_sample_time(f"sync_{target}_success")
    if last is None:
        ahead = ctx.collector.future_sample_time(f"sync_{target}_success")
        if ahead is not None:
            return CheckResult(spec.name, "UNKNOWN",
                               f"{target}: the last success is in the future ({local_time(ahead, zone=True)})")
        failures = ctx.collector.last_sample_time(f"sync_{target}_failure")
        what = "no success recorded" + (", only failures" if failures is not None else ", no run recorded")
        return CheckResult(spec.name, "CRITICAL", f"{target}: {what}")
    age = max(ctx.now - last, 0.0)
    state = judge(age, SECONDS, spec.warning, spec.critical)
    perf = (perfdata_item(f"{spec.name}_age", round(age), "s", spec.warning, spec.critical, 0, units=SECONDS),)
    return CheckResult(spec.name, state, f"{target}: last success {format_span(age)} ago "
                                         f"({local_time(last, zone=True)})", age,
                       "s", _texts(spec.warning), _texts(spec.critical), perf)


def check_circuit_breakers(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """Any breaker open is WARNING; one open for longer than an hour is CRITICAL."""
    now = ctx.now
    breakers = breaker_states(ctx.collector, ctx.collector.entities("breaker")["breaker"], now)
    opened = {name: epoch_of(entry["since"]) for name, entry in breakers.items() if entry["state"] == "open"}
    perf = (perfdata_item(f"{spec.name}_open", len(opened), minimum=0),)
    if not opened:
        return CheckResult(spec.name, "OK", "no circuit breaker is open", 0, perfdata=perf)
    longest = max(now - (since or now) for since in opened.values())
    state = "CRITICAL" if longest > BREAKER_CRITICAL_OPEN_S else "WARNING"
    names = ", ".join(f"{name} (open {format_span(now - (since or now))})" for name, since in sorted(opened.items()))
    return CheckResult(spec.name, state, f"open: {names}", len(opened), perfdata=perf)


def check_file_age(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """Monit's timestamp check: how long ago ``path`` was modified; a missing file is CRITICAL."""
    path = os.path.expanduser(spec.settings["path"])
    try:
        modified = os.stat(path).st_mtime
    except FileNotFoundError:
        return CheckResult(spec.name, "CRITICAL", f"{path} does not exist")
    age = max(ctx.now - modified, 0.0)
    state = judge(age, SECONDS, spec.warning, spec.critical)
    perf = (perfdata_item(f"{spec.name}_age", round(age), "s", spec.warning, spec.critical, 0, units=SECONDS),)
    return CheckResult(spec.name, state, f"{path} modified {format_span(age)} ago", age, "s",
                       _texts(spec.warning), _texts(spec.critical), perf)


def check_metric(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """The latest value, or a window statistic, of any metric against the thresholds."""
    name = spec.settings["metric"]
    statistic = spec.settings.get("statistic", "latest")
    hours = float(spec.settings.get("hours", DEFAULT_WINDOW_HOURS))
    value = ctx.collector.get_metric_stats(name, hours)[statistic]
    if value is None:
        return CheckResult(spec.name, "UNKNOWN", f"{name}: no samples in the last {hours:g} h")
    state = judge(value, ANY_UNIT, spec.warning, spec.critical)
    perf = (perfdata_item(f"{spec.name}", value, "", spec.warning, spec.critical, units=ANY_UNIT),)
    return CheckResult(spec.name, state, f"{name} {statistic} {value:.6g} over {hours:g} h", value, "",
                       _texts(spec.warning), _texts(spec.critical), perf)


def _perfdata_items(text: str, check: str) -> List[str]:
    """The items of a plugin's perfdata, each label prefixed with the check's name as the built-in
    checks' are (two checks running one plugin must not both say ``load1``); a quoted label may hold
    spaces (``'disk usage'=5%``); a token without a label and a value is left out."""
    import re

    items = []
    for item in re.findall(r"(?:'[^']*'|[^'\s])+", text):
        match = re.fullmatch(r"('(?:[^']|'')*'|[^'=]+)=(.+)", item)
        if match:
            label = match.group(1)
            label = label[1:-1].replace("''", "'") if label.startswith("'") else label
            items.append("'" + f"{check}_{label}".replace("'", "''") + "'=" + match.group(2))
    return items


class _Tail:
    """Keeps the last ``limit`` bytes of a stream and counts what it dropped."""

    def __init__(self, limit: int):
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]
            self.dropped += excess


class _Head(_Tail):
    """Keeps the first ``limit`` bytes of a stream and counts what it dropped."""

    def feed(self, chunk: bytes) -> None:
        room = max(0, self.limit - len(self.data))
        self.data += chunk[:room]
        self.dropped += len(chunk) - min(room, len(chunk))


def _drain(stream, tail: _Tail) -> None:
    """Read a child's output in a thread that never takes SIGTERM or SIGINT: the kernel then hands them to
    the main thread, whose handler forwards them (one taken here would leave the main thread blocked in
    waitpid until the child ended by itself)."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    with stream:
        for chunk in iter(lambda: stream.read1(65536), b""):
            tail.feed(chunk)


def program_problem(program: str) -> Optional[str]:
    """Why ``program`` (a path, or a name looked up on PATH) cannot be run, or None."""
    import shutil

    if os.sep not in program:
        return None if shutil.which(program) else f"program {program!r} is not on PATH"
    if not os.path.exists(program):
        return f"program {program} does not exist"
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        return f"program {program} is not an executable file"
    return None


def check_command(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """Any Monitoring Plugins executable: its exit code is the state, its first line the summary."""
    import shlex
    import signal
    import subprocess
    import threading

    argv = shlex.split(spec.settings["command"])
    missing = program_problem(argv[0])
    if missing:
        return CheckResult(spec.name, "UNKNOWN", missing)
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    except OSError as err:  # e.g. a script whose #! interpreter is missing
        return CheckResult(spec.name, "UNKNOWN", f"{argv[0]} cannot be run: {err.strerror or err}")
    # The verdict is on the first line: keep the head, read and drop the rest (a plugin gone mad, or
    # `yes`, must not fill the memory), and end the whole group at the timeout.
    head = _Head(CHECK_OUTPUT_KEEP_BYTES)
    reader = threading.Thread(target=_drain, args=(process.stdout, head), daemon=True)
    reader.start()
    deadline = time.monotonic() + spec.timeout_s
    try:
        process.wait(timeout=spec.timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join(spec.timeout_s)
        return CheckResult(spec.name, "UNKNOWN", f"{os.path.basename(argv[0])} did not finish in {spec.timeout_s:g} s")
    reader.join(max(0.0, deadline - time.monotonic()))  # a child of the plugin may still hold the pipe
    output = bytes(head.data)
    first = output.decode("utf-8", "replace").splitlines()[0] if output.strip() else ""
    text, _, perf = first.partition("|")
    state = CHECK_STATES[process.returncode] if 0 <= process.returncode <= 3 else "UNKNOWN"
    summary = _one_line(text) or f"{os.path.basename(argv[0])} exited with {process.returncode}"
    return CheckResult(spec.name, state, summary[:CHECK_OUTPUT_LINE_CHARS], float(process.returncode),
                       perfdata=tuple(_perfdata_items(perf, spec.name)))


def _finished_run_problems(run: tuple, limits: Dict[str, float]) -> List[Tuple[str, str]]:
    started, ended, exit_code, outcome = run
    took = ended - started
    problems = []
    if outcome in ("failure", "timeout", "breaker_open"):
        problems.append(("CRITICAL", f"the last run failed ({outcome}, exit {exit_code})"))
    if outcome == "unrecorded":  # its process ended before its result could be written: how it went is unknown
        return [("WARNING", "the last run ended without its result recorded (the store could not be written)")]
    if "max_duration" in limits and took > limits["max_duration"]:
        problems.append(("WARNING", f"took {format_span(took)}, longer than "
                                    f"{format_span(limits['max_duration'], exact=True)}"))
    if "min_duration" in limits and took < limits["min_duration"]:
        problems.append(("WARNING", f"took {format_span(took)}, less than "
                                    f"{format_span(limits['min_duration'], exact=True)}"))
    return problems


def check_job(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """A ``run`` job: did it start on time, succeed, and take a sensible time?"""
    job = spec.settings["job"]
    now = ctx.now
    runs = ctx.collector.store.query("SELECT started, ended, exit_code, outcome FROM job_runs WHERE job = ? "
                                     "ORDER BY started DESC LIMIT 20", (job,))
    if not runs:
        return CheckResult(spec.name, "CRITICAL", f"job {job}: no run recorded")
    started, ended, exit_code, outcome = runs[0]
    problems: List[Tuple[str, str]] = []
    expected = spec.settings.get("expected_every")
    if expected and now - started > parse_duration_s(expected):
        problems.append(("CRITICAL", f"late: last started {format_span(now - started)} ago, expected every "
                                     f"{format_span(parse_duration_s(expected), exact=True)}"))
    limits = {key: parse_duration_s(spec.settings[key]) for key in ("max_duration", "min_duration")
              if spec.settings.get(key)}
    done = next((run for run in runs if run[1] is not None and run[3] != "skipped"), None)  # the last that ran
    # A run without an end after the last that ran: still going, or killed (a later run supersedes it).
    running = next((run[0] for run in runs if run[1] is None and (done is None or run[0] > done[0])), None)
    if running is not None and "max_duration" in limits and now - running > limits["max_duration"]:
        problems.append(("CRITICAL", f"running for {format_span(now - running)}, longer than "
                                     f"{format_span(limits['max_duration'], exact=True)}"))
    if outcome == "skipped":
        problems.append(("WARNING", "the last run was skipped: the one before was still going"))
    if done is not None:
        problems += _finished_run_problems(done, limits)
    state = worst_state(level for level, _ in problems)
    summary = "; ".join(text for _, text in problems) or (
        f"job {job}: last run {format_span(now - started)} ago, "
        + ("running" if ended is None else f"exit {exit_code} in {format_span(ended - started)}"))
    perf = (perfdata_item(f"{spec.name}_age", round(now - started), "s", minimum=0),)
    return CheckResult(spec.name, state, summary if not problems else f"job {job}: {summary}", now - started, "s",
                       perfdata=perf)


def check_anomaly(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """The robust detector's score of the latest sample of ``metric`` (default: warning 3.5, critical 7)."""
    name = spec.settings["metric"]
    hours = float(spec.settings.get("hours", DEFAULT_WINDOW_HOURS))
    latest = ctx.collector.get_metric_stats(name, hours)["latest"]
    if latest is None:
        return CheckResult(spec.name, "UNKNOWN", f"{name}: no samples in the last {hours:g} h")
    baseline = ctx.collector.baseline(name, hours)
    if baseline is None:
        return CheckResult(spec.name, "UNKNOWN", f"{name}: too few samples in the last {hours:g} h for a baseline")
    score = anomaly_score(latest, baseline)
    score = abs(score) if score is not None else 0.0
    state = judge(score, PLAIN, spec.warning, spec.critical)
    perf = (perfdata_item(f"{spec.name}_score", round(score, 3), "", spec.warning, spec.critical, 0),)
    return CheckResult(spec.name, state, f"{name} latest {latest:.6g}: {anomaly_reason(latest, baseline)}", score,
                       "", _texts(spec.warning), _texts(spec.critical), perf)


class CheckType(NamedTuple):
    """One ``type =`` of ``[check:NAME]``: the function that runs it and what its section takes."""

    function: Any  # (CheckSpec, CheckContext) -> CheckResult
    keys: Tuple[str, ...] = ()  # besides CHECK_COMMON_KEYS
    required: Tuple[str, ...] = ()
    units: Tuple[str, ...] = ()  # the units its thresholds may carry; none: it takes no thresholds
    warning: str = ""  # the thresholds when its section gives none
    critical: str = ""
    needs_store: bool = True  # False: it runs even when the store cannot be opened
    problems: Any = None  # (section, items) -> [(section, key, text)]: what the keys cannot say alone
    secrets: Tuple[str, ...] = ()  # keys given as KEY, KEY_env or KEY_file, never shown


# The only list of check types.
CHECK_TYPES = {
    "anomaly": CheckType(check_anomaly, ("metric", "hours"), ("metric",), PLAIN, DEFAULT_ANOMALY_WARNING,
                         DEFAULT_ANOMALY_CRITICAL),
    "circuit_breaker": CheckType(check_circuit_breakers),
    "command": CheckType(check_command, ("command",), ("command",), needs_store=False),
    "database": CheckType(check_database),
    "disk": CheckType(check_disk, ("path",), (), ("B", "%", ""), DEFAULT_DISK_WARNING, DEFAULT_DISK_CRITICAL,
                      needs_store=False),
    "file_age": CheckType(check_file_age, ("path",), ("path",), SECONDS, needs_store=False),
    "http": CheckType(check_http, ("url", "method", "status", "contains", "regex", "headers", "follow_redirects",
                                   "tls_verify", "ca_file"), ("url",), SECONDS, needs_store=False,
                      problems=_http_header_problems, secrets=("authorization",)),
    "inodes": CheckType(check_inodes, ("path",), (), ("%", ""), "10%:", "5%:", needs_store=False),
    "job": CheckType(check_job, ("job", "expected_every", "max_duration", "min_duration"), ("job",)),
    "load": CheckType(check_load, ("minutes", "per_cpu"), (), PLAIN, "~:2", "~:4", needs_store=False),
    "memory": CheckType(check_memory, ("swap_warning", "swap_critical"), (), PERCENT, "10%:", "5%:",
                        needs_store=False),
    "process": CheckType(check_process, ("name", "match", "pidfile"), (), ("", "B", "%"), "", "1:", needs_store=False,
                         problems=_one_process_key),
    "metric": CheckType(check_metric, ("metric", "hours", "statistic"), ("metric",), ANY_UNIT),
    "sync_recency": CheckType(check_sync_recency, ("target",), ("target",), SECONDS, DEFAULT_SYNC_WARNING,
                              DEFAULT_SYNC_CRITICAL),
    "systemd_unit": CheckType(check_systemd_unit, ("unit", "expect"), ("unit",), needs_store=False),
    "tcp": CheckType(check_tcp, ("address", "send", "expect"), ("address",), SECONDS, needs_store=False),
    "tls_cert": CheckType(check_tls_cert, ("address", "server_name", "tls_verify", "ca_file"), ("address",), PLAIN,
                          "21:", "7:", needs_store=False),
}


def _check_spec(name: str, items: Dict[str, str]) -> CheckSpec:
    kind = items["type"].strip()
    check = CHECK_TYPES[kind]
    timeout = parse_duration_s(items["timeout"]) if "timeout" in items else DEFAULT_CHECK_TIMEOUT_S
    return CheckSpec(name, kind, {key: value.strip() for key, value in items.items()},
                     parse_thresholds(items.get("warning", check.warning)),
                     parse_thresholds(items.get("critical", check.critical)), timeout)


def job_schedules(config) -> Dict[str, float]:
    """Each job a ``job`` check expects, with how often it should start (its ``expected_every``)."""
    schedules: Dict[str, float] = {}
    for section in config.sections() if hasattr(config, "sections") else ():
        items = config[section]
        if section.startswith("check:") and items.get("type", "").strip() == "job" and items.get("job", "").strip():
            problems: List[Tuple[str, str, str]] = []  # check_problems() reports them
            every = _duration_setting(dict(items), section, "expected_every", 0.0, problems, positive=True)
            if every and not problems:
                schedules[items["job"].strip()] = min(every, schedules.get(items["job"].strip(), every))
    return schedules


def check_run_interval(config) -> float:
    """How often cron runs ``check``: ``[check] interval``, else an hour (check_problems() reports a bad one)."""
    common = dict(config["check"]) if hasattr(config, "has_section") and config.has_section("check") else {}
    return _duration_setting(common, "check", "interval", DEFAULT_CHECK_INTERVAL_S, [], positive=True)


def check_intervals(config) -> Optional[Dict[str, float]]:
    """How often cron runs each configured check (its ``interval``, else ``[check] interval``, else an
    hour): a verdict older than that is stale. None when no ``[check:NAME]`` is configured (the defaults
    run, whatever they are on the day)."""
    sections = [section for section in config.sections() if section.startswith("check:")] \
        if hasattr(config, "sections") else []
    if not sections:
        return None
    problems: List[Tuple[str, str, str]] = []  # check_problems() reports them
    default = check_run_interval(config)
    return {section[len("check:"):]: _duration_setting(dict(config[section]), section, "interval", default, problems,
                                                       positive=True) for section in sections}


def configured_checks(config) -> List[CheckSpec]:
    """The ``[check:NAME]`` sections as specs (check_problems() first: this one assumes they are sound)."""
    return [_check_spec(section[len("check:"):], dict(config[section]))
            for section in config.sections() if section.startswith("check:")]


def _threshold_problems(section: str, kind: str, key: str, text: Optional[str]) -> List[Tuple[str, str, str]]:
    if text is None:
        return []
    units = CHECK_TYPES[kind].units
    if not units:
        return [(section, key, f"{a_or_an(kind)} check takes no thresholds")]
    try:
        thresholds = parse_thresholds(text)
    except ValidationError as err:
        return [(section, key, str(err))]
    wrong = [t.text for t in thresholds if t.unit not in units]
    if wrong:
        words = {"B": "bytes", "%": "percent", "s": "durations", "": "plain numbers"}
        allowed = ", ".join(words[unit] for unit in units)
        return [(section, key, f"{_shown(', '.join(wrong))}: {a_or_an(kind)} check compares {allowed}")]
    return []


def _percent_range_problem(text: str) -> Optional[str]:
    """A range of percents (a plain number is one): what ``swap_warning`` takes."""
    try:
        thresholds = parse_thresholds(text)
    except ValidationError as err:
        return str(err)
    wrong = [t.text for t in thresholds if t.unit not in ("%", "")]
    return f"{_shown(', '.join(wrong))}: a percent such as ~:50%" if wrong else None


def _duration_problem(text: str) -> Optional[str]:
    try:
        parse_duration_s(text)
    except ValidationError as err:
        return str(err)
    return None


def _timeout_problem(text: str) -> Optional[str]:
    why = _duration_problem(text)
    return why if why or parse_duration_s(text) > 0 else "must be more than 0"


def _is_positive_number(text: str) -> bool:
    try:
        return 0 < decimal_number(text) < math.inf
    except ValueError:
        return False


def _minutes_problem(text: str) -> Optional[str]:
    return None if text in ("1", "5", "15") else f"{_shown(text)} is not 1, 5 or 15"


def _bool_problem(text: str) -> Optional[str]:
    problems: List[Tuple[str, str, str]] = []
    _bool_setting({"value": text}, "", "value", True, problems)
    return problems[0][2] if problems else None


def _address_problem(text: str) -> Optional[str]:
    try:
        parse_listen(text)
    except ValidationError:
        return f"{_shown(text)} is not HOST:PORT"
    return None


def _url_problem(text: str) -> Optional[str]:
    try:
        _checked_url(text)
    except ValueError as err:
        return str(err)
    return None


def _status_problem(text: str) -> Optional[str]:
    try:
        ranges = _statuses(text)
    except ValueError:
        ranges = []
    if ranges and all(100 <= low <= high <= 599 for low, high in ranges):
        return None
    return f"{_shown(text)} is not a status such as 200, 200-299 or 200,301"


def _regex_problem(text: str) -> Optional[str]:
    import re

    try:
        re.compile(text)
    except re.error as err:
        return f"not a regular expression: {err}"
    return None


def _hours_problem(text: str) -> Optional[str]:
    return None if _is_positive_number(text) else f"{_shown(text)} is not a positive number of hours"


def _send_problem(text: str) -> Optional[str]:
    try:
        tcp_send_bytes(text)
    except ValueError as err:
        return str(err)
    return None


def _statistic_problem(text: str) -> Optional[str]:
    return None if text in METRIC_STATISTICS else f"{_shown(text)} is not one of {', '.join(METRIC_STATISTICS)}"


def _command_problem(text: str) -> Optional[str]:
    import shlex

    try:
        shlex.split(text)
    except ValueError as err:
        return f"cannot be split into words: {err}"
    return None


def _job_key_problem(text: str) -> Optional[str]:
    """A job check's ``job``: a name that ``run NAME`` accepts (an empty one is reported as required)."""
    return name_problem(text.strip(), "job") if text.strip() else None


# What a value of a check key must be; a check type that takes the key gets the rule.
_CHECK_VALUE_RULES = {"timeout": _timeout_problem, "interval": _timeout_problem, "expected_every": _duration_problem,
                      "minutes": _minutes_problem, "per_cpu": _bool_problem, "address": _address_problem,
                      "url": _url_problem, "status": _status_problem, "regex": _regex_problem,
                      "tls_verify": _bool_problem, "follow_redirects": _bool_problem,
                      "swap_warning": _percent_range_problem, "swap_critical": _percent_range_problem,
                      "max_duration": _duration_problem, "min_duration": _duration_problem, "hours": _hours_problem,
                      "statistic": _statistic_problem, "command": _command_problem, "send": _send_problem,
                      "job": _job_key_problem}


def _check_value_problems(section: str, check: "CheckType", items: Dict[str, str]) -> List[Tuple[str, str, str]]:
    """What is wrong with the values of the timeout and of the keys this type takes."""
    problems = []
    for key in ("timeout", "interval") + check.keys:
        rule = _CHECK_VALUE_RULES.get(key)
        why = rule(items[key]) if rule is not None and key in items else None
        if why:
            problems.append((section, key, why))
    return problems


def _ping_url_problems(section: str, items: Dict[str, str]) -> List[Tuple[str, str, str]]:
    """A ``ping_url`` given more than one way, or one that is not http(s) (never shown: it holds the
    service's token); what ``[check]`` and ``[job:NAME]`` both take."""
    problems: List[Tuple[str, str, str]] = []
    _secret(items, "ping_url", section, {}, problems)
    url = items.get("ping_url", "").strip()
    if url and not _is_http_url(url):
        problems.append((section, "ping_url", "not an http or https URL"))
    return problems


def configured_ping_url(config, section: str) -> Optional[str]:
    """The ``ping_url`` (or its _env, _file) of ``section``; None when it has none; ConfigError when it
    cannot be read or is not an http(s) URL (never quoting it)."""
    if not (hasattr(config, "has_section") and config.has_section(section)):
        return None
    problems: List[Tuple[str, str, str]] = []
    url, _, missing = _secret(dict(config[section]), "ping_url", section, dict(os.environ), problems)
    if problems or missing:
        raise ConfigError(f"[{section}] ping_url: {problems[0][2] if problems else missing}")
    if url is not None and not _is_http_url(url):
        raise ConfigError(f"[{section}] ping_url: not an http or https URL")
    return url


def _check_run_problems(config) -> List[Tuple[str, str, str]]:
    """What is wrong in ``[check]``, the section about every run of check (its ping URL)."""
    if not (hasattr(config, "has_section") and config.has_section("check")):
        return []
    problems = [("check", key, "unknown key") for key in config["check"] if key not in CHECK_RUN_KEYS]
    problems += _ping_url_problems("check", dict(config["check"]))
    _duration_setting(dict(config["check"]), "check", "interval", DEFAULT_CHECK_INTERVAL_S, problems, positive=True)
    return problems


def check_dependencies(config) -> Dict[str, str]:
    """Each check's ``depends_on``: while that check is CRITICAL, its own alerts are held."""
    return {section[len("check:"):]: config[section]["depends_on"].strip()
            for section in (config.sections() if hasattr(config, "sections") else ())
            if section.startswith("check:") and config[section].get("depends_on", "").strip()}


def _dependency_problems(config) -> List[Tuple[str, str, str]]:
    names = {section[len("check:"):] for section in config.sections() if section.startswith("check:")}
    problems = []
    for child, parent in check_dependencies(config).items():
        if parent == child:
            problems.append((f"check:{child}", "depends_on", "a check cannot depend on itself"))
        elif parent not in names:
            problems.append((f"check:{child}", "depends_on", f"no check named {_shown(parent)}"))
    edges = {child: parent for child, parent in check_dependencies(config).items() if parent in names and
             parent != child}
    return problems + cycle_problems(edges, lambda name: f"check:{name}", "depends_on")


def check_problems(config) -> List[Tuple[str, str, str]]:
    """Every problem of the ``[check:NAME]`` sections, as (section, key, text)."""
    problems = _check_run_problems(config) + (_dependency_problems(config) if hasattr(config, "sections") else [])
    for section in config.sections() if hasattr(config, "sections") else ():
        if not section.startswith("check:"):
            continue
        why = name_problem(section[len("check:"):], "check")
        if why:
            problems.append((section, "", why))
        items = dict(config[section])
        kind = items.get("type", "").strip()
        check = CHECK_TYPES.get(kind)
        if section == f"check:{CONFIGURATION_CHECK}":
            problems.append((section, "", f"{CONFIGURATION_CHECK!r} is the name of the run's own check (what is "
                                          "wrong in this file): choose another"))
        if check is None:
            problems.append((section, "type", f"{_shown(kind)} is not one of {', '.join(sorted(CHECK_TYPES))}"))
            continue
        secret_keys = [key + suffix for key in check.secrets for suffix in SECRET_SUFFIXES]
        for key in items:
            if key not in CHECK_COMMON_KEYS and key not in check.keys and key not in secret_keys:
                problems.append((section, key, f"unknown key for {a_or_an(kind)} check"))
        for key in check.secrets:
            given = [key + suffix for suffix in SECRET_SUFFIXES if key + suffix in items]
            if len(given) > 1:
                problems.append((section, key, f"give only one of {', '.join(given)}"))
        for key in ("warning", "critical"):
            problems += _threshold_problems(section, kind, key, items.get(key))
        for key in check.required:
            if not items.get(key, "").strip():
                problems.append((section, key, f"required for {a_or_an(kind)} check"))
        problems += _check_value_problems(section, check, items)
        if check.problems is not None:
            problems += check.problems(section, items)
    return problems


def missing_programs(config) -> List[Tuple[str, str, str]]:
    """The command checks whose program cannot be run on this machine (``config --check`` reports them; a
    run reports the check UNKNOWN, as a missing plugin is)."""
    import shlex

    problems = []
    for section in config.sections() if hasattr(config, "sections") else ():
        command = config[section].get("command", "").strip() if section.startswith("check:") else ""
        if config[section].get("type", "").strip() != "command" or not command or _command_problem(command):
            continue
        why = program_problem(shlex.split(command)[0])
        if why:
            problems.append((section, "command", why))
    return problems


def default_checks(collector: Optional[MetricsCollector]) -> List[CheckSpec]:
    """With no [check:...] at all: disk, database, circuit_breaker, and sync_recency per target ever seen
    (none when there is no store to read them from)."""
    specs = [_check_spec("disk", {"type": "disk"}), _check_spec("database", {"type": "database"}),
             _check_spec("circuit_breaker", {"type": "circuit_breaker"})]
    for target in collector.sync_targets() if collector is not None else ():
        specs.append(_check_spec(f"sync_recency_{target}", {"type": "sync_recency", "target": target}))
    return specs


def check_specs(config, collector: MetricsCollector) -> List[CheckSpec]:
    """The configured checks, or the defaults when there are none; bad values raise ConfigError."""
    problems = check_problems(config)
    if problems:
        section, key, text = problems[0]
        raise ConfigError(f"[{section}] {key + ': ' if key else ''}{text}")
    return configured_checks(config) or default_checks(collector)




class CheckPlan(NamedTuple):
    """What a ``check`` run does: the checks it runs, and an UNKNOWN verdict for each it cannot run."""

    specs: List[CheckSpec]
    unrunnable: List[CheckResult]
    configured: bool  # the file has [check:NAME] sections (else the default checks run)


def _problem_text(problems: List[Tuple[str, str, str]], sections: bool = False) -> str:
    """The first few problems on one line; ``sections``: each with its section."""
    first = "; ".join((f"[{section}] " if sections and section else "") + (f"{key}: " if key else "") + text
                      for section, key, text in problems[:3])
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return f"{first}{more} (config --check lists every problem)"


def check_plan(config, problems: List[Tuple[str, str, str]], path: str) -> CheckPlan:
    """The checks of the configuration that can run, and for those that cannot an UNKNOWN verdict of their
    own: a ``[check:NAME]`` with a problem (a typo in a key, a wrong unit) is NAME, UNKNOWN, saying what is
    wrong; every other problem of the file (a channel, a line it could not read, a dependency) is the
    ``configuration`` check's. A mistake costs its own check, never the others, and is heard as one."""
    broken: Dict[str, List[Tuple[str, str, str]]] = {}
    general: List[Tuple[str, str, str]] = []
    for problem in problems:
        section, key, _ = problem
        name = section[len("check:"):] if section.startswith("check:") else ""
        runs_anyway = key == "depends_on"  # a dependency that cannot be followed is ignored, the check runs
        if name and not runs_anyway and name_problem(name, "check") is None and name != CONFIGURATION_CHECK:
            broken.setdefault(name, []).append(problem)
        else:
            general.append(problem)
    sections = [section for section in config.sections() if section.startswith("check:")] \
        if hasattr(config, "sections") else []
    specs, unrunnable = [], []
    for section in sections:
        name = section[len("check:"):]
        if name in broken:
            unrunnable.append(CheckResult(name, "UNKNOWN", f"configuration: {_problem_text(broken[name])}"
                                          [:CHECK_OUTPUT_LINE_CHARS]))
        elif name != CONFIGURATION_CHECK:
            specs.append(_check_spec(name, dict(config[section])))
    if general:
        count = f"{len(general)} problem{'s' if len(general) > 1 else ''} in {path}"
        unrunnable.append(CheckResult(CONFIGURATION_CHECK, "UNKNOWN",
                                      f"{count}: {_problem_text(general, sections=True)}"
                                      [:CHECK_OUTPUT_LINE_CHARS]))
    return CheckPlan(specs, unrunnable, bool(sections))


class CheckContext(NamedTuple):
    """What every check may read: the store, the time of this run, and --deep."""

    collector: Optional[MetricsCollector]  # None when the store cannot be opened: only store-free checks run
    now: float
    deep: bool = False
    db_path: Optional[str] = None  # the store's path, also when it cannot be opened

    @property
    def store_path(self) -> str:
        return self.db_path or (self.collector.db_path if self.collector is not None else "")


def _run_one(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """One check, whatever goes wrong inside it: an exception is UNKNOWN with a one-line reason."""
    try:
        return CHECK_TYPES[spec.kind].function(spec, ctx)
    except Exception as err:  # a check must report, never take the others down
        text = " ".join(str(err).split()) or type(err).__name__
        return CheckResult(spec.name, "UNKNOWN", f"{type(err).__name__}: {text}"[:CHECK_OUTPUT_LINE_CHARS])


def _checked(spec: CheckSpec, ctx: "CheckContext") -> CheckResult:
    """One check; those that read the store get a read-only connection of their own, as a SQLite
    connection belongs to the thread that made it."""
    if not CHECK_TYPES[spec.kind].needs_store:
        return _run_one(spec, ctx)
    try:
        with MetricsCollector(ctx.collector.db_path, readonly=True, now=lambda: ctx.now) as own:
            return _run_one(spec, ctx._replace(collector=own))
    except StorageError as err:
        return CheckResult(spec.name, "CRITICAL" if spec.kind == "database" else "UNKNOWN", str(err))


def _start_check(index: int, spec: CheckSpec, ctx: "CheckContext", results: Dict[int, CheckResult], clock) -> Any:
    import threading

    def work() -> None:
        began = clock()
        results[index] = _checked(spec, ctx)._replace(duration_s=clock() - began)

    thread = threading.Thread(target=work, name=f"check {spec.name}", daemon=True)
    thread.start()
    return thread


def run_checks(specs: List[CheckSpec], ctx: CheckContext, clock=time.monotonic) -> List[CheckResult]:
    """Every check at once, each in its own thread: one that hangs is UNKNOWN, the rest report."""
    results: Dict[int, CheckResult] = {}
    started = clock()
    threads = [_start_check(index, spec, ctx, results, clock) for index, spec in enumerate(specs)]
    for index, (spec, thread) in enumerate(zip(specs, threads)):
        # Each is waited for until its timeout from the start, and a moment more: a command check
        # stops its process itself at the timeout, and then says so.
        thread.join(max(0.0, started + spec.timeout_s + CHECK_TIMEOUT_GRACE_S - clock()))
        if index not in results:
            results[index] = CheckResult(spec.name, "UNKNOWN", f"no answer within {spec.timeout_s:g} s",
                                         duration_s=spec.timeout_s)
    return [results[index] for index in range(len(specs))]


def record_check_results(collector: MetricsCollector, results: List[CheckResult], now: float,
                         forget: Iterable[str] = ()) -> None:
    """Each verdict in words (for the summary) and as metrics: check_state (0-3), check_value and
    check_duration, labelled check=NAME; the words of the checks named in ``forget`` (a configuration
    problem mended) are dropped; one transaction."""
    samples = []
    for result in results:
        labels = {"check": result.name}
        samples.append(Sample("check_state", float(CHECK_STATES.index(result.state)), labels, now))
        samples.append(Sample("check_duration", result.duration_s, labels, now))
        if result.value is not None and math.isfinite(result.value):
            samples.append(Sample("check_value", float(result.value), labels, now))
    with collector.writing(samples) as conn:  # a writing command: the daily cleanup may follow
        conn.executemany("INSERT OR REPLACE INTO check_results (name, ts, state, summary) VALUES (?, ?, ?, ?)",
                         [(result.name, now, result.state, result.summary) for result in results])
        conn.executemany("DELETE FROM check_results WHERE name = ?", [(name,) for name in forget])
        for key, value in (pair for result in results for pair in result.keep):
            _set_meta(conn, key, value)


def _plugin_text(text: str) -> str:
    """One line without '|', which would start the perfdata in any line of a plugin's output."""
    return _one_line(text).replace("|", "/")


def plugin_output(results: List[CheckResult]) -> List[str]:
    """``METASYSTEM STATE - summary | perfdata``, then one line per check."""
    state = worst_state(r.state for r in results)
    bad = [r for r in results if r.state != "OK"]
    summary = "; ".join(f"{r.name} {r.state}: {r.summary}" for r in bad) if bad else (
        f"{len(results)} checks OK" if len(results) != 1 else "1 check OK")
    perfdata = " ".join(item for r in results for item in r.perfdata)
    lines = [f"METASYSTEM {state} - {_plugin_text(summary)}" + (f" | {perfdata}" if perfdata else "")]
    lines += [f"{r.state} {r.name}: {_plugin_text(r.summary)}" for r in results]
    return lines


## Jobs #######################################################################

JOB_OUTPUT_TAIL_BYTES = 10_000
DEFAULT_KILL_AFTER_S = 5.0  # after --timeout: SIGTERM, then SIGKILL this much later, as timeout(1) -k
JOB_TRANSIENT_EXIT_CODES = (75, 124)  # EX_TEMPFAIL, and our own timeout
EXIT_TIMEOUT = 124  # what timeout(1) exits with
JOB_RETRY_BACKOFF_S = 1.0
JOB_RETRY_BACKOFF_CAP_S = 60.0
PING_BODY_BYTES = 10_000  # of the output's tail: what a self-hosted healthchecks.io keeps of a ping
PING_ATTEMPTS = 3
PING_PAUSE_S = 1.0  # before the second attempt; twice that before the third


class JobRun(NamedTuple):
    """One ``run`` of a job: what happened, and the tail of what it printed."""

    run_id: str
    job: str
    started: float
    ended: Optional[float]
    exit_code: Optional[int]
    outcome: str  # success, failure, timeout, skipped, breaker_open; unrecorded: its end could not be written
    attempts: int
    output: bytes  # the last JOB_OUTPUT_TAIL_BYTES of stdout and stderr together
    cut_bytes: int  # how many earlier bytes of output were dropped
    store_error: Optional[MonitorError] = None  # why the run could not be recorded (store or configuration)

    @property
    def duration_s(self) -> float:
        return (self.ended or self.started) - self.started


class _JobFailed(Exception):
    def __init__(self, code: int):
        super().__init__(f"exit {code}")
        self.code = code


@contextlib.contextmanager
def _job_lock(db_path: str, name: str) -> Iterator[bool]:
    """An exclusive flock on ``locks/NAME.lock`` beside the store; yields False when another run holds it."""
    import fcntl

    folder = os.path.join(os.path.dirname(db_path) or ".", "locks")
    path = os.path.join(folder, f"{name.replace(os.sep, '_')}.lock")
    refuse_foreign_symlinks(path, "lock")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    handle = os.fdopen(fd, "a+b")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        handle.close()  # closing releases the lock, also when the process is killed


class _Forwarding:
    """``with _Forwarding() as forwarding``: SIGTERM and SIGINT to us go on to a child's process group.

    Installed before the child starts, so none falls in between; one that comes before
    ``started(pgid)`` is sent on then. The previous handlers come back at the end of the block.
    """

    def __init__(self) -> None:
        self.pgid: Optional[int] = None
        self.early: List[int] = []
        self.previous: List[Tuple[int, Any]] = []

    def __enter__(self) -> "_Forwarding":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            self.previous = [(signum, signal.signal(signum, self._forward)) for signum in (signal.SIGTERM,
                                                                                           signal.SIGINT)]
        return self

    def started(self, pgid: int) -> None:
        self.pgid = pgid
        for signum in self.early:
            self._forward(signum, None)

    def _forward(self, signum: int, frame: Any) -> None:
        if self.pgid is None:
            self.early.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signum)

    def __exit__(self, *exc_info: Any) -> None:
        import signal

        for signum, previous in self.previous:
            signal.signal(signum, previous)


def _kill_group(process: Any, kill_after_s: float) -> None:
    import signal
    import subprocess

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_command(argv: List[str], timeout_s: Optional[float], kill_after_s: float, tail: _Tail) -> int:
    """Run ``argv`` (no shell) in its own process group, stdin passed through, output into ``tail``.

    SIGTERM and SIGINT sent to us go to the whole group. On timeout the group
    gets SIGTERM, then SIGKILL ``kill_after_s`` later; the result is 124.
    """
    import subprocess
    import threading

    with _Forwarding() as forwarding:  # before the job starts: no signal may fall between the two
        try:
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        except OSError as err:
            tail.feed(f"cannot run {argv[0]}: {err.strerror or err}\n".encode("utf-8"))
            return 127 if isinstance(err, FileNotFoundError) else 126
        forwarding.started(process.pid)
        reader = threading.Thread(target=_drain, args=(process.stdout, tail), daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process, kill_after_s)
            tail.feed(f"[metasystem: timed out after {timeout_s:g} s; the process group was stopped]\n"
                      .encode("utf-8"))
            code = EXIT_TIMEOUT
    reader.join(kill_after_s + 1.0)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says


def validate_job_name(name: Any) -> str:
    """Return ``name`` if it can name a job (as ``[job:NAME]`` can), else raise ValidationError."""
    why = name_problem(validate_name(name, "job name"), "job")
    if why:
        raise ValidationError(f"{why}, got {_shown(name)}")
    return name


class JobRunner:
    """Runs a command as job NAME: timeout over its whole process group, retries, a lock, a breaker.

    Every run is a row of ``job_runs`` (started when it starts, so ``check``
    sees a run in progress) and two metrics, ``job_duration`` and
    ``job_exit_code`` with the label ``job=NAME``.
    """

    def __init__(self, collector: MetricsCollector, *, now=time.time, clock=time.monotonic, sleep=None, rng=None):
        import random

        self.collector = collector
        self.store = collector.store
        self._now, self._clock = now, clock
        self._sleep = time.sleep if sleep is None else sleep
        self._rng = random.Random() if rng is None else rng

    def run(self, name: str, argv: List[str], *, timeout_s: Optional[float] = None, retries: int = 0,
            lock: bool = False, kill_after_s: float = DEFAULT_KILL_AFTER_S,
            breaker: Optional["CircuitBreaker"] = None) -> JobRun:
        name = validate_job_name(name)
        if not argv:
            raise ValidationError("run needs a command after --")
        with contextlib.ExitStack() as stack:
            if lock and not stack.enter_context(_job_lock(self.collector.db_path, name)):
                return self._skipped(name)
            run_id = f"{os.getpid()}-{os.urandom(6).hex()}"  # who runs it: a later run can tell it died
            started = self._now()
            store_error = self._start(run_id, name, started)
            attempts, code, tail = 0, None, _Tail(JOB_OUTPUT_TAIL_BYTES)
            outcome = "failure"
            while True:
                attempts += 1
                if breaker is not None:
                    try:
                        code = self._through_breaker(breaker, argv, timeout_s, kill_after_s, tail)
                    except CircuitOpenError as err:
                        tail.feed(f"{err}\n".encode("utf-8"))
                        code, outcome = None, "breaker_open"
                        break
                else:
                    code = run_command(argv, timeout_s, kill_after_s, tail)
                if code == 0 or code not in JOB_TRANSIENT_EXIT_CODES or attempts > retries:
                    break
                delay = jittered_delay(nominal_delay(attempts, JOB_RETRY_BACKOFF_S, 2.0, JOB_RETRY_BACKOFF_CAP_S),
                                       "full", self._rng, cap=JOB_RETRY_BACKOFF_CAP_S,
                                       initial=JOB_RETRY_BACKOFF_S, previous=JOB_RETRY_BACKOFF_S)
                tail.feed(f"[metasystem: exit {code}, attempt {attempts} of {retries + 1}; "
                          f"again in {delay:.1f} s]\n".encode("utf-8"))
                self._sleep(delay)
            if outcome != "breaker_open":
                outcome = "success" if code == 0 else "timeout" if code == EXIT_TIMEOUT else "failure"
            run = JobRun(run_id, name, started, self._now(), code, outcome, attempts, bytes(tail.data), tail.dropped)
            return run._replace(run_id="", store_error=store_error) if store_error else self._finish(run)

    def _start(self, run_id: str, name: str, started: float) -> Optional[StorageError]:
        """The row of a run in progress, and the rows of runs of ``name`` whose process died before it
        could record its end; the error if the store cannot be written (the job runs all the same)."""
        try:
            with self.store.write() as conn:
                self._close_orphans(conn, name)
                conn.execute("INSERT INTO job_runs (run_id, job, started, attempts, outcome, output, cut_bytes) "
                             "VALUES (?, ?, ?, 0, 'running', x'', 0)", (run_id, name, started))
        except StorageError as err:
            return err
        return None

    @staticmethod
    def _close_orphans(conn: sqlite3.Connection, name: str) -> None:
        """Runs left 'running' by a process that is gone: ended at their start, outcome unrecorded."""
        for (run_id,) in conn.execute("SELECT run_id FROM job_runs WHERE job = ? AND ended IS NULL", (name,)):
            owner = run_id.partition("-")[0]
            if ascii_digits(owner) and not process_alive(int(owner)):
                conn.execute("UPDATE job_runs SET ended = started, outcome = 'unrecorded' WHERE run_id = ?",
                             (run_id,))

    def _through_breaker(self, breaker: "CircuitBreaker", argv: List[str], timeout_s: Optional[float],
                         kill_after_s: float, tail: _Tail) -> int:
        """The command as a breaker call: a non-zero exit counts as the breaker's failure."""
        result: Dict[str, int] = {}

        def attempt() -> None:
            result["code"] = run_command(argv, timeout_s, kill_after_s, tail)
            if result["code"] != 0:
                raise _JobFailed(result["code"])

        try:
            breaker.call(attempt)
        except _JobFailed:
            pass
        return result["code"]

    def _skipped(self, name: str) -> JobRun:
        now = self._now()
        run = JobRun(os.urandom(8).hex(), name, now, now, None, "skipped", 0, b"", 0)
        with self.store.write() as conn:
            conn.execute("INSERT INTO job_runs (run_id, job, started, ended, attempts, outcome, output, cut_bytes) "
                         "VALUES (?, ?, ?, ?, 0, 'skipped', x'', 0)", (run.run_id, name, now, now))
        return run

    def _finish(self, run: JobRun) -> JobRun:
        """The run's end in its row and two metrics; a store that fails now costs the record, not the run."""
        labels = {"job": run.job}
        samples = [Sample("job_duration", run.duration_s, labels, run.ended)]
        if run.exit_code is not None:
            samples.append(Sample("job_exit_code", float(run.exit_code), labels, run.ended))
        try:
            with self.store.write() as conn:
                conn.execute("UPDATE job_runs SET ended = ?, exit_code = ?, outcome = ?, attempts = ?, output = ?, "
                             "cut_bytes = ? WHERE run_id = ?", (run.ended, run.exit_code, run.outcome, run.attempts,
                                                                run.output, run.cut_bytes, run.run_id))
            self.collector.record_many(samples)
        except StorageError as err:
            return run._replace(store_error=err)
        return run


def ping_url(base: str, signal: str, run_id: str) -> str:
    """``base`` with ``/signal`` (start, fail, log or an exit code; nothing for success) and ``?rid=``:
    the healthchecks.io ping protocol, which Uptime Kuma push monitors and Cronitor also take."""
    from urllib.parse import urlencode, urlsplit, urlunsplit

    parts = urlsplit(base)
    path = parts.path.rstrip("/") + (f"/{signal}" if signal else "")
    query = "&".join(part for part in (parts.query, urlencode({"rid": run_id})) if part)
    return urlunsplit(parts._replace(path=path or "/", query=query))


def send_ping(base: str, signal: str, run_id: str, body: bytes = b"", *, budget_s: float = DEFAULT_ALERT_TIMEOUT_S,
              clock=time.monotonic, sleep=time.sleep) -> Optional[str]:
    """POST one ping, tried again after a timeout, a failed connection, 408, 429 or 5xx while ``budget_s``
    lasts; None when the service took it, else why not in one line (the URL masked). It never raises: a
    ping must not change what the job did, nor hold it up past the budget."""
    url = ping_url(base, signal, run_id)
    deadline = clock() + budget_s
    why = f"no answer within {budget_s:g} s"
    for attempt in range(1, PING_ATTEMPTS + 1):
        left = deadline - clock()
        if left <= 0:
            break
        try:
            reply = http_request("POST", url, body[-PING_BODY_BYTES:], {"Content-Type": "text/plain; charset=utf-8"},
                                 left, tls_context(True) if url.startswith("https:") else None)
        except (OSError, ValueError) as err:
            why = _error_text(err)
        else:
            said = _one_line(reply.body.decode("utf-8", "replace"))[:80]
            if 200 <= reply.status < 300 and "not found" in said.lower():  # healthchecks' answer to a typo
                return f"ping to {mask_url(url)}: the service answered {said!r}: is the URL right?"
            if 200 <= reply.status < 300:
                return None
            why = f"HTTP {reply.status}" + (f": {said}" if said else "")
            if classify_http_status(reply.status) != "transient":
                break
        if attempt < PING_ATTEMPTS:
            sleep(min(PING_PAUSE_S * attempt, max(0.0, deadline - clock())))
    return f"ping to {mask_url(url)} failed: {why}"


def job_problems(config) -> List[Tuple[str, str, str]]:
    """What is wrong in the ``[job:NAME]`` sections: unknown keys, a ping URL that is not http(s)."""
    problems: List[Tuple[str, str, str]] = []
    for section in config.sections() if hasattr(config, "sections") else ():
        if not section.startswith("job:"):
            continue
        why = name_problem(section[len("job:"):], "job")
        if why:
            problems.append((section, "", why))
        items = dict(config[section])
        problems += [(section, key, "unknown key") for key in items if key not in JOB_KEYS]
        problems += _ping_url_problems(section, items)
    return problems


def ping_signal(run: JobRun) -> str:
    """The ping that ends a run: nothing for success, the exit code, ``fail`` when there is none, and
    ``log`` for a run skipped because another still holds its lock."""
    if run.outcome == "skipped":
        return "log"
    if run.outcome == "success":
        return ""
    return str(run.exit_code) if run.exit_code is not None and 0 <= run.exit_code <= 255 else "fail"


def job_report(run: JobRun, argv: List[str]) -> str:
    """What ``run`` prints when the command failed: cron mails it."""
    import shlex

    attempts = f", {run.attempts} attempts" if run.attempts > 1 else ""
    code = "no exit code" if run.exit_code is None else f"exit {run.exit_code}"
    lines = [f"run {run.job}: {run.outcome} ({code}) after {run.duration_s:.1f} s{attempts}",
             f"command: {visible_text(shlex.join(argv))}"]
    if run.cut_bytes:
        lines.append(f"[... {run.cut_bytes} earlier bytes of output cut; the last {len(run.output)} follow ...]")
    text = run.output.decode("utf-8", "replace")
    return "\n".join(lines) + ("\n" + text.rstrip("\n") if text.strip() else "") + "\n"


## Summary ####################################################################

# 2: "omitted" counts the rows a section leaves out; 3: "jobs"; 4: "metrics"; 5: every configured check in
# "health", each with its "age_s" and whether it is "stale"; each job "late" or not against "expected_every_s"
SUMMARY_SCHEMA_VERSION = 5
SUMMARY_SECTION_ROWS = 50  # sync targets or agents shown, the worst first; the rest are only counted
SUMMARY_METRICS = 10  # the user's own series shown, the most recently written first
# The series of the sync, agent, breaker, check and job families (by the label that names the entity): the
# summary shows them in their sections, the export in named families; every other series is the user's own.
# The Storage section's _FAMILY_GLOBS says the same in SQL, for an index of the user's own.
_EXPORTED_SERIES = (
    ("target", r"sync_.+_(success|failure|files|conflicts)"), ("agent", r"agent_.+_(success|failure|items)"),
    ("breaker", r"circuit_breaker_.+_(state|failures)"), ("check", r"check_(state|value|duration)"),
    ("job", r"job_(duration|exit_code)"),
)
SUMMARY_RECENT_POINTS = 24  # the samples behind each sparkline
SUMMARY_BASELINE_POINTS = 240  # the recent samples that say what normal is, to mark anomalies among them
SUMMARY_ALERTS = 20
RATE_OK_PERCENT = 90.0  # a sync target or agent succeeding this often is OK; from the next WARNING, below CRITICAL
RATE_WARNING_PERCENT = 50.0
BREAKER_STATE_WORDS = {"closed": "OK", "half_open": "WARNING", "open": "CRITICAL"}
JOB_STATE_WORDS = {"success": "OK", "running": "OK", "skipped": "WARNING", "failure": "CRITICAL",
                   "timeout": "CRITICAL", "breaker_open": "WARNING", "unrecorded": "UNKNOWN"}
SEVERITY_STATE_WORDS = {"critical": "CRITICAL", "warning": "WARNING", "info": "OK"}
_INERT_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")  # controls, formats, unassigned, line breaks


def inert_text(text: Any, ascii_only: bool = False) -> str:
    """``text`` with every control or format character shown as an escape (``\\x1b``), so a name holding
    terminal or HTML control codes is drawn inert; non-ASCII escaped too when ``ascii_only``."""
    import unicodedata

    text = str(text)
    if text.isprintable() and (not ascii_only or text.isascii()):
        return text  # the usual case, at C speed
    out = []
    for char in text:
        if unicodedata.category(char) in _INERT_CATEGORIES or (ascii_only and ord(char) > 126):
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out)


def _runs(collector: MetricsCollector, prefix: str, hours: float) -> Tuple[int, int, Optional[float]]:
    """(successes, attempts, average duration) of the PREFIX_success / PREFIX_failure durations."""
    stats = [collector.get_metric_stats(f"{prefix}_{outcome}", hours) for outcome in ("success", "failure")]
    attempts = stats[0]["count"] + stats[1]["count"]
    # Each mean weighted by its share: no sum of durations that could overflow.
    average = math.fsum(part["avg"] * (part["count"] / attempts) for part in stats if part["count"])
    return stats[0]["count"], attempts, average if attempts else None


def _sync_summary(collector: MetricsCollector, target: str, hours: float) -> Dict[str, Any]:
    successes, attempts, avg_duration = _runs(collector, f"sync_{target}", hours)
    last_success = collector.latest(f"sync_{target}_success")
    return {
        "success_rate": None if attempts == 0 else 100.0 * successes / attempts,
        "attempts": attempts,
        "avg_duration": avg_duration,
        "last_success": iso_time(last_success[0]) if last_success else None,
    }


def _agent_summary(collector: MetricsCollector, agent: str, hours: float) -> Dict[str, Any]:
    successes, executions, avg_duration = _runs(collector, f"agent_{agent}", hours)
    runs = [collector.latest(f"agent_{agent}_{outcome}") for outcome in ("success", "failure")]
    latest = max((run for run in runs if run is not None), default=None, key=lambda run: run[0])
    return {
        "executions": executions,
        "success_rate": None if executions == 0 else 100.0 * successes / executions,
        "avg_duration": avg_duration,
        "latest_duration": None if latest is None else latest[1],
    }


def summary_status(health: Dict[str, Dict[str, Any]]) -> str:
    """The worst state among the checks, in lower case; ``unknown`` when no check has run."""
    if not health:
        return "unknown"
    return worst_state(entry["state"] for entry in health.values()).lower()


def _newest(collector: MetricsCollector, name: str, since: float, limit: int) -> List[Tuple[float, int, float]]:
    """Up to ``limit`` newest samples of ``name`` since ``since``, as (time, seq, value), newest first."""
    return collector.store.query(
        f"SELECT ts, seq, value FROM samples WHERE {_OF_NAME} AND ts >= ? ORDER BY ts DESC, seq DESC LIMIT ?",
        (name, since, limit))


def _anomalous_among_recent(known: List[float]) -> List[int]:
    """Positions, among the last SUMMARY_RECENT_POINTS of ``known`` (oldest first), of the values the
    robust detector finds anomalous against all of ``known``."""
    if len(known) < DEFAULT_MIN_SAMPLES:
        return []
    baseline = robust_baseline(sorted(known))
    return [i for i, value in enumerate(known[-SUMMARY_RECENT_POINTS:])
            if is_anomalous(value, baseline, DEFAULT_ROBUST_THRESHOLD)]


def recent_runs(collector: MetricsCollector, prefix: str, since: float) -> Dict[str, List[Any]]:
    """The durations of the last runs of PREFIX_success and PREFIX_failure, oldest first, with the
    positions of the failed ones and of those the robust detector finds anomalous against the runs
    before them."""
    runs = sorted((ts, seq, value, outcome == "failure") for outcome in ("success", "failure")
                  for ts, seq, value in _newest(collector, f"{prefix}_{outcome}", since, SUMMARY_BASELINE_POINTS))
    known = runs[-SUMMARY_BASELINE_POINTS:]
    recent = known[-SUMMARY_RECENT_POINTS:]
    return {"durations": [run[2] for run in recent], "failed": [i for i, run in enumerate(recent) if run[3]],
            "anomalous": _anomalous_among_recent([run[2] for run in known])}


def _breaker_summaries(collector: MetricsCollector, recorded: List[str], since: float,
                       until: float) -> Dict[str, Dict[str, Any]]:
    """Each breaker's state, with its recent failure counts."""
    found = breaker_states(collector, recorded, until)
    for name, entry in found.items():
        samples = _newest(collector, f"circuit_breaker_{name}_failures", since, SUMMARY_RECENT_POINTS)
        entry["recent"] = {"failures": [sample[2] for sample in reversed(samples)]}
    return found


def recent_jobs(store: Store, now: float,
                schedules: Optional[Dict[str, float]] = None) -> Dict[str, Dict[str, Any]]:
    """Every job ``run`` has run, and every job a ``job`` check expects: its last run (when, how it ended,
    how long), its last success, and ``late`` when it has not started within its ``expected_every``
    (CRITICAL, as the check says; ``missing`` when it never ran)."""
    schedules = schedules or {}
    jobs = {}
    ran = [job for (job,) in store.query("SELECT DISTINCT job FROM job_runs ORDER BY job")]
    for job in sorted(set(ran) | set(schedules)):
        every = schedules.get(job)
        last = store.query_one("SELECT started, ended, exit_code, outcome FROM job_runs WHERE job = ? "
                               "ORDER BY started DESC LIMIT 1", (job,))
        if last is None:
            jobs[job] = {"state": "CRITICAL", "outcome": "missing", "started": None, "exit_code": None,
                         "duration_s": None, "last_success": None, "late": True, "expected_every_s": every}
            continue
        started, ended, code, outcome = last
        good = store.query_one("SELECT max(ended) FROM job_runs WHERE job = ? AND outcome = 'success'", (job,))[0]
        late = every is not None and now - started > every
        state = "CRITICAL" if late else JOB_STATE_WORDS.get(outcome, "UNKNOWN")
        jobs[job] = {"state": state, "outcome": outcome, "started": iso_time(started), "exit_code": code,
                     "duration_s": None if ended is None else ended - started, "last_success": iso_time(good),
                     "late": late, "expected_every_s": every}
    return jobs


def dashboard_metrics(config) -> Optional[List[str]]:
    """The globs of ``[dashboard] metrics``, or None (the newest series) when it is not set."""
    text = config["dashboard"].get("metrics", "") if config.has_section("dashboard") else ""
    patterns = [part.strip() for part in text.split(",") if part.strip()]
    return patterns or None


def _series_recent(collector: MetricsCollector, series_id: int, since: float) -> Dict[str, Any]:
    points = collector.store.query("SELECT ts, value FROM samples WHERE series_id = ? AND ts >= ? "
                                   "ORDER BY ts DESC, seq DESC LIMIT ?", (series_id, since, SUMMARY_BASELINE_POINTS))
    latest = points[0] if points else collector.store.query_one(  # written before the window
        "SELECT ts, value FROM samples WHERE series_id = ? ORDER BY ts DESC, seq DESC LIMIT 1", (series_id,))
    values = [value for _, value in reversed(points)]
    return {"latest": latest[1], "time": iso_time(latest[0]),
            "recent": {"values": values[-SUMMARY_RECENT_POINTS:], "anomalous": _anomalous_among_recent(values)}}


def series_figure(name: str, value: Optional[float]) -> str:
    """A value of a series as the faces show it: in the unit its name says (``_bytes``, ``_seconds``,
    ``_percent``), else with six significant digits.

    >>> series_figure("backup_bytes", 52.3e9), series_figure("lag_seconds", 3900), series_figure("x", 1/3)
    ('52.3 GB', '1h 5m', '0.333333')
    """
    if value is None:
        return "-"
    if name.endswith("_bytes"):
        return format_bytes(value)
    if name.endswith("_seconds"):
        return format_span(value)
    if name.endswith("_percent"):
        return f"{value:.1f}%"
    return f"{value:.6g}"


def _label_value(value: Any) -> str:
    """A label value with backslash, double quote and newline escaped, as both exposition formats want."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def series_key(name: str, labels: Dict[str, str]) -> str:
    """How the faces name one series, as the exposition format writes it: ``name``, or
    ``name{label="value",...}`` with the labels sorted and each value's backslash, double quote and newline
    escaped; a name that holds ``{`` is quoted inside the braces (``{"name",label="value"}``). So no two
    series share a key, and series_name() reads the name back.

    >>> series_key("amb", {"a": "1,b=2"}), series_key("amb", {"a": "1", "b": "2"}), series_key("a{b}", {})
    ('amb{a="1,b=2"}', 'amb{a="1",b="2"}', '{"a{b}"}')
    """
    pairs = [f'{key}="{_label_value(value)}"' for key, value in sorted(labels.items())]
    if "{" in name:
        return "{" + ",".join([f'"{_label_value(name)}"'] + pairs) + "}"
    return name + ("{" + ",".join(pairs) + "}" if pairs else "")


_KEY_UNESCAPES = {"n": "\n"}  # any other escaped character stands for itself: \\ and \"


def series_name(key: str) -> str:
    r"""The metric name in a series_key().

    >>> series_name('amb{a="1,b=2"}'), series_name('{"a{b\\"c",x="1"}')
    ('amb', 'a{b"c')
    """
    if not key.startswith('{"'):
        return key.partition("{")[0]
    name, escaped = [], False
    for char in key[2:]:
        if escaped:
            name.append(_KEY_UNESCAPES.get(char, char))
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            break
        else:
            name.append(char)
    return "".join(name)


def _newest_own_series(collector: MetricsCollector) -> Iterator[Tuple[int, str, str, float]]:
    """(id, name, labels, time of the newest sample) of every user's own series with a sample, the newest
    first (then by name and labels), read from own_series_by_time as far as the caller iterates; the
    series whose last_ts may lag are asked their samples and merged in where they fall."""
    import heapq

    def newest_first(row: tuple) -> tuple:  # the order of the index
        return -row[3], row[1], row[2]

    lagging = sorted(collector.lagging_series())
    exact = collector.store.query(
        "SELECT id, name, labels, (SELECT max(ts) FROM samples WHERE series_id = series.id) AS last FROM series "
        f"WHERE id IN ({', '.join('?' * len(lagging))}) AND own AND last IS NOT NULL", lagging)
    with collector.store.rows("SELECT id, name, labels, last_ts FROM series WHERE own AND last_ts IS NOT NULL "
                              "ORDER BY last_ts DESC, name, labels") as indexed:
        yield from heapq.merge((row for row in indexed if row[0] not in lagging), sorted(exact, key=newest_first),
                               key=newest_first)


def own_series(collector: MetricsCollector, since: float, patterns: Optional[List[str]] = None,
               limit: int = SUMMARY_METRICS) -> Dict[str, Dict[str, Any]]:
    """The user's own series (not those of the sync, agent, breaker, check and job sections): the ``limit``
    most recently written, by name, or every one whose name matches a shell glob of ``patterns``, in the
    order of the globs (then by name); each with its latest value and time, and its recent values with
    the anomalous ones marked."""
    import fnmatch
    import json

    found: Dict[str, Dict[str, Any]] = {}
    with contextlib.closing(_newest_own_series(collector)) as newest:  # read no further than the last shown
        for series_id, name, labels_text, _ in newest:
            if patterns is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                continue
            labels = {} if labels_text == _NO_LABELS else json.loads(labels_text)
            found[series_key(name, labels)] = dict(_series_recent(collector, series_id, since), name=name,
                                                   labels=labels)
            if patterns is None and len(found) >= limit:
                break

    def place(key: str) -> Tuple[int, str]:  # the first glob its name matches, then the key
        name = found[key]["name"]
        return next((i for i, pattern in enumerate(patterns or ()) if fnmatch.fnmatchcase(name, pattern)), 0), key

    return {key: found[key] for key in sorted(found, key=place)}


def recent_alerts(store: Store, since: float, limit: int = SUMMARY_ALERTS) -> List[Dict[str, Any]]:
    """The newest alerts since ``since``, newest first, each with what every channel did with it."""
    newest = "SELECT id FROM alerts WHERE ts >= ? ORDER BY ts DESC, id DESC LIMIT ?"
    channels: Dict[int, Dict[str, str]] = {}
    for alert_id, channel, outcome in store.query(
            f"SELECT alert_id, channel, outcome FROM alert_deliveries WHERE alert_id IN ({newest})", (since, limit)):
        channels.setdefault(alert_id, {})[channel] = outcome
    return [dict({"time": iso_time(ts), "kind": kind, "severity": severity, "title": title,
                  "channels": dict(sorted(channels.get(alert_id, {}).items()))},
                 **({"message": message} if kind == "acknowledged" else {}))
            for alert_id, ts, kind, severity, title, message in store.query(
                "SELECT id, ts, kind, severity, title, message FROM alerts WHERE ts >= ? ORDER BY ts DESC, id DESC "
                "LIMIT ?", (since, limit))]


def recorded_health(store: Store, now: float,
                    intervals: Optional[Dict[str, float]] = None) -> Dict[str, Dict[str, Any]]:
    """The last verdict of every check, with its age; one older than its interval (and a minute) is
    stale: UNKNOWN, for the checks have stopped running and what they said then no longer stands.

    ``intervals`` names the configured checks: one that never ran shows as not checked yet. Without it,
    the checks are those of the last hour of runs (a check missing from them is one the configuration
    no longer has), each expected hourly.
    """
    found = {name: (ts, state, text) for name, ts, state, text in
             store.query("SELECT name, ts, state, summary FROM check_results ORDER BY name")}
    if intervals is not None and CONFIGURATION_CHECK in found:  # recorded only while the file has a problem
        intervals = dict(intervals, **{CONFIGURATION_CHECK: max(intervals.values(), default=DEFAULT_CHECK_INTERVAL_S)})
    if intervals is None:
        newest = max((ts for ts, _, _ in found.values()), default=now)
        intervals = {name: DEFAULT_CHECK_INTERVAL_S for name, (ts, _, _) in found.items()
                     if ts >= newest - DEFAULT_CHECK_INTERVAL_S}
    health = {}
    for name in sorted(intervals):
        if name not in found:
            health[name] = {"state": "UNKNOWN", "summary": "not checked yet", "checked_at": None, "age_s": None,
                            "stale": True}
            continue
        ts, state, text = found[name]
        stale = now - ts > intervals[name] + CHECK_STALE_GRACE_S
        if stale:
            state, text = "UNKNOWN", f"not checked for {format_span(now - ts)} (then {state}: {text})"
        health[name] = {"state": state, "summary": text, "checked_at": iso_time(ts), "age_s": max(0.0, now - ts),
                        "stale": stale}
    return health


def check_age(entry: Dict[str, Any]) -> str:
    """How long ago a check's verdict was given, as the faces show it: ``4m ago``, or ``never``."""
    age = entry.get("age_s")
    return "never" if age is None else f"{format_span(age)} ago"


def rate_state(rate: Optional[float]) -> str:
    """The state word of a success rate, as the dashboard and the status page color a row."""
    if rate is None:
        return "UNKNOWN"
    return "OK" if rate >= RATE_OK_PERCENT else "WARNING" if rate >= RATE_WARNING_PERCENT else "CRITICAL"


# The queries of the worst-first sections, with the named parameters of _run_params(). Of a series named
# PREFIX_NAME_success or _failure: NAME, and whether it is a value of the label (the series' own labels say so
# without a seek where NAME needs no escape in JSON; label_values says so anyway).
_RUN_NAME = "substr(series.name, :head_chars + 1, length(series.name) - :head_chars - 8)"
_OF_SECTION = "substr(series.name, 1, :head_chars) = :head AND length(series.name) >= :head_chars + 8"
_NAMED = (f"CASE WHEN instr(series.labels, :labelled || {_RUN_NAME} || '\"') THEN 1 ELSE EXISTS (SELECT 1 FROM "
          f"label_values WHERE key = :label AND value = {_RUN_NAME}) END")
# Whether series of NAME (any label set) have a sample in the window, or how many.
_IN_THE_WINDOW = ("FROM series AS run JOIN samples ON samples.series_id = run.id WHERE run.name = :head || {} || "
                  "'_{}' AND ts >= :since AND ts <= :until")
# A failure series' NAME, the successes and failures of NAME in the window.
_RUN_COUNTS = (f"SELECT {_RUN_NAME}, (SELECT count(*) {_IN_THE_WINDOW.format(_RUN_NAME, 'success')}), "
               f"(SELECT count(*) {_IN_THE_WINDOW.format(_RUN_NAME, 'failure')}) FROM series ")


def _run_params(prefix: str, label: str, since: float, until: float,
                lagging: AbstractSet[int]) -> Tuple[str, Dict[str, Any]]:
    """The SQL list of the lagging series' ids, ``(:l0, :l1, ...)``, and the named parameters of the queries
    of the worst-first sections."""
    ids = {f"l{i}": series_id for i, series_id in enumerate(sorted(lagging))}
    return "({})".format(", ".join(":" + key for key in ids)), dict(
        ids, since=since, until=until, label=label, head=prefix + "_", head_chars=len(prefix) + 1,
        labelled=f'"{label}":"')


def _counted_runs(store: Store, lagging_ids: str, params: Dict[str, Any]) -> Dict[str, Tuple[int, int]]:
    """The names with a PREFIX_NAME_failure series that ran since :since, each with its successes and failures
    in the window: failures_by_time holds those series, and meta's lagging_series the few whose last_ts may
    lag. Every other name failed no run in the window."""
    where = f"name GLOB '*_failure' AND {_OF_SECTION} AND {_NAMED}"
    rows = store.query(f"{_RUN_COUNTS} WHERE name GLOB '*_failure' AND last_ts >= :since AND {where}", params)
    rows += store.query(f"{_RUN_COUNTS} WHERE id IN {lagging_ids} AND {where}", params)
    return {name: (good, bad) for name, good, bad in rows}


def _succeeded_elsewhere(store: Store, params: Dict[str, Any]) -> int:
    """How many names have a PREFIX_NAME_success series with a sample in the window: one count in SQL, over
    the success series (success_series)."""
    return store.query_one(
        f"SELECT count(DISTINCT name) FROM series WHERE name GLOB '*_success' AND {_OF_SECTION} AND {_NAMED} "
        "AND EXISTS (SELECT 1 FROM samples WHERE series_id = series.id AND ts >= :since AND ts <= :until)",
        params)[0]


def _first_names(store: Store, succeeded: bool, skip: AbstractSet[str], count: int,
                 params: Dict[str, Any]) -> List[str]:
    """The first ``count`` names in order, past those in ``skip``, that succeeded in the window
    (``succeeded``) or did not: read as far as they are found."""
    found: List[str] = []
    if count <= 0:
        return found
    with store.rows(f"SELECT value FROM label_values AS v WHERE key = :label AND {'' if succeeded else 'NOT '}"
                    f"EXISTS (SELECT 1 {_IN_THE_WINDOW.format('v.value', 'success')}) ORDER BY value",
                    params) as rows:
        for (name,) in rows:
            if name not in skip:
                found.append(name)
                if len(found) == count:
                    break
    return found


def _worst_first(collector: MetricsCollector, prefix: str, label: str, since: float, until: float,
                 limit: Optional[int]) -> Tuple[List[str], Dict[str, int]]:
    """The ``limit`` names of ``label`` (target, agent) whose PREFIX_NAME_success and _failure runs in the
    window are in the worst state, sorted, and how many of the rest are in each state (every name and no
    counts without a limit, or when no more are there). The names that failed in the window have their runs
    counted; every other one failed none, so it is OK if it succeeded, else UNKNOWN: those are counted in SQL,
    and read only as far as the section shows them, in order. A window longer than the raw retention ranks by
    the raw samples left."""
    import collections

    store = collector.store
    first = [name for (name,) in store.query("SELECT value FROM label_values WHERE key = ? ORDER BY value LIMIT ?",
                                             (label, -1 if limit is None else limit + 1))]
    if limit is None or len(first) <= limit:
        return first, {}
    lagging_ids, params = _run_params(prefix, label, since, until, collector.lagging_series())
    counted = _counted_runs(store, lagging_ids, params)
    states = {name: rate_state(100.0 * good / (good + bad) if good + bad else None)
              for name, (good, bad) in counted.items()}
    succeeded = _succeeded_elsewhere(store, params) - sum(1 for good, _ in counted.values() if good)
    names = store.query_one("SELECT count(*) FROM label_values WHERE key = ?", (label,))[0]
    elsewhere = {"OK": succeeded, "UNKNOWN": names - len(counted) - succeeded}
    shown: List[Tuple[str, str]] = []
    for state in sorted(CHECK_STATES, key=STATE_RANK.__getitem__, reverse=True):
        room = limit - len(shown)
        if elsewhere.get(state) and room > 0:  # as many as may show, read in order: they join the counted
            walked = _first_names(store, state == "OK", counted.keys(), room, params)
            states.update((name, state) for name in walked)
            elsewhere[state] -= len(walked)
        shown += [(name, state) for name in sorted(name for name, named in states.items() if named == state)[:room]]
    rest = collections.Counter(states.values()) + collections.Counter(elsewhere)
    rest.subtract(state for _, state in shown)
    return sorted(name for name, _ in shown), {state: rest[state] for state in CHECK_STATES if rest[state]}


def _summary_now(collector: MetricsCollector, hours: float, limit: Optional[int], metrics: Optional[List[str]],
                 checks: Optional[Dict[str, float]], jobs: Optional[Dict[str, float]],
                 metrics_limit: int) -> Dict[str, Any]:
    """system_summary(), read in its caller's transaction."""
    since, until = collector.window(hours)
    health = recorded_health(collector.store, until, checks)
    targets, omitted_targets = _worst_first(collector, "sync", "target", since, until, limit)
    agents, omitted_agents = _worst_first(collector, "agent", "agent", since, until, limit)
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "generated_at": iso_time(until),
        "window_hours": hours,
        "status": summary_status(health),
        "sync": {target: dict(_sync_summary(collector, target, hours),
                              recent=recent_runs(collector, f"sync_{target}", since))
                 for target in targets},
        "circuit_breakers": _breaker_summaries(collector, collector.entities("breaker")["breaker"], since, until),
        "agents": {agent: dict(_agent_summary(collector, agent, hours),
                               recent=recent_runs(collector, f"agent_{agent}", since))
                   for agent in agents},
        "jobs": recent_jobs(collector.store, until, jobs),
        "metrics": own_series(collector, since, metrics, metrics_limit),
        "alerts": recent_alerts(collector.store, since),
        "health": health,
        "omitted": {section: counts for section, counts in (("sync", omitted_targets), ("agents", omitted_agents))
                    if counts},
    }


def system_summary(collector: MetricsCollector, hours: float = DEFAULT_WINDOW_HOURS, *,
                   limit: Optional[int] = None, metrics: Optional[List[str]] = None,
                   checks: Optional[Dict[str, float]] = None, jobs: Optional[Dict[str, float]] = None,
                   metrics_limit: int = SUMMARY_METRICS) -> Dict[str, Any]:
    """What the dashboard, ``--summary`` and the exporters show: sync targets, circuit breakers, agents,
    jobs, the user's own series, recent alerts and the checks' last verdicts, over the last ``hours``.
    With ``limit``, the sync and agent sections hold the ``limit`` in the worst state and ``omitted``
    counts the rest by state; ``metrics``, ``checks`` and ``jobs`` are what summary_options() reads from
    the configuration; without ``metrics``, the ``metrics_limit`` series written most recently show."""
    hours = window_hours(hours)
    with collector.store.reading():  # one snapshot: the lagging series and the last times agree
        return _summary_now(collector, hours, limit, metrics, checks, jobs, metrics_limit)


def _unreadable_summary(err: StorageError, hours: float, now: float) -> Dict[str, Any]:
    health = {"database": {"state": "CRITICAL", "summary": " ".join(str(err).split()), "checked_at": iso_time(now),
                           "age_s": 0.0, "stale": False}}
    return {"schema_version": SUMMARY_SCHEMA_VERSION, "generated_at": iso_time(now), "window_hours": hours,
            "status": summary_status(health), "sync": {}, "circuit_breakers": {}, "agents": {}, "jobs": {},
            "metrics": {}, "alerts": [], "health": health, "omitted": {}}


SERIES_CHART_POINTS = 600  # a series' window is drawn with at most this many points (means of equal slices)


def _chart_points(points: List[Tuple[float, float]], flagged: List[bool],
                  limit: int) -> Tuple[List[Tuple[float, float]], List[int]]:
    """At most ``limit`` points: each the mean time and value of an equal slice of ``points``, flagged
    when any point of its slice is."""
    if len(points) <= limit:
        return points, [i for i, flag in enumerate(flagged) if flag]
    drawn, marked = [], []
    for index in range(limit):
        low, high = index * len(points) // limit, (index + 1) * len(points) // limit
        part = points[low:high]
        drawn.append((math.fsum(t for t, _ in part) / len(part), math.fsum(v for _, v in part) / len(part)))
        if any(flagged[low:high]):
            marked.append(index)
    return drawn, marked


def series_detail(collector: MetricsCollector, key: str, hours: float = DEFAULT_WINDOW_HOURS,
                  limit: int = SERIES_CHART_POINTS) -> Optional[Dict[str, Any]]:
    """One series (by its series_key()) over the last ``hours``: count, min, max, avg and latest of its
    raw samples, its points for a chart (at most ``limit``), and which of them are anomalous against the
    window (the robust detector); None when there is no such series."""
    import json

    hours = window_hours(hours)
    since, until = collector.window(hours)
    name = series_name(key)
    found = [(series_id, labels) for series_id, labels_text in collector.store.query(
        "SELECT id, labels FROM series WHERE name = ?", (name,))
        for labels in [{} if labels_text == _NO_LABELS else json.loads(labels_text)]
        if series_key(name, labels) == key]
    if not found:
        return None
    series_id, labels = found[0]
    points = collector.store.query("SELECT ts, value FROM samples WHERE series_id = ? AND ts >= ? AND ts <= ? "
                                   "ORDER BY ts, seq", (series_id, since, until))
    values = [value for _, value in points]
    baseline = robust_baseline(sorted(values)) if len(values) >= DEFAULT_MIN_SAMPLES else None
    flagged = [baseline is not None and is_anomalous(value, baseline, DEFAULT_ROBUST_THRESHOLD) for value in values]
    drawn, marked = _chart_points(points, flagged, limit)
    return {"key": key, "name": name, "labels": labels, "generated_at": iso_time(until), "window_hours": hours,
            "count": len(values), "min": min(values, default=None), "max": max(values, default=None),
            "avg": math.fsum(v / len(values) for v in values) if values else None,
            "latest": values[-1] if values else None, "time": iso_time(points[-1][0]) if points else None,
            "anomalies": sum(flagged), "points": [[t, v] for t, v in drawn], "anomalous": marked}


def read_series(db_path: Optional[str], key: str, hours: float = DEFAULT_WINDOW_HOURS, *, now=time.time,
                limit: int = SERIES_CHART_POINTS) -> Optional[Dict[str, Any]]:
    """series_detail() of the store at ``db_path``, read without writing; None when there is no such
    series (a missing store has none); StorageError when the store cannot be read."""
    with MetricsCollector(resolve_db_path(db_path), readonly=True, now=now) as collector:
        return series_detail(collector, key, hours, limit)


def summary_options(config) -> Dict[str, Any]:
    """What the configuration says the faces show: the series of ``[dashboard] metrics``, the configured
    checks with their intervals, the jobs the job checks expect (read_summary's ``metrics``, ``checks``
    and ``jobs``)."""
    return {"metrics": dashboard_metrics(config), "checks": check_intervals(config), "jobs": job_schedules(config)}


def read_summary(db_path: Optional[str] = None, hours: float = DEFAULT_WINDOW_HOURS, *,
                 now=time.time, limit: Optional[int] = SUMMARY_SECTION_ROWS,
                 metrics: Optional[List[str]] = None, checks: Optional[Dict[str, float]] = None,
                 jobs: Optional[Dict[str, float]] = None, metrics_limit: int = SUMMARY_METRICS) -> Dict[str, Any]:
    """The summary of the store at ``db_path``, read without writing anything; at most ``limit`` sync
    targets and agents, the worst first (None: all of them).

    A missing store reads as an empty one. A store that cannot be read gives an
    empty summary too, whose ``database`` health is CRITICAL and says why.
    """
    hours = window_hours(hours)
    try:
        with MetricsCollector(resolve_db_path(db_path), readonly=True, now=now) as collector:
            return system_summary(collector, hours, limit=limit, metrics=metrics, checks=checks, jobs=jobs,
                                  metrics_limit=metrics_limit)
    except StorageError as err:
        return _unreadable_summary(err, hours, now())


## Export and serve ###########################################################

PROMETHEUS_PREFIX = "metasystem_"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
EXPORT_FORMATS = ("prometheus", "openmetrics")
# Endings that Prometheus's linter keeps for counters, histograms and summaries.
_RESERVED_ENDINGS = ("_total", "_count", "_sum", "_bucket", "_created", "_info")
_SAMPLE_ENDINGS = {"counter": "_total", "info": "_info"}

EXPORT_HEADERS = ("# HELP metasystem_", "# TYPE metasystem_")  # how every export begins, in both formats

DEFAULT_SERVE_PORT = 9473  # clear of node_exporter's 9100 and the Pushgateway's 9091

SERVE_REQUEST_TIMEOUT_S = 10.0  # for a client's whole request head: a slow one holds its thread this long at most
SERVE_MAX_CONNECTIONS = 256  # at once; more are answered 503 at once, without a thread
SERVE_BACKLOG = 128  # connections the kernel queues before accept: twenty scrapers at once are never reset
SERVE_PAGE_REFRESH_S = 30
DEFAULT_SERVE_CACHE_S = 5.0  # an answer is built at most this often, however many scrape it
# The kept answers, the oldest dropped first. Four pages are fixed (/, /api/summary, /metrics in its two
# formats); the rest are /series pages, one per series asked for. Only what was asked within the cache
# interval is worth keeping, so 64 entries hold the fixed pages and 60 series pages, and a client walking
# every series cycles through them instead of growing the memory.
SERVE_CACHE_MAX_ENTRIES = 64
# Bodies and their gzip forms. A series page is 40 KB at most (SERIES_CHART_POINTS points); /metrics is about
# 50 bytes a series, so both its formats for 200,000 series (~20 MB) and 60 series pages (~2.5 MB) fit. An
# answer bigger than this is served but not kept.
SERVE_CACHE_MAX_BYTES = 32 * 1024 * 1024
GZIP_MIN_BYTES = 1024  # smaller answers go as they are
DEFAULT_PUSH_JOB = "metasystem"
PUSH_METHODS = ("put", "post")

_PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1em;max-width:60em}table{border-collapse:collapse;width:100%}"
    "td,th{text-align:left;padding:.25em .5em;border-bottom:1px solid #ddd}.OK{color:#176f2c}"
    ".WARNING{color:#8a6100}.CRITICAL{color:#b00020;font-weight:bold}.UNKNOWN{color:#6a1b9a}"
    "svg{vertical-align:middle}h2{font-size:1.1em;margin-top:1.5em}"
)


class MetricFamily(NamedTuple):
    """One exported metric: its name, type and help, and its samples as (suffix, labels, value)."""

    name: str  # a counter's name is without _total and an info's without _info, as OpenMetrics writes them
    kind: str  # counter, gauge, summary or info (a gauge of 1 in the 0.0.4 format)
    help: str
    samples: List[Tuple[str, Dict[str, str], float]]


def _all_time(collector: MetricsCollector, name: str, now: float) -> Tuple[int, float]:
    """(count, sum) of every sample of ``name`` the store has kept, raw or rolled up."""
    stats = collector.get_metric_stats(name, hours=max(now, 1.0) / 3600.0)
    return stats["count"], (stats["avg"] * stats["count"] if stats["count"] else 0.0)


def _run_families(collector: MetricsCollector, what: str, noun: str, label: str, names: List[str],
                  now: float) -> List[MetricFamily]:
    """Runs of sync targets or agents: a counter by result, a duration summary, the last success time."""
    runs = MetricFamily(f"{PROMETHEUS_PREFIX}{what}_{noun}", "counter",
                        f"{what} {noun} recorded, by {label} and result", [])
    duration = MetricFamily(f"{PROMETHEUS_PREFIX}{what}_duration_seconds", "summary",
                            f"duration of {what} runs, by {label} and result", [])
    last = MetricFamily(f"{PROMETHEUS_PREFIX}{what}_last_success_timestamp_seconds", "gauge",
                        f"when the last successful {what} run was recorded", [])
    for name in names:
        for result in ("success", "failure"):
            count, total = _all_time(collector, f"{what}_{name}_{result}", now)
            labels = {label: name, "result": result}
            runs.samples.append(("_total", labels, count))
            duration.samples.extend([("_sum", labels, total), ("_count", labels, count)])
        latest = collector.last_sample_time(f"{what}_{name}_success")
        if latest is not None:
            last.samples.append(("", {label: name}, latest))
    return [runs, duration, last]


def _total_families(collector: MetricsCollector, what: str, label: str, names: List[str], parts: Tuple[str, ...],
                    now: float) -> List[MetricFamily]:
    """Counters of what runs reported: files synced, conflicts, items processed."""
    families = []
    for part in parts:
        family = MetricFamily(f"{PROMETHEUS_PREFIX}{what}_{part}", "counter", f"{part} reported by {what} runs", [])
        for name in names:
            family.samples.append(("_total", {label: name}, _all_time(collector, f"{what}_{name}_{part}", now)[1]))
        families.append(family)
    return families


def _breaker_families(collector: MetricsCollector, names: List[str], now: float) -> List[MetricFamily]:
    state = MetricFamily(f"{PROMETHEUS_PREFIX}circuit_breaker_state", "gauge",
                         "1 for the state each circuit breaker is in, 0 for the others", [])
    failures = MetricFamily(f"{PROMETHEUS_PREFIX}circuit_breaker_failures", "gauge",
                            "failures each circuit breaker counts now", [])
    for name, entry in _breaker_summaries(collector, names, now, now).items():
        for known in BREAKER_STATES:
            state.samples.append(("", {"breaker": name, "state": known}, 1.0 if entry["state"] == known else 0.0))
        if entry["failures"] is not None:
            failures.samples.append(("", {"breaker": name}, entry["failures"]))
    return [state, failures]


def _latest_values(store: Store, now: float, name: Optional[str] = None) -> List[Tuple[str, Dict[str, str], float]]:
    """(name, labels, latest value by LATEST_SQL) of every series of ``name``, or of every series when None."""
    import json

    rows = store.query(
        f"SELECT series.name, series.labels, (SELECT value FROM samples WHERE series_id = series.id {LATEST_SQL}) "
        "FROM series WHERE ? IS NULL OR series.name = ? ORDER BY series.name, series.labels", (now, name, name))
    return [(series_name, {} if labels == _NO_LABELS else json.loads(labels), value)
            for series_name, labels, value in rows if value is not None]


def _check_families(store: Store, now: float) -> List[MetricFamily]:
    state = MetricFamily(f"{PROMETHEUS_PREFIX}check_state", "gauge",
                         "the last state of each check: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN", [])
    checked = MetricFamily(f"{PROMETHEUS_PREFIX}check_last_run_timestamp_seconds", "gauge",
                           "when each check last ran", [])
    for name, ts, verdict in store.query("SELECT name, ts, state FROM check_results ORDER BY name"):
        state.samples.append(("", {"check": name}, float(CHECK_STATES.index(verdict))))
        checked.samples.append(("", {"check": name}, ts))
    value = MetricFamily(f"{PROMETHEUS_PREFIX}check_value", "gauge", "what each check measured last", [])
    for _, labels, latest in _latest_values(store, now, "check_value"):
        if "check" in labels:
            value.samples.append(("", {"check": labels["check"]}, latest))
    return [state, value, checked]


def _job_families(store: Store) -> List[MetricFamily]:
    success = MetricFamily(f"{PROMETHEUS_PREFIX}job_last_success_timestamp_seconds", "gauge",
                           "when each job last finished successfully", [])
    duration = MetricFamily(f"{PROMETHEUS_PREFIX}job_last_duration_seconds", "gauge",
                            "how long the last finished run of each job took", [])
    code = MetricFamily(f"{PROMETHEUS_PREFIX}job_last_exit_code", "gauge",
                        "the exit code of the last finished run of each job", [])
    for (job,) in store.query("SELECT DISTINCT job FROM job_runs ORDER BY job"):
        last = store.query_one("SELECT started, ended, exit_code FROM job_runs WHERE job = ? AND ended IS NOT NULL "
                               "AND outcome != 'skipped' ORDER BY started DESC LIMIT 1", (job,))
        good = store.query_one("SELECT max(ended) FROM job_runs WHERE job = ? AND outcome = 'success'", (job,))
        if good and good[0] is not None:
            success.samples.append(("", {"job": job}, good[0]))
        if last:
            duration.samples.append(("", {"job": job}, last[1] - last[0]))
            if last[2] is not None:
                code.samples.append(("", {"job": job}, float(last[2])))
    return [success, duration, code]


def _delivery_family(store: Store) -> MetricFamily:
    family = MetricFamily(f"{PROMETHEUS_PREFIX}alert_deliveries", "counter",
                          "alert deliveries by channel and outcome since the store began", [])
    for channel, outcome, count in store.query("SELECT channel, outcome, n FROM delivery_counts "
                                               "ORDER BY channel, outcome"):
        family.samples.append(("_total", {"channel": channel, "outcome": outcome}, float(count)))
    return family


def prometheus_name(name: str, taken: AbstractSet[str] = frozenset()) -> str:
    """``name`` as a valid metric name under the prefix: other characters become ``_``, an ending the
    linter keeps for counters and summaries gets ``_value``, and a name already ``taken`` a numbered suffix.
    ``taken`` is read, never copied: an export of N names stays linear."""
    import re

    valid = PROMETHEUS_PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", name)
    if valid.endswith(_RESERVED_ENDINGS):
        valid += "_value"
    candidate, number = valid, 2
    while candidate in taken:
        candidate, number = f"{valid}_{number}", number + 1
    return candidate


def prometheus_labels(labels: Dict[str, str]) -> Dict[str, str]:
    """Labels with valid names (``[a-zA-Z_][a-zA-Z0-9_]*``, no leading ``__``), empty values dropped."""
    import re

    out: Dict[str, str] = {}
    for key, value in sorted(labels.items()):
        valid = re.sub(r"[^a-zA-Z0-9_]", "_", key).lstrip("_") or "label"
        if valid[0].isdigit():
            valid = "_" + valid
        while valid in out:
            valid += "_"
        if value != "":
            out[valid] = str(value)
    return out


def _other_families(collector: MetricsCollector, taken: set) -> List[MetricFamily]:
    """The latest value of every series no family above exports, as a gauge under a valid name."""
    import re

    exported = [(label, re.compile(pattern)) for label, pattern in _EXPORTED_SERIES]
    by_name: Dict[str, List[Tuple[Dict[str, str], float]]] = {}
    for name, labels, value in _latest_values(collector.store, collector.now()):
        if labels and any(label in labels and pattern.fullmatch(name) for label, pattern in exported):
            continue
        by_name.setdefault(name, []).append((labels, value))
    families = []
    for name, series in sorted(by_name.items()):
        exported_name = prometheus_name(name, taken)
        taken.add(exported_name)
        families.append(MetricFamily(exported_name, "gauge", f"the latest value recorded as {name}",
                                     [("", prometheus_labels(labels), value) for labels, value in series]))
    return families


def metric_families(collector: MetricsCollector) -> List[MetricFamily]:
    """Everything the store knows, as Prometheus metrics: per-entity series carry labels
    (target, agent, breaker, check, job, channel), times are ``_timestamp_seconds`` gauges."""
    now = collector.now()
    entities = collector.entities("target", "agent", "breaker")
    families = _run_families(collector, "sync", "attempts", "target", entities["target"], now)
    families += _total_families(collector, "sync", "target", entities["target"], ("files", "conflicts"), now)
    families += _run_families(collector, "agent", "executions", "agent", entities["agent"], now)
    families += _total_families(collector, "agent", "agent", entities["agent"], ("items",), now)
    families += _breaker_families(collector, entities["breaker"], now)
    families += _check_families(collector.store, now)
    families += _job_families(collector.store)
    families.append(_delivery_family(collector.store))
    families += _other_families(collector, {family.name for family in families})
    build = MetricFamily(f"{PROMETHEUS_PREFIX}build", "info", "the version of metasystem-monitor exporting",
                         [("_info", {"version": __version__}, 1.0)])
    return [build] + [family for family in families if family.samples]


def _label_text(labels: Dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_label_value(value)}"' for key, value in labels.items()) + "}"


def _sample_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(float(value))


def exposition(families: List[MetricFamily], fmt: str = "prometheus") -> str:
    """The text format 0.0.4 (``prometheus``) or OpenMetrics 1.0 (``openmetrics``, ending in ``# EOF``)."""
    if fmt not in EXPORT_FORMATS:
        raise ValidationError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {_shown(fmt)}")
    openmetrics = fmt == "openmetrics"
    lines = []
    for family in families:
        help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
        if openmetrics:
            help_text = help_text.replace('"', '\\"')
            lines += [f"# TYPE {family.name} {family.kind}", f"# HELP {family.name} {help_text}"]
        else:
            # In the 0.0.4 format the metadata names the samples, _total or _info included.
            named = family.name + _SAMPLE_ENDINGS.get(family.kind, "")
            kind = "gauge" if family.kind == "info" else family.kind
            lines += [f"# HELP {named} {help_text}", f"# TYPE {named} {kind}"]
        for suffix, labels, value in family.samples:
            lines.append(f"{family.name}{suffix}{_label_text(labels)} {_sample_value(value)}")
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _cycles_collected_after() -> Iterator[None]:
    """Python's cycle collector held off for the block, and back as it was after: the exposition is
    many small objects holding no cycles, and the collector's passes over the growing heap made export
    superlinear in the names (1.6x ten times the time at 100,000 names; 1.2x without them)."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def export_text(collector: MetricsCollector, fmt: str = "prometheus") -> str:
    """The store's state in the chosen exposition format."""
    with _cycles_collected_after():
        return exposition(metric_families(collector), fmt)


def write_textfile(path: str, text: str) -> None:
    """Write ``text`` for node_exporter's textfile collector: a temporary file beside ``path`` whose name
    does not end in ``.prom``, then an atomic rename; a failed write leaves the old file and no temporary."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # node_exporter often runs as another user
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_SERVE_PORT}"


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse_busy(request: Any) -> None:
    """A 503 written without waiting: a client that does not read it loses it, not the server's time."""
    with contextlib.suppress(OSError):
        request.setblocking(False)
        request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Retry-After: 1\r\nContent-Length: 14\r\n\r\ntoo many busy\n")


class _HeadDeadlineReader(io.RawIOBase):
    """A socket's reads for a request head, each given only what is left of one deadline: a client that
    sends a byte every few seconds cannot keep a connection past it (a plain socket timeout restarts on
    every byte)."""

    def __init__(self, sock: Any, deadline: float, clock):
        self.sock, self.deadline, self.clock = sock, deadline, clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        import socket

        left = self.deadline - self.clock()
        if left <= 0:
            raise socket.timeout("the request head took longer than its deadline")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


def _bearer_matches(header: Optional[str], token: str) -> bool:
    """``Authorization: Bearer TOKEN``, the scheme in any letter case (RFC 7235), compared in constant time."""
    import hmac

    scheme, _, given = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                              token.encode("utf-8"))


def wants_openmetrics(accept: str) -> bool:
    """Whether an Accept header prefers OpenMetrics to the 0.0.4 text: its q is above 0 and not below the
    text format's (``text/plain`` or ``*/*``), as Prometheus itself negotiates.

    >>> wants_openmetrics("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4")
    True
    >>> wants_openmetrics("application/openmetrics-text;q=0")
    False
    """
    weights = {}
    for item in accept.split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = decimal_number(value)
                except ValueError:
                    q = 0.0
        weights[kind.lower()] = max(q, weights.get(kind.lower(), 0.0)) if math.isfinite(q) else 0.0
    openmetrics = weights.get("application/openmetrics-text", 0.0)
    return openmetrics > 0 and openmetrics >= max(weights.get("text/plain", 0.0), weights.get("*/*", 0.0))


class _Markup(str):
    """Text already made HTML (an SVG), not to be escaped again."""


def _html(value: Any) -> str:
    import html

    return html.escape(inert_text("-" if value is None else str(value)), quote=True)


def _page_table(title: str, columns: Tuple[str, ...], rows: List[tuple], states: bool = True) -> List[str]:
    """A section: its heading, and a table whose first column (with ``states``) is a state word, or a
    (word, state) pair, colored by the state's class."""
    out = [f"<h2>{_html(title)}</h2>"]
    if not rows:
        return out + ["<p>none</p>"]
    out.append("<table><tr>" + "".join(f"<th>{_html(column)}</th>" for column in columns) + "</tr>")
    for row in rows:
        state, cells = (row[0], row[1:]) if states else (None, row)
        word, style = state if isinstance(state, tuple) else (state, state)
        shown = "".join(f"<td>{cell if isinstance(cell, _Markup) else _html(cell)}</td>" for cell in cells)
        first = "" if state is None else f'<td class="{_html(style)}">{_html(word)}</td>'
        out.append(f"<tr>{first}{shown}</tr>")
    return out + ["</table>"]


def _page_percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _page_seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f} s"


def sparkline_svg(recent: Dict[str, List[Any]], width: int = 120, height: int = 24) -> str:
    """The recent durations as an inline SVG line; anomalous runs as red dots, failed ones as hollow."""
    values = recent.get("durations") or []
    if not values:
        return _Markup("")
    low, high = min(values), max(values)
    step = width / max(len(values) - 1, 1)

    def point(index: int) -> Tuple[float, float]:
        scaled = (values[index] - low) / (high - low) if high > low else 0.5
        return round(index * step, 1), round(height - 2 - scaled * (height - 4), 1)

    points = " ".join(f"{x},{y}" for x, y in map(point, range(len(values))))
    marks = "".join(f'<circle cx="{point(i)[0]}" cy="{point(i)[1]}" r="2.5" fill="#b00020"/>'
                    for i in recent.get("anomalous", ()) if i < len(values))
    marks += "".join(f'<circle cx="{point(i)[0]}" cy="{point(i)[1]}" r="2" fill="none" stroke="#b00020"/>'
                     for i in recent.get("failed", ()) if i < len(values))
    return _Markup(f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
                   f'aria-label="recent durations"><polyline points="{points}" fill="none" stroke="#1565c0" '
                   f'stroke-width="1.5"/>{marks}</svg>')


def line_chart_svg(detail: Dict[str, Any], width: int = 720, height: int = 240) -> str:
    """A series' window as an SVG line chart: time across, value up, its lowest and highest values and
    the window's ends written on the axes, anomalous points as red dots."""
    points = detail["points"]
    if not points:
        return _Markup("<p>no samples in this window</p>")
    left, bottom, top = 64, height - 20, 8
    since = epoch_of(detail["generated_at"]) - detail["window_hours"] * 3600.0
    until = epoch_of(detail["generated_at"])
    low, high = min(v for _, v in points), max(v for _, v in points)

    def place(t: float, v: float) -> Tuple[float, float]:
        x = left + (t - since) / max(until - since, 1e-9) * (width - left - 4)
        y = (top + bottom) / 2 if high == low else bottom - (v - low) / (high - low) * (bottom - top)
        return round(x, 1), round(y, 1)

    placed = [place(t, v) for t, v in points]
    line = " ".join(f"{x},{y}" for x, y in placed)
    dots = "".join(f'<circle cx="{placed[i][0]}" cy="{placed[i][1]}" r="3" fill="#b00020"/>'
                   for i in detail["anomalous"])
    labels = (f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{_html(series_figure(detail["name"], high))}'
              f'</text><text x="{left - 4}" y="{bottom}" text-anchor="end">{_html(series_figure(detail["name"], low))}'
              '</text>'
              f'<text x="{left}" y="{height - 4}">{_html(local_time(since))}</text>'
              f'<text x="{width - 4}" y="{height - 4}" text-anchor="end">{_html(local_time(until))}</text>')
    return _Markup(f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
                   f'aria-label="{_html(detail["key"])} over {detail["window_hours"]:g} hours" font-size="11">'
                   f'<path d="M{left},{top} V{bottom} H{width - 4}" fill="none" stroke="#999"/>{labels}'
                   f'<polyline points="{line}" fill="none" stroke="#1565c0" stroke-width="1.5"/>{dots}</svg>')


def series_page(detail: Dict[str, Any]) -> str:
    """One series on its own page: its chart over the window, with count, min, max, avg and anomalies."""
    def number(value: Optional[float]) -> str:
        return series_figure(detail["name"], value)

    key = _html(detail["key"])
    latest = f"{number(detail['latest'])} at {local_time(detail['time'])}" if detail["time"] else "none"
    rows = (("latest", latest), ("min", number(detail["min"])), ("max", number(detail["max"])),
            ("avg", number(detail["avg"])), ("samples", f"{detail['count']:,}"),
            ("anomalies", f"{detail['anomalies']:,}"))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{SERVE_PAGE_REFRESH_S}">',
        f"<title>metasystem: {key}</title><style>{_PAGE_STYLE}</style></head><body>",
        f'<p><a href="./">metasystem monitor</a></p><h1>{key}</h1>',
        f"<p>updated {_html(local_time(detail['generated_at'], seconds=True, zone=True))}, "
        f"window {detail['window_hours']:g} h</p>",
        line_chart_svg(detail),
        "<table>" + "".join(f"<tr><th>{_html(name)}</th><td>{_html(value)}</td></tr>" for name, value in rows)
        + "</table>",
        "</body></html>"]) + "\n"


def _series_link(key: str) -> str:
    from urllib.parse import quote

    return _Markup(f'<a href="series?key={_html(quote(key, safe=""))}">{_html(key)}</a>')


def _page_omitted(summary: Dict[str, Any], section: str, noun: str) -> List[str]:
    counts = summary.get("omitted", {}).get(section) or {}
    if not counts:
        return []
    states = ", ".join(f'<span class="{state}">{count:,} {state}</span>' for state, count in counts.items())
    return [f"<p>and {sum(counts.values()):,} more {noun}: {states}</p>"]


def status_page(summary: Dict[str, Any]) -> str:
    """The summary as one HTML page: no script, inline SVG sparklines, readable on a phone, refreshing
    itself. Every text from the store is escaped and its control characters shown inert."""
    status = str(summary["status"]).upper()
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{SERVE_PAGE_REFRESH_S}">',
        f"<title>metasystem: {_html(status)}</title><style>{_PAGE_STYLE}</style></head><body>",
        f'<h1>metasystem monitor: <span class="{_html(status)}">{_html(status)}</span></h1>',
        f"<p>updated {_html(local_time(summary['generated_at'], seconds=True, zone=True))}, "
        f"window {summary['window_hours']:g} h</p>",
    ]
    if summary["sync"] or summary.get("omitted", {}).get("sync"):  # a section with nothing in it is hidden
        parts += _page_table("Sync operations", ("state", "target", "success", "runs", "average", "recent"), [
            (rate_state(entry["success_rate"]), name, _page_percent(entry["success_rate"]), entry["attempts"],
             _page_seconds(entry["avg_duration"]), sparkline_svg(entry["recent"]))
            for name, entry in summary["sync"].items()])
        parts += _page_omitted(summary, "sync", "sync targets")
    if summary["circuit_breakers"]:
        parts += _page_table("Circuit breakers", ("state", "breaker", "is", "failures", "since"), [
            (BREAKER_STATE_WORDS.get(entry["state"], "UNKNOWN"), name,
             entry["state"], entry["failures"], local_time(entry["since"]))
            for name, entry in summary["circuit_breakers"].items()])
    if summary["agents"] or summary.get("omitted", {}).get("agents"):
        parts += _page_table("Agents", ("state", "agent", "success", "runs", "average", "latest", "recent"), [
            (rate_state(entry["success_rate"]), name, _page_percent(entry["success_rate"]), entry["executions"],
             _page_seconds(entry["avg_duration"]), _page_seconds(entry["latest_duration"]),
             sparkline_svg(entry["recent"]))
            for name, entry in summary["agents"].items()])
        parts += _page_omitted(summary, "agents", "agents")
    if summary.get("jobs"):
        parts += _page_table("Jobs", ("state", "job", "last run", "result", "took", "last success"), [
            (entry["state"], name, local_time(entry["started"]), entry["outcome"] + (
                f" ({entry['exit_code']})" if entry["exit_code"] not in (None, 0) else "") + (
                f", late: expected every {format_span(entry['expected_every_s'], exact=True)}"
                if entry.get("late") and entry.get("started") else ""),
             _page_seconds(entry["duration_s"]), local_time(entry["last_success"]))
            for name, entry in summary["jobs"].items()])
    if summary.get("metrics"):
        parts += _page_table("Metrics", ("series", "latest", "at", "recent"), [
            (_series_link(key), series_figure(entry["name"], entry["latest"]), local_time(entry["time"]),
             sparkline_svg({"durations": entry["recent"]["values"], "failed": [],
                            "anomalous": entry["recent"]["anomalous"]}))
            for key, entry in summary["metrics"].items()], states=False)
    parts += _page_table("Recent alerts", ("severity", "time", "title", "channels"), [
        (("RESOLVED", "OK") if alert["kind"] == "resolved" else ("ACKED", "OK") if alert["kind"] == "acknowledged"
         else SEVERITY_STATE_WORDS.get(alert["severity"], "UNKNOWN"),
         local_time(alert["time"]), alert["title"] + (f" ({alert['message']})" if alert.get("message") else ""),
         ", ".join(f"{name} {outcome}" for name, outcome in alert["channels"].items()))
        for alert in summary["alerts"]])
    parts += _page_table("System health", ("state", "check", "checked", "summary"), [
        (entry["state"], name, check_age(entry), entry["summary"]) for name, entry in summary["health"].items()])
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def serve_path(path: str, accept: str, db_path: str, hours: float, now,
               options: Optional[Dict[str, Any]] = None, series: str = "") -> Tuple[int, str, bytes]:
    """(status, content type, body) of one GET: what the server answers, without the server; ``options``
    are summary_options() of the configuration, ``series`` the key a /series page asks for."""
    if path == "/healthz":
        return 200, "text/plain; charset=utf-8", b"ok\n"
    try:
        if path == "/metrics":
            openmetrics = wants_openmetrics(accept)
            with MetricsCollector(db_path, readonly=True, now=now) as collector:
                text = export_text(collector, "openmetrics" if openmetrics else "prometheus")
            return 200, OPENMETRICS_CONTENT_TYPE if openmetrics else PROMETHEUS_CONTENT_TYPE, text.encode("utf-8")
        if path == "/api/summary":
            summary = read_summary(db_path, hours, now=now, **(options or {}))
            body = json_text(summary) + "\n"
            return 200, "application/json", body.encode("utf-8")
        if path == "/":
            summary = read_summary(db_path, hours, now=now, **(options or {}))
            return 200, "text/html; charset=utf-8", status_page(summary).encode("utf-8")
        if path in ("/series", "/api/series"):
            detail = read_series(db_path, series, hours, now=now) if series else None
            if detail is None:
                return 404, "text/plain; charset=utf-8", b'no such series (series?key=NAME{label="value",...})\n'
            if path == "/api/series":
                return 200, "application/json", (json_text(detail) + "\n").encode("utf-8")
            return 200, "text/html; charset=utf-8", series_page(detail).encode("utf-8")
    except StorageError as err:
        return 503, "text/plain; charset=utf-8", (" ".join(str(err).split()) + "\n").encode("utf-8")
    return 404, "text/plain; charset=utf-8", b"not found\n"


class _Answer:
    """One built answer: when its build began (by the cache's clock), what serve_path() gave, and its gzip
    form once a client has asked for it (made under ``lock``, once)."""

    def __init__(self, at: float, status: int, content_type: str, body: bytes):
        import threading

        self.at, self.status, self.content_type, self.body = at, status, content_type, body
        self.gzip: Optional[bytes] = None
        self.lock = threading.Lock()

    def size_bytes(self) -> int:
        return len(self.body) + len(self.gzip or b"")


class _Build:
    """An answer being built: the clients that ask for the same key meanwhile wait for ``done``."""

    def __init__(self):
        import threading

        self.done = threading.Event()
        self.answer: Optional[_Answer] = None  # still None when done: the build raised


class _Answers:
    """A server's answers by key, each built by ``build(*args)`` (serve_path) at most once per ``max_age_s``
    (by ``clock``) however many clients ask at once: those asking for a key being built wait for that
    build, and share its answer. Different keys build at the same time: ``_lock`` guards the two tables,
    never a build. Only successful answers are kept, at most ``max_entries`` of them and ``max_bytes``
    (bodies and gzip forms), the oldest dropped first."""

    def __init__(self, max_age_s: float, clock, build=serve_path, *, max_entries: int = SERVE_CACHE_MAX_ENTRIES,
                 max_bytes: int = SERVE_CACHE_MAX_BYTES):
        import collections
        import threading

        self.max_age_s, self.clock, self.build = max_age_s, clock, build
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._lock = threading.Lock()
        self._kept: Dict[Tuple[str, str], _Answer] = collections.OrderedDict()  # the oldest first
        self._building: Dict[Tuple[str, str], _Build] = {}
        self.kept_bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def keys(self) -> List[Tuple[str, str]]:
        """The keys kept, the oldest first."""
        with self._lock:
            return list(self._kept)

    def get(self, key: Tuple[str, str], *args: Any) -> Tuple[_Answer, float]:
        """The answer for ``key`` and its age in seconds, built by ``build(*args)`` when no fresh one is kept."""
        while True:
            with self._lock:
                at = self.clock()
                kept = self._kept.get(key)
                if kept is not None and at - kept.at < self.max_age_s:
                    return kept, at - kept.at
                pending = self._building.get(key)
                if pending is None:
                    pending = self._building[key] = _Build()
                    break
            pending.done.wait()
            if pending.answer is not None:
                return pending.answer, max(0.0, self.clock() - pending.answer.at)
            # That build raised (in its own thread, which reports it): this client builds, or waits, anew.
        try:
            pending.answer = _Answer(at, *self.build(*args))
        finally:
            with self._lock:
                del self._building[key]
                if pending.answer is not None and pending.answer.status == 200:
                    self._keep(key, pending.answer)
            pending.done.set()
        return pending.answer, 0.0

    def gzipped(self, key: Tuple[str, str], answer: _Answer) -> bytes:
        """The gzip form of ``answer`` (got for ``key``), compressed once and kept with it."""
        import gzip

        with answer.lock:
            if answer.gzip is None:
                packed = gzip.compress(answer.body, mtime=0)
                with self._lock:
                    answer.gzip = packed
                    if self._kept.get(key) is answer:
                        self.kept_bytes += len(packed)
                        self._drop_oldest()
            return answer.gzip

    def _keep(self, key: Tuple[str, str], answer: _Answer) -> None:
        old = self._kept.pop(key, None)
        if old is not None:
            self.kept_bytes -= old.size_bytes()
        if answer.size_bytes() <= self.max_bytes:
            self._kept[key] = answer
            self.kept_bytes += answer.size_bytes()
        self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Drop kept answers, the oldest first, while there are too many or they are stale."""
        at = self.clock()
        for key, answer in list(self._kept.items()):
            if (len(self._kept) <= self.max_entries and self.kept_bytes <= self.max_bytes
                    and at - answer.at < self.max_age_s):
                break
            del self._kept[key]
            self.kept_bytes -= answer.size_bytes()


def _gzip_wanted(accept_encoding: str) -> bool:
    """True when Accept-Encoding names gzip (or *) without q=0."""
    for part in accept_encoding.lower().split(","):
        name, _, params = part.strip().partition(";")
        weight = params.replace(" ", "").partition("q=")[2]
        if name.strip() in ("gzip", "*") and weight not in ("0", "0.0", "0.00", "0.000"):
            return True
    return False


def _handler_class(db_path: str, hours: float, token: Optional[str], now, clock, answers: _Answers,
                   options: Optional[Dict[str, Any]]) -> Any:
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        timeout = SERVE_REQUEST_TIMEOUT_S
        server_version = f"metasystem-monitor/{__version__}"
        protocol_version = "HTTP/1.0"

        def setup(self) -> None:
            super().setup()
            deadline = clock() + SERVE_REQUEST_TIMEOUT_S
            self.rfile = io.BufferedReader(_HeadDeadlineReader(self.connection, deadline, clock))

        def do_GET(self) -> None:
            self._answer(body_wanted=True)

        def do_HEAD(self) -> None:
            self._answer(body_wanted=False)

        def _answer(self, body_wanted: bool) -> None:
            from urllib.parse import parse_qs, urlsplit

            self.connection.settimeout(SERVE_REQUEST_TIMEOUT_S)  # the head is in: writing has its own time
            path, query = urlsplit(self.path)[2:4]
            series = (parse_qs(query).get("key") or [""])[0] if path in ("/series", "/api/series") else ""
            headers: Dict[str, str] = {}
            if path == "/healthz":  # straight away: never behind a build, nor the answers' lock
                status, content_type, body = serve_path(path, "", db_path, hours, now)
            elif token and not _bearer_matches(self.headers.get("Authorization"), token):
                status, content_type, body = 401, "text/plain; charset=utf-8", b"a bearer token is needed\n"
                headers["WWW-Authenticate"] = 'Bearer realm="metasystem"'
            else:
                accept = self.headers.get("Accept", "")
                key = (path, "openmetrics" if path == "/metrics" and wants_openmetrics(accept) else series)
                answer, age = answers.get(key, path, accept, db_path, hours, now, options, series)
                status, content_type, body = answer.status, answer.content_type, answer.body
                if status == 200:
                    headers.update({"Age": str(int(age)), "Vary": "Accept-Encoding"})
                    if len(body) >= GZIP_MIN_BYTES and _gzip_wanted(self.headers.get("Accept-Encoding", "")):
                        body, headers["Content-Encoding"] = answers.gzipped(key, answer), "gzip"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if body_wanted:
                with contextlib.suppress(ConnectionError):  # a client that left: nothing to tell it
                    self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("serve: %s %s", self.address_string(), format % args)

    return Handler


def make_server(listen: str, db_path: str, *, hours: float = DEFAULT_WINDOW_HOURS, token: Optional[str] = None,
                now=time.time, clock=time.monotonic, max_connections: int = SERVE_MAX_CONNECTIONS,
                cache_s: float = DEFAULT_SERVE_CACHE_S, options: Optional[Dict[str, Any]] = None,
                _answers: Optional[_Answers] = None) -> Any:
    """A threaded HTTP server of the store: ``/metrics``, ``/healthz``, ``/api/summary``, ``/`` (the
    status page) and ``/series`` (one series' page); ``options`` are summary_options() of the
    configuration. Off loopback it needs a bearer token; ``/healthz`` never does, and never waits. Each
    answer is built at most once per ``cache_s`` (its ``Age`` header says how old it is), different ones
    at the same time, and gzipped for a client that asks; at most SERVE_CACHE_MAX_ENTRIES answers and
    SERVE_CACHE_MAX_BYTES are kept. ``_answers`` (tests) replaces the answers and their builder.

    A client has SERVE_REQUEST_TIMEOUT_S (by ``clock``) for its whole request head, however it trickles
    it; at most ``max_connections`` are served at once, and the next ones get a 503 straight away.
    """
    import socket
    import threading
    from http.server import ThreadingHTTPServer

    host, port = parse_listen(listen)
    if not is_loopback(host) and not token:
        raise ConfigError(f"refusing to serve on {listen} (not loopback) without a token: set [serve] token_file")
    slots = threading.BoundedSemaphore(max_connections)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = SERVE_BACKLOG
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def process_request(self, request: Any, client_address: Any) -> None:
            if not slots.acquire(blocking=False):
                _refuse_busy(request)
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                # Freed before the close, not after: a client that has seen the end of its answer and comes
                # straight back must find its slot free, not race this thread for it.
                slots.release()
                self.shutdown_request(request)

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.debug("serve: a request from %s failed", client_address[0], exc_info=True)

    answers = _Answers(cache_s, clock) if _answers is None else _answers
    return Server((host, port), _handler_class(db_path, hours, token, now, clock, answers, options))


def _grouping_segment(label: str, value: str) -> str:
    import base64
    from urllib.parse import quote

    if value == "" or "/" in value:
        encoded = base64.urlsafe_b64encode(value.encode("utf-8")).decode("ascii") or "="
        return f"/{label}@base64/{encoded}"
    return f"/{label}/{quote(value, safe='')}"


def push_url(gateway: str, job: str, instance: str) -> str:
    """The Pushgateway URL of the group (job, instance); a value holding ``/`` or empty goes as ``@base64``."""
    return gateway.rstrip("/") + "/metrics" + _grouping_segment("job", job) + _grouping_segment("instance", instance)


def push(gateway: str, text: Optional[str], *, job: str = DEFAULT_PUSH_JOB, instance: str, method: str = "put",
         timeout_s: float = DEFAULT_ALERT_TIMEOUT_S) -> int:
    """PUT or POST ``text`` to the group (job, instance) of a Pushgateway, or DELETE the group when
    ``text`` is None; the HTTP status, or MonitorError with one line (the URL masked)."""
    try:
        url, headers = _basic_auth(push_url(gateway, job, instance))
    except ValueError as err:
        raise ValidationError(f"--gateway: {err}") from None
    verb = "DELETE" if text is None else method.upper()
    body = None if text is None else text.encode("utf-8")
    if text is not None:
        headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
    try:
        reply = http_request(verb, url, body, headers, timeout_s, tls_context(True) if url.startswith("https:")
                             else None)
    except (OSError, ValueError) as err:
        raise MonitorError(Masker(_url_fragments(gateway)).scrub(f"push to {mask_url(url)} failed: {_error_text(err)}")) from None
    if reply.status not in (200, 202):
        detail = _one_line(reply.body[:200].decode("utf-8", "replace"))
        raise MonitorError(Masker(_url_fragments(gateway)).scrub(f"push to {mask_url(url)} failed: HTTP {reply.status}"
                                                   + (f": {detail}" if detail else "")))
    return reply.status


## CLI ########################################################################

EXIT_CODE_TABLE = (  # what --help, help exit-codes and the man page say
    ("0", "success (recording commands print nothing)"),
    ("1", "runtime error, one line on stderr (-v adds the traceback); a bad configuration"),
    ("2", "usage error: a bad option, argument or input value"),
    ("3", "alert, alert-test: some channels failed"),
    ("4", "alert, alert-test: no channel delivered"),
    ("check", "0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the Monitoring Plugins codes)"),
    ("run", "the command's own code; 124 on timeout, 75 while its breaker is open"),
    ("130", "interrupted (SIGINT)"),
)
_EXIT_CODES_HELP = "exit codes:\n" + "\n".join(f"  {code:<5}  {meaning}" for code, meaning in EXIT_CODE_TABLE)

_GLOBAL_OPTIONS_WITH_VALUE = ("--db", "--config")

_PATH_ARGUMENTS = ("db", "config", "output")  # file names: their bytes stay as the system gave them


def _open_collector(args, *, readonly: bool, config: Any = None) -> MetricsCollector:
    """The store of this run as ``[storage]`` says; a problem there is a ConfigError. Given the ``config``
    a run has read already (check, run: they must go on whatever is wrong), the store takes what they
    record while ``[storage]`` has a problem, but keeps all it has (no roll-up, no cleanup by horizons
    nobody chose), and says so."""
    if config is None:
        config = load_config(args.config_path, required=args.config_named)
        return MetricsCollector(args.db_path, readonly=readonly, now=args.now, **storage_settings(config))
    settings = storage_or_defaults(config)
    if not settings["maintain"]:
        try:
            storage_settings(config)
        except ConfigError as err:
            log.warning("%s; the store keeps everything (no roll-up or cleanup) until that is mended", err)
    return MetricsCollector(args.db_path, readonly=readonly, now=args.now, **settings)


def error_line(text: str) -> str:
    """An error as one line of at most ERROR_LINE_CHARS, with nothing in it a terminal would obey."""
    return inert_text(truncate(" ".join(text.split()), ERROR_LINE_CHARS))


def _print_json(document: Dict[str, Any]) -> None:
    print(json_text(document))


_STATS_IN_UNIT = ("avg", "min", "max", "stddev", "latest")  # and the percentiles: in the metric's own unit


def _format_value(value: Any, name: str = "") -> str:
    """A statistic for people: in full (15 significant digits), and in bytes or a duration as well when
    the metric's ``name`` says it holds them (``_bytes``, ``_seconds``)."""
    if value is None or value == []:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, float) and not math.isfinite(value):
        return "out of range"
    if isinstance(value, float):
        text = f"{value:.15g}"
        if name.endswith("_bytes"):
            return f"{text} ({format_bytes(value)})"
        if name.endswith("_seconds"):
            return f"{text} ({format_span(value)})"
        return text
    return str(value)


def _parse_number(text: str, what: str) -> float:
    try:
        number = decimal_number(text)
    except ValueError:
        raise ValidationError(f"{what} {_shown(text)} is not a number") from None
    return finite_number(number, what)


def _parse_labels(pairs: Optional[List[str]]) -> Optional[Dict[str, str]]:
    if not pairs:
        return None
    labels: Dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValidationError(f"label {_shown(pair)} is not KEY=VALUE")
        if key in labels:
            raise ValidationError(f"label {key!r} given twice")
        labels[key] = value
    return labels


def parse_graphite_line(line: str, number: int) -> Sample:
    """One line of Graphite's plaintext protocol: ``name[;tag=value...] value [timestamp]``."""
    fields = line.split()
    if len(fields) not in (2, 3):
        raise ValidationError(f"line {number}: expected 'name value [timestamp]', got {_shown(line)}")
    path, *tags = fields[0].split(";")
    try:
        labels = _parse_labels(tags)
        value = _parse_number(fields[1], "value")
        timestamp = _parse_number(fields[2], "timestamp") if len(fields) == 3 else None
        validate_name(path)
        canonical_labels(labels)
    except ValidationError as err:
        raise ValidationError(f"line {number}: {err}") from None
    return Sample(path, value, labels, timestamp)


def read_graphite(stream) -> List[Sample]:
    """Every sample of a Graphite plaintext stream (bytes); the first bad line raises."""
    samples = []
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationError(f"line {number}: not UTF-8 text") from None
        if line.strip():
            samples.append(parse_graphite_line(line, number))
    return samples


def cmd_record(args) -> int:
    if args.name == "-":
        if args.value is not None or args.label or args.time is not None:
            raise ValidationError("'record -' reads name, value and time from stdin; give no other arguments")
        samples = read_graphite(sys.stdin.buffer)
    else:
        if args.value is None:
            raise ValidationError("record needs a VALUE after the name (or '-' to read stdin)")
        timestamp = None if args.time is None else _parse_number(args.time, "--time")
        samples = [Sample(args.name, _parse_number(args.value, "value"), _parse_labels(args.label), timestamp)]
    with _open_collector(args, readonly=False) as collector:
        collector.record_many(samples)
    return EXIT_OK


def cmd_record_sync(args) -> int:
    with _open_collector(args, readonly=False) as collector:
        collector.record_sync_metric(
            args.target,
            args.success,
            _parse_number(args.duration, "--duration"),
            files_synced=_parse_number(args.files, "--files"),
            conflicts=_parse_number(args.conflicts, "--conflicts"),
        )
    return EXIT_OK


def cmd_record_agent(args) -> int:
    with _open_collector(args, readonly=False) as collector:
        collector.record_agent_metric(
            args.name,
            _parse_number(args.duration, "--duration"),
            args.success,
            items_processed=_parse_number(args.items, "--items"),
        )
    return EXIT_OK


def _warn_if_never_recorded(collector: MetricsCollector, name: str, endings: Tuple[str, ...] = ("",)) -> None:
    """One stderr line when no series is called ``name`` (+ one of ``endings``): a typo, or the name
    another command takes. The exit code stays 0: scripts rely on it."""
    import difflib

    known = collector.metric_names()
    if any(name + ending in known for ending in endings):
        return
    if endings != ("",):  # a prefix: the names it is a prefix of
        known = sorted({known_name[:-len(ending)] for known_name in known for ending in endings
                        if ending and known_name.endswith(ending)})
    longer = [known_name for known_name in known if known_name.startswith(name + "_")]
    close = ([name + "_success"] if name + "_success" in longer else longer[:1]
             ) or difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    log.warning("no samples for %r%s ('metrics' lists the names)", name, hint)


def cmd_stats(args) -> int:
    validate_name(args.name, "metric name")  # no such name can be stored, nor echoed raw
    with _open_collector(args, readonly=True) as collector:
        stats = collector.get_metric_stats(args.name, args.hours, percentiles=args.percentiles)
        if stats["count"] == 0:
            _warn_if_never_recorded(collector, args.name)
    if args.json:
        _print_json(dict(stats, name=args.name, hours=args.hours))
        return EXIT_OK
    print(f"{args.name} (last {args.hours:g}h, times {zone_name(_moment(args.now()))})")
    for key, value in stats.items():
        value = local_time(value, seconds=True) if key.endswith("_time") and value else value
        print(f"  {key:<11} {_format_value(value, args.name if key in _STATS_IN_UNIT or key[1:].isdigit() else '')}")
    return EXIT_OK


def cmd_success_rate(args) -> int:
    validate_name(args.name, "metric name")  # no such name can be stored, nor echoed raw
    with _open_collector(args, readonly=True) as collector:
        successes, attempts = collector.success_counts(args.name, args.hours)
        if attempts == 0:
            _warn_if_never_recorded(collector, args.name, ("_success", "_failure"))
    rate = None if attempts == 0 else 100.0 * successes / attempts
    if args.json:
        _print_json({"name": args.name, "hours": args.hours, "success_rate": rate, "attempts": attempts})
    elif rate is None:
        print(f"{args.name}: no attempts in the last {args.hours:g}h")
    else:
        print(f"{args.name}: {rate:.1f}% of {attempts} attempts in the last {args.hours:g}h")
    return EXIT_OK


def cmd_anomalies(args) -> int:
    validate_name(args.name, "metric name")  # no such name can be stored, nor echoed raw
    threshold = None if args.threshold is None else _parse_number(args.threshold, "--threshold")
    with _open_collector(args, readonly=True) as collector:
        report = collector.detect_anomalies(args.name, args.hours, method=args.method, threshold=threshold,
                                            min_samples=args.min_samples)
        if report.n == 0:
            _warn_if_never_recorded(collector, args.name)
    if args.json:
        _print_json(dict(report.as_json(), name=args.name, hours=args.hours))
        return EXIT_OK
    heading = f"{args.name} (last {args.hours:g}h, times {zone_name(_moment(args.now()))})"
    if report.insufficient_data:
        print(f"{heading}: insufficient data: {report.n} samples, at least {report.min_samples} needed")
        return EXIT_OK
    described = ", ".join(f"{key} {value:g}" for key, value in report.baseline.describe().items() if key != "n")
    noun = "anomaly" if len(report) == 1 else "anomalies"
    print(f"{heading}: {len(report)} {noun} among {report.n} samples ({report.method}, threshold {report.threshold:g}; "
          f"{described})")
    for point in report:
        print(f"  {local_time(point['time'], seconds=True)}  {point['value']:.15g}  {point['reason']}")
    return EXIT_OK


def cmd_cleanup(args) -> int:
    with _open_collector(args, readonly=False) as collector:
        report = collector.cleanup()
        horizons = {"retention_days": collector.retention_days, "rollup_hourly_days": collector.hourly_days,
                    "rollup_daily_days": collector.daily_days}
    if args.json:
        _print_json(dict(report, **horizons))
    elif not args.quiet:
        print(f"cleanup: rolled up {report['rolled_up_hours']} hours; deleted {report['deleted_samples']} raw samples "
              f"older than {horizons['retention_days']:g} days; folded {report['folded_hours']} hours into "
              f"{report['daily_rollups']} days; deleted {report['deleted_days']} daily rollups, "
              f"{report['deleted_retry_records']} retry records, {report['deleted_job_runs']} job runs and "
              f"{report['deleted_alerts']} alerts of the history")
    return EXIT_OK


def cmd_collect(args) -> int:
    """The machine's figures into the store in one transaction; silent on success, as cron wants."""
    config = load_config(args.config_path, required=args.config_named)
    section = dict(config["collect"]) if config.has_section("collect") else {}
    problems: List[Tuple[str, str, str]] = []
    chosen = {key: _bool_setting(section, "collect", key, True, problems) for key in COLLECT_KEYS}
    if problems:
        raise ConfigError(f"[collect] {problems[0][1]}: {problems[0][2]}")
    with _open_collector(args, readonly=False) as collector:
        previous = collector.store.meta_times("collect_cpu_total", "collect_cpu_idle")
        samples, ticks = host_samples(chosen, previous if None not in previous else None, args.now())
        with collector.writing(samples) as conn:
            if ticks is not None:
                _set_meta(conn, "collect_cpu_total", float(ticks[0]))
                _set_meta(conn, "collect_cpu_idle", float(ticks[1]))
    return EXIT_OK


def cmd_breakers(args) -> int:
    with _open_collector(args, readonly=True) as collector:
        breakers = list_breakers(collector.store, args.now())
    if args.json:
        _print_json({"breakers": breakers})
        return EXIT_OK
    if not breakers and sys.stdout.isatty():  # a person asking; a pipe gets the empty list it expects
        log.warning("no circuit breakers recorded")
    for breaker in breakers:
        until = f"\tuntil {local_time(breaker['open_until'], zone=True)}" if breaker["open_until"] else ""
        print(f"{breaker['name']}\t{breaker['state']}\t{breaker['failures']} failures in {breaker['window_s']:g} s"
              f"\tsince {local_time(breaker['since'], zone=True)}{until}")
    return EXIT_OK


def cmd_breaker_reset(args) -> int:
    with _open_collector(args, readonly=False) as collector:
        before = breaker_status(collector.store, args.name, args.now())
        CircuitBreaker(args.name, collector=collector, now=args.now).reset()
    print(f"{args.name}: {before['state']} -> closed")
    return EXIT_OK


def cmd_retry_stats(args) -> int:
    validate_name(args.operation, "operation")  # no such name can be stored, nor echoed raw
    with _open_collector(args, readonly=True) as collector:
        retry = AdaptiveRetry(collector=collector, now=args.now)
        report = {
            "stats": retry.get_retry_stats(args.operation, args.hours),
            "analysis": retry.analyze_failures(args.operation),
            "recommendation": retry.recommend(args.operation),
        }
    if args.json:
        _print_json(dict(report, operation=args.operation, hours=args.hours))
        return EXIT_OK
    stats, analysis = report["stats"], report["analysis"]
    rate = "-" if stats["success_rate"] is None else f"{stats['success_rate']:.1f}%"
    errors = ", ".join(f"{name} {count}" for name, count in stats["common_errors"]) or "none"
    print(f"{args.operation} (last {args.hours:g}h): {stats['calls']} calls, {rate} succeeded, "
          f"{stats['retries']} retries, {stats['total_sleep_s']:.1f} s asleep")
    print(f"  errors: {errors}")
    print(f"  failures ever: {analysis['total_failures']}, recovered on a retry {analysis['transient']}, "
          f"never {analysis['permanent']}")
    advice = report["recommendation"]
    deadline = "none" if advice["deadline_s"] is None else f"{advice['deadline_s']:g} s"
    print(f"  recommended: max_attempts {advice['max_attempts']}, deadline {deadline}")
    for line in advice["evidence"]:
        print(f"    {line}")
    return EXIT_OK


def cmd_metrics(args) -> int:
    with _open_collector(args, readonly=True) as collector:
        metrics = collector.list_metrics()
    if args.json:
        _print_json({"metrics": metrics})
        return EXIT_OK
    for metric in metrics:
        print(f"{metric['name']}\t{metric['series']}\t{local_time(metric['last_time'], zone=True)}")
    return EXIT_OK


def cmd_export(args) -> int:
    """The store as Prometheus text (0.0.4) or OpenMetrics, on stdout or written atomically to --output."""
    target = args.output and output_target(args.output, "--output", ours=EXPORT_HEADERS, force=args.force)
    with _open_collector(args, readonly=True) as collector:
        text = export_text(collector, args.format)
    if not target:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        write_textfile(target, text)
    except OSError as err:
        raise MonitorError(f"cannot write {args.output}: {err.strerror or err}; the old file is unchanged") from None
    return EXIT_OK


class _Stopped(BaseException):
    """SIGTERM arrived: leave serve_forever() and close the socket.

    A BaseException, as KeyboardInterrupt is: raised while a request is being dispatched, an Exception
    is caught by socketserver's handle_error() and the server goes on serving (1 SIGTERM in 30 was lost).
    """


def _serve_token(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    path = os.path.expanduser(path)
    try:
        token = read_secret_file(path)
    except OSError as err:
        raise ConfigError(f"[serve] token_file {path} cannot be read: {err.strerror or err}") from None
    except ValueError as err:
        raise ConfigError(f"[serve] token_file {err}") from None
    if not token:
        raise ConfigError(f"[serve] token_file {path} is empty")
    return token


def cmd_serve(args) -> int:
    """Serve the store over HTTP until SIGTERM or Ctrl-C, then exit 0."""
    import signal

    config = load_config(args.config_path, required=args.config_named)
    section = dict(config["serve"]) if config.has_section("serve") else {}
    listen = args.listen or section.get("listen") or DEFAULT_LISTEN
    token = _serve_token(section.get("token_file"))
    problems: List[Tuple[str, str, str]] = []
    cache_s = _duration_setting(section, "serve", "cache", DEFAULT_SERVE_CACHE_S, problems)
    if problems:
        raise ConfigError(f"[serve] cache: {problems[0][2]}")
    try:
        server = make_server(listen, args.db_path, hours=args.hours, token=token, now=args.now, cache_s=cache_s,
                             options=summary_options(config))
    except OSError as err:
        raise MonitorError(f"cannot listen on {listen}: {err.strerror or err}") from None
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"{PROG}: serving http://{shown}:{port}/ (/metrics, /healthz, /api/summary, /series)", file=sys.stderr,
          flush=True)

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping already: a second one must not cut it short
        raise _Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
    return EXIT_OK


def cmd_push(args) -> int:
    """Push the exposition to a Pushgateway (or delete the group); silent on success, exit 1 on failure."""
    import socket

    text = None
    if not args.delete:
        with _open_collector(args, readonly=True) as collector:
            text = export_text(collector, "prometheus")
    push(args.gateway, text, job=args.job, instance=args.instance or socket.gethostname(), method=args.method)
    return EXIT_OK


def cmd_demo(args) -> int:
    """Write the demo store and say where it is (--db, else a new temporary folder)."""
    import tempfile

    db_path = args.db_path if (args.db or os.environ.get("METASYSTEM_DB")) else os.path.join(
        tempfile.mkdtemp(prefix="metasystem-demo-"), DB_FILENAME)
    if not 0 < args.days <= 366:
        raise ValidationError(f"--days must be more than 0 and at most 366, got {args.days:g}")
    written = write_demo(db_path, args.days, args.seed, args.now())  # the demo's data stands last, on its own
    print(f"demo store {db_path}: {written['samples']:,} samples over {args.days:g} days, "
          f"{written['alerts']} alerts")
    print(f"  python3 monitoring_dashboard.py --db {db_path}")
    return EXIT_OK


class Configured(NamedTuple):
    """A command's configuration, read once: the parsed file, its alerting settings, and every problem of
    the file (its unreadable lines first) in ``settings.problems``."""

    config: Any
    settings: AlertingSettings


def read_configuration(args) -> Configured:
    """The configuration of this run with all its problems; ConfigError only when the file cannot be read
    at all. What is right in it is used: a mistake costs its own section, not the rest."""
    config, unreadable = read_config(args.config_path, required=args.config_named)
    settings = alerting_settings(config, args.config_path)
    settings.problems[:0] = unreadable
    settings.problems.extend(unusable_channels(settings))  # a secret missing under cron: heard, not skipped
    return Configured(config, settings)


def say_problems(settings: AlertingSettings) -> int:
    """Each problem of the configuration as an error line on stderr (cron mails it); EXIT_RUNTIME when
    there was one, else EXIT_OK."""
    for line in settings.problem_lines():
        log.error("%s", line)
    return EXIT_RUNTIME if settings.problems else EXIT_OK


def _alerting(args, readonly: bool = False, given: Optional[Configured] = None,
              budget: Optional[RunBudget] = None) -> AlertingSystem:
    """The alerting system of the command line, its store not yet opened: every channel that is right is
    used, and the problems are the caller's to say (say_problems). Everything it sends shares ``budget``
    (a new ``[alerting] run_budget`` when not given)."""
    config, settings = given or read_configuration(args)
    storage = storage_or_defaults(config)
    return AlertingSystem(args.config_path, db_path=args.db_path, settings=settings,
                          synchronous=storage["synchronous"], now=args.now, readonly=readonly,
                          busy_timeout_s=storage["busy_timeout_s"], strict=False, say_unheard=True,
                          budget=budget or RunBudget(settings.run_budget_s))


def alongside(work) -> Any:
    """Start ``work()`` in a thread of its own (a ping beside a run's alerts: neither waits for the other);
    the function that waits for it, at most ``timeout_s``."""
    import threading

    thread = threading.Thread(target=work, name="alongside", daemon=True)
    thread.start()
    return lambda timeout_s: thread.join(timeout_s)


def ping_budget(given: Optional[Configured], budget: RunBudget) -> float:
    """What a ping may take: the alert timeout, within what is left of the run's budget."""
    return min(given.settings.timeout_s if given is not None else DEFAULT_ALERT_TIMEOUT_S, budget.left())


def cli_clock():
    """time.time, or a fixed instant from METASYSTEM_NOW (epoch seconds): replays and tests of cron runs."""
    text = os.environ.get("METASYSTEM_NOW")
    if not text:
        return time.time
    fixed = valid_timestamp(_parse_number(text, "METASYSTEM_NOW"), "METASYSTEM_NOW")
    return lambda: fixed


def _parse_details(pairs: Optional[List[str]]) -> Dict[str, str]:
    details: Dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValidationError(f"detail {_shown(pair)} is not KEY=VALUE")
        details[key.strip()] = value
    return details


def _delivery_line(name: str, delivery: Delivery) -> str:
    """``slack: sent in 120 ms`` or ``discord: failed after 1 attempt in 15 ms: HTTP 404: ...``."""
    line = f"{name}: {delivery.outcome}"
    if delivery.outcome == "failed":
        line += f" after {delivery.attempts} attempt{'' if delivery.attempts == 1 else 's'}"
    if delivery.latency_ms is not None:
        line += f" in {delivery.latency_ms:.0f} ms"
    return line + (f": {delivery.error}" if delivery.error else "")


def _delivery_exit(report: DeliveryReport, lifecycle: bool = False) -> int:
    code = report.exit_code()
    if not report.external and not lifecycle:
        log.warning("no alert channel is configured: the alert went to the log only "
                    "(see alerting-config.example.ini)")
    for name, delivery in report.outcomes.items():
        if delivery.outcome == "not_configured" and name != "log":
            log.warning("channel %s skipped (%s)", name, delivery.error or "not configured")
    if code == EXIT_ALERT_NONE:
        log.error("no channel delivered the alert")
    return code


BATCH_FIELDS = ("key", "state", "severity", "title", "message", "details")


def batch_entry(raw: bytes, number: int) -> Dict[str, Any]:
    """One line of ``alert --batch``, checked: a JSON object with a ``key``, a ``state`` of firing or ok, a
    valid ``severity``, text ``title`` and ``message``, an object of ``details``; ValidationError naming
    the line otherwise. Text that is not valid Unicode (a lone surrogate is valid JSON) is made so."""
    import json

    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValidationError(f"line {number}: not a JSON object") from None
    expected = (f"expected {{\"key\": ..., \"state\": \"firing\" or \"ok\", \"severity\", \"title\", "
                f"\"message\", \"details\"}}")
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"].strip() or \
            entry.get("state", "firing") not in ("firing", "ok"):
        raise ValidationError(f"line {number}: {expected}")
    for field in ("title", "message"):
        if entry.get(field) is not None and not isinstance(entry[field], str):
            raise ValidationError(f"line {number}: {field} must be text, got {_shown(entry[field])}")
    if entry.get("details") is not None and not isinstance(entry["details"], dict):
        raise ValidationError(f"line {number}: details must be an object of KEY: VALUE, got {_shown(entry['details'])}")
    unknown = sorted(set(entry) - set(BATCH_FIELDS))
    if unknown:
        raise ValidationError(f"line {number}: unknown field {_shown(unknown[0])}; the fields are "
                              f"{', '.join(BATCH_FIELDS)}")
    try:
        _lifecycle_key(entry["key"])
        if entry.get("state", "firing") == "firing":
            _severity(entry.get("severity", "warning"))
    except ValidationError as err:
        raise ValidationError(f"line {number}: {err}") from None
    return entry


def _alert_batch(args) -> int:
    """One run's states from stdin, one JSON object a line: fired and resolved together, digested. A bad
    line is reported by its number and the others still go out; the exit code says both."""
    if args.title is not None or args.severity is not None:
        raise ValidationError("--batch reads everything from stdin: give no TITLE or severity")
    entries, refused = [], 0
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        if not raw.strip():
            continue
        try:
            entries.append(batch_entry(raw, number))
        except ValidationError as err:
            log.error("%s; that line was not sent", err)
            refused += 1
    given = read_configuration(args)
    with contextlib.closing(_alerting(args, given=given)) as system, system.batch() as batch:
        for entry in entries:
            if entry.get("state", "firing") == "ok":
                system.resolve(entry["key"], entry.get("message"))
            else:
                system.fire(entry["key"], entry.get("title") or entry["key"], entry.get("message") or "",
                            entry.get("severity", "warning"), entry.get("details"))
    code = max(_delivery_exit(batch.report, lifecycle=True), say_problems(given.settings))
    return max(code, EXIT_USAGE) if refused else code


def cmd_alert(args) -> int:
    """0 delivered; 1 also when the configuration has a problem (said on stderr; the channels that are
    right still got the alert); 3 some channels failed; 4 none delivered."""
    if args.batch:
        return _alert_batch(args)
    if args.severity == "resolve":  # alert --resolve KEY [MESSAGE], or alert --resolve --key KEY [MESSAGE]
        key, message = (args.key, args.title) if args.key else (args.title, args.message)
        if not key:
            raise ValidationError("--resolve needs the KEY that --key fired")
    elif args.title is None:
        raise ValidationError("alert needs a TITLE (or --batch)")
    elif args.severity is None:
        raise ValidationError("one of --info, --warning, --critical or --resolve is required")
    elif args.key and (args.channel or args.dry_run):
        raise ValidationError("--key goes to every channel: it takes neither --channel nor --dry-run")
    given = read_configuration(args)
    with contextlib.closing(_alerting(args, given=given)) as system:
        if args.severity == "resolve":
            code = _delivery_exit(system.resolve(key, message), lifecycle=True)
        elif args.key:
            report = system.fire(args.key, args.title, args.message or "", args.severity,
                                 _parse_details(args.detail))
            code = _delivery_exit(report, lifecycle=True)
        else:
            alert = system.create_alert(args.title, args.message or "", args.severity, args.channel,
                                        _parse_details(args.detail))
            if args.dry_run:
                for block in system.render(alert):
                    print(block)
                code = EXIT_OK
            else:
                code = _delivery_exit(system.send_alert(alert))
    return max(code, say_problems(given.settings))


def _alerting_command(args, work, readonly: bool = False) -> int:
    """``work(system)`` on the alerting system of this run: its exit code, at least 1 when the configuration
    has a problem (each said on stderr; the parts that are right did their work)."""
    given = read_configuration(args)
    with contextlib.closing(_alerting(args, readonly=readonly, given=given)) as system:
        code = work(system)
    return max(code, say_problems(given.settings))


def _silence(args, system: AlertingSystem) -> int:
    if args.action == "add":
        if not args.match or not args.duration:
            raise ValidationError("silence add needs --match TEXT and --for DURATION")
        print(system.add_silence(args.match, parse_duration_s(args.duration), args.comment or ""))
        return EXIT_OK
    if args.action == "remove":
        if not args.id or not ascii_digits(args.id):
            raise ValidationError("silence remove needs the ID that 'silence list' shows")
        if not system.remove_silence(int(args.id)):
            raise MonitorError(f"no silence #{args.id}")
        return EXIT_OK
    silences, planned = system.list_silences(), system.planned_maintenance()
    if args.json:
        _print_json({"silences": silences, "maintenance": planned})
        return EXIT_OK
    for entry in silences:
        comment = f"  # {entry['comment']}" if entry["comment"] else ""
        state = "active" if entry["active"] else "scheduled"
        print(f"{entry['id']}  {entry['match']}  until {local_time(entry['ends'], zone=True)}  {state}{comment}")
    for entry in planned:
        state = "active" if entry["active"] else "planned"
        print(f"maintenance {entry['name']}  {entry['match']}  {local_time(entry['starts'], zone=True)} to "
              f"{local_time(entry['ends'], zone=True)}  {state}")
    return EXIT_OK


def cmd_silence(args) -> int:
    return _alerting_command(args, lambda system: _silence(args, system))


def cmd_alert_test(args) -> int:
    """A test to every enabled channel (or those --channel names): a line each, how it went or why it
    was skipped; the disabled ones are listed as such."""
    given = read_configuration(args)
    with contextlib.closing(_alerting(args, given=given)) as system:
        report = system.send_test(args.channel)
        configured = list(system.settings.channels)
        for name in configured + [name for name in report.outcomes if name not in configured]:
            delivery = report.outcomes.get(name)
            if delivery is not None:
                print(_delivery_line(name, delivery) if delivery.outcome != "not_configured"
                      else f"{name}: skipped ({delivery.error or 'not configured'})")
            elif not args.channel:
                print(f"{name}: skipped (disabled)")
    return max(_delivery_exit(report), say_problems(given.settings))


def _print_firing(firing: List[Dict[str, Any]], as_json: bool) -> int:
    if as_json:
        _print_json({"firing": firing})
        return EXIT_OK
    for entry in firing:
        channels = " ".join(f"{name}={local_time(channel['last_delivered']) if channel['last_delivered'] else ''}"
                            f"{'' if channel['last_delivered'] else 'held' if channel['held'] else 'pending'}"
                            for name, channel in entry["channels"].items())
        runs, ack = entry["failing_runs"], entry["acknowledged"]
        acked = f"  acknowledged by {ack['by']} at {local_time(ack['at'])}" + (
            f" ({ack['comment']})" if ack["comment"] else "") if ack else ""
        print(f"{entry['key']}  {entry['severity']:<8}  since {local_time(entry['since'], zone=True)}  "
              f"({runs} failing run{'' if runs == 1 else 's'})  {entry['title']}{acked}  {channels}".rstrip())
    return EXIT_OK


ALERTS_ERROR_CHARS = 200  # of a delivery's error in the plain alerts list (--json has all of it)


def _user_name() -> str:
    """Who runs this: $USER, else the account's name, else ``unknown``."""
    import getpass

    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError, ImportError):  # an uid without a passwd entry, in a container
        return "unknown"


def _acknowledge(args, system: AlertingSystem) -> int:
    if not args.key:
        raise ValidationError(f"alerts {args.action} needs the alert's KEY (alerts --firing lists them)")
    if args.action == "unack":
        if not system.unacknowledge(args.key):
            raise MonitorError(f"alert {args.key!r} is not acknowledged")
        return EXIT_OK
    by = args.by or _user_name()
    duration = parse_duration_s(args.duration) if args.duration else None
    done = system.acknowledge(args.key, by, args.comment or "", duration)
    if args.json:
        _print_json(done)
    return EXIT_OK


def _alert_list(args, system: AlertingSystem) -> int:
    history = system.firing() if args.firing else system.get_alert_history(args.hours)
    if args.firing:
        return _print_firing(history, args.json)
    if args.json:
        _print_json({"hours": args.hours, "alerts": history})
        return EXIT_OK
    for entry in history:
        outcomes = " ".join(f"{name}={channel['outcome']}" + (f" ({_one_line(channel['error'])[:ALERTS_ERROR_CHARS]})"
                                                               if channel["error"] else "")
                            for name, channel in entry["channels"].items())
        said = {"alert": "", "acknowledged": f" ({entry['message']})"}  # an ack says by whom
        kind = said.get(entry["kind"], f" ({entry['kind']})")
        print(f"{local_time(entry['time'], zone=True)}  {entry['severity']:<8}  {entry['title']}{kind}  "
              f"{outcomes}".rstrip())
    return EXIT_OK


def cmd_alerts(args) -> int:
    """The history of the last --hours, a line each with every channel's outcome and why one failed or
    was skipped; or (--firing) what fires now; ``ack KEY`` and ``unack KEY`` acknowledge."""
    if args.action:
        return _alerting_command(args, lambda system: _acknowledge(args, system))
    if args.key:
        raise ValidationError("alerts takes a KEY only after ack or unack")
    return _alerting_command(args, lambda system: _alert_list(args, system), readonly=True)


def cmd_config(args) -> int:
    if args.convert_yaml:
        path = args.config_path if args.config_path.endswith((".yaml", ".yml")) else yaml_sibling(args.config_path)
        if not path or not os.path.exists(path):
            raise ConfigError(f"no YAML file to convert ({path or args.config_path + ' is not an .ini path'})")
        sys.stdout.write(yaml_as_ini(path))
        return EXIT_OK
    config, settings = read_configuration(args)
    settings.problems.extend(check_problems(config) + job_problems(config))
    if args.check:
        settings.problems.extend(missing_programs(config))
    else:
        print("\n".join(effective_configuration(settings)))
    for line in settings.problem_lines():
        print(line if args.check else f"{PROG}: error: {line}", file=sys.stdout if args.check else sys.stderr)
    if settings.problems:
        return EXIT_RUNTIME
    warn_if_shared(settings)
    if args.check:
        usable = sorted(name for name, spec in settings.channels.items() if spec.enabled and not spec.missing)
        print(f"configuration OK: {len(usable)} channel{'' if len(usable) == 1 else 's'} ({', '.join(usable)})")
    return EXIT_OK


def _checks_without_store(args, specs: List[CheckSpec], err: StorageError, now: float) -> List[CheckResult]:
    """The store cannot be opened: that is CRITICAL, and the checks that need no store still give their
    verdicts (a broken store must not hide a full disk); the others are UNKNOWN, with the reason."""
    free = [spec for spec in specs if not CHECK_TYPES[spec.kind].needs_store]
    return ([CheckResult("database", "CRITICAL", str(err))]
            + run_checks(free, CheckContext(None, now, args.deep, args.db_path))
            + [CheckResult(spec.name, "UNKNOWN", "the store cannot be read") for spec in specs if spec not in free])


def _resolve_gone_checks(system: AlertingSystem, states: Dict[str, str]) -> None:
    """Resolve what this run's checks no longer say: the configuration once mended, and the alert of a check
    that is no longer configured (a section deleted), which would otherwise fire for ever."""
    if CONFIGURATION_CHECK not in states:
        system.resolve(CONFIGURATION_CHECK, "the configuration has no problem")
    for entry in system.firing():
        if entry["key"] not in states and entry["key"] != CONFIGURATION_CHECK and entry["title"] == f"check {entry['key']}":
            system.resolve(entry["key"], "the check is no longer configured", after=1)


def _alert_checks(args, results: List[CheckResult], given: Configured, budget: RunBudget) -> None:
    """Fire each check that is not OK (key: its name) and resolve each that is, as one run, holding the
    alerts of a check whose ``depends_on`` is CRITICAL (a cycle holds nothing); then the Watchdog to
    Alertmanager, which lives for two check intervals."""
    config = given.config
    parents = acyclic(check_dependencies(config))
    states = {result.name: result.state for result in results}
    try:
        with contextlib.closing(_alerting(args, given=given, budget=budget)) as system:
            with system.batch():
                for result in results:
                    parent = parents.get(result.name)
                    held = f"{parent} is CRITICAL" if states.get(parent) == "CRITICAL" else None
                    if result.state == "OK":
                        system.resolve(result.name, result.summary)
                    else:
                        severity = "critical" if result.state == "CRITICAL" else "warning"
                        system.fire(result.name, f"check {result.name}", f"{result.state}: {result.summary}",
                                    severity, inhibited_by=held)
                if not args.only:
                    _resolve_gone_checks(system, states)
            system.send_watchdog(WATCHDOG_RUNS * check_run_interval(config) + CHECK_STALE_GRACE_S)
    except MonitorError as err:  # the store cannot take the alerts' states: the verdict still stands
        log.error("alerts not sent: %s", err)


def _ping_check_run(args, code: int, text: str, given: Configured, budget: RunBudget) -> None:
    """``[check] ping_url`` hears of every run: the URL when all is OK, URL/CODE (1-3) otherwise, the
    plugin output as the body; a service that stops hearing says cron or the machine stopped."""
    import uuid

    try:
        url = configured_ping_url(given.config, "check")
    except ConfigError as err:
        log.warning("check run not pinged: %s", err)
        return
    if url is None:
        return
    problem = send_ping(url, "" if code == 0 else str(code), str(uuid.uuid4()), (text + "\n").encode("utf-8"),
                        budget_s=ping_budget(given, budget))
    if problem:
        log.warning("%s", problem)


def _report_checks(args, results: List[CheckResult], given: Configured) -> int:
    """The verdicts in the plugin format (or JSON), their alerts, the run's ping, and the worst state as
    the exit code. The ping and the alerts go out at once, all within ``[alerting] run_budget``."""
    budget = RunBudget(given.settings.run_budget_s)
    state = worst_state(result.state for result in results)
    text = "\n".join(plugin_output(results))
    pinged = alongside(lambda: _ping_check_run(args, CHECK_STATES.index(state), text, given, budget))
    if not args.no_alert:
        _alert_checks(args, results, given, budget)
    pinged(budget.left() + DELIVERY_JOIN_GRACE_S)
    if args.json:
        _print_json({"state": state, "checks": [result.as_json() for result in results]})
    else:
        print(text)
    return CHECK_STATES.index(state)


def _check_failed(state: str, text: str, as_json: bool) -> int:
    """``check`` could not run its checks: one line in the plugin format (or JSON) and on stderr, and the
    state's code."""
    text = " ".join(text.split())
    log.error("%s", error_line(text))
    if as_json:
        _print_json({"state": state, "checks": [], "error": text})
    else:
        print(f"METASYSTEM {state} - {text}")
    return CHECK_STATES.index(state)


def _record_checks(collector: MetricsCollector, results: List[CheckResult], now: float, mended: bool) -> None:
    try:
        record_check_results(collector, results, now, forget=(CONFIGURATION_CHECK,) if mended else ())
    except StorageError as err:  # the verdict still goes out
        log.error("%s: the check results were not recorded", err)


def _unreadable_configuration(args, err: ConfigError) -> int:
    """The configuration cannot be read at all: no check or channel is known. Said on stderr and in the
    plugin line, and recorded as the ``configuration`` check, so every face shows it (the store keeps all
    it has meanwhile)."""
    result = CheckResult(CONFIGURATION_CHECK, "UNKNOWN", str(err)[:CHECK_OUTPUT_LINE_CHARS])
    with contextlib.suppress(StorageError), \
            MetricsCollector(args.db_path, now=args.now, maintain=False) as collector:
        record_check_results(collector, [result], args.now())
    return _check_failed("UNKNOWN", f"{CONFIGURATION_CHECK}: {err}", args.json)


def _chosen(args, specs: List[CheckSpec], plan: CheckPlan) -> Tuple[List[CheckSpec], List[CheckResult]]:
    """The checks --only names (every one without it), and the UNKNOWN verdicts that go with them; a
    name that is no check is a usage error (MonitorError)."""
    if not args.only:
        return specs, plan.unrunnable
    names = [spec.name for spec in specs] + [r.name for r in plan.unrunnable if r.name != CONFIGURATION_CHECK]
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        raise ValidationError(f"no check named {', '.join(unknown)} (there are: {', '.join(names)})")
    return ([spec for spec in specs if spec.name in args.only],
            [result for result in plan.unrunnable if result.name in args.only])


def cmd_check(args) -> int:
    """Exit with the worst state: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (a usage or configuration error too).
    A configuration problem costs only what it touches: the other checks run and alert, the broken one is
    UNKNOWN, and every problem is said on stderr."""
    try:
        given = read_configuration(args)
    except ConfigError as err:
        return _unreadable_configuration(args, err)
    given.settings.problems.extend(check_problems(given.config) + job_problems(given.config))
    say_problems(given.settings)
    plan = check_plan(given.config, given.settings.problems, given.settings.path)
    now = args.now()
    try:
        collector = _open_collector(args, readonly=False, config=given.config)
    except StorageError as err:
        # the defaults that need no store: a full disk is often why the store cannot be written
        specs = plan.specs if plan.configured else [s for s in default_checks(None)
                                                    if not CHECK_TYPES[s.kind].needs_store]
        try:
            specs, unrunnable = _chosen(args, specs, plan)
        except ValidationError as usage:
            return _check_failed("UNKNOWN", str(usage), args.json)
        return _report_checks(args, _checks_without_store(args, specs, err, now) + unrunnable, given)
    with contextlib.closing(collector):
        try:
            specs, unrunnable = _chosen(args, plan.specs if plan.configured else default_checks(collector), plan)
        except ValidationError as usage:
            return _check_failed("UNKNOWN", str(usage), args.json)
        results = run_checks(specs, CheckContext(collector, now, args.deep, args.db_path)) + unrunnable
        mended = not args.only and all(result.name != CONFIGURATION_CHECK for result in plan.unrunnable)
        _record_checks(collector, results, now, mended)
    return _report_checks(args, results, given)


class _Ping:
    """The pings of one run: ``start`` as it is made, then its end, each tried within the alert timeout."""

    def __init__(self, url: str, given: Optional[Configured]):
        import uuid

        self.given = given
        self.url, self.run_id = url, str(uuid.uuid4())
        self.send("start", budget=RunBudget(given.settings.run_budget_s if given else DEFAULT_RUN_BUDGET_S))

    @classmethod
    def of_run(cls, args, given: Optional[Configured]) -> Optional["_Ping"]:
        """The pings of this run: to --ping, else to ``[job:NAME] ping_url``; None without either. A
        bad --ping is a usage error; a configured URL that cannot be used is a warning, and the job runs."""
        if args.ping:
            try:
                _checked_url(args.ping)
            except ValueError as err:
                raise ValidationError(f"--ping: {err}") from None
            return cls(args.ping, given)
        if given is None:
            return None
        try:
            url = configured_ping_url(given.config, f"job:{args.name}")
        except MonitorError as err:
            log.warning("run %s not pinged: %s", args.name, err)
            return None
        return cls(url, given) if url else None

    def send(self, signal: str, body: bytes = b"", *, budget: RunBudget) -> None:
        """One ping within the alert timeout and what is left of ``budget``: the start one before the job
        (so a service that hangs costs the job at most that), the end one beside the run's alerts."""
        problem = send_ping(self.url, signal, self.run_id, body, budget_s=ping_budget(self.given, budget))
        if problem:
            log.warning("%s", problem)


def _run_unrecorded(name: str, argv: List[str], timeout_s: Optional[float], kill_after_s: float,
                    err: MonitorError, now=time.time) -> JobRun:
    """The job run once, without a store (no lock, retries or breaker: each needs it)."""
    tail, started = _Tail(JOB_OUTPUT_TAIL_BYTES), now()
    code = run_command(argv, timeout_s, kill_after_s, tail)
    outcome = "success" if code == 0 else "timeout" if code == EXIT_TIMEOUT else "failure"
    return JobRun("", name, started, now(), code, outcome, 1, bytes(tail.data), tail.dropped, err)


def _alert_job(args, run: JobRun, argv: List[str], given: Optional[Configured], budget: RunBudget) -> None:
    if given is None:
        return  # the configuration could not be read: said already, and the job's report is on stdout
    try:
        with contextlib.closing(_alerting(args, given=given, budget=budget)) as system:
            system.store_warning_given = run.store_error is not None  # one line about the store is enough
            if run.outcome == "success":
                # A job's next success ends its failure: one passing run, not resolve_after.
                system.resolve(f"job {run.job}", f"exit 0 in {format_span(run.duration_s)}", after=1)
            else:
                system.fire(f"job {run.job}", f"job {run.job} failed", job_report(run, argv)[:2000], "critical")
    except MonitorError as err:  # the job ran; a store that cannot take the alert is reported, not fatal
        log.error("alerts not sent: %s", err)


def _job_run(args, argv: List[str], given: Optional[Configured], timeout_s: Optional[float],
             kill_after_s: float) -> JobRun:
    """The job run and recorded; run all the same, once and unrecorded, when the store or the configuration
    cannot be had: the job matters more than its record."""
    try:
        if given is None:
            raise ConfigError("the configuration cannot be read")
        collector = _open_collector(args, readonly=False, config=given.config)
    except (StorageError, ConfigError) as err:
        return _run_unrecorded(args.name, argv, timeout_s, kill_after_s, err, args.now)
    with contextlib.closing(collector):
        breaker = CircuitBreaker(args.breaker, collector=collector, now=args.now) if args.breaker else None
        return JobRunner(collector, now=args.now).run(args.name, argv, timeout_s=timeout_s, retries=args.retries,
                                                      lock=args.lock, kill_after_s=kill_after_s, breaker=breaker)


def _run_configuration(args) -> Optional[Configured]:
    """The configuration of a run, its problems said; None (said too) when it cannot be read at all."""
    try:
        given = read_configuration(args)
    except ConfigError as err:  # the job matters more than its configuration: run it anyway, and say so
        log.error("%s; the job runs without it (no record, alert or configured ping)", err)
        return None
    say_problems(given.settings)
    return given


def cmd_run(args) -> int:
    """The command's own exit code (124 on timeout, 75 when the breaker is open); silent on success. Its end
    ping and its alert go out together, within ``[alerting] run_budget``."""
    argv = list(args.command)
    if not argv:
        raise ValidationError("run needs a command: run NAME [options] -- COMMAND [ARG]...")
    if args.retries < 0:
        raise ValidationError(f"--retries must be 0 or more, got {args.retries}")
    timeout_s = parse_duration_s(args.timeout) if args.timeout else None
    if timeout_s == 0:
        raise ValidationError("--timeout must be more than 0")
    kill_after_s = parse_duration_s(args.kill_after) if args.kill_after else DEFAULT_KILL_AFTER_S
    given = _run_configuration(args)
    ping = _Ping.of_run(args, given)
    run = _job_run(args, argv, given, timeout_s, kill_after_s)
    budget = RunBudget(given.settings.run_budget_s if given is not None else DEFAULT_RUN_BUDGET_S)
    pinged = alongside(lambda: ping.send(ping_signal(run), run.output, budget=budget) if ping else None)
    if run.outcome == "skipped":
        log.warning("run %s: skipped: another run of it still holds its lock", run.job)
    else:
        if run.outcome != "success":
            sys.stdout.write(job_report(run, argv))
            sys.stdout.flush()
        if run.store_error is not None:
            log.warning("%s: this run of %s was not recorded%s", run.store_error, run.job,
                        " (the next run marks its row unrecorded)" if run.run_id else "")
        _alert_job(args, run, argv, given, budget)
    pinged(budget.left() + DELIVERY_JOIN_GRACE_S)
    if run.outcome in ("skipped", "breaker_open"):
        return EXIT_OK if run.outcome == "skipped" else EXIT_TEMPFAIL
    return run.exit_code


def _whole_argument(text: str) -> int:
    import argparse

    try:
        return whole_number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _number_argument(text: str) -> float:
    import argparse

    try:
        return decimal_number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _hours(text: str) -> float:
    import argparse

    try:
        hours = decimal_number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours") from None
    if not (math.isfinite(hours) and 0 < hours <= 1e6):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of hours")
    return hours


def _add_global_options(parser, suppress: bool) -> None:
    """--db, --config, -v, -q; accepted before and after the subcommand."""
    import argparse

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--db", metavar="PATH", default=default(None),
                        help="the SQLite store (default: $METASYSTEM_DB, else $METASYSTEM_HOME/metrics.db, "
                             "else ~/.metasystem/metrics.db)")
    parser.add_argument("--config", metavar="PATH", default=default(None),
                        help="the INI configuration (default: $METASYSTEM_CONFIG, else alerting-config.ini "
                             "beside the store)")
    parser.add_argument("-v", "--verbose", action="count", default=default(0),
                        help="more detail on stderr; tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False), help="only errors on stderr")


def _subcommand(subparsers, name: str, func, help_text: str, examples: str, formatter):
    sub = subparsers.add_parser(
        name, help=help_text, description=help_text, epilog="examples:\n" + examples, formatter_class=formatter,
    )
    _add_global_options(sub, suppress=True)
    sub.set_defaults(func=func)
    return sub


def _add_outcome(sub) -> None:
    outcome = sub.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--success", dest="success", action="store_true", help="the run succeeded")
    outcome.add_argument("--failure", dest="success", action="store_false", help="the run failed")
    sub.add_argument("--duration", required=True, metavar="SECONDS", help="how long the run took")


def subcommand_parsers(parser: Any) -> Dict[str, Any]:
    """Each subcommand's name and parser, as ``parser`` built them (argparse keeps them in its action)."""
    import argparse

    return next((action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction)),
                {})


def _option_strings(parser) -> List[str]:
    """Every option of ``parser`` and of the subcommands it has built."""
    found = list(parser._option_string_actions)
    for sub in subcommand_parsers(parser).values():
        found += sub._option_string_actions
    return found


def with_suggestion(message: str, options: Iterable[str]) -> str:
    """argparse's message, with the closest command, choice or option when one is near enough:
    ``unknown command 'recrod'; did you mean 'record'?``."""
    import difflib
    import re

    choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)$", message)
    if choice:
        what, given, listed = choice.groups()
        choices = re.findall(r"'([^']*)'", listed) or [part.strip() for part in listed.split(",")]
        close = difflib.get_close_matches(given, choices, n=1, cutoff=0.6) if len(given) <= 100 else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        if what == "COMMAND":
            return f"unknown command {given!r}{hint}"
        return message + hint
    unknown = re.match(r"unrecognized arguments: (.*)$", message)
    if unknown:
        given = next((word for word in unknown.group(1).split() if word.startswith("-")), None)
        close = (difflib.get_close_matches(given.split("=")[0], list(options), n=1, cutoff=0.6)
                 if given and len(given) <= 100 else [])
        if close:
            return f"{message}; did you mean {close[0]}?"
    return message


def parser_class():
    """argparse's parser, but a usage error is one line on stderr, not usage plus error."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            text = error_line(with_suggestion(message, _option_strings(self)))
            self.exit(EXIT_USAGE, f"{self.prog}: error: {text} (see --help)\n")

    return Parser


def _args_record(sub) -> None:
    sub.add_argument("name", metavar="NAME", help="metric name, or '-' to read 'name value [epoch]' lines from stdin")
    sub.add_argument("value", metavar="VALUE", nargs="?",
                     help="a finite number (put -- before a negative one in exponent form: -- -2e3)")
    sub.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label of the sample (repeatable)")
    sub.add_argument("--time", metavar="EPOCH_SECONDS", help="when it was measured (default: now)")


def _args_record_sync(sub) -> None:
    sub.add_argument("target", metavar="TARGET")
    _add_outcome(sub)
    sub.add_argument("--files", default="0", metavar="N", help="files synced (default 0)")
    sub.add_argument("--conflicts", default="0", metavar="N", help="conflicts met (default 0)")


def _args_record_agent(sub) -> None:
    sub.add_argument("name", metavar="NAME")
    _add_outcome(sub)
    sub.add_argument("--items", default="0", metavar="N", help="items processed (default 0)")


def _add_hours(sub) -> None:
    sub.add_argument("--hours", type=_hours, default=DEFAULT_WINDOW_HOURS, metavar="H", help="window (default 24)")


def _add_json(sub) -> None:
    sub.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _args_stats(sub) -> None:
    sub.add_argument("name", metavar="NAME")
    _add_hours(sub)
    sub.add_argument("--percentiles", action="store_true", help="add p50 and p95 (reads every value)")
    _add_json(sub)


def _args_named_window(sub) -> None:
    sub.add_argument("name", metavar="NAME")
    _add_hours(sub)
    _add_json(sub)


def _args_anomalies(sub) -> None:
    sub.add_argument("name", metavar="NAME")
    _add_hours(sub)
    sub.add_argument("--method", choices=ANOMALY_METHODS, default="robust",
                     help="robust: modified z-score from median and MAD (default); zscore: mean and stddev")
    sub.add_argument("--threshold", metavar="T",
                     help="score beyond which a sample is flagged (default 3.5 robust, 2 zscore)")
    sub.add_argument("--min-samples", type=_whole_argument, default=DEFAULT_MIN_SAMPLES, metavar="N",
                     help=f"fewer samples than this is insufficient data (default {DEFAULT_MIN_SAMPLES})")
    _add_json(sub)


def _args_breaker(sub) -> None:
    sub.add_argument("action", choices=("reset",), metavar="reset")
    sub.add_argument("name", metavar="NAME")


def _args_retry_stats(sub) -> None:
    sub.add_argument("operation", metavar="OPERATION")
    _add_hours(sub)
    _add_json(sub)


def _add_channels(sub) -> None:
    sub.add_argument("--channel", action="append", metavar="NAME",
                     help="only this channel, by name or type (repeatable; default: every channel)")


def _args_alert(sub) -> None:
    severity = sub.add_mutually_exclusive_group()
    for level in ALERT_SEVERITIES:
        severity.add_argument(f"--{level}", dest="severity", action="store_const", const=level,
                              help=f"{a_or_an(level)} alert")
    severity.add_argument("--resolve", dest="severity", action="store_const", const="resolve",
                          help="TITLE is a KEY that passes this run: resolve it after resolve_after such runs")
    sub.add_argument("title", metavar="TITLE", nargs="?",
                     help="what happened, in a few words (the dedup key with the severity)")
    sub.add_argument("message", metavar="MESSAGE", nargs="?", help="more about it")
    sub.add_argument("--key", metavar="KEY",
                     help="a failing run of KEY: notify on change, remind on schedule, resolve with --resolve KEY")
    sub.add_argument("--batch", action="store_true",
                     help='read one run from stdin, a JSON object a line: {"key", "state": "firing" or "ok", '
                          '"severity", "title", "message", "details"}')
    _add_channels(sub)
    sub.add_argument("--detail", action="append", metavar="KEY=VALUE", help="a detail to show (repeatable)")
    sub.add_argument("--dry-run", action="store_true", help="print what each channel would send; send nothing")


def _args_silence(sub) -> None:
    sub.add_argument("action", choices=("add", "list", "remove"), metavar="add|list|remove")
    sub.add_argument("id", metavar="ID", nargs="?", help="the silence to remove")
    sub.add_argument("--match", metavar="TEXT", help="silence alerts whose key or title contains TEXT; key=K: key K")
    sub.add_argument("--for", dest="duration", metavar="DURATION", help="how long: 90m, 2h, 7d")
    sub.add_argument("--comment", metavar="TEXT", help="why (shown by list)")
    _add_json(sub)


def _args_alerts(sub) -> None:
    sub.add_argument("action", nargs="?", choices=("ack", "unack"), metavar="ack|unack",
                     help="ack KEY: no more reminders of that firing alert (its RESOLVED still comes); unack KEY")
    sub.add_argument("key", nargs="?", metavar="KEY", help="the alert's key, as alerts --firing shows it")
    _add_hours(sub)
    sub.add_argument("--firing", action="store_true", help="what is firing now, and each channel's last delivery")
    sub.add_argument("--comment", metavar="TEXT", help="ack: why, or what is being done")
    sub.add_argument("--for", dest="duration", metavar="DURATION", help="ack: only this long (default: until resolved)")
    sub.add_argument("--by", metavar="WHO", help="ack: who (default: $USER)")
    _add_json(sub)


def _args_config(sub) -> None:
    sub.add_argument("--check", action="store_true",
                     help="list every problem with its section and key; exit 1 if there is one")
    sub.add_argument("--convert-yaml", action="store_true",
                     help="print the original design's alerting-config.yaml as the INI file to write instead")


def _args_check(sub) -> None:
    sub.add_argument("--only", action="append", metavar="NAME", help="run only this check (repeatable)")
    sub.add_argument("--deep", action="store_true", help="the database check runs integrity_check (slow)")
    sub.add_argument("--no-alert", action="store_true", help="report only: fire and resolve no alert")
    _add_json(sub)


def _job_name(text: str) -> str:
    import argparse

    try:
        return validate_job_name(text)
    except ValidationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _args_run(sub) -> None:
    sub.usage = f"{PROG} run NAME [options] -- COMMAND [ARG]..."
    sub.add_argument("name", metavar="NAME", type=_job_name,
                     help="the job's name (letters, digits, '-', '_' and '.'): its metrics, lock, alert and check")
    sub.add_argument("--timeout", metavar="DURATION", help="stop the whole process group after this long (exit 124)")
    sub.add_argument("--kill-after", metavar="DURATION",
                     help=f"after the timeout's SIGTERM, SIGKILL this much later (default {DEFAULT_KILL_AFTER_S:g}s)")
    sub.add_argument("--retries", type=_whole_argument, default=0, metavar="N",
                     help="run again up to N times after exit 75 (EX_TEMPFAIL) or a timeout, with backoff")
    sub.add_argument("--lock", action="store_true", help="skip this run while another run of NAME is alive")
    sub.add_argument("--quiet-on-success", action="store_true",
                     help="print nothing when the command succeeds (what run always does, as chronic)")
    sub.add_argument("--breaker", metavar="BREAKER", help="fail fast (exit 75) while this circuit breaker is open")
    sub.add_argument("--ping", metavar="URL",
                     help="a healthchecks.io-style ping URL: URL/start before, URL on success, URL/CODE on failure, "
                          "the output's tail as the body; heard when the machine itself goes quiet")
    sub.set_defaults(command=[])  # what follows '--': main() takes it off before argparse sees it


def _args_export(sub) -> None:
    sub.add_argument("--format", choices=EXPORT_FORMATS, default="prometheus",
                     help="prometheus (text format 0.0.4, the default) or openmetrics (1.0)")
    sub.add_argument("--output", metavar="FILE",
                     help="write FILE atomically instead of stdout (for node_exporter's textfile collector); "
                          "only a regular file, and one that export wrote unless --force")
    sub.add_argument("--force", action="store_true",
                     help="let --output replace a regular file that export did not write")


def _args_serve(sub) -> None:
    sub.add_argument("--listen", metavar="HOST:PORT",
                     help=f"where to listen (default: [serve] listen, else {DEFAULT_LISTEN}); off loopback only "
                          "with [serve] token_file")
    _add_hours(sub)


def _args_push(sub) -> None:
    sub.add_argument("--gateway", required=True, metavar="URL", help="the Pushgateway, e.g. http://pushgateway:9091")
    sub.add_argument("--job", default=DEFAULT_PUSH_JOB, help=f"the job label of the group (default {DEFAULT_PUSH_JOB})")
    sub.add_argument("--instance", help="the instance label of the group (default: this host's name)")
    sub.add_argument("--method", choices=PUSH_METHODS, default="put",
                     help="put replaces the whole group (the default), post only the metrics sent")
    sub.add_argument("--delete", action="store_true", help="delete the group instead")


def _args_demo(sub) -> None:
    sub.add_argument("--days", type=_number_argument, default=7.0, help="how many days of data (default 7)")
    sub.add_argument("--seed", type=_whole_argument, default=17, help="the random seed: the same seed, the same data")


# name, function, what it does, examples, its arguments: in the order --help lists them.
def _first_paragraph(obj: Any) -> str:
    """The first paragraph of a docstring, on one line, without reST's double backquotes."""
    return " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "")


def _wrapped(text: str, indent: str, first: str = "") -> List[str]:
    import textwrap

    return textwrap.wrap(text, width=100, initial_indent=first or indent, subsequent_indent=indent,
                         break_on_hyphens=False)


def reference_exit_codes() -> List[str]:
    return ["EXIT CODES"] + [f"  {code:<5}  {meaning}" for code, meaning in EXIT_CODE_TABLE]


def reference_checks() -> List[str]:
    """Every check type, from the check registry: what it does, its keys, what its thresholds compare."""
    units = {"B": "bytes", "%": "percent", "s": "durations", "": "plain numbers"}
    lines = ["CHECK TYPES ([check:NAME] type = ...; every one also takes " + ", ".join(CHECK_COMMON_KEYS[1:]) + ")"]
    for kind, check in sorted(CHECK_TYPES.items()):
        keys = [key + (" (required)" if key in check.required else "") for key in check.keys]
        keys += [f"{key} / {key}_env / {key}_file" for key in check.secrets]
        lines += _wrapped(_first_paragraph(check.function), "      ", f"  {kind}: ")
        lines += _wrapped(f"keys: {', '.join(keys) or 'none of its own'}", "      ")
        compares = ", ".join(units[unit] for unit in check.units) if check.units else "no thresholds"
        defaults = f"; default warning {check.warning}, critical {check.critical}" if check.warning else ""
        lines += _wrapped(f"compares: {compares}{defaults}" + ("" if check.needs_store else "; runs without the store"),
                          "      ")
    return lines


def reference_config() -> List[str]:
    """Every section and key of the INI file, from the tables and registries the code reads."""
    lines = ["CONFIGURATION (alerting-config.ini beside the store, or --config, or $METASYSTEM_CONFIG)"]
    lines += _wrapped(", ".join(STORAGE_KEYS), "              ", "  [storage]   ")
    lines += _wrapped(", ".join(ALERTING_KEYS), "              ", "  [alerting]  ")
    lines += _wrapped(f"{', '.join(SEED_CHANNEL_KEYS)} (each makes the channel of that name)", "              ")
    lines += _wrapped(", ".join(SERVE_KEYS), "              ", "  [serve]     ")
    lines += _wrapped(", ".join(COLLECT_KEYS), "              ", "  [collect]   ")
    lines += _wrapped(", ".join(DASHBOARD_KEYS), "              ", "  [dashboard] ")
    lines += _wrapped(f"{', '.join(CHECK_RUN_KEYS)} (about every run of check)", "              ", "  [check]     ")
    lines += _wrapped(f"{', '.join(JOB_KEYS)} (about every run NAME)", "              ", "  [job:NAME]  ")
    lines += _wrapped(f"{', '.join(MAINTENANCE_KEYS)} (a planned window that silences what matches)",
                      "              ", "  [maintenance:NAME]  ")
    lines += _wrapped(f"type = one of {', '.join(sorted(CHANNEL_TYPES))}; and {', '.join(CHANNEL_COMMON_KEYS[1:])}",
                      "      ", "  [channel:NAME]  ")
    for kind, channel in sorted(CHANNEL_TYPES.items()):
        keys = [key + (" (required)" if key in channel.required else "") for key in channel.keys]
        keys += [f"{key} / {key}_env / {key}_file" + (" (required)" if key in channel.required else "")
                 for key in channel.secrets]
        lines += _wrapped(_first_paragraph(channel), "        ", f"    {kind}: ")
        lines += _wrapped(", ".join(keys) or "no keys of its own", "        ")
    lines += _wrapped(f"type = one of {', '.join(sorted(CHECK_TYPES))}; and {', '.join(CHECK_COMMON_KEYS[1:])}; "
                      "the keys of each type: help checks", "      ", "  [check:NAME]  ")
    lines.append("  Durations: 90s, 5m, 2h, 7d. Sizes: 5GB, 10%. A secret KEY may be given as KEY_env (a variable)")
    lines.append("  or KEY_file (a file); config --check lists every problem, config prints what is in effect.")
    lines.append("  A NAME (of a channel, check, job or maintenance window) is letters, digits, '-', '_' and '.'.")
    return lines


REFERENCE_TOPICS = {"config": reference_config, "checks": reference_checks, "exit-codes": reference_exit_codes}
MAN_ENVIRONMENT = (
    ("METASYSTEM_DB", "the store, when --db is not given"),
    ("METASYSTEM_HOME", "the folder of the store and its configuration (default ~/.metasystem)"),
    ("METASYSTEM_CONFIG", "the INI file, when --config is not given"),
    ("METASYSTEM_NOW", "a fixed time (epoch seconds) for every command: replays and tests of cron runs"),
    ("TZ", "the time zone times are shown in; JSON keeps UTC"),
)


def _roff(text: str) -> str:
    """One line of text made safe for troff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def man_page(parser: Any) -> str:
    """The manual page, in troff (man(7)): the commands of ``parser``, the reference and the exit codes,
    from the same tables as --help and help TOPIC."""
    lines = [f'.TH METASYSTEM-MONITOR 1 "" "metasystem-monitor {__version__}" "User Commands"', ".SH NAME",
             "metasystem-monitor \\- metrics, anomalies, retries and alerts for one machine", ".SH SYNOPSIS",
             f".B {PROG}", "[\\fB\\-\\-db\\fR \\fIPATH\\fR] [\\fB\\-\\-config\\fR \\fIPATH\\fR] "
             "[\\fB\\-v\\fR] [\\fB\\-q\\fR] \\fICOMMAND\\fR ...", ".SH DESCRIPTION",
             _roff("Records metrics in a SQLite store, finds anomalies, runs health checks and cron jobs, and "
                   "sends alerts. Every command takes --help; the global options may come before or after it."),
             ".SH COMMANDS"]
    for name, sub in subcommand_parsers(parser).items():
        lines += [".TP", f".B {_roff(name)}", _roff(sub.description), ".nf"]
        lines += [_roff(line.strip()) for line in sub.epilog.splitlines()[1:]]  # after "examples:"
        lines.append(".fi")
    for title, topic in (("CONFIGURATION", reference_config), ("CHECK TYPES", reference_checks)):
        lines += [f".SH {title}", ".nf"] + [_roff(line) for line in topic()[1:]] + [".fi"]
    lines.append(".SH EXIT STATUS")
    for code, meaning in EXIT_CODE_TABLE:
        lines += [".TP", f".B {code}", _roff(meaning)]
    lines.append(".SH ENVIRONMENT")
    for name, meaning in MAN_ENVIRONMENT:
        lines += [".TP", f".B {name}", _roff(meaning)]
    lines += [".SH FILES", ".TP", ".I ~/.metasystem/metrics.db", "the store", ".TP",
              ".I ~/.metasystem/alerting-config.ini", "channels, checks and settings", ".SH SEE ALSO",
              ".BR monitoring-dashboard (1),", ".BR cron (8)"]
    return "\n".join(lines) + "\n"


def cmd_help(args) -> int:
    if args.topic is None:
        build_parser().print_help()
    elif args.topic == "man":
        print(man_page(build_parser()), end="")
    else:
        print("\n".join(REFERENCE_TOPICS[args.topic]()))
    return EXIT_OK


def _args_help(sub) -> None:
    topics = sorted(REFERENCE_TOPICS) + ["man"]
    sub.add_argument("topic", nargs="?", choices=topics, metavar="TOPIC",
                     help=f"one of {', '.join(topics)} (man: the manual page in troff; none: the command list)")


# Options whose value is a path: the shells complete file names there.
_PATH_OPTIONS = ("--db", "--config", "--output", "--token-file")


def completion_words(parser: Any) -> Dict[str, Dict[str, List[str]]]:
    """For the top level ('') and each command: its ``words`` (commands, options, positional choices),
    the ``takes_value`` options, and ``choices`` of each option that has them; read from the parser."""
    import argparse

    def words_of(one: Any) -> Dict[str, List[str]]:
        found: Dict[str, List[str]] = {"words": [], "takes_value": []}
        for action in one._actions:
            if isinstance(action, argparse._SubParsersAction):
                found["words"] += list(action.choices)
            elif not action.option_strings:
                found["words"] += [str(choice) for choice in action.choices or ()]
            elif action.help != argparse.SUPPRESS or one is not parser:
                found["words"] += action.option_strings
                if action.nargs != 0:
                    found["takes_value"] += action.option_strings
                    if action.choices:
                        for option in action.option_strings:
                            found[option] = [str(choice) for choice in action.choices]
        return found

    return {"": words_of(parser), **{name: words_of(sub) for name, sub in subcommand_parsers(parser).items()}}


def _shell_word(word: str, fish: bool = False) -> str:
    """``word`` quoted so that bash, zsh (``fish=False``) or fish reads it back as itself, expanding
    nothing: no variable, command substitution, glob or brace in it is ever run or matched."""
    import re

    if re.fullmatch(r"[\w.,:/@+-]+", word, re.ASCII):
        return word
    if fish:  # in fish's single quotes, backslash escapes a quote and itself
        return "'" + word.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "'" + word.replace("'", "'\"'\"'") + "'"


def _bash_completion(table: Dict[str, Dict[str, List[str]]], names: Dict[str, List[str]], zsh: bool) -> str:
    """The bash (and zsh, through bashcompinit) function. The words stand in arrays, each quoted, and are
    matched to what is typed in a loop: ``compgen -W`` would expand each word again (a ``$(...)`` in a
    configured name would run) and ``$(compgen ...)`` would glob what it prints."""
    takes_value = sorted({option for entry in table.values() for option in entry["takes_value"]})
    values = {f"{command}:{option}": words for command, entry in table.items() for option, words in entry.items()
              if option.startswith("-")}
    values.update({f"*:{option}": words for option, words in names.items()})
    cases = [f"        {key}) choices=({' '.join(_shell_word(word) for word in words)});;"
             for key, words in sorted(values.items())]
    cases.append(f"        {'|'.join('*:' + option for option in _PATH_OPTIONS)})")
    cases.append('            while IFS= read -r word; do COMPREPLY+=("$word"); done < <(compgen -f -- "$cur")')
    cases.append("            return 0;;")
    cases.append(f"        {'|'.join('*:' + option for option in takes_value)}) return 0;;")
    no_command = '""'
    commands = [f"            {_shell_word(name) if name else no_command}) "
                f"choices=({' '.join(_shell_word(word) for word in entry['words'])});;"
                for name, entry in table.items()]
    shell = "zsh" if zsh else "bash"
    lines = [f"# {shell} completion for {PROG}, made by '{PROG} completion {shell}'",
             *(["autoload -U +X bashcompinit && bashcompinit"] if zsh else []),
             "_metasystem_monitor() {",
             '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" command="" word i',
             "    local -a choices",
             "    choices=()",
             "    COMPREPLY=()",
             "    for ((i = 1; i < COMP_CWORD; i++)); do",
             '        case "${COMP_WORDS[i]}" in',
             f"            {'|'.join(takes_value)}) ((i++));;",
             "            -*) ;;",
             '            *) command="${COMP_WORDS[i]}"; break;;',
             "        esac",
             "    done",
             '    case "$command:$prev" in', *cases, "        *)",
             '            case "$command" in', *commands, "            esac;;",
             "    esac",
             '    for word in "${choices[@]}"; do',
             '        if [[ "$word" == "$cur"* ]]; then COMPREPLY+=("$word"); fi',
             "    done",
             "    return 0",
             "}",
             f"complete -F _metasystem_monitor {PROG} metasystem-monitor"]
    return "\n".join(lines) + "\n"


def _fish_words(words: List[str]) -> str:
    """The argument of fish's ``complete -a``: fish evaluates it, so each word is quoted inside it too."""
    return _shell_word(" ".join(_shell_word(word, fish=True) for word in words), fish=True)


def _fish_completion(table: Dict[str, Dict[str, List[str]]], names: Dict[str, List[str]]) -> str:
    lines = [f"# fish completion for {PROG}, made by '{PROG} completion fish'"]
    commands = [name for name in table if name]
    for program in (PROG, "metasystem-monitor"):
        lines.append(f"complete -c {program} -f")
        lines += [f"complete -c {program} -n '__fish_use_subcommand' -a {_fish_words([name])}" for name in commands]
        for name, entry in table.items():
            when = _shell_word(f"__fish_seen_subcommand_from {_shell_word(name, fish=True)}" if name
                               else "__fish_use_subcommand", fish=True)
            for word in entry["words"]:
                if not word.startswith("--"):
                    if not word.startswith("-") and name:
                        lines.append(f"complete -c {program} -n {when} -a {_fish_words([word])}")
                    continue
                values = entry.get(word) or names.get(word)
                argument = (" -r -F" if word in _PATH_OPTIONS else f" -x -a {_fish_words(values)}"
                            if values else " -x" if word in entry["takes_value"] else "")
                lines.append(f"complete -c {program} -n {when} -l {_shell_word(word[2:], fish=True)}{argument}")
    return "\n".join(lines) + "\n"


def completion_script(shell: str, parser: Any, names: Dict[str, List[str]]) -> str:
    """A completion script for ``shell``; ``names`` holds the values of options such as --only."""
    table = completion_words(parser)
    if shell == "fish":
        return _fish_completion(table, names)
    return _bash_completion(table, names, zsh=shell == "zsh")


def _configured_names(args) -> Dict[str, List[str]]:
    """The check and channel names of the configuration, when it can be read (completion offers them);
    a name that ``config --check`` refuses is left out."""
    try:
        config = load_config(args.config_path)
        settings = alerting_settings(config, args.config_path)
    except (MonitorError, OSError):
        return {}
    checks = [section[len("check:"):] for section in config.sections() if section.startswith("check:")]
    usable = sorted(name for name in checks if not name_problem(name, "check"))
    return {"--only": usable if checks else ["disk", "database", "circuit_breaker"],
            "--channel": sorted(settings.channels)}


def cmd_completion(args) -> int:
    print(completion_script(args.shell, build_parser(), _configured_names(args)), end="")
    return EXIT_OK


def _args_completion(sub) -> None:
    sub.add_argument("shell", choices=("bash", "zsh", "fish"), metavar="bash|zsh|fish")


_COMMANDS = (
    ("record", cmd_record, "store one sample, or many from stdin with '-'",
     f"  {PROG} record backup_bytes 52428800 --label host=nas\n"
     f"  printf 'load1 0.42\\nload5 0.37 1700000000\\n' | {PROG} record -", _args_record),
    ("record-sync", cmd_record_sync, "record one sync run of TARGET",
     f"  {PROG} record-sync icloud --success --duration 2.5 --files 10\n"
     f"  {PROG} record-sync external --failure --duration 31", _args_record_sync),
    ("record-agent", cmd_record_agent, "record one run of agent NAME",
     f"  {PROG} record-agent cataloger --success --duration 1.2 --items 45", _args_record_agent),
    ("stats", cmd_stats, "count, avg, min, max, stddev and latest of a metric",
     f"  {PROG} stats sync_icloud_success --hours 24\n"
     f"  {PROG} stats backup_bytes --percentiles --json | jq .p95", _args_stats),
    ("success-rate", cmd_success_rate, "percentage of NAME_success among its attempts",
     f"  {PROG} success-rate sync_icloud\n"
     f"  {PROG} success-rate agent_cataloger --hours 168 --json", _args_named_window),
    ("anomalies", cmd_anomalies, "samples that stand out from the rest of the window",
     f"  {PROG} anomalies sync_icloud_success --hours 24\n"
     f"  {PROG} anomalies backup_seconds --method zscore --threshold 3 --json", _args_anomalies),
    ("cleanup", cmd_cleanup, "roll up closed hours, delete expired raw samples, fold old hours into days",
     f"  {PROG} cleanup\n"
     f"  17 4 * * *  {PROG} -q cleanup     # daily from cron, silent unless it fails", _add_json),
    ("collect", cmd_collect, "record the machine's load, CPU, memory, disks, network and processes (host_*)",
     f"  {PROG} collect\n  * * * * *  {PROG} collect     # every minute from cron, silent unless it fails",
     lambda sub: None),
    ("breakers", cmd_breakers, "every circuit breaker: state, failures, since when",
     f"  {PROG} breakers\n  {PROG} breakers --json", _add_json),
    ("breaker", cmd_breaker_reset, "close a circuit breaker by hand",
     f"  {PROG} breaker reset icloud_sync", _args_breaker),
    ("retry-stats", cmd_retry_stats, "retry statistics of an operation, its failures, and the learned recommendation",
     f"  {PROG} retry-stats fetch_data\n  {PROG} retry-stats sync_icloud --hours 168 --json", _args_retry_stats),
    ("metrics", cmd_metrics, "every metric name with its sample count and last time",
     f"  {PROG} metrics\n  {PROG} metrics --json", _add_json),
    ("alert", cmd_alert, "send an alert to every configured channel (deduplicated for an hour)",
     f"  {PROG} alert --critical 'Backup failed' 'rsync exited with 23' --detail host=nas\n"
     f"  {PROG} alert --warning 'Disk almost full' --channel slack --dry-run\n"
     f"  {PROG} alert --critical 'Backup is stale' --key backup     # each failing run; notifies on change\n"
     f"  {PROG} alert --resolve backup                             # each passing run", _args_alert),
    ("check", cmd_check, "run the health checks; Monitoring Plugins output, exit 0 OK 1 WARNING 2 CRITICAL 3 UNKNOWN",
     f"  {PROG} check\n  */5 * * * *  {PROG} check > /dev/null     # alerts by itself; cron mails only errors\n"
     f"  {PROG} check --only disk --json", _args_check),
    ("run", cmd_run, "run a cron job: silent on success, a report and an alert on failure",
     f"  {PROG} run fetch --retries 3 --breaker fetch -- ./fetch.sh\n"
     f"  17 3 * * *  {PROG} run backup --timeout 2h --lock -- rsync -a /home /mnt/backup", _args_run),
    ("silence", cmd_silence, "mute matching alerts for a while (maintenance), list or remove silences",
     f"  {PROG} silence add --match backup --for 2h --comment 'moving the NAS'\n"
     f"  {PROG} silence list\n  {PROG} silence remove 3", _args_silence),
    ("alert-test", cmd_alert_test, "send a labelled test to each channel, past the dedup window",
     f"  {PROG} alert-test\n  {PROG} alert-test --channel ops-slack", _add_channels),
    ("alerts", cmd_alerts, "alerts sent in the window, with each channel's outcome",
     f"  {PROG} alerts --hours 168\n  {PROG} alerts --json | jq '.alerts[0].channels'\n"
     f"  {PROG} alerts --firing", _args_alerts),
    ("export", cmd_export, "the store's state as Prometheus metrics, for a scrape, a textfile or a push",
     f"  {PROG} export --output /var/lib/node_exporter/textfile/metasystem.prom\n"
     f"  {PROG} export --format openmetrics", _args_export),
    ("serve", cmd_serve, "serve /metrics, /healthz, /api/summary and a status page over HTTP",
     f"  {PROG} serve                                  # http://127.0.0.1:{DEFAULT_SERVE_PORT}/\n"
     f"  {PROG} serve --listen 127.0.0.1:9999 --hours 6", _args_serve),
    ("push", cmd_push, "push the metrics to a Prometheus Pushgateway, grouped by job and instance",
     f"  {PROG} push --gateway http://pushgateway.example:9091\n"
     f"  {PROG} push --gateway http://pushgateway.example:9091 --delete", _args_push),
    ("demo", cmd_demo, "write a week of realistic demo data into a new store, to try the dashboard on",
     f"  {PROG} demo --db /tmp/demo.db && python3 monitoring_dashboard.py --db /tmp/demo.db\n"
     f"  {PROG} demo --days 30 --seed 4", _args_demo),
    ("config", cmd_config, "print the configuration in effect, secrets masked",
     f"  {PROG} config\n  {PROG} config --check --config /etc/metasystem/alerting-config.ini", _args_config),
    ("help", cmd_help, "the reference: every configuration key, check type or exit code",
     f"  {PROG} help config\n  {PROG} help checks\n  {PROG} help exit-codes", _args_help),
    ("completion", cmd_completion, "print a completion script for bash, zsh or fish",
     f"  {PROG} completion bash > ~/.local/share/bash-completion/completions/{PROG}\n"
     f"  {PROG} completion fish > ~/.config/fish/completions/{PROG}.fish", _args_completion),
)


def build_parser(command: Optional[str] = None):
    """The argparse parser: every subcommand, or only ``command``.

    Building all of them costs milliseconds that every cron run would pay;
    main() asks for the one on its command line, and for all of them when
    help is wanted or the command is unknown.
    """
    import argparse
    import functools
    import shutil

    # argparse makes a formatter for every argument it adds, and each asks the
    # terminal for its width: ask once.
    formatter = functools.partial(argparse.RawDescriptionHelpFormatter,
                                  width=max(shutil.get_terminal_size().columns - 2, 11))
    parser = parser_class()(
        prog=PROG,
        description="Record and query metrics of one machine in a SQLite store, check its health, run its cron "
                    "jobs, and send alerts.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, suppress=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, func, help_text, examples, add_arguments in _COMMANDS:
        if command is None or name == command:
            add_arguments(_subcommand(subparsers, name, func, help_text, examples, formatter))
    return parser


def _command_of(argv: List[str]) -> Optional[str]:
    """The subcommand named on a command line, or None when it is unclear or help is asked for."""
    names = {entry[0] for entry in _COMMANDS}
    tokens = iter(argv)
    for token in tokens:
        if token in _GLOBAL_OPTIONS_WITH_VALUE:
            next(tokens, None)
        elif token in ("-h", "--help", "--version", "--"):
            return None
        elif not token.startswith("-"):
            return token if token in names else None
    return None


class _LowerLevelFormatter(logging.Formatter):
    """``metasystem_monitor.py: warning: ...``: the level in lower case, as in the one-line errors, and
    the message on one line whatever text it quotes (a -v traceback still follows it)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()}))

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _one_line(super().formatMessage(record))


@contextlib.contextmanager
def _stderr_logging(verbosity: int, quiet: bool) -> Iterator[None]:
    """Send this module's log records to stderr for the length of one main() call."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter(f"{PROG}: %(levelname)s: %(message)s"))
    level = logging.ERROR if quiet else logging.DEBUG if verbosity else logging.WARNING
    alerts = logging.getLogger(f"{log.name}.alert")  # the log channel's fallback: -q keeps its warnings
    previous = log.level, alerts.level
    log.addHandler(handler)
    log.setLevel(level)
    alerts.setLevel(min(level, logging.WARNING))
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous[0])
        alerts.setLevel(previous[1])


def _visible_text_arguments(args: Any) -> None:
    """Every argument that is text, not a file name, made valid Unicode with visible_text()."""
    for dest, value in vars(args).items():
        if dest in _PATH_ARGUMENTS:
            continue
        if isinstance(value, str):
            setattr(args, dest, visible_text(value))
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            setattr(args, dest, [visible_text(item) for item in value])


def _report(error: Any, code: int, verbose: int) -> int:
    """One error line on stderr (the traceback first with -v); return ``code``."""
    if verbose:
        log.error("traceback follows", exc_info=True)
    text = error_line(str(error)) or type(error).__name__
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


def _warn_if_both_configurations(path: str) -> None:
    sibling = yaml_sibling(path)
    if sibling and os.path.exists(path) and os.path.exists(sibling):
        log.warning("%s is read and %s is not: both exist (delete the YAML file, or convert it: config "
                    "--convert-yaml)", path, sibling)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit code instead of exiting."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    job_argv = None
    if command == "run" and "--" in argv:  # everything after it is the job's own command line
        cut = argv.index("--")
        argv, job_argv = argv[:cut], argv[cut + 1:]
    parser = build_parser(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
    _visible_text_arguments(args)
    if job_argv is not None:
        args.command = job_argv  # kept as given: a file name's bytes must reach the job unchanged
    args.config_named = bool(args.config or os.environ.get("METASYSTEM_CONFIG"))
    with _stderr_logging(args.verbose, args.quiet):
        try:
            args.now = cli_clock()  # the one clock of this run: every command reads its time from it
            args.db_path = resolve_db_path(args.db)
            args.config_path = resolve_config_path(args.config)
            _warn_if_both_configurations(args.config_path)
            return args.func(args)
        except ValidationError as err:
            return _report(err, EXIT_USAGE, args.verbose)
        except MonitorError as err:
            return _report(err, EXIT_RUNTIME, args.verbose)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader (head, grep -q) went away; keep Python's exit flush quiet.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        except Exception as err:  # a bug of ours: still one line for cron, details with -v
            return _report(f"unexpected {type(err).__name__}: {err}", EXIT_RUNTIME, args.verbose)


## Demo #######################################################################

DEMO_SYNC_TARGETS = {"icloud": (1800.0, 0.92, 2.3, 0.4), "external": (3600.0, 0.75, 1.9, 0.3)}  # every, rate, s
DEMO_AGENTS = {"cataloger": (1.23, 0.1), "maintainer": (0.95, 0.08), "synthesizer": (2.45, 0.2)}
DEMO_BREAKERS = ("icloud_sync", "external_sync", "database_write", "knowledge_graph")
DEMO_ALERTS = (  # hours ago, severity, title, channel outcomes
    (150.0, "warning", "external sync failing", {"email": "sent", "slack": "sent"}),
    (149.0, "info", "RESOLVED external sync failing", {"email": "sent", "slack": "sent"}),
    (52.0, "critical", "external_sync circuit breaker open", {"email": "sent", "slack": "failed", "log": "sent"}),
    (3.0, "warning", "synthesizer run took 9.8 s", {"slack": "sent"}),
)


def _demo_succeeds(i: int, offset: float, rate: float) -> bool:
    """Run ``i`` succeeds at ``rate``, failures spread evenly (a golden-ratio sequence), so any day of
    the demo shows about the same success rate."""
    return (offset + i * 0.6180339887498949) % 1.0 < rate


def _demo_times(start: float, end: float, every: float) -> List[float]:
    return [start + i * every for i in range(math.ceil((end - start) / every))]


def _demo_breakers(collector: MetricsCollector, start: float, now: float, rng: Any) -> None:
    for name in DEMO_BREAKERS:
        collector.record_circuit_breaker_metric(name, "closed", 0, timestamp=start)
    for opened in (now - 150 * 3600.0, now - 52 * 3600.0):  # external_sync tripped twice, and recovered
        collector.record_circuit_breaker_metric("external_sync", "open", 5, previous_state="closed",
                                                reason="5 failures within 10m", timestamp=opened)
        collector.record_circuit_breaker_metric("external_sync", "half_open", 5, previous_state="open",
                                                reason="open time over", timestamp=opened + 300.0)
        collector.record_circuit_breaker_metric("external_sync", "closed", 0, previous_state="half_open",
                                                reason="probe succeeded", timestamp=opened + 300.0 + rng.random())


def _demo_jobs(collector: MetricsCollector, start: float, now: float, rng: Any) -> None:
    with collector.store.write() as conn:
        for day, began in enumerate(_demo_times(start + 3 * 3600.0, now, 86400.0)):
            took = max(60.0, rng.gauss(1500.0, 120.0))
            code = 23 if day == 2 else 0
            conn.execute("INSERT INTO job_runs (run_id, job, started, ended, exit_code, outcome, attempts, output, "
                         "cut_bytes) VALUES (?, 'backup', ?, ?, ?, ?, 1, ?, 0)",
                         (f"demo{day}", began, began + took, code, "failure" if code else "success",
                          b"rsync: some files vanished\n" if code else b""))
    collector.record_many([Sample("job_duration", run[1] - run[0], {"job": "backup"}, run[1])
                           for run in collector.store.query("SELECT started, ended FROM job_runs")])


def _demo_alerts(db_path: str, now: float) -> None:
    """The alert history of the week, as the channels would have left it (nothing is sent)."""
    with AlertingSystem(os.devnull, db_path=db_path, now=lambda: now) as system:
        with system.store.write() as conn:
            for hours_ago, severity, title, outcomes in DEMO_ALERTS:
                kind = "resolved" if title.startswith("RESOLVED ") else "firing"
                alert = system.create_alert(title.replace("RESOLVED ", ""), "demo", _severity(severity))
                alert_id = conn.execute(
                    "INSERT INTO alerts (ts, kind, dedup_key, severity, title, message, details) "
                    "VALUES (?, ?, ?, ?, ?, ?, '{}')",
                    (now - hours_ago * 3600.0, kind, alert.key, severity, alert.title, alert.message)).lastrowid
                for channel, outcome in outcomes.items():
                    system._write_delivery(conn, alert_id, channel, Delivery(outcome, 1), kind)


def write_demo(db_path: str, days: float, seed: int, now: float) -> Dict[str, int]:
    """A week (or ``days``) of the original document's world in a new store: the icloud and external
    sync targets at about 92% and 75% success, three agents, breakers that tripped and recovered, a few
    alerts, anomalies, a nightly backup job, and the verdicts of the default checks."""
    import random

    rng = random.Random(seed)
    start = now - days * 86400.0
    with MetricsCollector(db_path, now=lambda: now, maintain=False) as collector:
        if collector.store.query_one("SELECT count(*) FROM samples")[0]:
            raise MonitorError(f"store {db_path} already holds samples; the demo writes only into a new one")
        samples: List[tuple] = []
        for target, (every, rate, mean, spread) in DEMO_SYNC_TARGETS.items():
            offset = rng.random()
            for i, ts in enumerate(_demo_times(start, now, every)):
                ok = _demo_succeeds(i, offset, rate)
                duration = max(0.1, rng.gauss(mean, spread) * (1.0 if ok else 1.6))
                outcome = "success" if ok else "failure"
                samples += [(f"sync_{target}_{outcome}", duration, {"target": target}, ts),
                            (f"sync_{target}_files", float(rng.randint(0, 40) if ok else 0), {"target": target}, ts)]
        samples.append(("sync_icloud_success", 14.2, {"target": "icloud"}, now - 5400.0))  # one slow sync
        for agent, (mean, spread) in DEMO_AGENTS.items():
            offset = rng.random()
            for i, ts in enumerate(_demo_times(start + 600.0, now, 3600.0)):
                outcome = "success" if _demo_succeeds(i, offset, 0.98) else "failure"
                samples.append((f"agent_{agent}_{outcome}", max(0.05, rng.gauss(mean, spread)), {"agent": agent}, ts))
        samples.append(("agent_synthesizer_success", 9.8, {"agent": "synthesizer"}, now - 3 * 3600.0))
        samples += [("disk_free_bytes", 80e9 - (ts - start) * 5e3 + rng.gauss(0, 2e8), {"mount": "/"}, ts)
                    for ts in _demo_times(start, now, 600.0)]
        collector.record_many(samples)
        _demo_breakers(collector, start, now, rng)
        collector.roll_up()
        _demo_jobs(collector, start, now, rng)
        results = run_checks(default_checks(collector), CheckContext(collector, now))
        record_check_results(collector, results, now)
        samples_written = collector.store.query_one("SELECT count(*) FROM samples")[0]
    _demo_alerts(db_path, now)
    return {"samples": samples_written, "alerts": len(DEMO_ALERTS)}


if __name__ == "__main__":
    sys.exit(main())
