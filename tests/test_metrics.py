"""MetricsCollector: recording, validation, window statistics, summary, cleanup."""

import math
import random
import re
import statistics
import unittest

import metasystem_monitor as mm

from .support import FakeClock, StoreTestCase, sqlite_rows

HOUR = 3600.0


class RecordTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.clock = FakeClock()
        self.metrics = self.collector(self.clock)

    def rows(self):
        return self.metrics.store.query(
            "SELECT name, labels, ts, seq, value FROM samples JOIN series ON id = series_id ORDER BY name, ts, seq"
        )

    def test_record_stores_name_labels_time_and_value(self):
        self.metrics.record("disk_free_bytes", 12.5, labels={"mount": "/", "host": "nas"})
        self.metrics.record("load1", 0.25, timestamp=1_799_999_000.5)
        self.assertEqual(self.rows(), [
            ("disk_free_bytes", '{"host":"nas","mount":"/"}', self.clock.now, 0, 12.5),
            ("load1", "{}", 1_799_999_000.5, 0, 0.25),
        ])

    def test_writing_commits_the_samples_and_the_callers_rows_together_or_neither(self):
        with self.metrics.writing([("x", 1.0, {"check": "a"})]) as conn:
            conn.execute("INSERT INTO check_results (name, ts, state, summary) VALUES ('a', 1, 'OK', 'fine')")
        with self.assertRaises(mm.StorageError):
            with self.metrics.writing([("x", 2.0, {"check": "b"})]) as conn:
                conn.execute("INSERT INTO check_results (name, ts, state, summary) VALUES ('b', 1, 'OK', 'x')")
                conn.execute("INSERT INTO check_results (name, ts, state, summary) VALUES (NULL, 1, 'OK', 'x')")
        with self.assertRaises(mm.ValidationError):  # refused before the transaction starts
            self.metrics.writing([("y", 3.0), ("", 4.0)])
        self.assertEqual(self.rows(), [("x", '{"check":"a"}', self.clock.now, 0, 1.0)])
        self.assertEqual(self.metrics.store.query("SELECT name, state FROM check_results"), [("a", "OK")])
        self.assertEqual(self.metrics.store.query("SELECT name FROM series ORDER BY name"), [("x",)])

    def test_two_samples_at_one_instant_are_both_kept(self):
        self.metrics.record("x", 1.0)
        self.metrics.record("x", 2.0)
        self.metrics.record_many([("x", 3.0), ("x", 4.0)])
        self.assertEqual([(row[3], row[4]) for row in self.rows()], [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)])
        self.assertEqual(self.metrics.get_metric_stats("x")["count"], 4)

    def test_record_many_takes_tuples_and_samples_and_returns_the_count(self):
        stored = self.metrics.record_many([
            ("a", 1),
            ("b", 2, {"k": "v"}),
            mm.Sample("c", 3, None, self.clock.now - 10),
        ])
        self.assertEqual(stored, 3)
        self.assertEqual([(r[0], r[1], r[4]) for r in self.rows()], [("a", "{}", 1.0), ("b", '{"k":"v"}', 2.0), ("c", "{}", 3.0)])
        self.assertEqual(self.metrics.record_many([]), 0)

    def test_bad_input_is_refused_with_its_value_and_nothing_is_stored(self):
        self.metrics.record("kept", 1.0)
        before = self.rows()
        cases = [
            (("", 1), "metric name is empty"),
            (("x" * 201, 1), "is 201 characters long; the limit is 200"),
            (("a\nb", 1), "metric name 'a\\nb' holds a control or other non-printable character"),
            (("a\x1b[31m", 1), "holds a control or other non-printable character"),
            ((7, 1), "metric name must be a string, got int 7"),
            (("x", float("nan")), "value of x must be a finite number, got nan"),
            (("x", float("inf")), "value of x must be a finite number, got inf"),
            (("x", "12"), "value of x must be a number, got '12'"),
            (("x", None), "value of x must be a number, got None"),
            (("x", 10**400), "value of x must be a finite number"),
            (("x", 1, {"k": 1}), "label 'k'=1 is not a pair of strings"),
            (("x", 1, {"bad key": "v"}), "label key 'bad key' must be letters, digits and underscores"),
            (("x", 1, ["k", "v"]), "labels must be a dict of strings, got list"),
            (("x", 1, None, float("nan")), "timestamp must be a finite number, got nan"),
            (("x", 1, None, -5), "timestamp must not be negative, got -5"),
            (("x", 1, None, 253402300800), "timestamp must be before the year 10000 (253402300800), got 253402300800"),
            (("x", 1, None, 1e300), "timestamp must be before the year 10000"),
            (("x",), "sample 1 is not (name, value[, labels[, timestamp]])"),
        ]
        for sample, message in cases:
            with self.subTest(sample=repr(sample)[:40]):
                with self.assertRaises(mm.ValidationError) as caught:
                    self.metrics.record_many([("good", 1.0), sample])
                self.assertIn(message, str(caught.exception))
                self.assertEqual(len(str(caught.exception).splitlines()), 1)
        self.assertEqual(self.rows(), before)

    def test_seed_helpers_refuse_bad_durations_counts_and_states(self):
        cases = [
            (lambda: self.metrics.record_sync_metric("icloud", True, -1), "duration must not be negative, got -1"),
            (lambda: self.metrics.record_sync_metric("icloud", "yes", 1), "success must be True or False, got 'yes'"),
            (lambda: self.metrics.record_sync_metric("icloud", True, 1, files_synced=1.5), "files_synced must be a whole number"),
            (lambda: self.metrics.record_sync_metric("", True, 1), "sync target is empty"),
            (lambda: self.metrics.record_agent_metric("cat", float("nan"), True), "duration must be a finite number"),
            (lambda: self.metrics.record_agent_metric("cat", 1, True, items_processed=-3), "items_processed must not be negative"),
            (lambda: self.metrics.record_circuit_breaker_metric("b", "ajar"), "breaker state must be one of closed, open, half_open, got 'ajar'"),
        ]
        for call, message in cases:
            with self.subTest(message=message):
                with self.assertRaises(mm.ValidationError) as caught:
                    call()
                self.assertIn(message, str(caught.exception))
        self.assertEqual(self.rows(), [])

    def test_sync_metric_names_follow_the_original_document(self):
        self.metrics.record_sync_metric("icloud", True, 2.5, files_synced=10, conflicts=1)
        self.metrics.record_sync_metric("icloud", False, 7.0)
        now = self.clock.now
        labels = '{"target":"icloud"}'
        self.assertEqual(self.rows(), [
            ("sync_icloud_conflicts", labels, now, 0, 1.0),
            ("sync_icloud_conflicts", labels, now, 1, 0.0),
            ("sync_icloud_failure", labels, now, 0, 7.0),
            ("sync_icloud_files", labels, now, 0, 10.0),
            ("sync_icloud_files", labels, now, 1, 0.0),
            ("sync_icloud_success", labels, now, 0, 2.5),
        ])

    def test_breaker_states_are_coded_and_half_open_accepts_a_hyphen(self):
        self.metrics.record_circuit_breaker_metric("db", "half-open", 2)
        self.assertEqual([(r[0], r[4]) for r in self.rows()], [("circuit_breaker_db_failures", 2.0), ("circuit_breaker_db_state", 2.0)])


class StatsTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.clock = FakeClock()
        self.metrics = self.collector(self.clock)

    def test_stats_agree_with_the_statistics_module(self):
        values = [2.5, 3.0, 1.25, 9.0, 4.75, 3.0, 2.0]
        for age, value in zip(range(len(values), 0, -1), values):
            self.metrics.record("d", value, timestamp=self.clock.now - age * 60)
        self.metrics.record("d", 1000.0, timestamp=self.clock.now - 25 * HOUR)  # outside the window
        self.metrics.record("other", 5.0)
        stats = self.metrics.get_metric_stats("d", hours=24, percentiles=True)
        self.assertEqual(stats["count"], 7)
        self.assertAlmostEqual(stats["avg"], statistics.fmean(values), places=12)
        self.assertEqual((stats["min"], stats["max"], stats["latest"]), (1.25, 9.0, 2.0))
        self.assertAlmostEqual(stats["stddev"], statistics.stdev(values), places=12)
        self.assertEqual(stats["p50"], statistics.median(values))
        self.assertAlmostEqual(stats["p95"], statistics.quantiles(values, n=20, method="inclusive")[-1], places=12)
        self.assertEqual(stats["first_time"], mm.iso_time(self.clock.now - 7 * 60))
        self.assertEqual(stats["last_time"], mm.iso_time(self.clock.now - 60))

    def test_variance_survives_a_large_offset(self):
        # sum(x*x) - sum(x)**2/n loses every digit here; two passes do not.
        values = [1e9 + v for v in (4.0, 7.0, 13.0, 16.0)]
        for i, value in enumerate(values):
            self.metrics.record("big", value, timestamp=self.clock.now - i)
        self.assertAlmostEqual(self.metrics.get_metric_stats("big")["stddev"], statistics.stdev(values), places=6)

    def test_empty_window_gives_zero_count_and_none(self):
        self.assertEqual(self.metrics.get_metric_stats("nothing", percentiles=True), {
            "count": 0, "avg": None, "min": None, "max": None, "stddev": None, "latest": None,
            "first_time": None, "last_time": None, "tiers": [], "p50": None, "p95": None,
        })

    def test_one_sample_has_no_stddev(self):
        self.metrics.record("one", 4.0)
        stats = self.metrics.get_metric_stats("one")
        self.assertEqual((stats["count"], stats["avg"], stats["stddev"], stats["latest"]), (1, 4.0, None, 4.0))

    def test_samples_in_the_future_are_outside_the_window(self):
        self.metrics.record("x", 1.0, timestamp=self.clock.now + 60)
        self.assertEqual(self.metrics.get_metric_stats("x")["count"], 0)
        self.clock.advance(61)
        self.assertEqual(self.metrics.get_metric_stats("x")["count"], 1)

    def test_all_label_sets_of_a_name_count_together(self):
        self.metrics.record("disk_free", 10, {"mount": "/"})
        self.metrics.record("disk_free", 30, {"mount": "/home"})
        stats = self.metrics.get_metric_stats("disk_free")
        self.assertEqual((stats["count"], stats["avg"]), (2, 20.0))

    def test_bad_windows_are_refused(self):
        for hours in (0, -1, float("nan")):
            with self.subTest(hours=hours), self.assertRaises(mm.ValidationError):
                self.metrics.get_metric_stats("x", hours=hours)


class SuccessRateTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.clock = FakeClock()
        self.metrics = self.collector(self.clock)

    def test_rate_is_a_percentage_of_attempts_in_the_window(self):
        for success in (True, True, True, False):
            self.metrics.record_sync_metric("icloud", success, 1.0)
        self.metrics.record_sync_metric("icloud", False, 1.0, timestamp=self.clock.now - 30 * HOUR)
        self.assertEqual(self.metrics.get_success_rate("sync_icloud", hours=24), 75.0)
        self.assertEqual(self.metrics.get_success_rate("sync_icloud", hours=48), 60.0)
        self.assertEqual(self.metrics.success_counts("sync_icloud", hours=24), (3, 4))

    def test_no_attempts_is_none_not_zero(self):
        self.assertIsNone(self.metrics.get_success_rate("sync_nowhere"))
        self.metrics.record_agent_metric("cataloger", 1.0, False)
        self.assertEqual(self.metrics.get_success_rate("agent_cataloger"), 0.0)


class SummaryTest(StoreTestCase):
    def test_summary_of_targets_breakers_and_agents(self):
        clock = FakeClock()
        metrics = self.collector(clock)
        start = clock.now
        metrics.record_sync_metric("icloud", True, 2.0, timestamp=start - 300)
        metrics.record_sync_metric("icloud", False, 4.0, timestamp=start - 200)
        metrics.record_sync_metric("external_drive", True, 1.0, timestamp=start - 100)
        metrics.record_circuit_breaker_metric("icloud_sync", "closed", 0, timestamp=start - 900)
        metrics.record_circuit_breaker_metric("icloud_sync", "open", 3, timestamp=start - 600)
        metrics.record_circuit_breaker_metric("icloud_sync", "open", 4, timestamp=start - 300)
        metrics.record_agent_metric("cataloger", 1.5, True, timestamp=start - 50)
        metrics.record_agent_metric("cataloger", 0.5, True, timestamp=start - 10)
        self.assertEqual(metrics.get_system_summary(), {
            "schema_version": 5,
            "generated_at": mm.iso_time(start),
            "window_hours": 24.0,
            "status": "unknown",
            "sync": {
                "external_drive": {"success_rate": 100.0, "attempts": 1, "avg_duration": 1.0,
                                   "last_success": mm.iso_time(start - 100),
                                   "recent": {"durations": [1.0], "failed": [], "anomalous": []}},
                "icloud": {"success_rate": 50.0, "attempts": 2, "avg_duration": 3.0,
                           "last_success": mm.iso_time(start - 300),
                           "recent": {"durations": [2.0, 4.0], "failed": [1], "anomalous": []}},
            },
            "circuit_breakers": {"icloud_sync": {"state": "open", "failures": 4, "since": mm.iso_time(start - 600),
                                                 "recent": {"failures": [0.0, 3.0, 4.0]}}},
            "agents": {"cataloger": {"executions": 2, "success_rate": 100.0, "avg_duration": 1.0,
                                     "latest_duration": 0.5,
                                     "recent": {"durations": [1.5, 0.5], "failed": [], "anomalous": []}}},
            "jobs": {},
            "metrics": {},
            "alerts": [],
            "health": {},
            "omitted": {},
        })

    def test_entities_are_the_label_values_of_every_series_sorted_as_python_sorts(self):
        metrics = self.collector(FakeClock())
        names = ["zeta", "Zeta", "éclair", "eclair", "日本", "😀", "a b", 'quote"d', "back\\slash", "", "a"]
        metrics.record_many((f"sync_{i}_files", 1.0, {"target": name, "host": f"h{i % 2}"}) for i, name in
                            enumerate(names))
        metrics.record("x", 1.0, {"target": "zeta"})  # one name, twice
        with metrics.writing() as conn:  # a series created in a transaction that is rolled back leaves none
            conn.execute("SAVEPOINT s")
            metrics._series_id(conn, ("y", mm.canonical_labels({"target": "rolled back"})))
            conn.execute("ROLLBACK TO s")
        self.assertEqual(metrics.entities("target", "host", "agent"),
                         {"target": sorted(names), "host": ["h0", "h1"], "agent": []})
        self.assertEqual(metrics.sync_targets(), sorted(names))

    def test_summary_of_an_empty_store(self):
        summary = self.collector(FakeClock()).get_system_summary()
        self.assertEqual((summary["sync"], summary["circuit_breakers"], summary["agents"]), ({}, {}, {}))


class RollupTest(StoreTestCase):
    """Whole hours come from rollups, the edges from raw samples: the answers must not change."""

    def reference(self, points, since, until):
        """get_metric_stats computed plainly from (ts, order, value) points."""
        inside = sorted(p for p in points if since <= p[0] <= until)
        values = [value for _, _, value in inside]
        if not values:
            return {"count": 0}
        return {
            "count": len(values), "avg": statistics.fmean(values), "min": min(values), "max": max(values),
            "stddev": statistics.stdev(values) if len(values) > 1 else None, "latest": inside[-1][2],
            "first_time": mm.iso_time(inside[0][0]), "last_time": mm.iso_time(inside[-1][0]),
        }

    def assertStatsMatch(self, stats, expected):
        self.assertEqual(stats["count"], expected["count"])
        if not expected["count"]:
            return
        for key in ("min", "max", "latest", "first_time", "last_time"):
            self.assertEqual(stats[key], expected[key], key)
        self.assertAlmostEqual(stats["avg"], expected["avg"], delta=1e-9 * abs(expected["avg"]))
        if expected["stddev"] is None:
            self.assertIsNone(stats["stddev"])
        else:
            self.assertAlmostEqual(stats["stddev"], expected["stddev"], delta=1e-9 * expected["stddev"])

    def test_windows_agree_with_a_plain_computation(self):
        rng = random.Random(7)
        clock = FakeClock(1_800_000_123.4)
        metrics = self.collector(clock, retention_days=365)
        points, order = [], 0
        start = clock.now - 3 * 86400

        def record(batch):
            nonlocal order
            metrics.record_many([("m", value, {"copy": str(i % 2)}, ts) for i, (ts, value) in enumerate(batch)])
            for ts, value in batch:
                points.append((ts, order, value))
                order += 1

        record([(start + rng.uniform(0, 3 * 86400), rng.gauss(1e6, 10.0)) for _ in range(3000)])
        record([(start + 3600.0 * k, float(k)) for k in range(72)])  # exactly on hour edges
        metrics.roll_up()  # the first write rolled up already: nothing new
        self.assertGreater(metrics.store.query("SELECT count(*) FROM rollups")[0][0], 100)
        late = [(start + rng.uniform(0, 2 * 86400), rng.gauss(1e6, 50.0)) for _ in range(200)]
        record(late + [late[0], (late[1][0], -5.0)])  # two more at instants already taken
        for advance in (0.0, 1900.0, 3600.0 * 5 + 7):
            clock.advance(advance)
            metrics.roll_up()
            for hours in (0.01, 0.5, 1, 1.5, 2, 5.25, 24, 36.7, 71.99, 80):
                with self.subTest(advance=advance, hours=hours):
                    stats = metrics.get_metric_stats("m", hours=hours)
                    self.assertStatsMatch(stats, self.reference(points, clock.now - hours * HOUR, clock.now))

    def test_a_day_window_reads_rollups_for_whole_hours(self):
        clock = FakeClock(1_800_000_123.4)
        metrics = self.collector(clock)
        metrics.record_many([("m", float(i), None, clock.now - i * 60.0) for i in range(2000)])
        metrics.roll_up()
        traced = []
        metrics.store.connection.set_trace_callback(traced.append)
        stats = metrics.get_metric_stats("m", hours=24)
        self.assertEqual(stats["count"], 24 * 60 + 1)
        reads = [sql for sql in traced if sql.startswith("SELECT")]
        self.assertEqual(sum(" FROM rollups " in sql for sql in reads), 2)  # first pass and squares
        # Two edges and the samples kept raw for their hours (none here: a lookup of the series), twice; latest.
        self.assertEqual(sum(" FROM samples " in sql for sql in reads), 7)

    def test_roll_up_reads_each_series_once_and_only_closed_hours(self):
        clock = FakeClock(1_800_000_000.0 + 30)  # 30 s into an hour
        metrics = self.collector(clock)
        metrics.record_many([("m", 1.0, None, clock.now - i * 600.0) for i in range(3 * 144)])
        metrics.store.connection.execute("DELETE FROM rollups")
        metrics.store.connection.execute("DELETE FROM meta WHERE key = 'rolled_until'")
        traced = []
        metrics.store.connection.set_trace_callback(traced.append)
        self.assertEqual(metrics.roll_up(), 71)
        self.assertEqual(traced.count("BEGIN IMMEDIATE"), 1)  # 71 closed hours, 426 samples: one slice
        self.assertEqual(sum(sql.startswith("SELECT ts, seq, value FROM samples") for sql in traced), 1)
        # The hour that ended 30 s ago is not closed yet: its sample stays raw only.
        self.assertEqual(metrics.store.meta_times("rolled_until")[0], 1_800_000_000.0 - 3600)
        self.assertEqual(metrics.store.query("SELECT max(bucket) FROM rollups"), [(1_800_000_000.0 - 7200,)])
        self.assertEqual(metrics.roll_up(), 0)

    def test_bucket_start_is_exact_at_the_edges(self):
        for ts, expected in ((0.0, 0.0), (3599.999, 0.0), (3600.0, 3600.0), (1_800_000_000.0, 1_800_000_000.0),
                             (math.nextafter(1_800_000_000.0, 0), 1_800_000_000.0 - 3600)):
            with self.subTest(ts=ts):
                self.assertEqual(mm.bucket_start(ts), expected)


class CleanupTest(StoreTestCase):
    def raw_values(self, metrics):
        return [row[0] for row in metrics.store.query("SELECT value FROM samples ORDER BY ts, seq")]

    def test_cleanup_deletes_expired_raw_samples_in_batches_and_keeps_their_statistics(self):
        clock = FakeClock()
        metrics = self.collector(clock, retention_days=30)
        old = [("x", float(i % 101), None, clock.now - 31 * 86400 - i) for i in range(25_000)]
        young = [("x", 7.0, None, clock.now - 29 * 86400), ("y", 8.0, None, clock.now)]
        metrics.record_many(old + young)  # the first write runs the daily cleanup itself
        self.assertEqual(self.raw_values(metrics), [7.0, 8.0])
        after_first = metrics.get_metric_stats("x", hours=10_000)
        self.assertEqual(after_first["count"], 25_001)
        metrics.record_many(old)  # late samples for hours already rolled up
        before = metrics.get_metric_stats("x", hours=10_000)
        traced = []
        metrics.store.connection.set_trace_callback(traced.append)
        self.assertEqual(metrics.cleanup_old_metrics(), 25_000)
        # x: 10,000 + 10,000 + 5,000, each in its own transaction; y has nothing expired: no write at all.
        self.assertEqual(sum(1 for sql in traced if sql.startswith("DELETE")), 3)
        self.assertEqual(metrics.cleanup_old_metrics(), 0)
        self.assertEqual(self.raw_values(metrics), [7.0, 8.0])
        after = metrics.get_metric_stats("x", hours=10_000)
        self.assertEqual(before["count"], 50_001)
        self.assertEqual((after["count"], after["min"], after["max"], after["latest"]),
                         (before["count"], before["min"], before["max"], before["latest"]))
        self.assertAlmostEqual(after["avg"], before["avg"], delta=1e-9 * before["avg"])
        self.assertAlmostEqual(after["stddev"], before["stddev"], delta=1e-9 * before["stddev"])
        values = [float(i % 101) for i in range(25_000)] * 2 + [7.0]
        self.assertAlmostEqual(after["avg"], statistics.fmean(values), delta=1e-9)
        self.assertAlmostEqual(after["stddev"], statistics.stdev(values), delta=1e-9)

    def test_automatic_cleanup_runs_at_most_once_a_day(self):
        clock = FakeClock()
        metrics = self.collector(clock, retention_days=1)
        metrics.record("x", 1)
        metrics.record("x", 2, timestamp=clock.now - 2 * 86400)  # expired, but cleanup ran a moment ago
        clock.advance(2 * HOUR)
        metrics.record("x", 3)
        self.assertEqual(self.raw_values(metrics), [2.0, 1.0, 3.0])
        clock.advance(22 * HOUR)
        metrics.record("x", 4)
        self.assertEqual(self.raw_values(metrics), [1.0, 3.0, 4.0])
        self.assertEqual(metrics.store.meta_times("last_cleanup")[0], clock.now)
        self.assertEqual(metrics.get_metric_stats("x", hours=100)["count"], 4)


class LastTimeTest(StoreTestCase):
    """series.last_ts: the time of the newest sample of each of the user's own series and of each failure
    series, kept by writes and deletes; for good, the first LAGGING_SERIES_MAX of those written lag instead,
    listed in meta's lagging_series."""

    def setUp(self):
        super().setUp()
        self.clock = FakeClock()
        self.metrics = self.collector(self.clock, maintain=False)

    def last_times(self):
        """({name: last_ts}, the names of the lagging series), read apart from the module."""
        lagging = sqlite_rows(self.db, "SELECT value FROM meta WHERE key = 'lagging_series'")
        ids = {int(part) for part in lagging[0][0].split(",")} if lagging else set()
        rows = sqlite_rows(self.db, "SELECT id, name, last_ts FROM series ORDER BY id")
        return {name: last for _, name, last in rows}, {name for sid, name, _ in rows if sid in ids}

    def assertLastTimesRight(self, msg=None):
        """Every series that keeps a last_ts and does not lag has the time of its newest sample (None without
        one), and few lag."""
        rows = sqlite_rows(self.db, "SELECT name, last_ts, (SELECT max(ts) FROM samples WHERE series_id = series.id) "
                                    f"FROM series WHERE {mm._TRACKED} ORDER BY id")
        last, lagging = self.last_times()
        self.assertLessEqual(len(lagging), mm.LAGGING_SERIES_MAX, msg)
        self.assertEqual({name: stored for name, stored, _ in rows if name not in lagging},
                         {name: newest for name, _, newest in rows if name not in lagging}, msg)

    def fill_the_room(self, collector=None):
        (collector or self.metrics).record_many((f"hot{i}", 1.0) for i in range(mm.LAGGING_SERIES_MAX))

    def test_the_first_series_written_lag_and_writing_one_again_reads_nothing_more(self):
        now = self.clock.now
        self.metrics.record("a", 1.0, timestamp=now - 10)
        self.metrics.record("a", 2.0, timestamp=now - 5)
        self.assertEqual(self.last_times(), ({"a": None}, {"a"}))
        traced = []
        self.metrics.store.connection.set_trace_callback(traced.append)
        self.metrics.record("a", 3.0, timestamp=now)
        self.assertEqual([sql.split()[0] for sql in traced], ["BEGIN", "INSERT", "COMMIT"])  # as before schema 10
        self.metrics.store.connection.set_trace_callback(None)
        self.metrics.roll_up()
        self.metrics.record("b", 1.0, timestamp=now)
        self.assertEqual(self.last_times(), ({"a": None, "b": None}, {"a", "b"}))
        self.assertEqual(self.metrics.lagging_series(), frozenset({1, 2}))
        self.assertLastTimesRight()

    def test_the_room_goes_to_series_that_keep_one(self):
        self.metrics.record_sync_metric("icloud", True, 2.0, 5, 0)
        self.metrics.record_sync_metric("icloud", False, 2.0, 5, 0)
        self.metrics.record("load", 1.0)
        self.assertEqual(self.last_times()[1], {"sync_icloud_failure", "load"})

    def test_only_the_users_own_series_and_failures_keep_one(self):
        self.fill_the_room()
        now = self.clock.now
        self.metrics.record_sync_metric("icloud", True, 2.0, 5, 0, timestamp=now - 30)
        self.metrics.record_sync_metric("icloud", False, 3.0, 0, 1, timestamp=now - 20)
        self.metrics.record_circuit_breaker_metric("db", "open", 3, timestamp=now - 10)
        self.metrics.record("backup_failure", 1.0, timestamp=now - 5)
        traced = []
        self.metrics.store.connection.set_trace_callback(traced.append)
        self.metrics.record_sync_metric("icloud", True, 2.5, 5, 0, timestamp=now)  # three series, none keeps one
        self.metrics.record("sync_icloud_success", 2.0, {"target": "icloud"}, timestamp=now)
        self.metrics.store.connection.set_trace_callback(None)
        self.assertEqual([sql for sql in traced if re.search(r"\b(UPDATE|INTO|FROM) (series|meta)\b", sql)], [])
        self.assertEqual([sql.split()[0] for sql in traced], ["BEGIN", "SAVEPOINT"] + ["INSERT"] * 3 + [
            "RELEASE", "COMMIT", "BEGIN", "INSERT", "INSERT", "COMMIT"])  # the same as before schema 10
        self.assertEqual({name: last for name, last in self.last_times()[0].items() if not name.startswith("hot")}, {
            "sync_icloud_success": None, "sync_icloud_files": None, "sync_icloud_conflicts": None,
            "sync_icloud_failure": now - 20, "circuit_breaker_db_state": None, "circuit_breaker_db_failures": None,
            "backup_failure": now - 5})
        self.assertLastTimesRight()

    def test_past_the_room_a_write_catches_last_ts_up_out_of_order_and_at_one_instant(self):
        self.fill_the_room()
        now = self.clock.now
        self.metrics.record_many([("late", 1.0, None, now - 5), ("late", 2.0, None, now - 50),
                                  ("other", 1.0, {"k": "v"}, now - 7)])
        self.metrics.record("late", 3.0, timestamp=now - 100)  # older than the newest: last_ts stays
        self.metrics.record("late", 4.0, timestamp=now - 5)  # a second sample at the newest instant
        last, lagging = self.last_times()
        self.assertEqual((last["late"], last["other"], len(lagging), "late" in lagging), (now - 5, now - 7, 64, False))
        self.assertEqual(sqlite_rows(self.db, "SELECT ts, seq, value FROM samples JOIN series ON id = series_id "
                                              "WHERE name = 'late' ORDER BY ts, seq"),
                         [(now - 100, 0, 3.0), (now - 50, 0, 2.0), (now - 5, 0, 1.0), (now - 5, 1, 4.0)])
        self.metrics.record("late", 5.0, timestamp=now + 1)
        self.assertEqual(self.last_times()[0]["late"], now + 1)
        self.assertLastTimesRight()

    def test_a_rolled_back_write_lists_nothing(self):
        with self.assertRaises(mm.StorageError):
            with self.metrics.writing([("x", 1.0)]) as conn:
                conn.execute("INSERT INTO check_results (name, ts, state, summary) VALUES (NULL, 1, 'OK', '')")
        self.assertEqual(self.last_times(), ({}, set()))
        self.fill_the_room()
        self.metrics.record("x", 2.0)
        self.assertEqual((self.last_times()[0]["x"], "x" in self.last_times()[1]), (self.clock.now, False))
        self.assertLastTimesRight()

    def test_a_collector_sees_the_room_another_took(self):
        other = self.collector(self.clock, maintain=False)
        now = self.clock.now
        self.metrics.record("a", 1.0, timestamp=now - 10)  # this collector read the list with room in it
        other.record_many((f"hot{i}", 1.0) for i in range(mm.LAGGING_SERIES_MAX - 1))
        self.metrics.record("z", 2.0, timestamp=now)
        self.assertEqual((len(self.last_times()[1]), self.last_times()[0]["z"]), (mm.LAGGING_SERIES_MAX, now))
        self.assertLastTimesRight()

    def test_deleting_the_newest_samples_catches_last_ts_up(self):
        metrics = self.collector(self.clock, maintain=False, retention_days=2, hourly_days=3)
        self.fill_the_room(metrics)
        day, now = 86400.0, self.clock.now
        busy = [("busy", float(i), None, now - 10 * day + i) for i in range(5)]  # its hour rolled up, raw deleted
        sparse = [("sparse", 1.0, None, now - 10 * day + k * 7200) for k in range(3)]  # kept raw, folded, deleted
        mixed = [("mixed", 1.0, None, now - 10 * day), ("mixed", 2.0, None, now - 3600)]  # the newer one stays
        metrics.record_many(busy + sparse + mixed)
        metrics.roll_up()
        metrics.record("sparse", 9.0, timestamp=now - 9 * day)  # late, into an hour rolled up
        self.assertEqual({name: last for name, last in self.last_times()[0].items() if not name.startswith("hot")},
                         {"busy": now - 10 * day + 4, "sparse": now - 9 * day, "mixed": now - 3600})
        report = metrics.cleanup()
        # Past the retention: busy's five and sparse's late one (a plain sample, its hour's rollup merged).
        # The samples kept raw for their hours fold into days with the hours (six in all) and go.
        self.assertEqual((report["deleted_samples"], report["folded_hours"]), (6, 6))
        self.assertEqual(sqlite_rows(self.db, "SELECT name, ts FROM samples JOIN series ON id = series_id "
                                              "WHERE name NOT GLOB 'hot*'"), [("mixed", now - 3600)])
        self.assertEqual({name: last for name, last in self.last_times()[0].items() if not name.startswith("hot")},
                         {"busy": None, "sparse": None, "mixed": now - 3600})
        self.assertLastTimesRight()

    def test_any_order_of_writes_roll_ups_and_cleanups_keeps_last_ts_right(self):
        rng = random.Random(31)
        collectors = [self.metrics, self.collector(self.clock, maintain=False, retention_days=1, hourly_days=2)]
        for step in range(300):
            collector = rng.choice(collectors)
            action = rng.random()
            if action < 0.6:
                collector.record(f"s{rng.randrange(90)}", 1.0, timestamp=self.clock.now - rng.uniform(0, 4 * 86400))
            elif action < 0.9:
                collector.record_many((f"s{rng.randrange(90)}", 1.0, None, self.clock.now - rng.uniform(0, 86400))
                                      for _ in range(rng.randrange(1, 40)))
            elif action < 0.95:
                collector.roll_up()
            else:
                collector.cleanup()
            self.clock.advance(rng.uniform(0, 3600))
            self.assertLastTimesRight(f"after step {step}")
        self.assertEqual(len(self.last_times()[1]), mm.LAGGING_SERIES_MAX)
        self.assertGreater(sqlite_rows(self.db, "SELECT count(*) FROM series WHERE last_ts IS NULL")[0][0], 0)
        self.assertEqual(sqlite_rows(self.db, f"SELECT count(*) FROM series WHERE NOT {mm._TRACKED}"), [(0,)])


class PureFunctionsTest(unittest.TestCase):
    def test_percentile_interpolates(self):
        self.assertEqual(mm.percentile([], 0.5), None)
        self.assertEqual(mm.percentile([3.0], 0.95), 3.0)
        self.assertEqual(mm.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95), 4.8)

    def test_iso_time_has_an_offset(self):
        self.assertEqual(mm.iso_time(1_700_000_000.25), "2023-11-14T22:13:20.250+00:00")
        self.assertIsNone(mm.iso_time(None))

    def test_iso_time_agrees_with_datetime(self):
        from datetime import datetime, timezone

        rng = random.Random(9)
        cases = [0.0, 0.9999995, 59.9999996, 1_799_999_999.9999997, 253402300799.5]
        cases += [rng.uniform(0, 4e9) for _ in range(2000)]
        for ts in cases:
            with self.subTest(ts=ts):
                expected = datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")
                self.assertEqual(mm.iso_time(ts), expected)

    def test_canonical_labels_are_sorted_and_compact(self):
        self.assertEqual(mm.canonical_labels({"b": "2", "a": "é"}), '{"a":"é","b":"2"}')
        self.assertEqual(mm.canonical_labels({}), "{}")
        self.assertEqual(mm.canonical_labels(None), "{}")

    def test_finite_number(self):
        self.assertEqual(mm.finite_number(3), 3.0)
        self.assertTrue(math.isfinite(mm.finite_number(True)))


if __name__ == "__main__":
    unittest.main()
