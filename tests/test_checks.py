"""check: thresholds, perfdata, the default and configured checks, exit codes, alerts across runs."""

import base64
import json
import os
import re
import subprocess
import sys
import unittest

import metasystem_monitor as mm

from .servers import HTTPServer, Reply
from .support import AlertTestCase, StoreTestCase, sqlite_rows

T0 = 1_800_000_000.0

# The Monitoring Plugins guidelines' first line: "SERVICE STATE - text | 'label'=value[UOM];[warn];[crit];[min];[max]"
PERF_ITEM = r"('([^']|'')+'|[^=' ]+)=-?[0-9.]+(e[+-]?[0-9]+)?([a-zA-Z%]*)(;[^; ]*){0,4}"
FIRST_LINE = re.compile(rf"^METASYSTEM (OK|WARNING|CRITICAL|UNKNOWN) - [^|\n]+( \| {PERF_ITEM}( {PERF_ITEM})*)?$")


class Thresholds(unittest.TestCase):
    def test_each_form_and_its_edges(self):
        cases = {
            "10": [(-0.1, True), (0, False), (10, False), (10.001, True)],
            "10:": [(9.99, True), (10, False), (1e300, False)],
            "~:10": [(-1e300, False), (10, False), (10.01, True)],
            "10:20": [(9.9, True), (10, False), (20, False), (20.1, True)],
            "@10:20": [(9.9, False), (10, True), (15, True), (20, True), (20.1, False)],
        }
        for text, expectations in cases.items():
            threshold = mm.parse_threshold(text)
            for value, alerts in expectations:
                with self.subTest(range=text, value=value):
                    self.assertEqual(threshold.alerts(value), alerts)

    def test_units(self):
        self.assertEqual(mm.parse_threshold("5GB:")[:4], (5e9, float("inf"), False, "B"))
        self.assertEqual(mm.parse_threshold("1.5KiB")[:4], (0, 1536, False, "B"))
        self.assertEqual(mm.parse_threshold("90%")[:4], (0, 90, False, "%"))
        self.assertEqual(mm.parse_threshold("~:24h")[:4], (float("-inf"), 86400, False, "s"))
        self.assertEqual(mm.parse_threshold("@5m:2h")[:4], (300, 7200, True, "s"))
        self.assertEqual([t.unit for t in mm.parse_thresholds("10GB:, 10%:")], ["B", "%"])

    def test_bad_ranges_are_refused(self):
        for text in ("20:10", "abc", "10XB:", "5GB:10%", ":", "@"):
            with self.subTest(text=text), self.assertRaises(mm.ValidationError):
                mm.parse_threshold(text)

    def test_plugin_output_keeps_pipes_out_of_the_text(self):
        results = [mm.CheckResult("a", "OK", "fine", perfdata=("'a b'=1",)),
                   mm.CheckResult("b", "CRITICAL", "path /x|y is gone\nsecond line")]
        self.assertEqual(mm.plugin_output(results), [
            "METASYSTEM CRITICAL - b CRITICAL: path /x/y is gone second line | 'a b'=1",
            "OK a: fine", "CRITICAL b: path /x/y is gone second line"])
        self.assertEqual(mm._perfdata_items(" 'disk usage'=5%;80 inodes=7  'it''s'=1 junk =3", "c"),
                         ["'c_disk usage'=5%;80", "'c_inodes'=7", "'c_it''s'=1"])

    def test_perfdata_items(self):
        warning, critical = mm.parse_thresholds("10GB:"), mm.parse_thresholds("5GB:")
        self.assertEqual(mm.perfdata_item("disk free", 5e9, "B", warning, critical, 0, 1e12),
                         "'disk free'=5000000000B;10000000000:;5000000000:;0;1000000000000")
        self.assertEqual(mm.perfdata_item("it's", 0.25), "'it''s'=0.25")
        self.assertEqual(mm.perfdata_item("age", 90, "s", mm.parse_thresholds("~:1h"), mm.parse_thresholds("@1:2")),
                         "'age'=90s;~:3600")
        self.assertEqual(mm.perfdata_item("n", 3, "", mm.parse_thresholds("@1:2"), mm.parse_thresholds("5")),
                         "'n'=3;@1:2;5")


class CheckCommand(AlertTestCase):
    def check(self, *args, when=T0, config=None):
        if config is not None:
            self.write_config(config)
        return self.run_cli("check", "--no-alert", *args, env=self.cli_env(METASYSTEM_NOW=repr(when), TZ="UTC"))

    def record(self, name, value, ts, **labels):
        with mm.MetricsCollector(self.db, now=lambda: ts) as collector:
            collector.record(name, value, labels=labels or None, timestamp=ts)

    def assertPluginOutput(self, result, code, lines):
        """Exit code, the first line against the guidelines' grammar, then the check lines exactly."""
        out = result.stdout.decode().splitlines()
        self.assertEqual(result.returncode, code, result.stdout + result.stderr)
        self.assertRegex(out[0], FIRST_LINE)
        self.assertEqual(out[1:], lines)
        return out[0]

    def test_quick_check_reads_the_store_once_a_day_and_deep_every_time(self):
        self.write_config("")
        sizes = r", [0-9.]+ [KMG]?B, WAL [0-9.]+ [KMG]?B$"
        for when, summary in ((T0, r"quick_check ok"), (T0 + 3600, r"quick_check ok 1h ago"),
                              (T0 + 86399, r"quick_check ok 23h 59m ago"), (T0 + 86400, r"quick_check ok"),
                              (T0 + 90000, r"quick_check ok 1h ago")):
            with self.subTest(when=when - T0):
                result = self.check("--only", "database", when=when)
                self.assertEqual((result.returncode, result.stderr), (0, b""))
                self.assertRegex(result.stdout.decode().splitlines()[1], rf"^OK database: {summary}{sizes}")
        self.assertEqual(sqlite_rows(self.db, "SELECT value FROM meta WHERE key = 'quick_check_ok_at'"),
                         [(repr(T0 + 86400),)])
        deep = self.check("--only", "database", "--deep", when=T0 + 90060)
        self.assertRegex(deep.stdout.decode().splitlines()[1], rf"^OK database: integrity_check ok{sizes}")

    def test_the_defaults_on_a_fresh_machine(self):
        self.write_config("")
        result = self.check()
        out = result.stdout.decode().splitlines()
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertRegex(out[0], FIRST_LINE)
        self.assertTrue(out[0].startswith("METASYSTEM OK - 3 checks OK | 'disk_free'="), out[0])
        self.assertRegex(out[1], r"^OK disk: [0-9.]+ [KMGT]?B free of [0-9.]+ [KMGT]?B \([0-9.]+%\) on "
                         + re.escape(self.tmp))
        self.assertRegex(out[2], r"^OK database: quick_check ok, [0-9.]+ [KMG]?B, WAL [0-9.]+ [KMG]?B$")
        self.assertEqual(out[3:], ["OK circuit_breaker: no circuit breaker is open"])
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM samples JOIN series ON id = series_id "
                                              "WHERE name = 'check_state'"), [(3,)])
        # In words too, for the dashboard: the same lines the output shows.
        recorded = sqlite_rows(self.db, "SELECT state, name, summary FROM check_results")
        self.assertEqual(sorted(f"{state} {name}: {summary}" for state, name, summary in recorded), sorted(out[1:]))

    def test_sync_recency_with_an_injected_clock(self):
        self.write_config("")
        self.record("sync_icloud_success", 2.5, T0, target="icloud")
        self.record("sync_external_failure", 30, T0, target="external")
        expectations = [
            (T0 + 23 * 3600, 2, "OK", "last success 23h ago"),
            (T0 + 25 * 3600, 2, "WARNING", "last success 1d 1h ago"),
            (T0 + 49 * 3600, 2, "CRITICAL", "last success 2d 1h ago"),
        ]
        for when, _, state, text in expectations:
            with self.subTest(state=state):
                result = self.check("--only", "sync_recency_icloud", "--only", "sync_recency_external", when=when)
                self.assertPluginOutput(result, 2, [
                    "CRITICAL sync_recency_external: external: no success recorded, only failures",
                    f"{state} sync_recency_icloud: icloud: {text} (01-15 08:00 UTC)"])
        future = self.check("--only", "sync_recency_icloud", when=T0 - 3600)
        self.assertPluginOutput(future, 3, [
            "UNKNOWN sync_recency_icloud: icloud: the last success is in the future (01-15 08:00 UTC)"])

    def test_file_age_and_a_missing_file(self):
        path = os.path.join(self.tmp, "backup.done")
        open(path, "w").close()
        os.utime(path, (T0 - 5400, T0 - 5400))
        config = (f"[check:backup]\ntype = file_age\npath = {path}\nwarning = ~:1h\ncritical = ~:2h\n\n"
                  f"[check:gone]\ntype = file_age\npath = {path}.missing\n")
        result = self.check(config=config)
        first = self.assertPluginOutput(result, 2, [f"WARNING backup: {path} modified 1h 30m ago",
                                                    f"CRITICAL gone: {path}.missing does not exist"])
        self.assertEqual(first, f"METASYSTEM CRITICAL - backup WARNING: {path} modified 1h 30m ago; gone CRITICAL: "
                                f"{path}.missing does not exist | 'backup_age'=5400s;~:3600;~:7200;0")

    def test_a_command_check_takes_the_plugins_state_line_and_perfdata(self):
        for code, state in enumerate(mm.CHECK_STATES):
            with self.subTest(state=state):
                plugin = self.write_script("plugin", f"print('DISK {state} - 42% used | used=42%;80;90;0;100 "
                                                     f"inodes=7')\nprint('more text')\nsys.exit({code})")
                result = self.check(config=f"[check:disk2]\ntype = command\ncommand = {plugin} --flag 'a b'\n")
                first = self.assertPluginOutput(result, code, [f"{state} disk2: DISK {state} - 42% used"])
                self.assertTrue(first.endswith(" | 'disk2_used'=42%;80;90;0;100 'disk2_inodes'=7"), first)
        load = self.write_script("load", "print('OK - load average: 0.5 | load1=0.5;4;8;0 load5=0.3;4;8;0')")
        twice = self.check(config=f"[check:cpu]\ntype = command\ncommand = {load}\n\n"
                                  f"[check:cpu_again]\ntype = command\ncommand = {load} -w 2\n")
        self.assertTrue(twice.stdout.decode().splitlines()[0].endswith(
            " | 'cpu_load1'=0.5;4;8;0 'cpu_load5'=0.3;4;8;0 'cpu_again_load1'=0.5;4;8;0 'cpu_again_load5'=0.3;4;8;0"),
            twice.stdout)
        plugin = self.write_script("plugin4", "sys.exit(4)")
        result = self.check(config=f"[check:odd]\ntype = command\ncommand = {plugin}\n")
        self.assertPluginOutput(result, 3, ["UNKNOWN odd: plugin4 exited with 4"])

    def test_a_hanging_check_is_killed_at_its_timeout_while_the_others_report(self):
        hang = self.write_script("hang", "time.sleep(60)")
        ok = self.write_script("ok", "print('FINE - yes')")
        result = self.check(config=f"[check:hang]\ntype = command\ncommand = {hang}\ntimeout = 0.3s\n\n"
                                   f"[check:ok]\ntype = command\ncommand = {ok}\n")
        self.assertPluginOutput(result, 3, ["UNKNOWN hang: hang did not finish in 0.3 s", "OK ok: FINE - yes"])

    def test_json_has_every_check_with_state_value_thresholds_and_duration(self):
        self.record("queue_length", 12, T0)
        result = self.check("--json", when=T0 + 60, config="[check:queue]\ntype = metric\nmetric = queue_length\n"
                                                            "warning = 10\ncritical = 20\n")
        document = json.loads(result.stdout)
        self.assertEqual(result.returncode, 1)
        [check] = document["checks"]
        self.assertEqual({k: v for k, v in check.items() if k != "duration_s"},
                         {"name": "queue", "state": "WARNING", "summary": "queue_length latest 12 over 24 h",
                          "value": 12.0, "unit": "", "warning": "10", "critical": "20"})
        self.assertEqual(document["state"], "WARNING")
        self.assertGreaterEqual(check["duration_s"], 0)

    def test_a_check_that_raises_is_unknown_in_one_line(self):
        result = self.check(config="[check:missing]\ntype = disk\npath = /no/such/folder\n")
        self.assertPluginOutput(result, 3, ["UNKNOWN missing: FileNotFoundError: [Errno 2] No such file or "
                                            "directory: '/no/such/folder'"])

    def test_a_bad_check_section_is_its_own_unknown_check_and_the_others_run(self):
        stamp = os.path.join(self.tmp, "stamp")
        open(stamp, "w").close()
        os.utime(stamp, (T0 - 60, T0 - 60))
        result = self.check(config=f"[check:x]\ntype = disk\nwarning = 20:10\n\n[check:age]\ntype = file_age\n"
                                   f"path = {stamp}\n")
        why = "configuration: warning: '20:10' is not a range such as 10, 10:, ~:10, 10:20 or @10:20 (config --check " \
              "lists every problem)"
        self.assertEqual(result.returncode, 3)
        self.assertEqual(result.stdout.decode().splitlines(), [
            f"METASYSTEM UNKNOWN - x UNKNOWN: {why} | 'age_age'=60s;;;0", f"OK age: {stamp} modified 1m ago",
            f"UNKNOWN x: {why}"])
        self.assertEqual(result.stderr.decode(), f"metasystem_monitor.py: error: {self.config_path}: [check:x] warning: "
                                                 "'20:10' is not a range such as 10, 10:, ~:10, 10:20 or @10:20\n")

    def test_config_check_lists_the_problems_of_check_sections(self):
        self.write_config("[check:x]\ntype = disk\nwarning = 20:10\nbogus = 1\n\n[check:y]\ntype = job\n"
                          "expected_every = often\n\n[check:z]\ntype = nope\n\n[check:age]\ntype = file_age\n"
                          "path = /x\ncritical = 5GB:,~:2h\n\n[check:db]\ntype = database\nwarning = 10\n")
        result = self.run_cli("config", "--check", env=self.cli_env())
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout.decode().splitlines(), [
            f"{self.config_path}: [check:x] bogus: unknown key for a disk check",
            f"{self.config_path}: [check:x] warning: '20:10' is not a range such as 10, 10:, ~:10, 10:20 or @10:20",
            f"{self.config_path}: [check:y] job: required for a job check",
            f"{self.config_path}: [check:y] expected_every: 'often' is not a duration such as 90s, 5m, 2h or 7d",
            f"{self.config_path}: [check:z] type: 'nope' is not one of anomaly, circuit_breaker, command, database, "
            "disk, file_age, http, inodes, job, load, memory, metric, process, sync_recency, systemd_unit, tcp, tls_cert",
            f"{self.config_path}: [check:age] critical: '5GB:': a file_age check compares durations, plain numbers",
            f"{self.config_path}: [check:db] warning: a database check takes no thresholds",
        ])

    def test_a_number_without_a_unit_is_in_the_checks_own_unit(self):
        path = os.path.join(self.tmp, "marker")
        open(path, "w").close()
        os.utime(path, (T0 - 100, T0 - 100))
        result = self.check(config=f"[check:m]\ntype = file_age\npath = {path}\nwarning = 60\ncritical = 3600\n")
        first = self.assertPluginOutput(result, 1, [f"WARNING m: {path} modified 1m ago"])
        self.assertTrue(first.endswith(" | 'm_age'=100s;60;3600;0"), first)

    def test_deep_runs_integrity_check(self):
        self.write_config("")
        result = self.check("--only", "database", "--deep")
        self.assertEqual(result.returncode, 0)
        self.assertRegex(result.stdout.decode().splitlines()[1], r"^OK database: integrity_check ok, ")

    def test_a_store_that_is_not_a_database_is_critical_and_untouched(self):
        self.write_config("")
        with open(self.db, "wb") as handle:
            handle.write(b"garbage" * 100)
        result = self.check()
        broken = f"store {self.db} is not a SQLite database"
        lines = result.stdout.decode().splitlines()
        self.assertEqual((result.returncode, lines[:2]), (2, [f"METASYSTEM CRITICAL - database CRITICAL: {broken} | "
                                                              + lines[0].partition(" | ")[2],
                                                              f"CRITICAL database: {broken}"]))
        # the default disk check needs no store, and runs: a full disk is often why a store breaks
        self.assertRegex(lines[2], rf"^(OK|WARNING|CRITICAL) disk: .* free of .* on {re.escape(self.tmp)}$")
        self.assertEqual(len(lines), 3)
        with open(self.db, "rb") as handle:
            self.assertEqual(handle.read(), b"garbage" * 100)

    def test_an_open_breaker_is_warning_and_critical_after_an_hour(self):
        self.write_config("")
        with mm.MetricsCollector(self.db, now=lambda: T0) as collector:
            breaker = mm.CircuitBreaker("nas", failure_threshold=1, collector=collector, now=lambda: T0)
            with self.assertRaises(OSError):
                breaker.call(self._fail)
        soon = self.check("--only", "circuit_breaker", when=T0 + 60)
        later = self.check("--only", "circuit_breaker", when=T0 + 3700)
        self.assertPluginOutput(soon, 1, ["WARNING circuit_breaker: open: nas (open 1m)"])
        self.assertPluginOutput(later, 2, ["CRITICAL circuit_breaker: open: nas (open 1h 1m)"])

    @staticmethod
    def _fail():
        raise OSError("nas unreachable")

    def test_the_anomaly_check_scores_the_latest_sample(self):
        with mm.MetricsCollector(self.db, now=lambda: T0) as collector:
            collector.record_many([("backup_seconds", 100 + (i % 5), None, T0 - 3600 + 60 * i) for i in range(40)])
            collector.record("backup_seconds", 400, timestamp=T0)
        result = self.check(when=T0 + 1, config="[check:backup_time]\ntype = anomaly\nmetric = backup_seconds\n")
        out = self.assertPluginOutput(result, 2, [result.stdout.decode().splitlines()[1]])
        self.assertTrue(result.stdout.decode().splitlines()[1].startswith(
            "CRITICAL backup_time: backup_seconds latest 400: "), out)


class ChecksFireAndResolve(AlertTestCase):
    def test_alerts_fired_and_resolved_across_separate_runs(self):
        path = os.path.join(self.tmp, "heartbeat")
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n\n"
                              f"[check:heartbeat]\ntype = file_age\npath = {path}\ncritical = ~:10m\n")
            env = self.cli_env(METASYSTEM_NOW=repr(T0), TZ="UTC")
            first = self.run_cli("check", env=env)
            again = self.run_cli("check", env=self.cli_env(METASYSTEM_NOW=repr(T0 + 300)))
            open(path, "w").close()
            os.utime(path, (T0 + 550, T0 + 550))
            passes = [self.run_cli("check", env=self.cli_env(METASYSTEM_NOW=repr(T0 + 600 + 300 * n)))
                      for n in range(2)]
        self.assertEqual([r.returncode for r in (first, again, *passes)], [2, 2, 0, 0])
        payloads = [r.json() for r in hook.requests]
        self.assertEqual([(p["kind"], p["title"], p["severity"]) for p in payloads],
                         [("firing", "check heartbeat", "critical"), ("resolved", "check heartbeat", "critical")])
        self.assertEqual(payloads[0]["message"], f"CRITICAL: {path} does not exist")


if __name__ == "__main__":
    unittest.main()


class CommandOutputBoundTest(StoreTestCase):
    """A plugin that floods its output: the check keeps a bounded head and ends the plugin at its timeout."""

    MEASURE = ("import resource, subprocess, sys\n"
               "result = subprocess.run(sys.argv[1:], capture_output=True, timeout=120)\n"
               "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
               "sys.stdout.write(f'{result.returncode} {peak}\\n' + result.stdout.decode())\n")

    def test_a_flood_of_output_keeps_the_verdict_and_bounded_memory(self):
        flood = self.write_script("flood.py", "out = sys.stdout.buffer\nout.write(b'OK - fine|a=1\\n')\n"
                                              "for _ in range(300): out.write(b'x' * (1 << 20))\n")
        endless = self.write_script("endless.py", "with open(sys.argv[1], 'w') as out:\n    out.write(str(os.getpid()))\n"
                                                  "while True: sys.stdout.buffer.write(b'y\\n' * 65536)")
        pid_file = os.path.join(self.tmp, "endless.pid")
        config = os.path.join(self.tmp, "checks.ini")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(f"[check:flood]\ntype = command\ncommand = {flood}\n"
                         f"[check:endless]\ntype = command\ncommand = {endless} {pid_file}\ntimeout = 1s\n")
        os.chmod(config, 0o600)
        measured = subprocess.run([sys.executable, "-c", self.MEASURE, sys.executable, "-m", "metasystem_monitor",
                                   "--db", self.db, "--config", config, "check", "--no-alert"],
                                  capture_output=True, env=self.child_env(), cwd=self.tmp, timeout=120)
        first, *lines = measured.stdout.decode().splitlines()
        code, peak = map(int, first.split())
        self.assertEqual(code, 3, measured.stdout)  # UNKNOWN: the endless one did not finish
        self.assertEqual(lines[1:], ["OK flood: OK - fine", "UNKNOWN endless: endless.py did not finish in 1 s"])
        self.assertLess(peak, 150 * 1024 * 1024)  # 300 MB went through; an unbounded buffer holds it all
        with open(pid_file, encoding="utf-8") as handle:
            with self.assertRaises(ProcessLookupError):
                os.kill(int(handle.read()), 0)  # ended, and reaped


class MutantsThatSurvivedTest(AlertTestCase):
    """Each test here fails when one of the hand-made mutants that once survived the whole suite is applied."""

    def test_the_disk_check_judges_percent_free_as_well_as_bytes(self):
        stats = os.statvfs(self.tmp)
        percent = 100.0 * stats.f_bavail / stats.f_blocks
        # Bytes cannot trigger (1 B free is always there); only the percent rule can.
        self.write_config(f"[check:space]\ntype = disk\npath = {self.tmp}\nwarning = 1B:,{int(percent) + 2}%:\n"
                          f"critical = 1B:,0.0001%:\n")
        result = self.run_cli("check", "--no-alert", env=self.cli_env())
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertTrue(result.stdout.startswith(b"METASYSTEM WARNING - space WARNING: "), result.stdout)

    def test_the_default_disk_thresholds_hold_the_original_ten_percent_rule(self):
        for bytes_free, percent, state in ((11e9, 9.9, "WARNING"), (11e9, 10.1, "OK"), (11e9, 4.9, "CRITICAL"),
                                           (4e9, 50.0, "CRITICAL")):
            with self.subTest(bytes_free=bytes_free, percent=percent):
                verdicts = [mm.judge(bytes_free, mm.BYTES, mm.parse_thresholds(mm.DEFAULT_DISK_WARNING),
                                     mm.parse_thresholds(mm.DEFAULT_DISK_CRITICAL)),
                            mm.judge(percent, mm.PERCENT, mm.parse_thresholds(mm.DEFAULT_DISK_WARNING),
                                     mm.parse_thresholds(mm.DEFAULT_DISK_CRITICAL))]
                self.assertEqual(mm.worst_state(verdicts), state)

    def test_an_empty_quiet_hours_range_and_smtp_port_0_are_configuration_problems(self):
        self.write_config("[channel:quiet]\ntype = webhook\nurl = http://127.0.0.1:9/x\nquiet_hours = 22:00-22:00\n"
                          "[channel:mail]\ntype = email\nto = a@example.com\nsmtp_host = 127.0.0.1\nsmtp_port = 0\n")
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual(code, 1, out + err)
        self.assertIn(f"{self.config_path}: [channel:quiet] quiet_hours: '22:00-22:00' is an empty time range",
                      out + err)
        self.assertIn(f"{self.config_path}: [channel:mail] smtp_port: '0' is not a port number", out + err)

    def test_a_point_exactly_at_the_z_threshold_is_not_an_anomaly(self):
        baseline = mm.Baseline("zscore", 10, 0.0, 1.0, "stddev", 1.0)
        flagged = mm.flag_points([(1.0, 2.0), (2.0, 2.0000001), (3.0, -2.0), (4.0, -2.0000001)], baseline, 2.0)
        self.assertEqual([point["timestamp"] for point in flagged], [2.0, 4.0])

    def test_a_command_check_without_its_command_is_one_problem_not_a_crash(self):
        self.write_config("[check:x]\ntype = command\n[check:y]\ntype = command\ncommand = 'unclosed\n")
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual(code, 1, out + err)
        self.assertNotIn("unexpected", out + err)
        self.assertIn(f"{self.config_path}: [check:x] command: required for a command check", out + err)
        self.assertIn(f"{self.config_path}: [check:y] command: cannot be split into words", out + err)


class MachineChecksTest(AlertTestCase):
    """inodes, load and tcp: built-in check types that read the machine itself, against real sources."""

    def check(self, config, *args):
        self.write_config(config, log_channel=False)
        return self.run_cli("check", "--no-alert", *args, env=self.cli_env(METASYSTEM_NOW=repr(T0)))

    def lines(self, result):
        return result.stdout.decode().splitlines()

    def test_inodes_and_load_judge_what_the_kernel_says(self):
        folder = os.statvfs(self.tmp)
        if not folder.f_files:
            self.skipTest("this folder's filesystem counts no inodes")
        fine = self.check(f"[check:ino]\ntype = inodes\npath = {self.tmp}\n\n"
                          "[check:load]\ntype = load\nwarning = ~:100000\n")
        self.assertEqual((fine.returncode, fine.stderr), (0, b""))
        ino, load = self.lines(fine)[1:]
        self.assertRegex(ino, rf"^OK ino: [0-9,]+ inodes free of {folder.f_files:,} \([0-9.]+%\) on "
                         + re.escape(self.tmp) + "$")
        self.assertRegex(load, rf"^OK load: load [0-9.]+ [0-9.]+ [0-9.]+; 5-minute load per CPU [0-9.]+ "
                         rf"\({os.cpu_count()} CPUs\)$")
        self.assertIn("'ino_free_percent'=", self.lines(fine)[0])
        forced = self.check(f"[check:ino]\ntype = inodes\npath = {self.tmp}\ncritical = @0%:100%\n\n"
                            "[check:load]\ntype = load\nminutes = 15\nper_cpu = false\nwarning = @0:1000000\n")
        self.assertEqual(forced.returncode, 2)
        self.assertTrue(self.lines(forced)[1].startswith("CRITICAL ino: "))
        self.assertRegex(self.lines(forced)[2], r"^WARNING load: load [0-9. ]+; 15-minute load$")

    def test_memory_reads_what_linux_says_is_available(self):
        if not os.path.exists("/proc/meminfo"):
            self.skipTest("no /proc/meminfo on this system: the check says UNKNOWN there")
        figures = mm.read_meminfo()
        result = self.check("[check:mem]\ntype = memory\nwarning = 100%:\n")  # any figure under 100 % warns
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertRegex(self.lines(result)[1], r"^WARNING mem: [0-9.]+ [KMGT]?B available of "
                         + re.escape(mm.format_bytes(figures["MemTotal"])) + r" \([0-9.]+%\), (no swap|swap [0-9.]+% used)$")
        self.assertIn("'mem_available_percent'=", self.lines(result)[0])
        swapped = self.check("[check:mem]\ntype = memory\nwarning = 0%:\nswap_critical = @0:100%\n")
        swap = figures.get("SwapTotal", 0)
        used = 100.0 * (swap - figures.get("SwapFree", 0)) / swap if swap else 0.0
        self.assertEqual(swapped.returncode, 2, swapped.stdout)  # any swap use, none too, is inside @0:100
        self.assertRegex(self.lines(swapped)[0], r"'mem_swap_used_percent'=[0-9.]+%;;@100;0;100")
        self.assertAlmostEqual(float(re.search(r"'mem_swap_used_percent'=([0-9.]+)%", self.lines(swapped)[0])
                                     .group(1)), used, delta=5.0)
        self.write_config("[check:mem]\ntype = memory\nswap_warning = 5GB\n", log_channel=False)
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual(out.splitlines(), [f"{self.config_path}: [check:mem] swap_warning: '5GB': a percent such "
                                            "as ~:50%"])

    def test_process_counts_by_command_line_name_or_pidfile(self):
        import subprocess
        import sys

        marker = f"mm-process-check-{os.getpid()}"
        child = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()",
                                  marker], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(child.wait, 10)
        self.addCleanup(child.stdout.close)
        self.addCleanup(child.stdin.close)  # it reads until stdin closes: no sleep, no kill needed
        self.assertEqual(child.stdout.readline(), b"ready\n")  # started: its memory no longer grows
        pidfile = os.path.join(self.tmp, "child.pid")
        with open(pidfile, "w", encoding="ascii") as handle:
            handle.write(f"{child.pid}\n")
        def resident():  # proc(5): the 24th field of /proc/PID/stat, in pages
            with open(f"/proc/{child.pid}/stat", "rb") as handle:
                return int(handle.read().split()[23]) * os.sysconf("SC_PAGE_SIZE")

        before = resident() if os.path.exists(f"/proc/{child.pid}/stat") else None
        result = self.check(f"[check:by-match]\ntype = process\nmatch = {marker}\n\n"
                            f"[check:by-pidfile]\ntype = process\npidfile = {pidfile}\ncritical = 1:1\n\n"
                            f"[check:by-name]\ntype = process\nname = {marker}-none\nwarning = 1:\ncritical = 0:\n")
        self.assertEqual(result.returncode, 1, result.stdout)
        usage = r", ([0-9.]+ [KMG]?B) resident, [0-9]+\.[0-9]% CPU$"
        self.assertEqual([re.sub(usage, "", line) for line in self.lines(result)[1:]], [
            f"OK by-match: 1 process matching {marker!r} (pid {child.pid})",
            f"OK by-pidfile: 1 process pid in {pidfile} (pid {child.pid})",
            f"WARNING by-name: 0 processes named {marker + '-none'!r}",
        ])
        if before is not None:  # what the kernel says before and after the check brackets what it saw
            after = resident()
            seen = int(re.search(r"'by-match_rss'=([0-9]+)B;;;0 ", self.lines(result)[0]).group(1))
            self.assertTrue(min(before, after) <= seen <= max(before, after), (before, seen, after))
            self.assertEqual(re.search(usage, self.lines(result)[1]).group(1), mm.format_bytes(seen))
        limits = self.check(f"[check:memory]\ntype = process\nmatch = {marker}\nwarning = ~:1KB\n\n"
                            f"[check:cpu]\ntype = process\nmatch = {marker}\ncritical = 1:,@0%:1000000%\n\n"
                            f"[check:roomy]\ntype = process\nmatch = {marker}\nwarning = ~:1TB,~:1000000%\n")
        self.assertEqual([line.split(":")[0] for line in self.lines(limits)[1:]],
                         ["WARNING memory", "CRITICAL cpu", "OK roomy"])
        child.stdin.close()
        child.wait(10)
        gone = self.check(f"[check:by-pidfile]\ntype = process\npidfile = {pidfile}\n\n"
                          f"[check:nofile]\ntype = process\npidfile = {pidfile}.missing\n")
        self.assertEqual(self.lines(gone)[1:], [
            f"CRITICAL by-pidfile: 0 processes pid in {pidfile}",
            f"CRITICAL nofile: pid in {pidfile}.missing: cannot be read (No such file or directory)",
        ])

    def test_a_pidfile_is_read_only_when_it_is_a_small_regular_file(self):
        """A symlink to /dev/zero would be read for ever, a FIFO would block the check: both are refused
        unread, as is a file too large to be a pid file, and one that starts with no process id."""
        paths = {name: os.path.join(self.tmp, name) for name in ("zero.pid", "fifo.pid", "big.pid", "word.pid",
                                                                  "empty.pid", "folder.pid", "pg.pid")}
        os.symlink("/dev/zero", paths["zero.pid"])
        os.mkfifo(paths["fifo.pid"])
        os.mkdir(paths["folder.pid"])
        contents = {"big.pid": f"{os.getpid()}\n" + "#" * mm.PIDFILE_MAX_BYTES, "word.pid": "pid=12\n",
                    "empty.pid": " \n", "pg.pid": f"{os.getpid()}\n/var/lib/postgresql/data\n1700000000\n5432\n"}
        for name, text in contents.items():
            with open(paths[name], "w", encoding="ascii") as handle:
                handle.write(text)
        config = "".join(f"[check:{name[:-4]}]\ntype = process\npidfile = {path}\n\n" for name, path in paths.items())
        self.write_config(config, log_channel=False)
        result = self.run_cli("check", "--no-alert", env=self.cli_env(METASYSTEM_NOW=repr(T0)), timeout=20)
        self.assertEqual((result.returncode, result.stderr), (2, b""))
        unreadable = "{0}: cannot be read ({0} is {1})"
        self.assertEqual([re.sub(r", [0-9.]+ [KMG]?B resident, [0-9]+\.[0-9]% CPU$", "", line)
                          for line in self.lines(result)[1:]], [
            "CRITICAL zero: pid in " + unreadable.format(paths["zero.pid"], "a character device, not a regular file"),
            "CRITICAL fifo: pid in " + unreadable.format(paths["fifo.pid"], "a FIFO, not a regular file"),
            "CRITICAL big: pid in " + unreadable.format(paths["big.pid"], "larger than 4,096 bytes: not what it "
                                                                              "should hold"),
            f"CRITICAL word: pid in {paths['word.pid']}: cannot be read (it does not start with a process id)",
            f"CRITICAL empty: pid in {paths['empty.pid']}: cannot be read (it does not start with a process id)",
            "CRITICAL folder: pid in " + unreadable.format(paths["folder.pid"], "a directory, not a regular file"),
            f"OK pg: 1 process pid in {paths['pg.pid']} (pid {os.getpid()})"])

    def test_a_process_check_takes_exactly_one_way_to_find_them(self):
        self.write_config("[check:a]\ntype = process\n\n[check:b]\ntype = process\nname = x\nmatch = y\n",
                          log_channel=False)
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [
            f"{self.config_path}: [check:a] name: give exactly one of name, match or pidfile",
            f"{self.config_path}: [check:b] name: give exactly one of name, match or pidfile (not name, match)",
        ])

    def fake_systemctl(self, units):
        """A ``systemctl`` on PATH answering ``show`` from ``units`` (unit: its properties' lines; None: systemd
        cannot be asked), logging its argv: the case that needs systemd as PID 1, which a test cannot be."""
        folder = os.path.join(self.tmp, "bin")
        os.makedirs(os.path.join(folder, "units"), exist_ok=True)
        for unit, text in units.items():
            with open(os.path.join(folder, "units", unit), "w") as handle:
                handle.write("DOWN" if text is None else text)
        script = os.path.join(folder, "systemctl")
        with open(script, "w") as handle:
            handle.write('#!/bin/sh\nprintf "%s\\n" "$*" >> "$0.argv"\nunit="$(dirname "$0")/units/$4"\n'
                         'if [ "$(cat "$unit" 2>/dev/null)" = DOWN ]; then\n'
                         '  echo "System has not been booted with systemd as init system (PID 1). Can\'t operate." >&2\n'
                         '  exit 1\nfi\n'
                         'if [ -f "$unit" ]; then cat "$unit"; else\n'
                         '  printf "LoadState=not-found\\nActiveState=inactive\\nSubState=dead\\n"; fi\n')
        os.chmod(script, 0o755)
        return folder

    def test_systemd_unit_states_from_systemctl_show(self):
        folder = self.fake_systemctl({
            "web.service": "LoadState=loaded\nActiveState=active\nSubState=running\n",
            "backup.service": "LoadState=loaded\nActiveState=failed\nSubState=failed\n",
            "sync.service": "LoadState=loaded\nActiveState=activating\nSubState=start\n",
            "once.service": "LoadState=loaded\nActiveState=inactive\nSubState=dead\n",
            "box.service": None})
        self.write_config("[check:web]\ntype = systemd_unit\nunit = web.service\n\n"
                          "[check:backup]\ntype = systemd_unit\nunit = backup.service\n\n"
                          "[check:sync]\ntype = systemd_unit\nunit = sync.service\n\n"
                          "[check:once]\ntype = systemd_unit\nunit = once.service\nexpect = active, inactive\n\n"
                          "[check:gone]\ntype = systemd_unit\nunit = -gone.service\n\n"
                          "[check:box]\ntype = systemd_unit\nunit = box.service\n", log_channel=False)
        path = f"{folder}{os.pathsep}{os.environ['PATH']}"
        result = self.run_cli("check", "--no-alert", env=self.cli_env(METASYSTEM_NOW=repr(T0), PATH=path))
        self.assertEqual((result.returncode, result.stderr), (2, b""))
        self.assertEqual(self.lines(result)[1:], [
            "OK web: web.service is active (running)",
            "CRITICAL backup: backup.service is failed (failed), expected active",
            "WARNING sync: sync.service is activating (start), expected active",
            "OK once: once.service is inactive (dead)",
            "CRITICAL gone: -gone.service: no such unit",
            "UNKNOWN box: box.service: systemctl show failed: System has not been booted with systemd as init "
            "system (PID 1). Can't operate.",
        ])
        with open(os.path.join(folder, "systemctl.argv")) as handle:
            self.assertEqual(sorted(handle.read().splitlines()), sorted(
                f"show --property=LoadState,ActiveState,SubState -- {unit}"
                for unit in ("web.service", "backup.service", "sync.service", "once.service", "-gone.service",
                             "box.service")))
        empty = os.path.join(self.tmp, "empty-bin")
        os.makedirs(empty)
        nowhere = self.run_cli("check", "--no-alert", env=self.cli_env(METASYSTEM_NOW=repr(T0), PATH=empty))
        self.assertEqual(self.lines(nowhere)[1], "UNKNOWN web: web.service: systemctl is not on PATH: no systemd here")
        self.assertEqual(nowhere.returncode, 3)

    def test_http_status_body_time_and_a_verified_certificate(self):
        from .servers import SELF_SIGNED_PEM, HTTPServer, Reply

        with HTTPServer(default=Reply(200, "service is up")) as plain, \
                HTTPServer(default=Reply(200, "tls ok"), tls=True) as secure:
            result = self.check(
                f"[check:a]\ntype = http\nurl = {plain.url('/health')}\ncontains = is up\nwarning = ~:30s\n\n"
                f"[check:b]\ntype = http\nurl = {plain.url('/health')}\nregex = ^down\n\n"
                f"[check:c]\ntype = http\nurl = {plain.url('/health')}\nstatus = 500-599\n\n"
                f"[check:d]\ntype = http\nurl = {secure.url('/')}\n\n"
                f"[check:e]\ntype = http\nurl = {secure.url('/')}\nca_file = {SELF_SIGNED_PEM}\ncontains = tls\n\n"
                f"[check:f]\ntype = http\nurl = {secure.url('/')}\ntls_verify = false\n")
        lines = self.lines(result)
        self.assertEqual(result.returncode, 2)
        self.assertRegex(lines[1], rf"^OK a: {re.escape(plain.url('/'))}\*\*\*: HTTP 200 in \d+ ms, 13 bytes$")
        self.assertEqual(lines[2:4], [f"CRITICAL b: {plain.url('/')}***: HTTP 200, the body does not match '^down'",
                                      f"CRITICAL c: {plain.url('/')}***: HTTP 200"])
        self.assertRegex(lines[4], r"^CRITICAL d: https://127\.0\.0\.1:\d+/: .*CERTIFICATE_VERIFY_FAILED")
        self.assertRegex(lines[5], r"^OK e: https://127\.0\.0\.1:\d+/: HTTP 200 in \d+ ms, 6 bytes$")
        self.assertRegex(lines[6], r"^OK f: ")
        days = (ssl_seconds("Nov  4 01:16:48 2126 GMT") - T0) / 86400
        self.assertIn(f"'e_cert_days_left'={round(days, 1):g};;;0", lines[0])
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM check_results"), [(6,)])

    def test_http_headers_credentials_and_redirects(self):
        from .servers import HTTPServer, Reply

        token = os.path.join(self.tmp, "token")
        with open(token, "w") as handle:
            handle.write("Bearer s3cret-token\n")
        os.chmod(token, 0o600)
        with HTTPServer(default=Reply(200, "landed")) as other:
            with HTTPServer(Reply(302, headers={"Location": "/next"}), Reply(303, headers={"Location": "/last"}),
                            Reply(200, "done"), Reply(301, headers={"Location": "/moved"}),
                            Reply(307, headers={"Location": other.url("/away")}), default=Reply(200, "plain")) as site:
                result = self.check(
                    f"[check:follow]\ntype = http\nurl = {site.url('/start')}\nmethod = POST\nfollow_redirects = true\n"
                    "headers = Accept: application/json\n  X-Probe: metasystem one\n"
                    f"authorization_file = {token}\n\n")
                asis = self.check(f"[check:asis]\ntype = http\nurl = {site.url('/start')}\nstatus = 200\n")
                away = self.check(f"[check:away]\ntype = http\nurl = {site.url('/x').replace('://', '://me:pw@')}\n"
                                  "follow_redirects = yes\n")
        self.assertEqual(self.lines(result)[1:],
                         [f"OK follow: {site.url('/')}***: HTTP 200 after 2 redirects in "
                          + self.lines(result)[1].split(" in ")[1]])
        self.assertRegex(self.lines(result)[1], r" in \d+ ms, 4 bytes$")
        first, second, third = site.requests[:3]
        self.assertEqual([(r.method, r.path) for r in site.requests[:3]], [("POST", "/start"), ("GET", "/next"),
                                                                          ("GET", "/last")])
        for request in (first, second, third):
            self.assertEqual((request.headers["Accept"], request.headers["X-Probe"], request.headers["Authorization"]),
                             ("application/json", "metasystem one", "Bearer s3cret-token"))
        self.assertEqual(self.lines(asis)[1:], [f"CRITICAL asis: {site.url('/')}***: HTTP 301"])
        self.assertRegex(self.lines(away)[1], "^" + re.escape(f"OK away: http://***@127.0.0.1:{site.port}/***: HTTP 200 "
                                                              "after 1 redirect in ") + r"\d+ ms, 6 bytes$")
        self.assertEqual(site.requests[-1].headers["Authorization"], "Basic " + base64.b64encode(b"me:pw").decode())
        self.assertEqual([(r.path, r.headers["Authorization"]) for r in other.requests], [("/away", None)])
        self.assertNotIn(b"s3cret", result.stdout + result.stderr + asis.stdout + asis.stderr + away.stdout)

    def test_a_redirect_to_another_origin_keeps_only_headers_that_carry_no_credential(self):
        """Another scheme, host or port is another origin, as curl judges it: Authorization (any letter case),
        Cookie, X-Api-Key and the rest stay behind, there and on every later hop; the same origin keeps them."""
        from .servers import SELF_SIGNED_PEM

        token = os.path.join(self.tmp, "token")
        with open(token, "w") as handle:
            handle.write("Bearer s3cret-token\n")
        os.chmod(token, 0o600)
        headers = ("headers = Accept: application/json\n  accept-language: de\n  authorization: Bearer in-headers\n"
                   "  Cookie: session=abc\n  X-Api-Key: k3y\n  PROXY-AUTHORIZATION: Basic eA==\n  X-Trace: 1\n")
        sent = {"Accept": "application/json", "accept-language": "de", "authorization": "Bearer in-headers",
                "Cookie": "session=abc", "X-Api-Key": "k3y", "PROXY-AUTHORIZATION": "Basic eA==", "X-Trace": "1"}
        kept = {"Accept": "application/json", "accept-language": "de"}
        with HTTPServer(default=Reply(200, "plain")) as plain, HTTPServer(default=Reply(200, "named")) as named, \
                HTTPServer(default=Reply(200, "same")) as same:
            with HTTPServer(Reply(302, headers={"Location": plain.url("/in-clear")}), tls=True) as secure:
                named.replies = [Reply(301, headers={"Location": named.url("/by-address")}),
                                 Reply(302, headers={"Location": f"http://localhost:{named.port}/back"})]
                same.replies = [Reply(307, headers={"Location": f"http://LocalHost:{same.port}/case"}),
                                Reply(308, headers={"Location": f"HTTP://localhost:{same.port}/scheme-case"})]
                result = self.check(
                    f"[check:tls]\ntype = http\nurl = {secure.url('/start')}\nca_file = {SELF_SIGNED_PEM}\n"
                    f"follow_redirects = true\n{headers}\n"
                    f"[check:host]\ntype = http\nurl = http://localhost:{named.port}/start\nfollow_redirects = true\n"
                    f"authorization_file = {token}\n{headers}\n"
                    f"[check:same]\ntype = http\nurl = http://localhost:{same.port}/start\nfollow_redirects = true\n"
                    f"authorization_file = {token}\n{headers}")
        self.assertEqual((result.returncode, result.stderr), (0, b""), result.stdout)

        def received(server):
            return [(r.path, {key: value for key, value in r.headers.items() if key.lower() != "host"})
                    for r in server.requests]

        common = {"Accept-Encoding": "identity", "User-Agent": mm.USER_AGENT}
        self.assertEqual(received(secure), [("/start", {**common, **sent})])
        self.assertEqual(received(plain), [("/in-clear", {**common, **kept})])
        self.assertEqual(received(named), [("/start", {**common, **sent, "Authorization": "Bearer s3cret-token"}),
                                           ("/by-address", {**common, **kept}), ("/back", {**common, **kept})])
        self.assertEqual(received(same), [(path, {**common, **sent, "Authorization": "Bearer s3cret-token"})
                                          for path in ("/start", "/case", "/scheme-case")])

    def test_http_redirect_loops_and_bad_headers_are_reported(self):
        from .servers import HTTPServer, Reply

        with HTTPServer(default=Reply(302, headers={"Location": "/again"})) as loop:
            result = self.check(f"[check:loop]\ntype = http\nurl = {loop.url('/')}\nfollow_redirects = true\n\n"
                                f"[check:nosecret]\ntype = http\nurl = {loop.url('/')}\n"
                                "authorization_env = MM_NOT_SET_ANYWHERE\n")
        self.assertEqual(self.lines(result)[1:], [f"CRITICAL loop: {loop.url('/')}: more than 10 redirects",
                                                  f"UNKNOWN nosecret: {loop.url('/')}: $MM_NOT_SET_ANYWHERE is not set"])
        self.assertEqual(len(loop.requests), 11)
        self.write_config("[check:h]\ntype = http\nurl = http://127.0.0.1:1/\nheaders = no colon here\n"
                          "follow_redirects = maybe\nauthorization = a\nauthorization_file = /x\n", log_channel=False)
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [
            f"{self.config_path}: [check:h] authorization: give only one of authorization, authorization_file",
            f"{self.config_path}: [check:h] follow_redirects: 'maybe' is not true or false",
            f"{self.config_path}: [check:h] headers: 'no colon here' is not a header such as Accept: text/html",
        ])

    def test_a_header_value_http_cannot_carry_is_a_configuration_problem(self):
        self.write_config("[check:h]\ntype = http\nurl = http://127.0.0.1:1/\n"
                          "headers = X-Euro: 5 \u20ac\n    X-Bell: a\x07b\n    X-Fine: a\tb, caf\u00e9\n",
                          log_channel=False)
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [
            f"{self.config_path}: [check:h] headers: the value of X-Euro holds '\u20ac', which a header cannot carry",
            f"{self.config_path}: [check:h] headers: the value of X-Bell holds '\\x07', which a header cannot carry",
        ])
        result = self.run_cli("check", "--no-alert", env=self.cli_env())
        self.assertEqual((result.returncode, result.stderr.decode()),
                         (3, "".join(f"metasystem_monitor.py: error: {line}\n" for line in out.splitlines())))
        self.assertEqual(result.stdout.decode().splitlines()[0], "METASYSTEM UNKNOWN - h UNKNOWN: configuration: "
                         "headers: the value of X-Euro holds '\u20ac', which a header cannot carry; headers: the value "
                         "of X-Bell holds '\\x07', which a header cannot carry (config --check lists every problem)")

    def test_a_certificate_a_test_ca_signed_is_verified_only_with_that_ca(self):
        import time

        from .servers import HTTPServer, make_certificates

        made = make_certificates(self.tmp, days=10)
        if made is None:
            self.skipTest("no openssl binary here to make a CA with; the stored self-signed certificate tests TLS")
        ca, server = made
        now = repr(time.time())  # the certificates are valid from the real now on
        with HTTPServer(default=Reply(200, "ok"), tls=server) as secure:
            address = f"127.0.0.1:{secure.port}"
            self.write_config(f"[check:site]\ntype = http\nurl = {secure.url('/')}\nca_file = {ca}\n\n"
                              f"[check:stranger]\ntype = http\nurl = {secure.url('/')}\n\n"
                              f"[check:cert]\ntype = tls_cert\naddress = {address}\nca_file = {ca}\n",
                              log_channel=False)
            result = self.run_cli("check", "--no-alert", env=self.cli_env(METASYSTEM_NOW=now))
        lines = self.lines(result)
        self.assertEqual(result.returncode, 2)
        self.assertRegex(lines[1], r"^OK site: https://127\.0\.0\.1:\d+/: HTTP 200 in \d+ ms, 2 bytes$")
        self.assertRegex(lines[2], r"^CRITICAL stranger: https://127\.0\.0\.1:\d+/: .*CERTIFICATE_VERIFY_FAILED")
        self.assertRegex(lines[3], r"^WARNING cert: 127\.0\.0\.1: the certificate expires in 10 days \(")
        self.assertRegex(lines[0], r"'site_cert_days_left'=(9\.9|10);;;0 ")

    def test_tls_cert_days_left_against_the_thresholds(self):
        from .servers import SELF_SIGNED_PEM, HTTPServer

        with HTTPServer(tls=True) as secure:
            address = f"127.0.0.1:{secure.port}"
            result = self.check(f"[check:near]\ntype = tls_cert\naddress = {address}\nca_file = {SELF_SIGNED_PEM}\n"
                                "warning = 40000:\n\n"
                                f"[check:far]\ntype = tls_cert\naddress = {address}\nca_file = {SELF_SIGNED_PEM}\n\n"
                                f"[check:untrusted]\ntype = tls_cert\naddress = {address}\n")
        days = (ssl_seconds("Nov  4 01:16:48 2126 GMT") - T0) / 86400
        lines = self.lines(result)
        self.assertEqual(lines[1:3], [
            f"WARNING near: 127.0.0.1: the certificate expires in {days:.0f} days (11-04 01:16 UTC)",
            f"OK far: 127.0.0.1: the certificate expires in {days:.0f} days (11-04 01:16 UTC)",
        ])
        self.assertRegex(lines[3], rf"^CRITICAL untrusted: {re.escape(address)}: .*CERTIFICATE_VERIFY_FAILED")

    def test_the_http_keys_are_checked(self):
        self.write_config("[check:a]\ntype = http\nurl = ftp://x\nstatus = 99\nregex = (\ntls_verify = perhaps\n",
                          log_channel=False)
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [
            f"{self.config_path}: [check:a] url: not an http or https URL with a host",
            f"{self.config_path}: [check:a] status: '99' is not a status such as 200, 200-299 or 200,301",
            f"{self.config_path}: [check:a] regex: not a regular expression: missing ), unterminated subpattern "
            "at position 0",
            f"{self.config_path}: [check:a] tls_verify: 'perhaps' is not true or false",
        ])

    def test_meminfo_lines_are_read_in_bytes(self):
        path = os.path.join(self.tmp, "meminfo")
        with open(path, "w", encoding="ascii") as handle:
            handle.write("MemTotal:       16000 kB\nMemAvailable:    4000 kB\nHugePages_Total:       0\nOdd line\n")
        self.assertEqual(mm.read_meminfo(path), {"MemTotal": 16_384_000, "MemAvailable": 4_096_000,
                                                  "HugePages_Total": 0})

    def test_tcp_connects_sends_and_expects(self):
        import socket
        import threading

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        said = []

        def serve():
            for _ in range(2):
                connection, _ = listener.accept()
                with connection:
                    connection.settimeout(5)
                    said.append(connection.recv(64) if len(said) else b"")
                    connection.sendall(b"SSH-2.0-test\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        ok = self.check(f"[check:ssh]\ntype = tcp\naddress = 127.0.0.1:{port}\nexpect = SSH-\n")
        self.assertEqual(ok.returncode, 0, ok.stdout)
        self.assertRegex(self.lines(ok)[1], rf"^OK ssh: 127\.0\.0\.1:{port} answered in [0-9.]+ ms$")
        wrong = self.check(f"[check:ssh]\ntype = tcp\naddress = 127.0.0.1:{port}\nsend = HELLO\\r\\n\n"
                           "expect = HTTP/\ntimeout = 2s\n")
        self.assertEqual(self.lines(wrong)[1], f"CRITICAL ssh: 127.0.0.1:{port}: the reply does not hold 'HTTP/': "
                                               "'SSH-2.0-test'")
        self.assertEqual(said[1:], [b"HELLO\r\n"])
        thread.join(10)  # it accepts no more: closing the socket now refuses the next connection
        listener.close()
        refused = self.check(f"[check:ssh]\ntype = tcp\naddress = 127.0.0.1:{port}\n")
        self.assertEqual((refused.returncode, self.lines(refused)[1]),
                         (2, f"CRITICAL ssh: 127.0.0.1:{port}: connection refused"))

    def test_tcp_send_reads_its_escapes_and_sends_every_other_character_once_as_utf8(self):
        import socket
        import threading

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(30)
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        received = []

        def serve():
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(30)
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = connection.recv(256)
                    if not chunk:
                        break
                    data += chunk
                received.append(data)
                connection.sendall(b"OK\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 30)
        result = self.check(f"[check:t]\ntype = tcp\naddress = 127.0.0.1:{port}\nexpect = OK\ntimeout = 20s\n"
                            "send = GET /\u20ac/caf\u00e9 a\\\\b\\t\\0\\x00\\xff\\x7F\\r\\n\n")
        thread.join(30)
        self.assertEqual((result.returncode, result.stderr), (0, b""), result.stdout)
        self.assertEqual(received, [b"GET /\xe2\x82\xac/caf\xc3\xa9 a\\b\t\x00\x00\xff\x7f\r\n"])

    def test_a_tcp_send_with_a_bad_escape_is_a_configuration_problem(self):
        cases = {"ends\\": "\\ at character 5", "q\\q": "\\q at character 2", "x\\x4": "\\x at character 2",
                 "x\\x4g": "\\x at character 2", "\\u20ac": "\\u at character 1", "a\\\\\\": "\\ at character 4"}
        for send, where in cases.items():
            with self.subTest(send=send):
                self.write_config(f"[check:t]\ntype = tcp\naddress = 127.0.0.1:1\nsend = {send}\n", log_channel=False)
                problem = f"[check:t] send: {where} is not an escape (\\r \\n \\t \\\\ \\0 \\xHH; \\\\ is a backslash)"
                code, out, err = self.run_main("config", "--check", "--config", self.config_path)
                self.assertEqual((code, out, err), (1, f"{self.config_path}: {problem}\n", ""))
                result = self.run_cli("check", "--no-alert", env=self.cli_env(METASYSTEM_NOW=repr(T0)))
                self.assertEqual((result.returncode, result.stderr.decode()),
                                 (3, f"metasystem_monitor.py: error: {self.config_path}: {problem}\n"))
                self.assertEqual(self.lines(result)[0], "METASYSTEM UNKNOWN - t UNKNOWN: configuration: "
                                 f"{problem.partition('] ')[2]} (config --check lists every problem)")

    def test_the_new_keys_are_checked(self):
        self.write_config("[check:a]\ntype = load\nminutes = 10\nper_cpu = maybe\n\n[check:b]\ntype = tcp\n\n"
                          "[check:c]\ntype = tcp\naddress = nowhere\n", log_channel=False)
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [
            f"{self.config_path}: [check:a] minutes: '10' is not 1, 5 or 15",
            f"{self.config_path}: [check:a] per_cpu: 'maybe' is not true or false",
            f"{self.config_path}: [check:b] address: required for a tcp check",
            f"{self.config_path}: [check:c] address: 'nowhere' is not HOST:PORT",
        ])


def ssl_seconds(text):
    import ssl

    return ssl.cert_time_to_seconds(text)


class CollectTest(AlertTestCase):
    """collect: the machine's own figures into the store, from the real /proc of this machine."""

    def collect(self, when, config=""):
        self.write_config(config, log_channel=False)
        return self.run_cli("collect", env=self.cli_env(METASYSTEM_NOW=repr(when)))

    def recorded(self):
        return sqlite_rows(self.db, "SELECT name, labels, ts, value FROM samples JOIN series ON id = series_id "
                                    "ORDER BY name, labels, ts")

    def test_two_runs_record_every_figure_and_cpu_busy_between_them(self):
        if not os.path.exists("/proc/stat"):
            self.skipTest("no /proc here: collect records the load alone")
        for when in (T0, T0 + 60):
            result = self.collect(when)
            self.assertEqual((result.returncode, result.stdout, result.stderr), (0, b"", b""))
        rows = self.recorded()
        names = {name for name, _, _, _ in rows}
        self.assertTrue({"host_load1", "host_load5", "host_load15", "host_cpu_busy_percent",
                         "host_memory_available_bytes", "host_memory_available_percent", "host_processes",
                         "host_network_receive_bytes", "host_network_transmit_bytes"} <= names, names)
        self.assertEqual([ts for name, _, ts, _ in rows if name == "host_cpu_busy_percent"], [T0 + 60])
        self.assertEqual(sorted({ts for _, _, ts, _ in rows}), [T0, T0 + 60])
        for name, _, _, value in rows:
            if name.endswith("_percent"):
                self.assertTrue(0 <= value <= 100, (name, value))
        mounts = {json.loads(labels)["mount"] for name, labels, _, _ in rows if name == "host_disk_used_percent"}
        self.assertEqual(mounts, {mount for mount in mm.real_mounts() if os.statvfs(mount).f_blocks})
        interfaces = {json.loads(labels)["interface"] for name, labels, _, _ in rows
                      if name == "host_network_receive_bytes"}
        self.assertEqual(interfaces, set(mm.read_network_bytes()))

    def test_the_collect_section_chooses_and_is_checked(self):
        result = self.collect(T0, "[collect]\nnetwork = false\ndisks = no\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        names = {name for name, _, _, _ in self.recorded()}
        self.assertFalse({name for name in names if name.startswith(("host_network", "host_disk", "host_inodes"))})
        self.assertIn("host_load1", names)
        bad = self.collect(T0, "[collect]\ncpu = maybe\n")
        self.assertEqual((bad.returncode, bad.stderr.decode()),
                         (1, "metasystem_monitor.py: error: [collect] cpu: 'maybe' is not true or false\n"))

    def test_proc_sources_are_read_as_the_kernel_writes_them(self):
        stat_path, dev_path, mounts_path = (os.path.join(self.tmp, name) for name in ("stat", "dev", "mounts"))
        with open(stat_path, "w", encoding="ascii") as handle:
            handle.write("cpu  100 5 50 800 20 1 2 3 7 0\ncpu0 1 2 3 4\n")
        with open(dev_path, "w", encoding="ascii") as handle:
            handle.write("Inter-| Receive | Transmit\n face |bytes packets|bytes packets\n"
                         "  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n")
        with open(mounts_path, "w", encoding="utf-8") as handle:
            handle.write("/dev/sda1 / ext4 rw 0 0\nproc /proc proc rw 0 0\n/dev/sdb1 /mnt/my\\040disk ext4 rw 0 0\n"
                         "/dev/sda1 / ext4 rw 0 0\n")
        self.assertEqual(mm.read_cpu_ticks(stat_path), (981, 820))  # guest (7) is in user already
        self.assertEqual(mm.read_network_bytes(dev_path), {"eth0": (1000, 2000)})
        self.assertEqual(mm.real_mounts(mounts_path), ["/", "/mnt/my disk"])
