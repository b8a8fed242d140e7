"""Retention: raw samples expire, hours fold into days, and statistics do not change."""

import json
import os
import random
import statistics
import subprocess
import sys
import time

import metasystem_monitor as mm

from .support import REPO, SUBPROCESS_TIMEOUT_S, FakeClock, StoreTestCase, sqlite_rows

DAY = 86400.0
HOUR = 3600.0


def table_rows(store):
    return {table: store.query(f"SELECT * FROM {table} ORDER BY 1, 2, 3")
            for table in ("series", "samples", "rollups")}


class FoldingTest(StoreTestCase):
    """A store with 1 day of raw samples, 3 days of hours, and days before that."""

    def setUp(self):
        super().setUp()
        self.clock = FakeClock(1_800_000_000.0 + 5 * HOUR + 17)  # 05:00:17 UTC
        self.metrics = self.collector(self.clock, retention_days=1, hourly_days=3, maintain=False)
        rng = random.Random(21)
        start = self.clock.now - 8 * DAY
        self.points = [(start + i * 600.0 + rng.uniform(0, 599), rng.gauss(100, 15)) for i in range(8 * 144)]
        self.metrics.record_many([("m", v, {"site": "a" if i % 3 else "b"}, ts) for i, (ts, v) in enumerate(self.points)])

    def expected(self, since):
        values = [v for ts, v in self.points if since <= ts <= self.clock.now]
        return len(values), statistics.fmean(values), min(values), max(values), statistics.stdev(values)

    def observed(self, hours):
        stats = self.metrics.get_metric_stats("m", hours=hours)
        return stats["count"], stats["avg"], stats["min"], stats["max"], stats["stddev"]

    def assertSameStats(self, observed, expected):
        self.assertEqual(observed[0], expected[0])
        self.assertEqual(observed[2:4], expected[2:4])
        for got, want in zip((observed[1], observed[4]), (expected[1], expected[4])):
            self.assertAlmostEqual(got, want, delta=1e-9 * abs(want))

    def test_hours_fold_into_days_and_statistics_stay_exact(self):
        report = self.metrics.cleanup()
        self.assertEqual(report["deleted_samples"], sum(1 for ts, _ in self.points if ts < mm.bucket_start(
            self.clock.now - DAY)))
        day_edge = mm.bucket_start(self.clock.now - 3 * DAY, DAY)
        self.assertEqual(self.metrics.store.meta_times("daily_until")[0], day_edge)
        self.assertEqual(report["daily_rollups"], 2 * 5)  # two series, five whole days before the edge
        self.assertEqual(self.metrics.store.query("SELECT count(*) FROM rollups WHERE span = 3600 AND bucket < ?",
                                                  (day_edge,)), [(0,)])
        # A window that starts on a day boundary inside the daily tier is exact.
        since = mm.bucket_start(self.clock.now - 7 * DAY, DAY)
        hours = (self.clock.now - since) / HOUR
        self.assertSameStats(self.observed(hours), self.expected(since))
        self.assertEqual(self.metrics.get_metric_stats("m", hours=hours)["tiers"], ["daily", "hourly", "raw"])
        self.assertEqual(self.metrics.get_metric_stats("m", hours=20)["tiers"], ["hourly", "raw"])
        self.assertEqual(self.metrics.get_metric_stats("m", hours=0.5)["tiers"], ["raw"])

    def test_a_second_cleanup_changes_nothing(self):
        self.metrics.cleanup()
        before = table_rows(self.metrics.store)
        traced = []
        self.metrics.store.connection.set_trace_callback(traced.append)
        self.assertEqual(self.metrics.cleanup(), {"rolled_up_hours": 0, "deleted_samples": 0, "folded_hours": 0,
                                                  "daily_rollups": 0, "deleted_days": 0,
                                                  "deleted_retry_records": 0, "deleted_job_runs": 0,
                                                  "deleted_alerts": 0})
        self.metrics.store.connection.set_trace_callback(None)
        self.assertEqual(table_rows(self.metrics.store), before)
        writes = [sql for sql in traced if sql.split()[0] in ("INSERT", "UPDATE", "DELETE")]
        self.assertEqual(len(writes), 1)  # when the last cleanup ran, and nothing else
        self.assertTrue(writes[0].startswith("INSERT OR REPLACE INTO meta (key, value) VALUES ("), writes)
        # Nothing due costs the same whatever the number of series: no statement reads them or their rows.
        self.assertEqual([sql for sql in traced if "samples" in sql or "FROM series" in sql], [])

    def test_a_sample_older_than_what_was_deleted_goes_at_the_next_cleanup(self):
        self.metrics.cleanup()
        self.metrics.record("m", 5.0, {"site": "a"}, self.clock.now - 2 * DAY)  # past the one-day retention
        self.assertEqual(self.metrics.cleanup()["deleted_samples"], 1)
        self.assertEqual(self.metrics.cleanup()["deleted_samples"], 0)

    def test_a_late_sample_for_a_folded_day_joins_that_day(self):
        self.metrics.cleanup()
        since = mm.bucket_start(self.clock.now - 7 * DAY, DAY)
        late = (since + 3 * HOUR + 1, 1000.0)
        self.metrics.record("m", late[1], {"site": "a"}, late[0])
        self.points.append(late)
        hours = (self.clock.now - since) / HOUR
        self.assertSameStats(self.observed(hours), self.expected(since))
        self.assertEqual(self.metrics.store.query("SELECT count(*) FROM rollups WHERE span = 3600 AND bucket < ?",
                                                  (self.metrics.store.meta_times("daily_until")[0],)), [(0,)])

    def test_daily_rollups_expire_when_configured(self):
        self.metrics.daily_days = 5
        report = self.metrics.cleanup()
        self.assertEqual(report["deleted_days"], 2 * 3)  # days 8, 7 and 6 ago (the oldest is partial)
        oldest = self.metrics.store.query("SELECT min(bucket) FROM rollups")[0][0]
        self.assertEqual(oldest, mm.bucket_start(self.clock.now - 5 * DAY, DAY))


class SlicedRollUpTest(StoreTestCase):
    """A write rolls up at most one slice of series; the rest follow; statistics stay exact meanwhile."""

    SERIES = 2 * mm.ROLLUP_SERIES_PER_SLICE + 500

    def test_a_write_does_one_slice_and_a_late_sample_in_a_done_slice_is_counted_once(self):
        clock = FakeClock(1_800_000_000.0 + 2 * HOUR + 120)  # 02:02: the hours 00:00 and 01:00 are closed
        metrics = self.collector(clock, maintain=False)
        hour = mm.bucket_start(clock.now - HOUR)
        metrics.record_many((f"s{i}", float(i % 7), None, hour + i % 3000) for i in range(self.SERIES))
        metrics.roll_up(slices=1)
        cursor, rolled = metrics.store.meta_times("rollup_cursor", "rolled_until")
        self.assertEqual(rolled, None)
        self.assertEqual(metrics.store.query("SELECT count(DISTINCT series_id) FROM rollups"),
                         [(mm.ROLLUP_SERIES_PER_SLICE,)])
        done = metrics.store.query("SELECT name FROM series WHERE id <= ? ORDER BY id LIMIT 1", (cursor,))[0][0]
        metrics.record(done, 100.0, None, hour + 10)  # late for a series whose slice is done
        metrics.record("s9999999", 1.0, None, hour + 20)  # a new series: the slices to come take it
        self.assertEqual(metrics.get_metric_stats(done, hours=3)["count"], 2)  # raw: the hour is not rolled yet
        self.assertGreater(metrics.roll_up(), 0)
        self.assertEqual(metrics.store.meta_times("rollup_cursor", "rolled_until"), (None, mm.bucket_start(clock.now)))
        for name, count in ((done, 2), ("s9999999", 1), (f"s{self.SERIES - 1}", 1)):
            stats = metrics.get_metric_stats(name, hours=3)
            self.assertEqual((stats["count"], stats["tiers"]), (count, ["hourly"]), name)
        self.assertEqual(metrics.get_metric_stats(done, hours=3)["max"], 100.0)

    def test_the_write_path_does_one_slice_a_minute(self):
        clock = FakeClock(1_800_000_000.0 + 2 * HOUR + 120)
        metrics = self.collector(clock)
        hour = mm.bucket_start(clock.now - HOUR)
        with mm.MetricsCollector(self.db, maintain=False, now=clock.time) as bulk:
            bulk.record_many((f"s{i}", 1.0, None, hour) for i in range(self.SERIES))
            bulk.cleanup()  # the daily cleanup is done: what remains due is the roll-up of the next hour
        clock.advance(HOUR)
        with mm.MetricsCollector(self.db, maintain=False, now=clock.time) as bulk:
            bulk.record_many((f"s{i}", 2.0, None, clock.now - HOUR + 5) for i in range(self.SERIES))
        for minute in range(3):
            metrics.record("x", 1.0)
            rolled = metrics.store.query("SELECT count(DISTINCT series_id) FROM rollups WHERE bucket = ?",
                                         (mm.bucket_start(clock.now - HOUR),))[0][0]
            self.assertEqual(rolled, min(self.SERIES, (minute + 1) * mm.ROLLUP_SERIES_PER_SLICE), minute)
            clock.advance(60)


class CleanupCommandTest(StoreTestCase):
    def test_text_json_and_quiet(self):
        old = mm.bucket_start(time.time() - 40 * DAY) + 60  # 100 seconds inside one hour, whenever this runs
        with self.collector(maintain=False) as metrics:
            metrics.record_many([("m", float(i), None, old + i) for i in range(100)])
        result = self.run_cli("--db", self.db, "cleanup")
        self.assertCleanExit(result, stdout="cleanup: rolled up 1 hours; deleted 100 raw samples older than 30 days; "
                                            "folded 0 hours into 0 days; deleted 0 daily rollups, 0 retry records, 0 job runs and "
                                            "0 alerts of the history\n")
        result = self.run_cli("--db", self.db, "cleanup", "--json")
        self.assertCleanExit(result, stdout=None)
        self.assertEqual(json.loads(result.stdout), {
            "rolled_up_hours": 0, "deleted_samples": 0, "folded_hours": 0, "daily_rollups": 0, "deleted_days": 0,
            "deleted_retry_records": 0,
            "deleted_job_runs": 0,
            "deleted_alerts": 0,
            "retention_days": 30.0, "rollup_hourly_days": 365.0, "rollup_daily_days": 0.0,
        })
        self.assertCleanExit(self.run_cli("--db", self.db, "-q", "cleanup"))
        stats = json.loads(self.run_cli("--db", self.db, "stats", "m", "--hours", str(41 * 24), "--json").stdout)
        self.assertEqual((stats["count"], stats["min"], stats["max"], stats["tiers"]), (100, 0.0, 99.0, ["hourly"]))

    def test_horizons_come_from_the_configuration(self):
        config = os.path.join(self.tmp, "c.ini")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write("[storage]\nretention_days = 12h\nrollup_hourly_days = 2d\nrollup_daily_days = 400\n")
        result = self.run_cli("--config", config, "--db", self.db, "cleanup", "--json")
        document = json.loads(result.stdout)
        self.assertEqual((document["retention_days"], document["rollup_hourly_days"], document["rollup_daily_days"]),
                         (0.5, 2.0, 400.0))


_LIVE_WRITER = """
import select, sys
import metasystem_monitor as mm
collector = mm.MetricsCollector(sys.argv[1], maintain=False)
print("ready", flush=True)
count = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    collector.record("live", count)
    count += 1
collector.close()
print(count, flush=True)
"""


class LargeCleanupTest(StoreTestCase):
    ROWS = 2_000_000

    def build(self, now):
        """2,000,000 raw samples 31 to 61 days old over four series, and a few recent ones."""
        with mm.Store(self.db) as store, store.write() as conn:
            conn.executemany("INSERT INTO series (id, name, labels) VALUES (?, ?, '{}')",
                             [(i, f"s{i}") for i in range(1, 5)])
            step = 30 * DAY / (self.ROWS / 4)
            start = now - 61 * DAY
            # Row i: series i % 4 + 1, time start + (i // 4) * step, value i % 1009; made by SQLite itself,
            # which is faster than two million Python tuples.
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ? - 1) "
                "INSERT INTO samples (series_id, ts, seq, value) "
                "SELECT i % 4 + 1, ? + (i / 4) * ?, 0, CAST(i % 1009 AS REAL) FROM n",
                (self.ROWS, start, step),
            )
            conn.executemany("INSERT INTO samples (series_id, ts, seq, value) VALUES (?, ?, 0, ?)",
                             [(1, now - d * DAY, 5000.0 + d) for d in range(1, 30)])

    def test_two_million_expired_rows_go_while_another_process_writes(self):
        now = time.time()
        self.build(now)
        metrics = self.collector(maintain=False)
        metrics.store.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size_before = os.path.getsize(self.db)
        before = {hours: metrics.get_metric_stats("s1", hours=hours) for hours in (30 * 24, 90 * 24)}
        writer = subprocess.Popen([sys.executable, "-c", _LIVE_WRITER, self.db], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=self.child_env())
        self.addCleanup(lambda: writer.poll() is None and writer.kill())
        self.assertEqual(writer.stdout.readline(), b"ready\n")
        report = metrics.cleanup()
        out, err = writer.communicate(b"stop\n", timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((writer.returncode, err), (0, b""))
        written = int(out)
        self.assertGreater(written, 0)
        self.assertEqual(report["deleted_samples"], self.ROWS)
        self.assertEqual(metrics.store.query("SELECT count(*) FROM samples WHERE series_id <= 4"), [(29,)])
        live = metrics.store.query("SELECT count(*), min(value), max(value) FROM samples JOIN series ON id = series_id "
                                   "WHERE name = 'live'")
        self.assertEqual(live, [(written, 0.0, written - 1.0)])
        for hours, was in before.items():
            with self.subTest(hours=hours):
                now_stats = metrics.get_metric_stats("s1", hours=hours)
                self.assertEqual((now_stats["count"], now_stats["min"], now_stats["max"]),
                                 (was["count"], was["min"], was["max"]))
                self.assertAlmostEqual(now_stats["avg"], was["avg"], delta=1e-9 * was["avg"])
        self.assertEqual(before[90 * 24]["count"], self.ROWS // 4 + 29)
        self.assertEqual(sqlite_rows(self.db, "PRAGMA quick_check"), [("ok",)])
        # The freed pages go back to the file system once a checkpoint completes (not
        # while another process still reads), and the WAL, grown by the purge, is cut
        # back to its limit when it restarts.
        metrics.record("after", 1.0)
        metrics.store.connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
        metrics.record("after", 2.0)
        metrics.store.connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.assertGreater(size_before, 40_000_000)
        free_pages, pages = (sqlite_rows(self.db, f"PRAGMA {pragma}")[0][0] for pragma in ("freelist_count", "page_count"))
        self.assertLess(free_pages, 64)
        self.assertEqual(os.path.getsize(self.db), pages * 4096)
        self.assertLess(os.path.getsize(self.db), size_before / 4)  # what is left is rollups and the writer's samples
        self.assertLessEqual(os.path.getsize(self.db + "-wal"), mm.WAL_SIZE_LIMIT_BYTES + 65536)
        again = metrics.cleanup()
        self.assertEqual(again["deleted_samples"] + again["folded_hours"] + again["deleted_days"], 0)
