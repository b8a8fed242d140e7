#!/usr/bin/env python3
"""metasystem-monitor's terminal dashboard: sync targets, breakers, agents, jobs, your series, alerts, checks.

Standard library only, Python 3.9+. Keep it beside metasystem_monitor.py:

    python3 monitoring_dashboard.py               # refreshes every 10 seconds; q quits
    python3 monitoring_dashboard.py --refresh 5
    python3 monitoring_dashboard.py --summary     # one JSON object, for jq and shell pipelines
    python3 monitoring_dashboard.py --once        # the screen once, as plain text (also when piped)

Tab moves between sections; Enter shows your series one at a time, full screen,
with a chart of the window (Left and Right for the others, b to come back).

Everything shown comes from metasystem_monitor.read_summary() (a series full
screen from read_series()), so the screen and --summary always agree. The
dashboard never writes to the store. Color goes off with NO_COLOR, --no-color or
TERM=dumb; a terminal that is not UTF-8, or --ascii, gets ASCII sparklines and
marks.

Exit codes: 0 quit or printed; 1 the summary or the screen could not be made (one
line on stderr); 2 a usage error.
"""

from __future__ import annotations

import os
import sys
import time
import unicodedata
from typing import Any, Callable, Dict, List, Optional, Tuple

import metasystem_monitor as mm

PROG = "monitoring_dashboard.py"
DEFAULT_REFRESH_S = 10
REFRESH_RANGE_S = (1, 3600)
PLAIN_WIDTH = 80
FULL_SIZE = (80, 24)  # below this, the lower-priority sections are dropped
MIN_SIZE = (20, 5)  # below this, one line says the terminal is too small
HEADER_LINES = 2
FOOTER_LINES = 1
ESCAPE_KEY = 27
ESCAPE_SEQUENCE_WAIT_MS = 50  # the rest of ESC [ B arrives together; a lone Escape has nothing after it
# What a terminal that is not in keypad mode sends for the keys that scroll, after ESC and [ or O.
ESCAPE_SEQUENCES = {"A": "KEY_UP", "B": "KEY_DOWN", "C": "KEY_RIGHT", "D": "KEY_LEFT", "Z": "KEY_BTAB",
                    "H": "KEY_HOME", "F": "KEY_END", "1~": "KEY_HOME", "7~": "KEY_HOME", "4~": "KEY_END",
                    "8~": "KEY_END", "5~": "KEY_PPAGE", "6~": "KEY_NPAGE"}
WIDE = 110  # from this width on, rows show more columns

SPARK_UNICODE = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-:=+*#"
MARKS = {"unicode": {"anomaly": "◆", "up": "↑", "down": "↓", "left": "←", "right": "→", "rule": "─"},
         "ascii": {"anomaly": "!", "up": "Up", "down": "Down", "left": "Left", "right": "Right", "rule": "-"}}
ENTER_KEYS = (10, 13)  # and curses.KEY_ENTER
TAB_KEY = 9

# A line is a list of (text, style) segments. Styles name a meaning; the curses loop picks the look.
Segment = Tuple[str, str]
Line = List[Segment]

# Sections in the order they are drawn, each with its priority: on a small screen, the highest
# priorities (lowest numbers) are kept.
SECTION_PRIORITY = {"sync": 1, "circuit_breakers": 2, "jobs": 3, "metrics": 6, "agents": 5, "alerts": 4,
                    "health": 0}


## Text ########################################################################

def cell_width(char: str) -> int:
    """Columns a character takes: 2 for wide East Asian ones, 0 for combining marks, else 1."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def width_of(text: str) -> int:
    return sum(cell_width(char) for char in text)


def clip(text: str, cells: int) -> str:
    """The longest start of ``text`` that fits in ``cells`` columns."""
    used = 0
    for index, char in enumerate(text):
        used += cell_width(char)
        if used > cells:
            return text[:index]
    return text


def pad(text: str, cells: int) -> str:
    """``text`` cut or padded with spaces to exactly ``cells`` columns."""
    text = clip(text, cells)
    return text + " " * (cells - width_of(text))


def clip_line(line: Line, cells: int) -> Line:
    """The segments of ``line`` that fit in ``cells`` columns, the last one cut."""
    out: Line = []
    for text, style in line:
        if cells <= 0:
            break
        piece = clip(text, cells)
        if piece:
            out.append((piece, style))
        cells -= width_of(piece)
    return out


def plain(line: Line) -> str:
    return "".join(text for text, _ in line).rstrip()


def sparkline(values: List[float], ascii_only: bool = False, marked: Tuple[int, ...] = (),
              failed: Tuple[int, ...] = ()) -> Line:
    """One character per value, scaled between the smallest and the largest; marked values (anomalies)
    are drawn as a mark of their own, so they show without color, and failed runs in the failure color."""
    levels = SPARK_ASCII if ascii_only else SPARK_UNICODE
    mark = MARKS["ascii" if ascii_only else "unicode"]["anomaly"]
    if not values:
        return []
    usual = [value for index, value in enumerate(values) if index not in marked] or values
    low, high = min(usual), max(usual)  # scaled without the anomalies, which would flatten the rest
    line: Line = []
    for index, value in enumerate(values):
        if index in marked:
            line.append((mark, "anomaly"))
            continue
        step = (len(levels) - 1) * (value - low) / (high - low) if high > low else (len(levels) - 1) / 2
        step = min(max(step, 0), len(levels) - 1)
        line.append((levels[int(round(step))], "failed" if index in failed else "spark"))
    return _merged(line)


def _merged(line: Line) -> Line:
    """Neighbouring segments of one style joined, so the screen is drawn in fewer pieces."""
    out: Line = []
    for text, style in line:
        if out and out[-1][1] == style:
            out[-1] = (out[-1][0] + text, style)
        else:
            out.append((text, style))
    return out


def seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}s"
    if value < 600:
        return f"{value:.1f}s"
    return mm.format_span(value)


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}%"


def ago(when: Optional[str], now: Optional[str]) -> str:
    """How long before ``now`` (the summary's time) ``when`` was, for people: ``2h 5m ago``."""
    then, at = mm.epoch_of(when), mm.epoch_of(now)
    return "-" if then is None or at is None else f"{mm.format_span(at - then)} ago"


## Sections ####################################################################

def _state_cell(state: str) -> Segment:
    return (pad(state, 8), state.lower())


def _with_sparkline(line: Line, values: List[float], marked: List[int], width: int, ascii_only: bool,
                    failed: Tuple[int, ...] = ()) -> Line:
    """``line``, then as many of the newest ``values`` as a sparkline as the width leaves room for, and
    how many of those are anomalous, in words."""
    odd = len(marked)
    note = f" {odd} anomalous" if odd else ""
    room = width - width_of(plain(line) + " ") - 2 - len(note)
    if room < 4 or not values:  # no room for a sparkline; the count of anomalies still shows
        return line + [(note, "anomaly")] if note else line
    start = max(0, len(values) - room)
    shown = values[start:]
    marked_shown = tuple(i - start for i in marked if i >= start)
    failed_shown = tuple(i - start for i in failed if i >= start)
    line = line + [(" ", "plain")] + sparkline(shown, ascii_only, marked_shown, failed_shown)
    return line + [(note, "anomaly")] if note else line


def _runs_line(name: str, entry: Dict[str, Any], columns: List[str], width: int, ascii_only: bool) -> Line:
    recent = entry.get("recent") or {}
    line: Line = [("  ", "plain"), _state_cell(mm.rate_state(entry.get("success_rate"))),
                  (" " + pad(mm.inert_text(name, ascii_only), 14) + " " + " ".join(columns), "plain")]
    return _with_sparkline(line, recent.get("durations", []), list(recent.get("anomalous", ())), width, ascii_only,
                           tuple(recent.get("failed", ())))


def omitted_line(summary: Dict[str, Any], section: str, noun: str) -> List[Line]:
    """``and 24,950 more sync targets: 24,900 OK, 50 UNKNOWN`` when the summary left rows out."""
    counts = (summary.get("omitted") or {}).get(section) or {}
    if not counts:
        return []
    states = ", ".join(f"{count:,} {state}" for state, count in counts.items())
    return [[(f"  and {sum(counts.values()):,} more {noun}: {states} (--all shows every one)", "dim")]]


def sync_lines(summary: Dict[str, Any], width: int, ascii_only: bool) -> List[Line]:
    lines = []
    for target, entry in sorted(summary["sync"].items()):
        columns = [f"{percent(entry.get('success_rate')):>6}", f"{entry.get('attempts', 0):>4} runs",
                   f"avg {seconds(entry.get('avg_duration')):>6}"]
        if width >= WIDE:
            columns.append(f"last ok {ago(entry.get('last_success'), summary.get('generated_at'))}")
        lines.append(_runs_line(target, entry, columns, width, ascii_only))
    return lines + omitted_line(summary, "sync", "sync targets")  # none: the section is hidden


def breaker_lines(summary: Dict[str, Any], width: int, ascii_only: bool) -> List[Line]:
    lines = []
    for name, entry in sorted(summary["circuit_breakers"].items()):
        state = entry.get("state") or "unknown"
        failures = entry.get("failures")
        line: Line = [("  ", "plain"), _state_cell(mm.BREAKER_STATE_WORDS.get(state, "UNKNOWN")),
                      (" " + pad(mm.inert_text(name, ascii_only), 18) + f" {pad(state, 9)} failures "
                       f"{'-' if failures is None else failures:>3} since {mm.local_time(entry.get('since'))}",
                       "plain")]
        lines.append(_with_sparkline(line, (entry.get("recent") or {}).get("failures", []), [], width, ascii_only))
    return lines  # none: the section is hidden


def agent_lines(summary: Dict[str, Any], width: int, ascii_only: bool) -> List[Line]:
    lines = []
    for agent, entry in sorted(summary["agents"].items()):
        columns = [f"{percent(entry.get('success_rate')):>6}", f"{entry.get('executions', 0):>4} runs",
                   f"avg {seconds(entry.get('avg_duration')):>6}", f"latest {seconds(entry.get('latest_duration')):>6}"]
        lines.append(_runs_line(agent, entry, columns, width, ascii_only))
    return lines + omitted_line(summary, "agents", "agents")  # none: the section is hidden


def job_lines(summary: Dict[str, Any], width: int, ascii_only: bool) -> List[Line]:
    """The jobs ``run`` wraps and the job checks expect: nothing at all (the section is hidden) until
    there is one. A late job says ``late`` and how often it should start; the state says CRITICAL."""
    lines = []
    for job, entry in sorted((summary.get("jobs") or {}).items()):
        code = entry.get("exit_code")
        late = entry.get("late") and entry.get("started")
        result = "late" if late else str(entry.get("outcome", "")) + (f" {code}" if code not in (None, 0) else "")
        every = f" (every {mm.format_span(entry['expected_every_s'], exact=True)})" if late else ""
        lines.append([("  ", "plain"), _state_cell(entry.get("state", "UNKNOWN")),
                      (" " + pad(mm.inert_text(job, ascii_only), 14) + f" {pad(result, 12)} "
                       f"took {seconds(entry.get('duration_s')):>6}  "
                       f"last run {ago(entry.get('started'), summary.get('generated_at'))}{every}", "plain")])
    return lines


def metric_lines(summary: Dict[str, Any], width: int, ascii_only: bool) -> List[Line]:
    """The user's own series: the latest value and the recent ones; hidden until there is one."""
    lines = []
    for key, entry in (summary.get("metrics") or {}).items():
        recent = entry.get("recent") or {}
        line: Line = [("  " + pad(mm.inert_text(key, ascii_only), 40) + " "
                       + f"{mm.series_figure(entry.get('name', ''), entry.get('latest')):>10}", "plain")]
        lines.append(_with_sparkline(line, recent.get("values", []), list(recent.get("anomalous", ())), width,
                                     ascii_only))
    return lines


def alert_lines(summary: Dict[str, Any], width: int, ascii_only: bool) -> List[Line]:
    lines = []
    for alert in summary["alerts"]:
        kind = alert.get("kind")
        word = {"resolved": "RESOLVED", "acknowledged": "ACKED"}.get(kind, str(alert.get("severity", "")).upper())
        style = "ok" if kind in ("resolved", "acknowledged") else mm.SEVERITY_STATE_WORDS.get(
            alert.get("severity"), "UNKNOWN").lower()
        channels = ", ".join(f"{mm.inert_text(name, ascii_only)} {mm.inert_text(outcome, ascii_only)}"
                             for name, outcome in sorted(alert.get("channels", {}).items()))
        title = mm.inert_text(alert.get("title", "") + (f" ({alert['message']})" if alert.get("message") else ""),
                              ascii_only)
        lines.append([("  " + mm.local_time(alert.get("time")) + " ", "plain"), (pad(word, 8), style),
                      (f" {title}" + (f"  [{channels}]" if channels else ""), "plain")])
    hours = summary.get("window_hours", mm.DEFAULT_WINDOW_HOURS)
    return lines or [[(f"  no alerts in the past {hours:g} hours", "dim")]]


def health_lines(summary: Dict[str, Any], width: int, ascii_only: bool) -> List[Line]:
    lines = []
    for name, entry in sorted(summary["health"].items()):
        text = mm.inert_text(entry.get("summary", ""), ascii_only)
        lines.append([("  ", "plain"), _state_cell(entry.get("state", "UNKNOWN")),
                      (" " + pad(mm.inert_text(name, ascii_only), 17) + " " + pad(mm.check_age(entry), 9) + " " + text,
                       "plain")])
    return lines or [[("  no check has run yet: metasystem_monitor.py check (from cron, every 5 minutes)", "dim")]]


SECTIONS: Tuple[Tuple[str, str, Callable[[Dict[str, Any], int, bool], List[Line]]], ...] = (
    ("sync", "SYNC OPERATIONS", sync_lines),
    ("circuit_breakers", "CIRCUIT BREAKERS", breaker_lines),
    ("agents", "AGENTS", agent_lines),
    ("jobs", "JOBS", job_lines),
    ("metrics", "METRICS", metric_lines),
    ("alerts", "RECENT ALERTS", alert_lines),
    ("health", "SYSTEM HEALTH", health_lines),
)


## Screens #####################################################################

def header_lines(summary: Dict[str, Any], width: int, error: Optional[str] = None) -> List[Line]:
    status = str(summary.get("status", "unknown")).upper()
    updated = f"updated {mm.local_time(summary.get('generated_at'), seconds=True, zone=True)}"
    title = "METASYSTEM MONITOR"
    first: Line = [(title, "title"), (" " * max(1, width - len(title) - len(updated)) + updated, "plain")]
    second: Line = [("status ", "plain"), (status, status.lower()),
                    (f"   window {summary.get('window_hours', mm.DEFAULT_WINDOW_HOURS):g} h", "plain")]
    if error:
        second.append(("   " + mm.inert_text(error), "critical"))
    return [first, second]


def section_blocks(summary: Dict[str, Any], width: int, ascii_only: bool) -> List[Tuple[str, List[Line]]]:
    """Each section as (key, lines): a blank line, its title, a rule, then its rows."""
    rule = MARKS["ascii" if ascii_only else "unicode"]["rule"] * width
    blocks = [(key, render_rows(summary, width, ascii_only)) for key, title, render_rows in SECTIONS]
    titles = {key: title for key, title, _ in SECTIONS}
    return [(key, [[("", "plain")], [(titles[key], "title")], [(rule, "dim")]] + rows)
            for key, rows in blocks if rows]  # a section with no row at all (jobs before the first) is hidden


def shown_blocks(summary: Dict[str, Any], width: int, height: Optional[int] = None,
                 ascii_only: bool = False) -> List[Tuple[str, List[Line]]]:
    """Every section, or on a screen smaller than 80x24 those of the highest priority that fit."""
    blocks = section_blocks(summary, width, ascii_only)
    if height is not None and (width < FULL_SIZE[0] or height < FULL_SIZE[1]):
        room = height - HEADER_LINES - FOOTER_LINES
        kept, used = set(), 0
        for key, lines in sorted(blocks, key=lambda block: SECTION_PRIORITY[block[0]]):
            if used + len(lines) <= room or not kept:
                kept.add(key)
                used += len(lines)
        blocks = [block for block in blocks if block[0] in kept]
    return blocks


def body_lines(summary: Dict[str, Any], width: int, height: Optional[int] = None,
               ascii_only: bool = False) -> List[Line]:
    return [line for _, lines in shown_blocks(summary, width, height, ascii_only) for line in lines]


def section_titles_at(summary: Dict[str, Any], width: int, height: int, ascii_only: bool = False) -> List[int]:
    """The body line of each shown section's title: where Tab and Shift-Tab scroll to."""
    starts, line = [], 0
    for _, lines in shown_blocks(summary, width, height, ascii_only):
        starts.append(line + 1)  # after the blank line that opens the block
        line += len(lines)
    return starts


def footer_line(width: int, ascii_only: bool, first: int, shown: int, total: int, keys: Optional[str] = None,
                where: Optional[str] = None) -> Line:
    marks = MARKS["ascii" if ascii_only else "unicode"]
    keys = keys or f"q quit  h help  r refresh  Tab sections  Enter series  {marks['up']}{marks['down']} PgUp PgDn"
    if where is None:
        where = f"lines {first + 1}-{first + shown} of {total}" if total > shown else ""
    keys = clip(keys, width - len(where) - 1) if where else keys  # where the reader is matters more
    return [(keys + " " * max(1, width - width_of(keys) - len(where)) + where, "dim")]


HELP = (
    "KEYS",
    "  q, Escape     quit",
    "  r             refresh now",
    "  h, ?          this help (any key returns)",
    "  Up, Down      scroll a line",
    "  PgUp, PgDn    scroll a page; Home, End",
    "  Tab, n        the next section; Shift-Tab, p the one before",
    "  Enter, m      your series one at a time, full screen: Left, Right",
    "                (or n, p) the others; b, Escape or Enter back",
    "",
    "STATES",
    "  OK, WARNING, CRITICAL, UNKNOWN: the checks' words, shown in color too",
    "  a sync target or agent: OK at 90% success or more, WARNING at 50%",
    "  a circuit breaker: closed OK, half_open WARNING, open CRITICAL",
    "  sparklines: the recent run durations; a mark is a run the robust detector",
    "  finds anomalous",
)


def screen(summary: Dict[str, Any], width: int, height: int, *, scroll: int = 0, ascii_only: bool = False,
           show_help: bool = False, error: Optional[str] = None) -> Tuple[List[Line], int]:
    """The lines of one screen of ``width`` x ``height``, each clipped to the width, and the scroll
    position actually used (kept within the content)."""
    if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
        return [clip_line([("too small", "warning")], width)] if height > 0 and width > 0 else [], 0
    room = height - HEADER_LINES - FOOTER_LINES
    if show_help:
        body = [[(text, "title" if text.isupper() else "plain")] for text in HELP]
    else:
        body = body_lines(summary, width, height, ascii_only)
    scroll = max(0, min(scroll, len(body) - room))
    shown = body[scroll:scroll + room]
    lines = header_lines(summary, width, error) + shown + [[("", "plain")]] * (room - len(shown))
    # The last cell of the screen cannot be written: the footer ends one column short of it.
    lines.append(footer_line(width - 1, ascii_only, scroll, len(shown), len(body)))
    return [clip_line(line, width) for line in lines], scroll


CHART_LABEL_CELLS = 11  # the value written at the chart's top and bottom rows, and a space


def chart_columns(detail: Dict[str, Any], columns: int) -> Tuple[List[Optional[float]], List[bool]]:
    """The series' points placed by time into ``columns`` (the highest of those falling in each, so a
    spike shows; None where none did, a gap), and which columns hold an anomalous point."""
    until = mm.epoch_of(detail["generated_at"])
    since = until - detail["window_hours"] * 3600.0
    slices: List[List[float]] = [[] for _ in range(columns)]
    marked = [False] * columns
    anomalous = set(detail.get("anomalous", ()))
    for index, (t, value) in enumerate(detail.get("points", [])):
        column = min(columns - 1, max(0, int((t - since) / max(until - since, 1e-9) * columns)))
        slices[column].append(value)
        marked[column] = marked[column] or index in anomalous
    return [max(part) if part else None for part in slices], marked


def chart_lines(detail: Dict[str, Any], width: int, rows: int, ascii_only: bool) -> List[Line]:
    """The window as an area chart ``rows`` high: a column per slice of time, eighth-cell tops, the
    highest and lowest values written on the left, anomalous columns in their own style."""
    columns = max(1, width - CHART_LABEL_CELLS)
    if not detail.get("points") or not detail.get("generated_at"):
        return [[("  no samples in this window", "dim")]]
    values, marked = chart_columns(detail, columns)
    known = [value for value in values if value is not None]
    if not known or rows < 2:
        return [[("  no samples in this window", "dim")]]
    low, high, name = min(known), max(known), detail.get("name", "")
    levels = SPARK_ASCII if ascii_only else SPARK_UNICODE
    full = "#" if ascii_only else "█"
    eighths = [None if value is None else (1 + (rows * 8 - 1) * ((value - low) / (high - low) if high > low else 0.5))
               for value in values]
    lines = []
    for row in range(rows):  # the top row first
        floor = (rows - 1 - row) * 8
        label = mm.series_figure(name, high) if row == 0 else mm.series_figure(name, low) if row == rows - 1 else ""
        line: Line = [(f"{clip(label, CHART_LABEL_CELLS - 1):>{CHART_LABEL_CELLS - 1}} ", "dim")]  # rows align
        for column, height in enumerate(eighths):
            if height is None or height <= floor:
                cell = " "
            elif height >= floor + 8:
                cell = full
            else:
                cell = levels[min(len(levels) - 1, int(height - floor))]
            line.append((cell, "anomaly" if marked[column] and cell != " " else "spark"))
        lines.append(_merged(line))
    return lines


def series_screen(detail: Dict[str, Any], width: int, height: int, *, ascii_only: bool = False,
                  position: str = "", error: Optional[str] = None) -> List[Line]:
    """One series full screen: its key, its figures over the window, and its chart, as tall as fits."""
    if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
        return [clip_line([("too small", "warning")], width)] if height > 0 and width > 0 else []
    marks = MARKS["ascii" if ascii_only else "unicode"]
    key = mm.inert_text(detail.get("key", ""), ascii_only)
    updated = f"updated {mm.local_time(detail.get('generated_at'), seconds=True, zone=True)}"
    first: Line = [(key, "title"), (" " * max(1, width - width_of(key) - len(updated)) + updated, "plain")]
    figures = "   ".join(f"{field} {mm.series_figure(detail.get('name', ''), detail.get(field))}"
                         for field in ("latest", "min", "max", "avg"))
    second: Line = [(f"{figures}   {detail.get('count', 0):,} samples in "
                     f"{detail.get('window_hours', mm.DEFAULT_WINDOW_HOURS):g} h", "plain")]
    if detail.get("anomalies"):
        second.append((f"   {detail['anomalies']:,} anomalous {marks['anomaly']}", "anomaly"))
    if error:
        second.append(("   " + mm.inert_text(error), "critical"))
    rows = height - HEADER_LINES - FOOTER_LINES - 2
    until = mm.epoch_of(detail.get("generated_at")) if detail.get("generated_at") else None
    ends = ""
    if until is not None:
        start = mm.local_time(until - detail.get("window_hours", mm.DEFAULT_WINDOW_HOURS) * 3600.0)
        end = mm.local_time(until)
        ends = " " * CHART_LABEL_CELLS + start + " " * max(1, width - CHART_LABEL_CELLS - len(start) - len(end)) + end
    body = [[("", "plain")]] + chart_lines(detail, width, rows, ascii_only) + [[(ends, "dim")]]
    body += [[("", "plain")]] * (height - HEADER_LINES - FOOTER_LINES - len(body))
    keys = f"b back  {marks['left']} {marks['right']} series  r refresh  q quit"
    lines = [first, second] + body[:height - HEADER_LINES - FOOTER_LINES]
    lines.append(footer_line(width - 1, ascii_only, 0, 0, 0, keys=keys, where=position))
    return [clip_line(line, width) for line in lines]


def plain_text(summary: Dict[str, Any], ascii_only: bool = False, width: int = PLAIN_WIDTH) -> str:
    """The whole dashboard once, as plain text of ``width`` columns: for --once and redirected output."""
    lines = header_lines(summary, width) + body_lines(summary, width, None, ascii_only)
    return "\n".join(plain(clip_line(line, width)) for line in lines) + "\n"


## The curses loop #############################################################

class Terminal:
    """The curses screen, started without curses.wrapper (which turns color on even under NO_COLOR)
    and always given back to the terminal as it was."""

    def __init__(self, color: bool):
        import curses

        self.curses = curses
        if hasattr(curses, "set_escdelay"):
            curses.set_escdelay(25)  # Escape quits at once, not after a second
        else:
            os.environ.setdefault("ESCDELAY", "25")
        self.window = curses.initscr()
        try:
            curses.noecho()
            curses.cbreak()
            self.window.keypad(True)
            try:
                curses.curs_set(0)
            except curses.error:
                pass  # a terminal that cannot hide its cursor
            self.styles = self._styles(color and curses.has_colors())
        except BaseException:
            self.close()
            raise

    def _styles(self, color: bool) -> Dict[str, int]:
        curses = self.curses
        bold = curses.A_BOLD
        styles = {"title": bold, "critical": bold, "anomaly": bold, "dim": curses.A_DIM}
        if not color:
            return styles
        curses.start_color()
        try:
            curses.use_default_colors()
            background = -1
        except curses.error:
            background = curses.COLOR_BLACK
        for number, (style, foreground, extra) in enumerate((
                ("ok", curses.COLOR_GREEN, 0), ("warning", curses.COLOR_YELLOW, bold),
                ("critical", curses.COLOR_RED, bold), ("unknown", curses.COLOR_MAGENTA, bold),
                ("anomaly", curses.COLOR_RED, bold), ("spark", curses.COLOR_CYAN, 0), ("failed", curses.COLOR_RED, 0),
                ("title", curses.COLOR_CYAN, bold),
        ), start=1):
            curses.init_pair(number, foreground, background)
            styles[style] = curses.color_pair(number) | extra
        return styles

    def size(self) -> Tuple[int, int]:
        """The window's size, brought up to the terminal's first: a SIGWINCH that came while curses
        was busy can be missed, and the next refresh must still see the new size."""
        try:
            columns, lines = os.get_terminal_size(sys.__stdout__.fileno())
        except (OSError, AttributeError, ValueError):
            columns, lines = 0, 0
        if lines and columns and self.curses.is_term_resized(lines, columns):
            self.curses.resizeterm(lines, columns)
        height, width = self.window.getmaxyx()
        return width, height

    def draw(self, lines: List[Line]) -> None:
        """Every segment at its place; nothing is written past the window (the last cell of the last
        row is left alone, as writing it raises in curses)."""
        curses = self.curses
        width, height = self.size()
        self.window.erase()
        for row, line in enumerate(lines[:height]):
            column = 0
            for text, style in clip_line(line, width - 1 if row == height - 1 else width):
                try:
                    self.window.addstr(row, column, text, self.styles.get(style, 0))
                except curses.error:
                    break
                column += width_of(text)
        self.window.noutrefresh()
        curses.doupdate()

    def key(self, timeout_s: float) -> int:
        """The next key, or -1 after ``timeout_s``: the loop sleeps here, costing no CPU."""
        self.window.timeout(max(1, int(timeout_s * 1000)))
        key = self.window.getch()
        return self._rest_of_escape() if key == ESCAPE_KEY else key

    def _rest_of_escape(self) -> int:
        """Escape, or the key an escape sequence curses did not know names (ESC [ B is Down)."""
        self.window.timeout(ESCAPE_SEQUENCE_WAIT_MS)
        following: List[int] = []
        while len(following) < 4:
            key = self.window.getch()
            if key == -1:
                break
            following.append(key)
            if len(following) > 1 and (chr(key).isalpha() or chr(key) == "~"):
                break
        return escape_key(following, self.curses)

    def resized(self) -> None:
        try:
            self.curses.update_lines_cols()
        except AttributeError:
            pass

    def close(self) -> None:
        curses = self.curses
        try:
            self.window.keypad(False)
            curses.nocbreak()
            curses.echo()
        finally:
            curses.endwin()


class Dashboard:
    """The state of a running dashboard: the last summary, the scroll position, help shown or not, and
    the series shown full screen, if one is."""

    def __init__(self, collect: Callable[[], Dict[str, Any]], refresh_s: float, ascii_only: bool,
                 clock: Callable[[], float] = time.monotonic,
                 collect_series: Optional[Callable[[str], Optional[Dict[str, Any]]]] = None):
        self.collect = collect
        self.collect_series = collect_series
        self.refresh_s = refresh_s
        self.ascii_only = ascii_only
        self.clock = clock
        self.summary: Dict[str, Any] = empty_summary()
        self.error: Optional[str] = None
        self.scroll = 0
        self.show_help = False
        self.next_refresh = 0.0
        self.series: Optional[str] = None  # the key of the series shown full screen
        self.detail: Optional[Dict[str, Any]] = None
        self.size = FULL_SIZE

    def refresh_if_due(self) -> None:
        if self.clock() < self.next_refresh:
            return
        try:
            self.summary, self.error = self.collect(), None
            if self.series is not None and self.collect_series is not None:
                self.detail = self.collect_series(self.series)
        except Exception as err:  # the last good screen stays, with the reason on its second line
            self.error = " ".join(str(err).split()) or type(err).__name__
        self.next_refresh = self.clock() + self.refresh_s

    def lines(self, width: int, height: int) -> List[Line]:
        self.size = (width, height)
        if self.series is not None and not self.show_help:
            keys = self.series_keys()
            position = f"{keys.index(self.series) + 1} of {len(keys)}" if self.series in keys else ""
            detail = self.detail or {"key": self.series, "generated_at": self.summary.get("generated_at"),
                                     "window_hours": self.summary.get("window_hours", mm.DEFAULT_WINDOW_HOURS)}
            if detail.get("generated_at") in (None, "-"):
                detail = dict(detail, generated_at=None)
            return series_screen(detail, width, height, ascii_only=self.ascii_only, position=position,
                                 error=self.error)
        lines, self.scroll = screen(self.summary, width, height, scroll=self.scroll, ascii_only=self.ascii_only,
                                    show_help=self.show_help, error=self.error)
        return lines

    def series_keys(self) -> List[str]:
        return list((self.summary.get("metrics") or {}).keys())

    def open_series(self, key: Optional[str]) -> None:
        """Show ``key`` full screen (None: back to the overview), read at once."""
        self.series, self.detail = key, None
        self.next_refresh = 0.0

    def step_series(self, step: int) -> None:
        keys = self.series_keys()
        if keys:
            at = keys.index(self.series) if self.series in keys else -step if step > 0 else 0
            self.open_series(keys[(at + step) % len(keys)])

    def step_section(self, step: int) -> None:
        """Scroll to the next section's title (``step`` 1) or the one before (-1)."""
        starts = section_titles_at(self.summary, *self.size, self.ascii_only)
        if step > 0:
            # A title on the top row, or under the blank line that opens its block, is where the reader is.
            self.scroll = next((start for start in starts if start > self.scroll + 1), self.scroll)
        else:
            self.scroll = next((start for start in reversed(starts) if start < self.scroll), 0)

    def handle(self, key: int, page: int, curses: Any) -> bool:
        """Act on one key; False when it quits."""
        if self.show_help and key != -1 and key != curses.KEY_RESIZE:
            self.show_help = False
            return True
        if key in (ord("q"), ord("Q")) or (key == ESCAPE_KEY and self.series is None):
            return False
        if key in (ord("r"), ord("R")):
            self.next_refresh = 0.0
        elif key in (ord("h"), ord("H"), ord("?")):
            self.show_help = True
        elif self.series is not None:
            self._handle_series_key(key, curses)
        else:
            self._handle_overview_key(key, page, curses)
        return True

    def _handle_series_key(self, key: int, curses: Any) -> None:
        if key in (ord("b"), ord("B"), ord("m"), ESCAPE_KEY, curses.KEY_BACKSPACE, 127, curses.KEY_ENTER,
                   *ENTER_KEYS):
            self.open_series(None)
        elif key in (curses.KEY_RIGHT, ord("n"), TAB_KEY):
            self.step_series(1)
        elif key in (curses.KEY_LEFT, ord("p"), curses.KEY_BTAB):
            self.step_series(-1)

    def _handle_overview_key(self, key: int, page: int, curses: Any) -> None:
        moves = {curses.KEY_UP: -1, curses.KEY_DOWN: 1, curses.KEY_PPAGE: -page, curses.KEY_NPAGE: page,
                 curses.KEY_HOME: -10 ** 9, curses.KEY_END: 10 ** 9}
        if key in moves:
            self.scroll = max(0, self.scroll + moves[key])
        elif key in (TAB_KEY, ord("n")):
            self.step_section(1)
        elif key in (curses.KEY_BTAB, ord("p")):
            self.step_section(-1)
        elif key in (curses.KEY_ENTER, ord("m"), *ENTER_KEYS) and self.series_keys():
            self.open_series(self.series_keys()[0])

    def run(self, terminal: Terminal) -> int:
        curses = terminal.curses
        while True:
            self.refresh_if_due()
            width, height = terminal.size()
            terminal.draw(self.lines(width, height))
            key = terminal.key(max(0.0, self.next_refresh - self.clock()))
            if key == curses.KEY_RESIZE:
                terminal.resized()
            elif not self.handle(key, max(1, height - HEADER_LINES - FOOTER_LINES), curses):
                return 0


def escape_key(following: List[int], curses: Any) -> int:
    """The key that ESC followed by ``following`` names: Escape alone, an arrow or paging key for ESC [ B
    and its like, and -1 (nothing) for any other sequence, so that no unknown key quits."""
    if not following:
        return ESCAPE_KEY
    text = "".join(chr(key) for key in following if 0 <= key < 128)
    name = ESCAPE_SEQUENCES.get(text[1:]) if text[:1] in ("[", "O") else None
    return getattr(curses, name) if name else -1


def empty_summary() -> Dict[str, Any]:
    return {"status": "unknown", "generated_at": "-", "window_hours": mm.DEFAULT_WINDOW_HOURS, "sync": {},
            "circuit_breakers": {}, "agents": {}, "alerts": [], "health": {}}


## Command line ################################################################

def build_parser():
    import argparse

    parser = mm.parser_class()(
        prog=PROG, description="The metasystem-monitor dashboard: what the store holds, refreshed.",
        epilog="examples:\n  python3 monitoring_dashboard.py --refresh 5\n"
               "  python3 monitoring_dashboard.py --summary | jq .status",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="the SQLite store (default: $METASYSTEM_DB, else $METASYSTEM_HOME/metrics.db, "
                                     "else ~/.metasystem/metrics.db)")
    parser.add_argument("--config", help="the INI file (default: $METASYSTEM_CONFIG, else alerting-config.ini "
                                         "beside the store)")
    parser.add_argument("--refresh", type=_refresh_seconds, default=DEFAULT_REFRESH_S, metavar="SECONDS",
                        help=f"seconds between refreshes, {REFRESH_RANGE_S[0]} to {REFRESH_RANGE_S[1]} "
                             f"(default {DEFAULT_REFRESH_S})")
    parser.add_argument("--hours", type=_window_hours, default=mm.DEFAULT_WINDOW_HOURS, metavar="H",
                        help="the window shown, in hours (default 24)")
    parser.add_argument("--once", action="store_true", help="print the screen once as plain text and exit")
    parser.add_argument("--summary", action="store_true", help="print the summary as one JSON object and exit")
    parser.add_argument("--no-color", action="store_true", help="no color (so do NO_COLOR and TERM=dumb)")
    parser.add_argument("--ascii", action="store_true", help="ASCII sparklines and marks")
    parser.add_argument("--all", action="store_true",
                        help=f"every sync target and agent (default: the {mm.SUMMARY_SECTION_ROWS} in the worst state, "
                             "the rest counted)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {mm.__version__}")
    return parser


def _refresh_seconds(text: str) -> float:
    import argparse

    try:
        value = mm.decimal_number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not REFRESH_RANGE_S[0] <= value <= REFRESH_RANGE_S[1]:
        raise argparse.ArgumentTypeError(f"must be {REFRESH_RANGE_S[0]} to {REFRESH_RANGE_S[1]} seconds, got {text!r}")
    return value


def _window_hours(text: str) -> float:
    import argparse

    try:
        return mm.window_hours(mm.decimal_number(text))
    except (ValueError, mm.MonitorError):
        raise argparse.ArgumentTypeError(f"must be a positive number of hours, got {text!r}") from None


def use_color(args, environ: Dict[str, str]) -> bool:
    return not (args.no_color or environ.get("NO_COLOR") or environ.get("TERM", "") == "dumb")


def terminal_is_utf8() -> bool:
    import locale

    try:
        return locale.nl_langinfo(locale.CODESET).replace("-", "").upper() == "UTF8"
    except AttributeError:  # no nl_langinfo on this platform
        return (sys.stdout.encoding or "").replace("-", "").upper() == "UTF8"


def fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def main(argv: Optional[List[str]] = None, environ: Optional[Dict[str, str]] = None) -> int:
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    config_path = mm.resolve_config_path(args.config, environ)
    db_path = mm.resolve_db_path(args.db, environ)
    try:
        config = mm.load_config(config_path, required=bool(args.config or environ.get("METASYSTEM_CONFIG")))
        options = mm.summary_options(config)
        now = mm.cli_clock()

        def collect(rows: int = 0) -> Dict[str, Any]:
            """The summary; ``rows``: the screen's, so your series fill it when there are that many."""
            return mm.read_summary(db_path, args.hours, now=now, limit=None if args.all else mm.SUMMARY_SECTION_ROWS,
                                   metrics_limit=max(mm.SUMMARY_METRICS, rows), **options)

        def collect_series(key: str) -> Optional[Dict[str, Any]]:
            return mm.read_series(db_path, key, args.hours, now=now)

        if args.summary:
            sys.stdout.write(mm.json_text(collect()) + "\n")
            return 0
        if args.once or not sys.stdout.isatty():
            ascii_only = args.ascii or (sys.stdout.encoding or "").replace("-", "").upper() != "UTF8"
            sys.stdout.write(plain_text(collect(), ascii_only))
            return 0
        return run_screen(args, collect, collect_series, environ)
    except mm.MonitorError as err:
        return fail(str(err))
    except BrokenPipeError:
        return 1


def run_screen(args, collect: Callable[[int], Dict[str, Any]],
               collect_series: Callable[[str], Optional[Dict[str, Any]]], environ: Dict[str, str]) -> int:
    import curses
    import locale
    import signal

    locale.setlocale(locale.LC_ALL, "")
    ascii_only = args.ascii or not terminal_is_utf8()

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        terminal = Terminal(use_color(args, environ))
    except curses.error as err:
        return fail(f"cannot start the screen ({err}); --once prints it as plain text")
    def fitted() -> Dict[str, Any]:  # as many of your series as the screen has rows for
        return collect(terminal.size()[1] - HEADER_LINES - FOOTER_LINES)

    try:
        return Dashboard(fitted, args.refresh, ascii_only, collect_series=collect_series).run(terminal)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        terminal.close()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
