"""read_summary(): the one summary that the dashboard and --summary show, read from a real store."""

import json
import os
import random
import re
import sqlite3
import subprocess
import sys

import metasystem_monitor as mm

from .support import REPO, SUBPROCESS_TIMEOUT_S, AlertTestCase, FakeClock, StoreTestCase, file_bytes, sqlite_rows

HOUR_S = 3600.0


class ReadSummaryTest(AlertTestCase):

    def summary(self, now=None, hours=24.0):
        now = self.clock.now if now is None else now
        return mm.read_summary(self.db, hours, now=lambda: now)

    def test_a_missing_store_is_an_empty_summary_and_nothing_is_created(self):
        self.assertEqual(self.summary(), {
            "schema_version": 5, "generated_at": mm.iso_time(self.clock.now), "window_hours": 24.0,
            "status": "unknown", "sync": {}, "circuit_breakers": {}, "agents": {}, "jobs": {}, "metrics": {},
            "alerts": [], "health": {}, "omitted": {},
        })
        self.assertEqual(os.listdir(self.tmp), ["log.sock"])

    def test_a_store_that_cannot_be_read_is_a_critical_database_and_is_left_alone(self):
        with open(self.db, "wb") as handle:
            handle.write(b"SQLite format 3\x00" + b"\xff" * 200)
        before = file_bytes(self.db)
        summary = self.summary()
        self.assertEqual((summary["status"], summary["health"], summary["sync"]), (
            "critical", {"database": {"state": "CRITICAL", "summary": f"store {self.db} is not a SQLite database",
                                      "checked_at": mm.iso_time(self.clock.now), "age_s": 0.0, "stale": False}},
            {}))
        self.assertEqual(file_bytes(self.db), before)

    def test_reading_writes_nothing(self):
        metrics = self.collector(self.clock)
        metrics.record_sync_metric("icloud", True, 2.0)
        metrics.close()
        before = (file_bytes(self.db), os.stat(self.db).st_mtime_ns)
        self.assertEqual(self.summary()["sync"]["icloud"]["attempts"], 1)
        self.assertEqual((file_bytes(self.db), os.stat(self.db).st_mtime_ns), before)

    def test_alerts_newest_first_with_what_each_channel_did(self):
        system = self.system("[channel:dead]\ntype = webhook\nurl = http://127.0.0.1:9/hook\n")
        for send in (lambda: system.send_warning_alert("disk filling", "80% used", channels=["log"]),
                     lambda: system.send_critical_alert("backup failed", "exit 2", channels=["log", "dead"]),
                     lambda: system.fire("sync", "sync failing", "3 failures", "warning")):
            send()  # the dead channel's retries move the clock on
            self.clock.advance(60)
        times = [ts for (ts,) in sqlite_rows(self.db, "SELECT ts FROM alerts ORDER BY id")]
        alerts = self.summary()["alerts"]
        self.assertEqual(alerts, [
            {"time": mm.iso_time(times[2]), "kind": "firing", "severity": "warning",
             "title": "sync failing", "channels": {"dead": "failed", "log": "sent"}},
            {"time": mm.iso_time(times[1]), "kind": "alert", "severity": "critical",
             "title": "backup failed", "channels": {"dead": "failed", "log": "sent"}},
            {"time": mm.iso_time(times[0]), "kind": "alert", "severity": "warning",
             "title": "disk filling", "channels": {"log": "sent"}},
        ])
        since_last = (self.clock.now - times[2] + 1) / HOUR_S
        self.assertEqual(self.summary(hours=since_last)["alerts"], alerts[:1])

    def test_at_most_twenty_alerts(self):
        system = self.system()
        for i in range(25):
            system.send_info_alert(f"note {i}", "", channels=["log"])
            self.syslog.pending()  # a full /dev/log queue would hold the next one up
            self.clock.advance(1)
        titles = [alert["title"] for alert in self.summary()["alerts"]]
        self.assertEqual(titles, [f"note {i}" for i in range(24, 4, -1)])

    def test_health_is_the_last_verdict_of_each_check_still_run(self):
        metrics = self.collector(self.clock)
        start = self.clock.now
        mm.record_check_results(metrics, [mm.CheckResult("disk", "OK", "plenty"),
                                          mm.CheckResult("old", "CRITICAL", "gone from the configuration")], start)
        self.assertEqual(sqlite_rows(self.db, "SELECT name, state FROM check_results ORDER BY name"),
                         [("disk", "OK"), ("old", "CRITICAL")])
        self.assertEqual(self.summary(start + 60)["status"], "critical")
        later = start + 2 * HOUR_S
        self.clock.advance(2 * HOUR_S)
        mm.record_check_results(metrics, [mm.CheckResult("disk", "WARNING", "9% free", 9.0, "%")], later)
        summary = self.summary(later + 60)
        self.assertEqual(summary["health"], {"disk": {"state": "WARNING", "summary": "9% free",
                                                      "checked_at": mm.iso_time(later), "age_s": 60.0,
                                                      "stale": False}})
        self.assertEqual(summary["status"], "warning")
        # An hour and a minute later the verdict still stands: cron starts on the minute.
        self.assertFalse(self.summary(later + HOUR_S + 60)["health"]["disk"]["stale"])
        # The checks stopped running: what they said then no longer stands.
        stale = self.summary(later + 3 * HOUR_S)
        self.assertEqual(stale["health"]["disk"], {"state": "UNKNOWN", "summary": "not checked for 3h "
                                                   "(then WARNING: 9% free)", "checked_at": mm.iso_time(later),
                                                   "age_s": 3 * HOUR_S, "stale": True})
        self.assertEqual(stale["status"], "unknown")
        # The same results are metrics too, written in the same transaction.
        self.assertEqual(metrics.get_metric_stats("check_value", 24)["latest"], 9.0)

    def test_every_configured_check_shows_stale_after_its_interval(self):
        self.write_config("[check]\ninterval = 10m\n\n[check:disk]\ntype = disk\ninterval = 5m\n\n"
                          "[check:site]\ntype = tcp\naddress = 127.0.0.1:1\n\n[check:db]\ntype = database\n",
                          log_channel=False)
        options = mm.summary_options(mm.load_config(self.config_path))
        self.assertEqual(options["checks"], {"disk": 300.0, "site": 600.0, "db": 600.0})
        metrics = self.collector(self.clock)
        start = self.clock.now
        mm.record_check_results(metrics, [mm.CheckResult("disk", "OK", "plenty"), mm.CheckResult("db", "OK", "fine"),
                                          mm.CheckResult("removed", "CRITICAL", "no longer configured")], start)

        def health(after):
            summary = mm.read_summary(self.db, now=lambda: start + after, **options)
            return {name: (entry["state"], entry["age_s"], entry["stale"]) for name, entry in summary["health"].items()}

        self.assertEqual(health(6 * 60), {"db": ("OK", 360.0, False), "disk": ("OK", 360.0, False),
                                          "site": ("UNKNOWN", None, True)})
        self.assertEqual(health(6 * 60 + 1), {"db": ("OK", 361.0, False), "disk": ("UNKNOWN", 361.0, True),
                                              "site": ("UNKNOWN", None, True)})
        self.assertEqual(mm.read_summary(self.db, now=lambda: start, **options)["health"]["site"],
                         {"state": "UNKNOWN", "summary": "not checked yet", "checked_at": None, "age_s": None,
                          "stale": True})
        self.write_config("[check]\ninterval = 0s\n\n[check:disk]\ntype = disk\ninterval = often\n",
                          log_channel=False)
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [
            f"{self.config_path}: [check] interval: must be more than 0",
            f"{self.config_path}: [check:disk] interval: 'often' is not a duration such as 90s, 5m, 2h or 7d"])

    def test_the_dashboard_and_the_server_show_the_configured_checks(self):
        import urllib.request

        from .support import reap

        self.write_config("[check:disk]\ntype = disk\n\n[check:site]\ntype = tcp\naddress = 127.0.0.1:1\n",
                          log_channel=False)
        mm.record_check_results(self.collector(self.clock), [mm.CheckResult("disk", "OK", "plenty")], self.clock.now)
        env = self.cli_env(METASYSTEM_NOW=repr(self.clock.now + 60))
        shown = subprocess.run([sys.executable, os.path.join(REPO, "monitoring_dashboard.py"), "--summary"], env=env,
                               capture_output=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=self.tmp)
        self.assertEqual((shown.returncode, shown.stderr), (0, b""))
        expected = {"disk": {"state": "OK", "summary": "plenty", "checked_at": mm.iso_time(self.clock.now),
                             "age_s": 60.0, "stale": False},
                    "site": {"state": "UNKNOWN", "summary": "not checked yet", "checked_at": None, "age_s": None,
                             "stale": True}}
        self.assertEqual(json.loads(shown.stdout)["health"], expected)
        server = subprocess.Popen([sys.executable, "-m", "metasystem_monitor", "serve", "--listen", "127.0.0.1:0"],
                                  stderr=subprocess.PIPE, env=env, cwd=self.tmp)
        self.addCleanup(reap, server)
        port = int(server.stderr.readline().decode().split(":")[3].split("/")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/summary", timeout=SUBPROCESS_TIMEOUT_S) as reply:
            self.assertEqual(json.loads(reply.read())["health"], expected)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=SUBPROCESS_TIMEOUT_S) as reply:
            page = reply.read().decode()
        self.assertIn('<tr><td class="OK">OK</td><td>disk</td><td>1m ago</td><td>plenty</td></tr>', page)
        self.assertIn('<tr><td class="UNKNOWN">UNKNOWN</td><td>site</td><td>never</td><td>not checked yet</td></tr>',
                      page)

    def test_recent_runs_mark_failures_and_anomalies(self):
        metrics = self.collector(self.clock)
        start = self.clock.now - 40 * 60
        durations = [2.0 + (i % 5) / 100 for i in range(40)]
        durations[35] = 30.0
        for i, duration in enumerate(durations):
            metrics.record_sync_metric("icloud", i != 38, duration, timestamp=start + i * 60)
        recent = self.summary()["sync"]["icloud"]["recent"]
        self.assertEqual(recent, {"durations": durations[-24:], "failed": [22], "anomalous": [19]})

    def test_too_few_runs_mark_no_anomaly(self):
        metrics = self.collector(self.clock)
        for i, duration in enumerate([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 50.0]):
            metrics.record_agent_metric("cataloger", duration, True, timestamp=self.clock.now - 100 + i)
        self.assertEqual(self.summary()["agents"]["cataloger"]["recent"]["anomalous"], [])
        metrics.record_agent_metric("cataloger", 1.0, True, timestamp=self.clock.now - 1)
        self.assertEqual(self.summary()["agents"]["cataloger"]["recent"]["anomalous"], [6])

    def test_a_circuit_breaker_shows_its_live_state_and_failures(self):
        metrics = self.collector(self.clock)
        breaker = mm.CircuitBreaker("nas", failure_threshold=3, collector=metrics, now=self.clock.time)

        def failing():
            raise ConnectionError("down")

        for _ in range(2):
            with self.assertRaises(ConnectionError):
                breaker.call(failing)
        self.assertEqual(self.summary()["circuit_breakers"]["nas"]["state"], "closed")
        self.assertEqual(self.summary()["circuit_breakers"]["nas"]["failures"], 2)
        with self.assertRaises(ConnectionError):
            breaker.call(failing)
        entry = self.summary()["circuit_breakers"]["nas"]
        self.assertEqual((entry["state"], entry["failures"], entry["since"], entry["recent"]),
                         ("open", 3, mm.iso_time(self.clock.now), {"failures": [3.0]}))

    def test_the_window_must_be_positive(self):
        for hours in (0, -1, float("nan")):
            with self.assertRaises(mm.ValidationError):
                mm.read_summary(self.db, hours, now=FakeClock().time)


class ManyTargetsTest(StoreTestCase):
    """Many sync targets: the faces show the worst and count the rest, so a refresh stays cheap."""

    def test_the_worst_are_shown_the_rest_counted_by_state_and_all_on_request(self):
        now = 1_800_000_000.0
        with mm.MetricsCollector(self.db, maintain=False, now=lambda: now) as metrics:
            rows = []
            for i in range(120):
                target = f"t{i:03d}"
                outcome = "failure" if i % 40 == 7 else "success"  # t007, t047, t087 fail half their runs
                rows += [(f"sync_{target}_success", 2.0, {"target": target}, now - 600),
                         (f"sync_{target}_{outcome}", 2.0, {"target": target}, now - 300)]
            rows += [("sync_quiet_files", 1.0, {"target": "quiet"}, now - 60)]  # runs none: UNKNOWN
            metrics.record_many(rows)
        bounded = mm.read_summary(self.db, now=lambda: now, limit=5)
        self.assertEqual(list(bounded["sync"]), ["quiet", "t000", "t007", "t047", "t087"])
        self.assertEqual(bounded["sync"]["t047"]["success_rate"], 50.0)
        self.assertEqual(bounded["omitted"], {"sync": {"OK": 116}})
        every = mm.read_summary(self.db, now=lambda: now, limit=None)
        self.assertEqual((len(every["sync"]), every["omitted"]), (121, {}))
        self.assertEqual({name: every["sync"][name] for name in bounded["sync"]}, bounded["sync"])
        self.assertEqual(len(mm.read_summary(self.db, now=lambda: now)["sync"]), mm.SUMMARY_SECTION_ROWS)


def worst_first_before_schema_11(db, prefix, label, since, until, limit):
    """The sync or agent section's names and omitted counts as they were found before label_values and
    last_ts: every name from the series' labels, a grouped count of every run in the window."""
    import collections

    names = sorted({json.loads(text)[label] for (text,) in sqlite_rows(db, "SELECT DISTINCT labels FROM series")
                    if label in json.loads(text)})
    if len(names) <= limit:
        return names, {}
    counts = dict(sqlite_rows(db, "SELECT series.name, count(*) FROM series JOIN samples ON series_id = series.id "
                                  "WHERE series.name >= ? AND series.name < ? AND ts >= ? AND ts <= ? GROUP BY 1",
                              (prefix + "_", prefix + "`", since, until)))
    states = {}
    for name in names:
        good, bad = counts.get(f"{prefix}_{name}_success", 0), counts.get(f"{prefix}_{name}_failure", 0)
        states[name] = mm.rate_state(100.0 * good / (good + bad) if good + bad else None)
    ranked = sorted(names, key=lambda name: (-mm.STATE_RANK[states[name]], name))
    rest = collections.Counter(states[name] for name in ranked[limit:])
    return sorted(ranked[:limit]), {state: rest[state] for state in mm.CHECK_STATES if rest[state]}


class WorstFirstTest(StoreTestCase):
    """The worst sync targets and agents, read without a look at every one: the same as a count of all."""

    def build(self, seed):
        rng = random.Random(seed)
        now = 1_800_000_000.0
        names = [f"t{i:03d}" for i in range(rng.randrange(20, 160))]
        names += ['q"uote', "back\\slash", "é", "a_failure", "", "日本"]  # written with escapes, or odd ones
        with mm.MetricsCollector(self.db, maintain=False, now=lambda: now) as metrics:
            for prefix, label in (("sync", "target"), ("agent", "agent")):  # "t0" is no name, "t000" is
                metrics.record_many([(f"{prefix}_t0_success", 1.0, {label: "t000"}, now - 60),
                                     (f"{prefix}_t0_failure", 1.0, {label: "t000"}, now - 60)])
            for _ in range(rng.randrange(100, 900)):  # the first 64 series lag in last_ts
                name = rng.choice(names)
                prefix, label = rng.choice([("sync", "target"), ("agent", "agent")])
                outcome = rng.choice(["success", "success", "success", "failure", "files" if prefix == "sync" else
                                      "items"])
                when = now - rng.choice([rng.uniform(0, 86400), rng.uniform(86400, 3 * 86400), 86400.0, 0.0,
                                         -rng.uniform(1, 7200)])  # in the window, before it, at its edges, after it
                labels = rng.choice([{label: name}, {label: name, "host": "nas"}, None, {label: "other"}])
                metrics.record(f"{prefix}_{name}_{outcome}", 1.0, labels, timestamp=when)
                if rng.random() < 0.05:
                    metrics.record_many((f"{prefix}_{rng.choice(names)}_failure", 2.0, {label: rng.choice(names)},
                                         now - rng.uniform(0, 86400)) for _ in range(70))
        if seed % 2:  # as a store migrated to schema 10 leaves them: the lagging series' last_ts from before
            conn = sqlite3.connect(self.db)
            self.addCleanup(conn.close)
            lagging = conn.execute("SELECT value FROM meta WHERE key = 'lagging_series'").fetchone()[0]
            conn.execute(f"UPDATE series SET last_ts = (SELECT max(ts) FROM samples WHERE series_id = series.id "
                         f"AND ts < ?) WHERE id IN ({lagging})", (now - rng.uniform(0, 86400),))
            conn.commit()
        return now

    def test_the_sections_agree_with_a_count_of_every_run(self):
        for seed in range(12):
            with self.subTest(seed=seed):
                if os.path.exists(self.db):
                    os.remove(self.db)
                now = self.build(seed)
                with mm.MetricsCollector(self.db, readonly=True, now=lambda: now) as metrics:
                    self.assertGreater(len(metrics.lagging_series()), 0)
                    for prefix, label in (("sync", "target"), ("agent", "agent")):
                        for limit, hours in ((1, 24), (5, 24), (50, 24), (5, 48), (20, 1)):
                            since = now - hours * 3600.0
                            counted = mm._counted_runs(metrics.store, *mm._run_params(
                                prefix, label, since, now, metrics.lagging_series()))
                            runs = dict(sqlite_rows(self.db, "SELECT name, count(*) FROM series JOIN samples ON "
                                                             "series_id = id WHERE ts >= ? AND ts <= ? GROUP BY name",
                                                    (since, now)))
                            self.assertEqual(counted, {name: (runs.get(f"{prefix}_{name}_success", 0),
                                                              runs.get(f"{prefix}_{name}_failure", 0))
                                                       for name in counted})
                            self.assertEqual(mm._worst_first(metrics, prefix, label, since, now, limit),
                                             worst_first_before_schema_11(self.db, prefix, label, since, now, limit),
                                             (prefix, limit, hours))

    def test_only_the_failed_and_the_shown_are_read_one_by_one(self):
        now = 1_800_000_000.0
        with mm.MetricsCollector(self.db, maintain=False, now=lambda: now) as metrics:
            metrics.record_many((f"early_{i}", 1.0) for i in range(mm.LAGGING_SERIES_MAX))
            metrics.record_many((f"sync_t{i:04d}_{'failure' if i % 100 == 7 else 'success'}", 1.0,
                                 {"target": f"t{i:04d}"}, now - 600) for i in range(3000))
        with mm.MetricsCollector(self.db, readonly=True, now=lambda: now) as metrics:
            traced = []
            metrics.store.connection.set_trace_callback(traced.append)
            shown, omitted = mm._worst_first(metrics, "sync", "target", now - 86400, now, 50)
            metrics.store.connection.set_trace_callback(None)
            failed = [f"t{i:04d}" for i in range(7, 3000, 100)]
            self.assertEqual((shown, omitted), (sorted(failed + [f"t{i:04d}" for i in range(21) if i != 7]),
                                                {"OK": 2950}))
            plans = {sql: " ".join(row[3] for row in metrics.store.query("EXPLAIN QUERY PLAN " + sql))
                     for sql in traced if sql.startswith(("SELECT", "WITH"))}
        self.assertIn("failures_by_time", next(plan for sql, plan in plans.items() if "'*_failure'" in sql))
        self.assertIn("success_series", next(plan for sql, plan in plans.items() if "count(DISTINCT" in sql))
        # The success series are read whole, from their index (each asked for a sample in the window); no
        # other statement walks series.
        self.assertEqual([plan for plan in plans.values()
                          if re.search(r"SCAN series(?! USING (COVERING )?INDEX success_series)", plan)], [])


class JobsSectionTest(AlertTestCase):
    """Every job run wraps shows on every face: its last run, how it ended, how long it took."""

    def test_jobs_read_from_real_runs_and_drawn_on_the_screen_and_the_page(self):
        import monitoring_dashboard as dash

        env = self.cli_env(METASYSTEM_NOW="1800000000")
        self.write_config("")
        self.assertEqual(self.run_cli("run", "backup", "--", "sh", "-c", "exit 0", env=env).returncode, 0)
        self.assertEqual(self.run_cli("run", "report", "--", "sh", "-c", "exit 3", env=env).returncode, 3)
        summary = mm.read_summary(self.db, now=lambda: 1_800_000_000.0 + 7200)
        self.assertEqual({job: {key: entry[key] for key in ("state", "outcome", "exit_code", "started",
                                                             "last_success")}
                          for job, entry in summary["jobs"].items()}, {
            "backup": {"state": "OK", "outcome": "success", "exit_code": 0, "started": mm.iso_time(1_800_000_000.0),
                       "last_success": mm.iso_time(1_800_000_000.0)},
            "report": {"state": "CRITICAL", "outcome": "failure", "exit_code": 3,
                       "started": mm.iso_time(1_800_000_000.0), "last_success": None},
        })
        text = dash.plain_text(summary, ascii_only=True)
        self.assertIn("\nJOBS\n" + "-" * 80 + "\n"  # the clock stood still for both runs: they took 0 s
                      "  OK       backup         success      took  0.00s  last run 2h ago\n"
                      "  CRITICAL report         failure 3    took  0.00s  last run 2h ago\n", text)
        self.assertIn("<h2>Jobs</h2>", mm.status_page(summary))
        self.assertNotIn("JOBS", dash.plain_text(dict(summary, jobs={}), ascii_only=True))  # none: no section


    def test_a_job_late_against_its_check_or_never_run_is_critical_on_every_face(self):
        import monitoring_dashboard as dash

        env = self.cli_env(METASYSTEM_NOW="1800000000")
        self.write_config("[check:backup]\ntype = job\njob = backup\nexpected_every = 1h\n\n"
                          "[check:offsite]\ntype = job\njob = offsite\nexpected_every = 1d\n\n"
                          "[check:report]\ntype = job\njob = report\n", log_channel=False)
        self.assertEqual(self.run_cli("run", "backup", "--", "sh", "-c", "exit 0", env=env).returncode, 0)
        self.assertEqual(self.run_cli("run", "report", "--", "sh", "-c", "exit 0", env=env).returncode, 0)
        options = mm.summary_options(mm.load_config(self.config_path))
        self.assertEqual(options["jobs"], {"backup": 3600.0, "offsite": 86400.0})
        on_time = mm.read_summary(self.db, now=lambda: 1_800_000_000.0 + 3600, **options)["jobs"]
        self.assertEqual({job: (entry["state"], entry["outcome"], entry["late"]) for job, entry in on_time.items()},
                         {"backup": ("OK", "success", False), "offsite": ("CRITICAL", "missing", True),
                          "report": ("OK", "success", False)})
        self.assertEqual(on_time["offsite"], {"state": "CRITICAL", "outcome": "missing", "started": None,
                                              "exit_code": None, "duration_s": None, "last_success": None,
                                              "late": True, "expected_every_s": 86400.0})
        summary = mm.read_summary(self.db, now=lambda: 1_800_000_000.0 + 3601, **options)
        self.assertEqual((summary["jobs"]["backup"]["state"], summary["jobs"]["backup"]["late"]), ("CRITICAL", True))
        text = dash.plain_text(summary, ascii_only=True)
        self.assertIn("\n  CRITICAL backup         late         took  0.00s  last run 1h ago (every 1h)\n"
                      "  CRITICAL offsite        missing      took      -  last run -\n"
                      "  OK       report         success      took  0.00s  last run 1h ago\n", text)
        self.assertIn("<td>success, late: expected every 1h</td>", mm.status_page(summary))


class OwnSeriesTest(StoreTestCase):
    """The user's own series on every face: the newest ten, or those [dashboard] metrics names."""

    def setUp(self):
        super().setUp()
        self.now = 1_800_000_000.0
        with mm.MetricsCollector(self.db, maintain=False, now=lambda: self.now) as metrics:
            rows = [(f"series_{i:02d}", float(i), None, self.now - 1000 + i) for i in range(12)]
            rows += [("backup_bytes", 5e7 + i, {"host": "nas"}, self.now - 600 + i * 20) for i in range(20)]
            rows += [("backup_bytes", 9e9, {"host": "nas"}, self.now - 100)]  # one that stands out
            rows += [("sync_icloud_success", 2.0, {"target": "icloud"}, self.now - 10)]  # the sync section's
            metrics.record_many(rows)

    def test_the_newest_ten_by_default_with_latest_values_and_anomalies(self):
        shown = mm.read_summary(self.db, now=lambda: self.now)["metrics"]
        self.assertEqual(list(shown), ['backup_bytes{host="nas"}'] + [f"series_{i:02d}" for i in range(3, 12)])
        backup = shown['backup_bytes{host="nas"}']
        self.assertEqual((backup["name"], backup["labels"], backup["latest"], backup["time"]),
                         ("backup_bytes", {"host": "nas"}, 9e9, mm.iso_time(self.now - 100)))
        self.assertEqual(len(backup["recent"]["values"]), 21)
        self.assertEqual(backup["recent"]["anomalous"], [20])

    def test_globs_choose_and_every_face_draws_them(self):
        import monitoring_dashboard as dash

        summary = mm.read_summary(self.db, now=lambda: self.now, metrics=["backup_*", "series_0[01]"])
        self.assertEqual(list(summary["metrics"]), ['backup_bytes{host="nas"}', "series_00", "series_01"])
        text = dash.plain_text(summary, ascii_only=True)
        self.assertIn("\nMETRICS\n" + "-" * 80 + "\n"
                      '  backup_bytes{host="nas"}                     9.0 GB _..-:==+**#! 1 anomalous\n'
                      "  series_00                                         0 =\n"
                      "  series_01                                         1 =\n", text)
        self.assertIn("<h2>Metrics</h2>", mm.status_page(summary))
        self.assertNotIn("METRICS", dash.plain_text(dict(summary, metrics={}), ascii_only=True))
        ordered = mm.read_summary(self.db, now=lambda: self.now, metrics=["series_0[01]", "backup_*", "series_01"])
        self.assertEqual(list(ordered["metrics"]), ["series_00", "series_01", 'backup_bytes{host="nas"}'])  # glob order

    def test_the_dashboard_section_of_the_configuration(self):
        config = os.path.join(self.tmp, "c.ini")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write("[dashboard]\nmetrics = series_1*\n")
        result = subprocess.run([sys.executable, os.path.join(REPO, "monitoring_dashboard.py"), "--db", self.db,
                                 "--config", config, "--summary"], capture_output=True, cwd=self.tmp,
                                env=self.child_env(METASYSTEM_NOW=repr(self.now)), timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertEqual(list(json.loads(result.stdout)["metrics"]), ["series_10", "series_11"])
        with open(config, "w", encoding="utf-8") as handle:
            handle.write("[dashboard]\nmetrix = x\n")
        checked = self.run_cli("--config", config, "config", "--check")
        self.assertEqual((checked.returncode, checked.stdout.decode()),
                         (1, f"{config}: [dashboard] metrix: unknown key\n"))


def own_series_before_schema_10(db, limit):
    """The keys of the newest own series as the summary found them before last_ts: every series' newest
    sample, all sorted, the families' series told in Python."""
    families = [(label, re.compile(pattern)) for label, pattern in mm._EXPORTED_SERIES]
    keys = []
    for name, labels, _ in sqlite_rows(db, "SELECT name, labels, (SELECT max(ts) FROM samples WHERE series_id = "
                                        "series.id) AS last FROM series WHERE last IS NOT NULL "
                                        "ORDER BY last DESC, name, labels"):
        if not any(f'"{label}":' in labels and pattern.fullmatch(name) for label, pattern in families):
            keys.append(mm.series_key(name, json.loads(labels)))
            if len(keys) == limit:
                break
    return sorted(keys)


class OwnSeriesIndexTest(StoreTestCase):
    """The newest of the user's own series come from an index that holds only theirs, with the series that
    may lag in last_ts asked their samples: the same ten as the sort of every series found."""

    def test_the_families_said_in_sql_are_those_of_the_export(self):
        names = ["sync_a_success", "sync_a_failure", "sync_a_files", "sync_a_conflicts", "sync__success",
                 "sync_a_b_success", "sync_success", "Sync_a_success", "sync_a_successes", "xsync_a_success",
                 "agent_a_items", "agent_a_success", "agent__items", "circuit_breaker_b_state",
                 "circuit_breaker_b_failures", "circuit_breaker__state", "check_state", "check_value",
                 "check_duration", "check_states", "job_duration", "job_exit_code", "job_exit", "sync_*_success",
                 "sync_?_failure", "sync_[a]_files", "sync_é_success", "backup_bytes"]
        labels = [{}, {"target": "a"}, {"agent": "a"}, {"breaker": "b"}, {"check": "c"}, {"job": "j"},
                  {"xtarget": "a"}, {"target_": "a"}, {"host": "nas", "target": "a"}, {"note": '"target":'}]
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        conn.execute("CREATE TABLE series (name TEXT, labels TEXT)")
        cases = [(name, mm.canonical_labels(pairs)) for name in names for pairs in labels]
        conn.executemany("INSERT INTO series VALUES (?, ?)", cases)
        families = [(label, re.compile(pattern)) for label, pattern in mm._EXPORTED_SERIES]
        expected = [(name, text, int(not any(label in json.loads(text) and pattern.fullmatch(name)
                                             for label, pattern in families))) for name, text in cases]
        self.assertEqual(conn.execute(f"SELECT name, labels, {mm._OWN_SERIES} FROM series").fetchall(), expected)
        self.assertEqual(sum(own for _, _, own in expected), 280 - 27)  # 9 + 2 + 2 + 3 + 2 names, 2 with target

    def test_the_newest_ten_are_those_of_a_sort_of_every_series(self):
        rng = random.Random(31)
        now, written = 1_800_000_000.0, []
        with mm.MetricsCollector(self.db, maintain=False, now=lambda: now) as metrics:
            # The first 64 series written lag in last_ts: some of them old, some the newest of all.
            metrics.record_many((f"early_{i}", 1.0, None, now - 5000 + 100 * (i % 3)) for i in range(64))
            for i in range(3000):
                target = f"t{i:04d}"  # the families' series, newer than every own series
                metrics.record_many([(f"sync_{target}_success", 1.0, {"target": target}, now - rng.uniform(0, 99)),
                                     (f"sync_{target}_files", 1.0, {"target": target}, now - 1)])
            for i in range(40):  # ties at one instant, told apart by name, then labels
                metrics.record(f"own_{i % 7}", 1.0, {"n": str(i)}, timestamp=now - 200 - i % 4)
            for i in range(200):
                metrics.record(f"own_{rng.randrange(9)}", 1.0, timestamp=now - rng.uniform(100, 4000))
                metrics.record(f"early_{rng.randrange(64)}", 1.0, timestamp=now - rng.uniform(100, 6000))
        with mm.MetricsCollector(self.db, readonly=True, now=lambda: now) as metrics:
            traced = []
            metrics.store.connection.set_trace_callback(traced.append)
            for limit in (1, 10, 30, 200):
                with self.subTest(limit=limit):
                    self.assertEqual(list(mm.own_series(metrics, now - 86400, limit=limit)),
                                     own_series_before_schema_10(self.db, limit))
            metrics.store.connection.set_trace_callback(None)
            indexed = next(sql for sql in traced if "ORDER BY last_ts DESC" in sql)
            plan = " ".join(row[3] for row in metrics.store.query("EXPLAIN QUERY PLAN " + indexed))
        self.assertIn("INDEX own_series_by_time", plan)  # in its order: no sort of the series
        self.assertNotIn("TEMP B-TREE", plan)
