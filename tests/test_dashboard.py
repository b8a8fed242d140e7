"""The dashboard: its renderers as pure functions, its command line, and the real curses screen in a
pseudo-terminal."""

import curses
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import unittest

import metasystem_monitor as mm
import monitoring_dashboard as dash

from .support import REPO, SUBPROCESS_TIMEOUT_S, FakeClock, StoreTestCase, reap

DASHBOARD = os.path.join(REPO, "monitoring_dashboard.py")
GOLDEN = os.path.join(REPO, "tests", "data")
NOW = 1_800_000_000.0
PTY_TIMEOUT_S = 20
# SGR parameters that set a color: 30-39 and 90-97 foreground, 40-49 and 100-107 background.
COLOR_SGR = re.compile(rb"\x1b\[(?:[0-9;]*;)?(?:3[0-9]|4[0-9]|9[0-7]|10[0-7])(?:;[0-9;]*)?m")


def sample_summary():
    """A summary as read_summary() makes it, with every kind of row the screen draws."""
    return {
        "schema_version": 5, "generated_at": "2027-01-15T08:00:00.000+00:00", "window_hours": 24.0,
        "status": "critical",
        "sync": {
            "icloud": {"success_rate": 92.5, "attempts": 40, "avg_duration": 2.34,
                       "last_success": "2027-01-15T07:50:00.000+00:00",
                       "recent": {"durations": [2.0, 2.2, 2.4, 2.1, 2.3, 9.5, 2.2, 2.0], "failed": [2],
                                  "anomalous": [5]}},
            "external": {"success_rate": 75.0, "attempts": 20, "avg_duration": 1.89,
                         "last_success": "2027-01-15T06:10:00.000+00:00",
                         "recent": {"durations": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], "failed": [0, 1],
                                    "anomalous": []}},
            "nas": {"success_rate": None, "attempts": 0, "avg_duration": None, "last_success": None,
                    "recent": {"durations": [], "failed": [], "anomalous": []}},
        },
        "circuit_breakers": {
            "icloud_sync": {"state": "closed", "failures": 0, "since": "2027-01-14T22:00:00.000+00:00",
                            "recent": {"failures": [0.0, 3.0, 0.0]}},
            "external_sync": {"state": "open", "failures": 5, "since": "2027-01-15T07:30:00.000+00:00",
                              "recent": {"failures": [0.0, 5.0]}},
            "knowledge_graph": {"state": "half_open", "failures": 3, "since": "2027-01-15T07:55:00.000+00:00",
                                "recent": {"failures": []}},
        },
        "agents": {
            "cataloger": {"executions": 24, "success_rate": 100.0, "avg_duration": 1.23, "latest_duration": 1.15,
                          "recent": {"durations": [1.2, 1.3, 1.1, 1.15], "failed": [], "anomalous": []}},
            "maintainer": {"executions": 24, "success_rate": 95.8, "avg_duration": 0.95, "latest_duration": 0.92,
                           "recent": {"durations": [0.9, 1.0, 0.92], "failed": [], "anomalous": []}},
            "synthesizer": {"executions": 24, "success_rate": 41.7, "avg_duration": 612.0, "latest_duration": 2.38,
                            "recent": {"durations": [2.4, 2.38], "failed": [1], "anomalous": []}},
        },
        "jobs": {
            "backup": {"state": "OK", "outcome": "success", "started": "2027-01-15T03:17:00.000+00:00",
                       "exit_code": 0, "duration_s": 754.0, "last_success": "2027-01-15T03:29:34.000+00:00",
                       "late": False, "expected_every_s": 86400.0},
            "offsite": {"state": "CRITICAL", "outcome": "success", "started": "2027-01-13T04:00:00.000+00:00",
                        "exit_code": 0, "duration_s": 61.5, "last_success": "2027-01-13T04:01:01.500+00:00",
                        "late": True, "expected_every_s": 86400.0},
            "report": {"state": "CRITICAL", "outcome": "failure", "started": "2027-01-15T07:00:00.000+00:00",
                       "exit_code": 3, "duration_s": 2.25, "last_success": None, "late": False,
                       "expected_every_s": None},
        },
        "metrics": {
            'backup_bytes{host="nas"}': {"name": "backup_bytes", "labels": {"host": "nas"}, "latest": 52_300_000_000.0,
                                       "time": "2027-01-15T03:29:34.000+00:00",
                                       "recent": {"values": [5.1e10, 5.15e10, 5.2e10, 5.23e10], "anomalous": []}},
            "host_load1": {"name": "host_load1", "labels": {}, "latest": 3.5, "time": "2027-01-15T07:59:00.000+00:00",
                           "recent": {"values": [0.2, 0.3, 0.25, 0.2, 0.3, 3.5], "anomalous": [5]}},
        },
        "alerts": [
            {"time": "2027-01-15T07:31:00.000+00:00", "kind": "firing", "severity": "critical",
             "title": "external sync \x1b[31mfailing\x1b[0m", "channels": {"email": "sent", "slack": "failed"}},
            {"time": "2027-01-15T06:00:00.000+00:00", "kind": "resolved", "severity": "warning",
             "title": "disk almost full", "channels": {"email": "sent"}},
        ],
        "health": {
            "disk": {"state": "OK", "summary": "85.6 GB free of 270.6 GB (31.6%) on /srv",
                     "checked_at": "2027-01-15T07:55:00.000+00:00", "age_s": 300.0, "stale": False},
            "database": {"state": "OK", "summary": "quick_check ok, 12.0 MB, WAL 0 B",
                         "checked_at": "2027-01-15T07:55:00.000+00:00", "age_s": 300.0, "stale": False},
            "circuit_breaker": {"state": "CRITICAL", "summary": "open: external_sync (open 30m)",
                                "checked_at": "2027-01-15T07:55:00.000+00:00", "age_s": 300.0, "stale": False},
            "backup": {"state": "UNKNOWN", "summary": "not checked for 3h (then OK: ran 4h ago)",
                       "checked_at": "2027-01-15T05:00:00.000+00:00", "age_s": 10800.0, "stale": True},
            "site": {"state": "UNKNOWN", "summary": "not checked yet", "checked_at": None, "age_s": None,
                     "stale": True},
        },
    }


def sample_series():
    """A series as read_series() gives it: a day of samples every 15 minutes, one of them anomalous."""
    now = mm.epoch_of("2027-01-15T08:00:00.000+00:00")
    points = [[now - 86400 + i * 900, 100.0 + (i % 7) * 3 + (60.0 if i == 40 else 0.0)] for i in range(96)]
    values = [value for _, value in points]
    return {"key": 'backup_bytes{host="nas"}', "name": "backup_bytes", "labels": {"host": "nas"},
            "generated_at": "2027-01-15T08:00:00.000+00:00", "window_hours": 24.0, "count": 96, "min": min(values),
            "max": max(values), "avg": sum(values) / 96, "latest": values[-1], "time": mm.iso_time(points[-1][0]),
            "anomalies": 1, "points": points, "anomalous": [40]}


def screen_text(summary, width, height, **options):
    lines, _ = dash.screen(summary, width, height, **options)
    return "\n".join(dash.plain(line) for line in lines) + "\n"


class RendererTest(unittest.TestCase):
    """Given a summary and a size, the lines drawn."""

    maxDiff = None

    def assertGolden(self, name, text):
        with open(os.path.join(GOLDEN, name), encoding="utf-8") as handle:
            self.assertEqual(text, handle.read())

    def test_golden_screens(self):
        for width, height in ((80, 24), (120, 40), (40, 12)):
            with self.subTest(size=f"{width}x{height}"):
                self.assertGolden(f"dashboard_{width}x{height}.txt", screen_text(sample_summary(), width, height))

    def test_golden_series_screens(self):
        for (width, height), ascii_only in (((80, 24), False), ((40, 12), True)):
            with self.subTest(size=f"{width}x{height}"):
                lines = dash.series_screen(sample_series(), width, height, ascii_only=ascii_only, position="1 of 3")
                self.assertGolden(f"series_{width}x{height}{'_ascii' if ascii_only else ''}.txt",
                                  "\n".join(dash.plain(line) for line in lines) + "\n")
                anomalous = [text for line in lines for text, style in line if style == "anomaly"]
                self.assertTrue(anomalous)  # the spike's column, in its own style

    def test_a_chart_keeps_its_columns_whatever_its_labels(self):
        detail = dict(sample_series(), name="ratio", key="ratio")
        detail["points"] = [[t, 1234567.891 if i % 2 else 0.000123] for i, (t, _) in enumerate(detail["points"])]
        lines = dash.chart_lines(detail, 60, 6, ascii_only=True)
        self.assertEqual([dash.plain(line)[:11] for line in (lines[0], lines[-1])], ["1.23457e+0 ", "  0.000123 "])
        self.assertEqual({dash.width_of("".join(text for text, _ in line)) for line in lines}, {60})

    def test_golden_html_pages(self):
        self.assertGolden("status_page.html", mm.status_page(sample_summary()))
        self.assertGolden("series_page.html", mm.series_page(sample_series()))

    def test_golden_plain_text_in_ascii(self):
        self.assertGolden("dashboard_once_ascii.txt", dash.plain_text(sample_summary(), ascii_only=True))

    def test_the_footer_ends_before_the_last_cell_which_curses_cannot_write(self):
        summary = sample_summary()
        summary["sync"].update({f"target{n:02d}": summary["sync"]["icloud"] for n in range(40)})
        for width, height in ((80, 24), (120, 30), (32, 8)):
            with self.subTest(size=f"{width}x{height}"):
                lines, _ = dash.screen(summary, width, height)
                total = len(dash.body_lines(summary, width, height, False))
                footer = dash.plain(lines[-1])
                self.assertEqual(len(footer), width - 1)
                self.assertRegex(footer, rf" lines 1-{height - 3} of {total}$")

    def test_escape_sequences_curses_does_not_know_name_their_keys_and_a_lone_escape_quits(self):
        for following, key in (([], dash.ESCAPE_KEY), (b"[B", curses.KEY_DOWN), (b"OA", curses.KEY_UP),
                               (b"[5~", curses.KEY_PPAGE), (b"[6~", curses.KEY_NPAGE), (b"[H", curses.KEY_HOME),
                               (b"[4~", curses.KEY_END), (b"[C", curses.KEY_RIGHT), (b"[D", curses.KEY_LEFT),
                               (b"[Z", curses.KEY_BTAB), (b"[Y", -1), (b"x", -1), (b"[1;5B", -1)):
            with self.subTest(following=following):
                self.assertEqual(dash.escape_key(list(following), curses), key)

    def test_rows_a_summary_left_out_are_counted_by_state(self):
        summary = dict(sample_summary(), omitted={"sync": {"OK": 24950, "UNKNOWN": 3}})
        text = dash.plain_text(summary, ascii_only=True)
        self.assertIn("\n  and 24,953 more sync targets: 24,950 OK, 3 UNKNOWN (--all shows every one)\n", text)
        self.assertNotIn("more agents", text)
        self.assertIn('<p>and 24,953 more sync targets: <span class="OK">24,950 OK</span>, '
                      '<span class="UNKNOWN">3 UNKNOWN</span></p>', mm.status_page(dict(summary, alerts=[])))

    def test_no_size_draws_past_the_window(self):
        summary = sample_summary()
        summary["sync"]["同期ターゲット"] = dict(summary["sync"]["icloud"])  # wide characters: two columns each
        for width in range(0, 131, 7):
            for height in range(0, 46, 3):
                for ascii_only in (False, True):
                    lines, _ = dash.screen(summary, width, height, ascii_only=ascii_only, scroll=5)
                    self.assertLessEqual(len(lines), height)
                    for line in lines:
                        self.assertLessEqual(dash.width_of("".join(text for text, _ in line)), width)

    def test_below_20x5_one_line_says_too_small(self):
        for width, height, expected in ((19, 24, "too small"), (80, 4, "too small"), (10, 3, "too small"),
                                        (5, 1, "too s"), (0, 0, None)):
            lines, _ = dash.screen(sample_summary(), width, height)
            self.assertEqual([dash.plain(line) for line in lines], [expected] if expected else [])

    def test_below_80x24_the_lower_priority_sections_are_dropped(self):
        text = screen_text(sample_summary(), 80, 17)
        self.assertIn("SYSTEM HEALTH", text)
        self.assertIn("SYNC OPERATIONS", text)
        for dropped in ("CIRCUIT BREAKERS", "AGENTS", "RECENT ALERTS"):
            self.assertNotIn(dropped, text)
        # At 80x24 and more, nothing is dropped: what does not fit scrolls.
        body = dash.body_lines(sample_summary(), 80, 24)
        self.assertEqual(sum(dash.plain(line) in ("SYNC OPERATIONS", "AGENTS", "RECENT ALERTS", "CIRCUIT BREAKERS",
                                                  "SYSTEM HEALTH") for line in body), 5)

    def test_scrolling_stays_within_the_content(self):
        summary = sample_summary()
        total = len(dash.body_lines(summary, 80, 24))
        room = 24 - dash.HEADER_LINES - dash.FOOTER_LINES
        lines, scroll = dash.screen(summary, 80, 24, scroll=10 ** 6)
        self.assertEqual(scroll, total - room)
        self.assertEqual(dash.plain(lines[-1])[-len(f"lines {scroll + 1}-{total} of {total}"):],
                         f"lines {scroll + 1}-{total} of {total}")
        self.assertEqual(dash.plain(lines[-2]),
                         "  UNKNOWN  site              never     not checked yet")

    def test_control_characters_and_escapes_are_drawn_inert(self):
        text = screen_text(sample_summary(), 120, 40)
        self.assertNotIn("\x1b", text)
        self.assertIn("external sync \\x1b[31mfailing\\x1b[0m", text)
        self.assertEqual(mm.inert_text("a\tb\r\nc\u202ed\x00"), "a\\tb\\r\\nc\\u202ed\\x00")

    def test_ascii_mode_draws_only_ascii(self):
        summary = sample_summary()
        summary["agents"]["écrivain"] = summary["agents"]["cataloger"]
        text = screen_text(summary, 120, 40, ascii_only=True) + dash.plain_text(summary, ascii_only=True)
        self.assertEqual(text.encode("ascii", "replace").decode("ascii"), text)
        self.assertIn("\\xe9crivain", text)
        self.assertIn("Up", text)

    def test_sparkline_scales_and_marks(self):
        def drawn(*args, **kwargs):
            return "".join(text for text, _ in dash.sparkline(*args, **kwargs))

        self.assertEqual(drawn([1, 2, 3, 4, 5, 6, 7, 8]), "▁▂▃▄▅▆▇█")
        self.assertEqual(drawn([8, 1]), "█▁")
        self.assertEqual(drawn([3, 3, 3]), "▅▅▅")
        self.assertEqual(drawn([1, 2, 3, 4, 5, 6, 7, 8], ascii_only=True), "_.-:=+*#")
        self.assertEqual(drawn([1, 1, 9, 1], marked=(2,)), "▅▅◆▅")
        self.assertEqual(drawn([1, 1, 9, 1], ascii_only=True, marked=(2,)), "==!=")
        self.assertEqual(dash.sparkline([]), [])
        self.assertEqual(dash.sparkline([1, 5, 9], marked=(1,)), [("▁", "spark"), ("◆", "anomaly"), ("█", "spark")])
        self.assertEqual(dash.sparkline([1, 5, 9, 9], failed=(1, 2)),
                         [("▁", "spark"), ("▅█", "failed"), ("█", "spark")])

    def test_health_rows_say_the_state_in_words(self):
        text = screen_text(sample_summary(), 80, 60)
        self.assertIn("  CRITICAL circuit_breaker   5m ago    open: external_sync (open 30m)\n", text)
        self.assertIn("  OK       disk              5m ago    85.6 GB free of 270.6 GB (31.6%) on /srv\n", text)
        self.assertIn("  UNKNOWN  site              never     not checked yet\n", text)

    def test_an_empty_summary_says_what_to_do(self):
        text = dash.plain_text(dash.empty_summary())
        self.assertIn("  no check has run yet: metasystem_monitor.py check (from cron, every 5 minutes)\n", text)
        self.assertIn("  no alerts in the past 24 hours\n", text)


class DashboardStateTest(unittest.TestCase):
    """The loop's state, driven by the keys curses defines, with an injected clock and collector."""

    def dashboard(self, collect):
        self.clock = FakeClock()
        return dash.Dashboard(collect, 10, False, clock=self.clock.monotonic)

    def test_refreshes_only_when_due_or_asked(self):
        calls = []
        board = self.dashboard(lambda: calls.append(1) or sample_summary())
        board.refresh_if_due()
        board.refresh_if_due()
        self.clock.advance(9.9)
        board.refresh_if_due()
        self.assertEqual(len(calls), 1)
        self.clock.advance(0.1)
        board.refresh_if_due()
        self.assertEqual(len(calls), 2)
        self.assertTrue(board.handle(ord("r"), 10, curses))
        board.refresh_if_due()
        self.assertEqual(len(calls), 3)

    def test_a_failed_refresh_keeps_the_last_screen_and_says_why(self):
        answers = [sample_summary(), mm.StorageError("store x is locked\nby another process", "x")]

        def collect():
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        board = self.dashboard(collect)
        board.refresh_if_due()
        self.clock.advance(10)
        board.refresh_if_due()
        lines = [dash.plain(line) for line in board.lines(80, 24)]
        self.assertEqual(lines[1], "status CRITICAL   window 24 h   store x is locked by another process")
        self.assertIn("SYNC OPERATIONS", lines)

    def test_tab_moves_between_sections_and_enter_opens_the_series(self):
        summary = sample_summary()
        summary["metrics"] = {
            "backup_bytes": {"name": "backup_bytes", "labels": {}, "latest": 5.0, "time": summary["generated_at"],
                             "recent": {"values": [1.0, 5.0], "anomalous": []}},
            "queue{q=a}": {"name": "queue", "labels": {"q": "a"}, "latest": 2.0, "time": summary["generated_at"],
                           "recent": {"values": [2.0], "anomalous": []}}}
        asked = []

        def series(key):
            asked.append(key)
            return {"key": key, "generated_at": summary["generated_at"], "window_hours": 24.0, "count": 0,
                    "points": [], "anomalous": []}

        self.clock = FakeClock()
        board = dash.Dashboard(lambda: summary, 10, False, clock=self.clock.monotonic, collect_series=series)
        board.refresh_if_due()
        body = [dash.plain(line) for line in dash.body_lines(summary, 80, 24)]
        titles = [body.index(title) for title in ("SYNC OPERATIONS", "CIRCUIT BREAKERS", "AGENTS", "JOBS", "METRICS",
                                                  "RECENT ALERTS", "SYSTEM HEALTH")]
        board.lines(80, 24)
        self.assertEqual(dash.section_titles_at(summary, 80, 24), titles)
        seen = []
        for _ in range(len(titles) + 1):
            board.handle(dash.TAB_KEY, 21, curses)
            seen.append(board.scroll)
        self.assertEqual(seen, titles[1:] + [titles[-1]] * 2)
        board.handle(curses.KEY_BTAB, 21, curses)
        board.handle(ord("p"), 21, curses)
        self.assertEqual(board.scroll, titles[-3])
        board.handle(10, 21, curses)  # Enter
        board.refresh_if_due()
        screen = [dash.plain(line) for line in board.lines(80, 24)]
        self.assertEqual((asked, screen[0][:12], screen[3].strip(), screen[-1][-6:]),
                         (["backup_bytes"], "backup_bytes", "no samples in this window", "1 of 2"))
        for key, expected in ((curses.KEY_RIGHT, "queue{q=a}"), (curses.KEY_RIGHT, "backup_bytes"),
                              (curses.KEY_LEFT, "queue{q=a}")):
            board.handle(key, 21, curses)
            board.refresh_if_due()
            self.assertEqual(asked[-1], expected)
        self.assertTrue(board.handle(dash.ESCAPE_KEY, 21, curses))  # back, not quit
        self.assertIsNone(board.series)
        self.assertFalse(board.handle(dash.ESCAPE_KEY, 21, curses))

    def test_keys(self):
        board = self.dashboard(sample_summary)
        board.refresh_if_due()
        self.assertTrue(board.handle(curses.KEY_NPAGE, 5, curses))
        board.lines(80, 24)
        self.assertEqual(board.scroll, 5)
        self.assertTrue(board.handle(curses.KEY_UP, 5, curses))
        self.assertEqual(board.scroll, 4)
        self.assertTrue(board.handle(curses.KEY_END, 5, curses))
        board.lines(80, 24)
        self.assertEqual(board.scroll, 21)  # 42 lines of content, 21 rows for them
        self.assertTrue(board.handle(curses.KEY_HOME, 5, curses))
        self.assertEqual(board.scroll, 0)
        self.assertTrue(board.handle(ord("?"), 5, curses))
        self.assertEqual(dash.plain(board.lines(80, 24)[2]), "KEYS")
        self.assertTrue(board.handle(ord("x"), 5, curses))  # any key leaves the help
        self.assertFalse(board.show_help)
        for key in (ord("q"), 27):
            self.assertFalse(board.handle(key, 5, curses))


class SummaryCommandTest(StoreTestCase):
    """--summary and --once as a shell pipeline sees them: real processes."""

    def run_dashboard(self, *args, env=None):
        env = dict(self.child_env(), METASYSTEM_NOW=str(NOW), **(env or {}))
        return subprocess.run([sys.executable, DASHBOARD, "--db", self.db, *args], capture_output=True, env=env,
                              cwd=self.tmp, timeout=SUBPROCESS_TIMEOUT_S)

    def populate(self):
        clock = FakeClock(NOW - 3600)
        with mm.MetricsCollector(self.db, now=clock.time) as metrics:
            metrics.record_sync_metric("icloud", True, 2.0, timestamp=NOW - 600)
            metrics.record_sync_metric("icloud", False, 4.0, timestamp=NOW - 300)
            metrics.record_agent_metric("cataloger", 1.5, True, timestamp=NOW - 200)
            metrics.record_circuit_breaker_metric("icloud_sync", "open", 3, timestamp=NOW - 120)
            mm.record_check_results(metrics, [mm.CheckResult("disk", "WARNING", "9% free")], NOW - 60)

    def test_summary_of_an_empty_store(self):
        result = self.run_dashboard("--summary")
        expected = {"schema_version": 5, "generated_at": mm.iso_time(NOW), "window_hours": 24.0, "status": "unknown",
                    "sync": {}, "circuit_breakers": {}, "agents": {}, "jobs": {}, "metrics": {}, "alerts": [],
                    "health": {}, "omitted": {}}
        self.assertCleanExit(result, 0, json.dumps(expected, sort_keys=True, indent=2) + "\n")
        self.assertFalse(os.path.exists(self.db))

    def test_summary_shows_the_worst_fifty_targets_and_all_of_them_on_request(self):
        with mm.MetricsCollector(self.db, now=lambda: NOW) as metrics:
            metrics.record_many((f"sync_t{i:02d}_success", 1.0, {"target": f"t{i:02d}"}, NOW - 60) for i in range(60))
        bounded = json.loads(self.run_dashboard("--summary").stdout)
        every = json.loads(self.run_dashboard("--summary", "--all").stdout)
        self.assertEqual((len(bounded["sync"]), bounded["omitted"]), (50, {"sync": {"OK": 10}}))
        self.assertEqual((len(every["sync"]), every["omitted"]), (60, {}))

    def test_summary_of_a_populated_store_through_json_tool(self):
        self.populate()
        env = dict(self.child_env(), METASYSTEM_NOW=str(NOW))
        producer = subprocess.Popen([sys.executable, DASHBOARD, "--db", self.db, "--summary"], stdout=subprocess.PIPE,
                                    env=env)
        self.addCleanup(reap, producer)
        tool = subprocess.run([sys.executable, "-m", "json.tool", "--sort-keys"], stdin=producer.stdout,
                              capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)
        producer.stdout.close()
        self.assertEqual((producer.wait(SUBPROCESS_TIMEOUT_S), tool.returncode, tool.stderr), (0, 0, b""))
        summary = json.loads(tool.stdout)
        self.assertEqual(summary["status"], "warning")
        self.assertEqual(summary["sync"], {"icloud": {
            "success_rate": 50.0, "attempts": 2, "avg_duration": 3.0, "last_success": mm.iso_time(NOW - 600),
            "recent": {"durations": [2.0, 4.0], "failed": [1], "anomalous": []}}})
        self.assertEqual(summary["agents"]["cataloger"]["latest_duration"], 1.5)
        self.assertEqual(summary["circuit_breakers"]["icloud_sync"]["state"], "open")
        self.assertEqual(summary["health"], {"disk": {"state": "WARNING", "summary": "9% free",
                                                      "checked_at": mm.iso_time(NOW - 60), "age_s": 60.0,
                                                      "stale": False}})
        self.assertEqual(summary, mm.read_summary(self.db, now=lambda: NOW))

    def test_once_redirected_is_the_plain_screen(self):
        self.populate()
        expected = dash.plain_text(mm.read_summary(self.db, now=lambda: NOW))
        for args in (("--once",), ()):  # a plain run with stdout redirected prints once too
            with self.subTest(args=args):
                result = self.run_dashboard(*args, env={"LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"})
                self.assertCleanExit(result, 0, expected)
                self.assertNotIn(b"\x1b", result.stdout)
                self.assertIn(b"  WARNING  icloud          50.0%    2 runs avg  3.00s \xe2\x96\x81\xe2\x96\x88",
                              result.stdout)

    def test_an_unreadable_store_is_a_critical_summary_not_an_error(self):
        with open(self.db, "wb") as handle:
            handle.write(b"not a database at all" * 100)
        result = self.run_dashboard("--summary")
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        summary = json.loads(result.stdout)
        self.assertEqual((summary["status"], summary["health"]["database"]["summary"]),
                         ("critical", f"store {self.db} is not a SQLite database"))
        with open(self.db, "rb") as handle:
            self.assertEqual(handle.read(), b"not a database at all" * 100)

    def test_version_help_and_an_executable_file(self):
        version = self.run_dashboard("--version")
        self.assertEqual((version.returncode, version.stdout, version.stderr),
                         (0, f"monitoring_dashboard.py {mm.__version__}\n".encode(), b""))
        self.assertIn("$METASYSTEM_HOME", " ".join(self.run_dashboard("--help").stdout.decode().split()))
        self.assertEqual(os.stat(DASHBOARD).st_mode & 0o111, 0o111)  # its #! line works: ./monitoring_dashboard.py

    def test_bad_options_are_one_line_errors(self):
        for args, code, fragment in (
                (("--refresh", "0"), 2, "argument --refresh: must be 1 to 3600 seconds, got '0'"),
                (("--refresh", "3601"), 2, "argument --refresh: must be 1 to 3600 seconds"),
                (("--hours", "nan"), 2, "argument --hours: must be a positive number of hours, got 'nan'"),
                (("--config", os.path.join(self.tmp, "none.ini"), "--summary"), 1, "none.ini does not exist"),
        ):
            with self.subTest(args=args):
                result = self.run_dashboard(*args)
                self.assertEqual((result.returncode, result.stdout), (code, b""))
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertIn(fragment, result.stderr.decode())
                self.assertTrue(result.stderr.startswith(b"monitoring_dashboard.py: error: "), result.stderr)


class PseudoTerminal:
    """The dashboard on the slave side of a pty, its screen read from the master side."""

    def __init__(self, test, args, env_extra, size=(120, 40)):
        self.master, slave = pty.openpty()
        self.resize(size, slave)
        env = {key: value for key, value in os.environ.items() if key not in ("LINES", "COLUMNS", "NO_COLOR")}
        env.update(TERM="xterm-256color", LC_ALL="C.UTF-8", PYTHONPATH=REPO, **env_extra)
        self.process = subprocess.Popen([sys.executable, DASHBOARD, *args], stdin=slave, stdout=slave, stderr=slave,
                                        env=env, start_new_session=True)
        os.close(slave)
        test.addCleanup(os.close, self.master)
        test.addCleanup(reap, self.process)
        self.output = b""

    def resize(self, size, fd=None):
        columns, rows = size
        fcntl.ioctl(self.master if fd is None else fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def resize_and_signal(self, size):
        self.resize(size)
        self.process.send_signal(signal.SIGWINCH)

    def read_until(self, marker, timeout=PTY_TIMEOUT_S):
        """Read until ``marker`` shows in what is written from now on; the bytes read since."""
        start, deadline = len(self.output), time.monotonic() + timeout
        while marker not in self.output[start:]:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"{marker!r} not drawn within {timeout} s; got {self.output[start:][-500:]!r}")
            self.output += os.read(self.master, 65536)
        return self.output[start:]

    def finish(self, keys=b"", sig=None):
        """Press ``keys`` (or send ``sig``), then the exit code, once the child has written everything."""
        if keys:
            os.write(self.master, keys)
        if sig:
            self.process.send_signal(sig)
        code = self.process.wait(PTY_TIMEOUT_S)
        while True:
            ready, _, _ = select.select([self.master], [], [], 0)
            if not ready:
                break
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the slave side is closed
                break
            if not chunk:
                break
            self.output += chunk
        return code


ENTER_ALTERNATE = b"\x1b[?1049h"
LEAVE_ALTERNATE = b"\x1b[?1049l"


class RealScreenTest(StoreTestCase):
    """The real dashboard, curses and all, in a pseudo-terminal."""

    def setUp(self):
        super().setUp()
        with mm.MetricsCollector(self.db) as metrics:
            for i in range(30):
                metrics.record_sync_metric("icloud", i % 10 != 3, 2.0 + (i % 4) / 10)
                metrics.record_agent_metric("cataloger", 1.0 + (i % 3) / 10, True)
            metrics.record_circuit_breaker_metric("external_sync", "open", 4)
            mm.record_check_results(metrics, [mm.CheckResult("disk", "OK", "plenty free")], time.time())

    def start(self, *args, **env):
        # Refreshing every second: a resize must show within one refresh even if its signal were lost.
        return PseudoTerminal(self, ["--db", self.db, "--refresh", "1", *args], env)

    def assertTerminalRestored(self, output):
        self.assertIn(ENTER_ALTERNATE, output)
        self.assertGreater(output.rfind(LEAVE_ALTERNATE), output.rfind(ENTER_ALTERNATE))

    def test_draws_survives_resizes_and_quits_on_q(self):
        term = self.start()
        first = term.read_until(b"PgUp PgDn")  # the footer: drawn last
        for text in (b"SYNC OPERATIONS", b"CIRCUIT BREAKERS", b"external_sync", b"icloud", b"cataloger",
                     b"plenty free", "▁".encode()):
            self.assertIn(text, first)
        term.resize_and_signal((30, 8))
        term.read_until(b"SYSTEM HEALTH")
        term.resize_and_signal((10, 3))
        term.read_until(b"too small")
        term.resize_and_signal((120, 40))
        term.read_until(b"SYNC OPERATIONS")
        self.assertEqual(term.finish(b"q"), 0)
        self.assertTerminalRestored(term.output)
        self.assertRegex(term.output, COLOR_SGR)  # so the NO_COLOR test below can fail

    def test_no_color_writes_no_color_sequences_and_escape_quits(self):
        term = self.start(NO_COLOR="1")
        term.read_until(b"SYSTEM HEALTH")
        self.assertEqual(term.finish(b"\x1b"), 0)
        self.assertTerminalRestored(term.output)
        self.assertNotRegex(term.output, COLOR_SGR)

    def test_help_then_ascii_marks_then_sigterm_restores_the_terminal(self):
        term = self.start("--ascii", "--no-color")
        drawn = term.read_until(b"SYSTEM HEALTH")
        self.assertNotIn("▁".encode(), drawn)
        self.assertNotRegex(term.output, COLOR_SGR)
        os.write(term.master, b"h")
        term.read_until(b"KEYS")
        self.assertEqual(term.finish(sig=signal.SIGTERM), 128 + signal.SIGTERM)
        self.assertTerminalRestored(term.output)

    def test_an_arrow_sent_as_esc_bracket_b_scrolls_and_does_not_quit(self):
        with mm.MetricsCollector(self.db) as metrics:  # more rows than the screen holds
            for n in range(30):
                metrics.record_sync_metric(f"target{n:02d}", True, 1.0)
        term = self.start()
        term.read_until(b"lines 1-")
        os.write(term.master, b"\x1b[B")  # Down from a terminal that is not in keypad mode
        term.read_until(b"2-38")  # curses redraws only what changed: lines 1-37 of N becomes 2-38
        self.assertIsNone(term.process.poll())
        self.assertEqual(term.finish(b"q"), 0)
        self.assertTerminalRestored(term.output)

    def test_enter_shows_a_series_full_screen_and_b_comes_back(self):
        with mm.MetricsCollector(self.db) as metrics:
            for i in range(12):
                metrics.record("backup_bytes", 100.0 + i)
                metrics.record("queue_depth", float(i % 3))
        term = self.start()
        term.read_until(b"METRICS")
        os.write(term.master, b"\r")
        drawn = term.read_until(b"1 of 2")
        self.assertIn(b"backup_bytes", drawn)
        self.assertIn(b"12 samples in 24 h", drawn)
        os.write(term.master, b"\x1b[C")  # Right, as a terminal not in keypad mode sends it
        term.read_until(b"queue_depth")  # curses redraws only what changed: "1 of 2" becomes "2 of 2" by one cell
        os.write(term.master, b"b")
        term.read_until(b"SYNC OPERATIONS")
        self.assertEqual(term.finish(b"q"), 0)
        self.assertTerminalRestored(term.output)

    def test_the_screen_shows_as_many_of_your_series_as_it_has_rows(self):
        now = time.time()
        with mm.MetricsCollector(self.db) as metrics:
            metrics.record_many((f"series_{i:02d}", float(i), None, now - 30 + i) for i in range(30))
        summary = mm.read_summary(self.db)["metrics"]  # --summary and the page: the ten written last
        self.assertEqual(sorted(summary), [f"series_{i:02d}" for i in range(20, 30)])
        term = self.start()
        term.read_until(b"series_00")  # the oldest of the thirty: 37 rows have room for all of them
        self.assertEqual(term.finish(b"q"), 0)
        self.assertTerminalRestored(term.output)

    def test_sigint_restores_the_terminal(self):
        term = self.start()
        term.read_until(b"PgUp PgDn")
        self.assertEqual(term.finish(sig=signal.SIGINT), 128 + signal.SIGINT)
        self.assertTerminalRestored(term.output)


if __name__ == "__main__":
    unittest.main()
