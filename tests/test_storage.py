"""The SQLite store: files and modes, pragmas, versions, many writers, crashes."""

import contextlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import unittest

import metasystem_monitor as mm

from .support import REPO, SUBPROCESS_TIMEOUT_S, StoreTestCase, file_bytes, reap, sqlite_rows


UNMARKED_UP_TO_SCHEMA = 7  # APPLICATION_ID came while the schema was 7: a store of 7 or older may lack it


class StoreFilesTest(StoreTestCase):
    def test_created_folder_and_file_are_private_whatever_the_umask(self):
        for umask in (0o000, 0o022, 0o077):
            with self.subTest(umask=oct(umask)):
                folder = os.path.join(self.tmp, f"u{umask:o}", "nested")
                path = os.path.join(folder, "metrics.db")
                previous = os.umask(umask)
                try:
                    with mm.Store(path) as store:
                        store.connection.execute("SELECT 1")
                finally:
                    os.umask(previous)
                self.assertEqual(stat.S_IMODE(os.stat(folder).st_mode), 0o700)
                self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(folder)).st_mode), 0o700)
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_an_existing_folder_keeps_its_mode(self):
        folder = os.path.join(self.tmp, "shared")
        os.mkdir(folder)
        os.chmod(folder, 0o755)
        with mm.Store(os.path.join(folder, "m.db")):
            pass
        self.assertEqual(stat.S_IMODE(os.stat(folder).st_mode), 0o755)

    def test_wal_files_share_the_private_mode(self):
        with self.collector() as collector:
            collector.record("x", 1)
            for suffix in ("-wal", "-shm"):
                self.assertEqual(stat.S_IMODE(os.stat(self.db + suffix).st_mode), 0o600)


class StorePragmasTest(StoreTestCase):
    def test_wal_normal_incremental_vacuum_and_schema_version(self):
        with mm.Store(self.db) as store:
            self.assertEqual(store.query("PRAGMA journal_mode"), [("wal",)])
            self.assertEqual(store.query("PRAGMA synchronous"), [(1,)])
            self.assertEqual(store.query("PRAGMA busy_timeout"), [(5000,)])
        self.assertEqual(sqlite_rows(self.db, "PRAGMA auto_vacuum"), [(2,)])
        self.assertEqual(sqlite_rows(self.db, "PRAGMA user_version"), [(mm.SCHEMA_VERSION,)])

    def test_synchronous_full_is_an_option(self):
        with mm.Store(self.db, synchronous="full") as store:
            self.assertEqual(store.query("PRAGMA synchronous"), [(2,)])

    def test_unknown_synchronous_mode_is_refused(self):
        with self.assertRaisesRegex(mm.ValidationError, "synchronous must be one of normal, full, got 'off'"):
            mm.Store(self.db, synchronous="off")
        self.assertFalse(os.path.exists(self.db))

    def test_write_transactions_begin_immediate(self):
        traced = []
        with mm.Store(self.db) as store:
            store.connection.set_trace_callback(traced.append)
            with store.write() as conn:
                conn.execute("INSERT INTO meta VALUES ('k', 'v')")
        self.assertEqual(traced, ["BEGIN IMMEDIATE", "INSERT INTO meta VALUES ('k', 'v')", "COMMIT"])

    def test_failed_write_rolls_back(self):
        with mm.Store(self.db) as store:
            with self.assertRaises(RuntimeError):
                with store.write() as conn:
                    conn.execute("INSERT INTO meta VALUES ('k', 'v')")
                    raise RuntimeError("stop")
            self.assertEqual(store.query("SELECT * FROM meta"), [])
            self.assertFalse(store.connection.in_transaction)

    def test_queries_inside_reading_see_one_snapshot_and_rows_stop_where_the_caller_does(self):
        mm.Store(self.db).close()
        with mm.Store(self.db, readonly=True) as reader, mm.Store(self.db) as writer:
            with reader.reading():
                self.assertEqual(reader.query("SELECT count(*) FROM meta"), [(0,)])
                with writer.write() as conn:
                    conn.execute("INSERT INTO meta VALUES ('k', 'v')")
                self.assertEqual(reader.query("SELECT count(*) FROM meta"), [(0,)])
                with reader.reading():  # inside one already: that one holds
                    self.assertEqual(reader.query("SELECT count(*) FROM meta"), [(0,)])
            self.assertFalse(reader.connection.in_transaction)
            self.assertEqual(reader.query("SELECT count(*) FROM meta"), [(1,)])
            steps = []
            reader.connection.set_progress_handler(lambda: steps.append(1), 1)
            with reader.rows("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000) "
                             "SELECT i FROM n") as rows:
                self.assertEqual([i for i, _ in zip(rows, range(3))], [(1,), (2,), (3,)])
            self.assertLess(len(steps), 1000)  # three rows made of a million, then the statement stopped

    def test_a_held_write_lock_gives_up_after_the_busy_timeout(self):
        with mm.Store(self.db) as holder, mm.Store(self.db, busy_timeout_s=0.05) as waiter:
            holder.connection.execute("BEGIN IMMEDIATE")
            holder.connection.execute("INSERT INTO meta VALUES ('held', '1')")
            with self.assertRaises(mm.StorageError) as caught:
                with waiter.write() as conn:
                    conn.execute("INSERT INTO meta VALUES ('waiting', '1')")
            self.assertEqual(str(caught.exception), f"store {self.db} is locked by another process (gave up after 0.05 s)")
            holder.connection.execute("COMMIT")
            self.assertEqual(waiter.query("SELECT key FROM meta"), [("held",)])

    def test_window_queries_use_the_primary_key_not_a_scan(self):
        with self.collector() as collector:
            collector.record("x", 1)
            plan = collector.store.query(
                "EXPLAIN QUERY PLAN SELECT count(*), avg(value), min(value), max(value), min(ts), max(ts) "
                f"FROM samples WHERE {mm._IN_WINDOW}",
                ("x", 0.0, 1e10),
            )
        details = [row[3] for row in plan]
        self.assertIn("SEARCH samples USING PRIMARY KEY (series_id=? AND ts>? AND ts<?)", details)
        self.assertFalse([d for d in details if d.startswith("SCAN")], details)


class StoreVersionsTest(StoreTestCase):
    def assertRefusedUnchanged(self, message):
        """Opening for writing and for reading both fail with ``message``; the file keeps every byte."""
        before = file_bytes(self.db)
        for readonly in (False, True):
            with self.subTest(readonly=readonly):
                with self.assertRaises(mm.StorageError) as caught:
                    mm.Store(self.db, readonly=readonly)
                self.assertEqual(str(caught.exception), message)
        self.assertEqual(file_bytes(self.db), before)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["metrics.db"])

    def write_database(self, *statements):
        conn = sqlite3.connect(self.db)
        for statement in statements:
            conn.execute(statement)
        conn.commit()
        conn.close()

    def test_a_newer_schema_is_refused_and_left_byte_for_byte(self):
        self.write_database(f"PRAGMA application_id = {mm.APPLICATION_ID}", "CREATE TABLE future (x)",
                            "PRAGMA user_version = 99")
        self.assertRefusedUnchanged(f"store {self.db} was written by a newer version (schema 99; this program "
                                    f"knows up to {mm.SCHEMA_VERSION}); it was left unchanged")

    def test_a_file_that_is_not_a_database_is_refused_unchanged(self):
        with open(self.db, "wb") as handle:
            handle.write(b"these are my notes, not a database\n" * 100)
        self.assertRefusedUnchanged(f"store {self.db} is not a SQLite database")

    def test_another_programs_database_is_refused_unchanged_whatever_its_version(self):
        refused = (f"store {self.db} is a SQLite database of another program (it does not carry the "
                   f"metasystem marker); it was left unchanged")
        for version in (0, 1, mm.SCHEMA_VERSION, mm.SCHEMA_VERSION + 1):
            with self.subTest(user_version=version):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.db)
                self.write_database("CREATE TABLE users (name TEXT)", "INSERT INTO users VALUES ('Ada')",
                                    f"PRAGMA user_version = {version}")
                self.assertRefusedUnchanged(refused)
                self.assertEqual(sqlite_rows(self.db, "PRAGMA journal_mode"), [("delete",)])
        os.unlink(self.db)
        self.write_database("PRAGMA application_id = 1", "PRAGMA user_version = 1")  # no tables, not ours
        self.assertRefusedUnchanged(refused)

    def test_no_command_changes_another_programs_database_or_advises_an_upgrade(self):
        self.write_database("CREATE TABLE users (name TEXT)", "INSERT INTO users VALUES ('Ada')",
                            "PRAGMA user_version = 1")
        before = file_bytes(self.db)
        for args, code in ((("record", "x", "1"), 1), (("stats", "x"), 1), (("export",), 1), (("metrics",), 1),
                           (("record-sync", "t", "--success", "--duration", "1"), 1), (("alerts",), 1), (("check", "--no-alert"), 2)):
            with self.subTest(args=args):
                status, out, err = self.run_main("--db", self.db, *args)
                self.assertEqual(status, code, out + err)
                self.assertIn("is a SQLite database of another program", out + err)
                self.assertNotIn("upgrade", out + err)
        self.assertEqual(file_bytes(self.db), before)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["home", "metrics.db"] if os.path.isdir(
            os.path.join(self.tmp, "home")) else ["metrics.db"])

    def test_a_store_from_before_the_marker_is_recognised_and_marked(self):
        conn = sqlite3.connect(self.db)
        for statements in mm._MIGRATIONS[:UNMARKED_UP_TO_SCHEMA]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {UNMARKED_UP_TO_SCHEMA}")
        conn.commit()
        conn.close()
        with self.assertRaisesRegex(mm.StorageError, "has schema 7; run a recording command once to upgrade it"):
            mm.Store(self.db, readonly=True)
        self.assertEqual(sqlite_rows(self.db, "PRAGMA application_id"), [(0,)])  # a reader changes nothing
        with mm.Store(self.db) as store:
            self.assertEqual(store.query("SELECT count(*) FROM samples"), [(0,)])
        self.assertEqual(sqlite_rows(self.db, "PRAGMA application_id"), [(mm.APPLICATION_ID,)])

    def test_an_empty_file_is_migrated_to_the_current_schema(self):
        open(self.db, "wb").close()
        with mm.Store(self.db) as store:
            tables = {row[0] for row in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertEqual(tables, {"series", "samples", "rollups", "meta", "retry_attempts", "retry_calls",
                                  "retry_budget", "breakers", "breaker_failures", "breaker_transitions",
                                  "alerts", "alert_deliveries", "alert_marks", "alert_states",
                                  "alert_channel_states", "alert_held", "silences", "job_runs", "check_results",
                                  "delivery_counts", "alert_acks", "raw_kept", "label_values"})

    def test_a_version_1_store_is_migrated_forward_and_keeps_its_data(self):
        conn = sqlite3.connect(self.db)
        for statement in mm._MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO series (id, name, labels) VALUES (1, 'kept', '{}')")
        conn.execute("INSERT INTO samples VALUES (1, 1800000000.0, 0, 42.0)")
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
        conn.close()
        with self.assertRaisesRegex(mm.StorageError, "has schema 1; run a recording command once to upgrade it"):
            mm.Store(self.db, readonly=True)
        with mm.Store(self.db) as store:
            self.assertEqual(store.query("PRAGMA user_version"), [(mm.SCHEMA_VERSION,)])
            self.assertEqual(store.query("SELECT * FROM samples"), [(1, 1800000000.0, 0, 42.0)])
            self.assertEqual(store.query("SELECT count(*) FROM retry_calls"), [(0,)])

    def test_a_store_of_every_older_version_gets_last_times_and_label_values_from_its_series(self):
        for version in range(1, mm.SCHEMA_VERSION):
            with self.subTest(version=version):
                path = os.path.join(self.tmp, f"v{version}.db")
                conn = sqlite3.connect(path)
                for statements in mm._MIGRATIONS[:version]:
                    for statement in statements:
                        statement(conn) if callable(statement) else conn.execute(statement)
                if version > UNMARKED_UP_TO_SCHEMA:
                    conn.execute(f"PRAGMA application_id = {mm.APPLICATION_ID}")
                conn.executemany("INSERT INTO series (id, name, labels) VALUES (?, ?, ?)",
                                 [(1, "own", "{}"), (2, "sync_a_success", '{"target":"a"}'),
                                  (3, "empty", '{"host":"n\\"as","target":"a"}')])
                conn.executemany("INSERT INTO samples VALUES (?, ?, ?, ?)",
                                 [(1, 1800000050.0, 0, 1.0), (1, 1800000010.0, 0, 2.0), (1, 1800000050.0, 1, 3.0),
                                  (2, 1800000020.0, 0, 4.0)])
                if version >= 10:  # as the writes of schema 10 keep them
                    conn.execute("UPDATE series SET own = id != 2")
                    conn.execute(f"UPDATE series SET last_ts = (SELECT max(ts) FROM samples WHERE series_id = id) "
                                 f"WHERE {mm._TRACKED}")
                conn.execute(f"PRAGMA user_version = {version}")
                conn.commit()
                conn.close()
                with mm.Store(path) as store:
                    self.assertEqual(store.query("SELECT id, last_ts FROM series ORDER BY id"),  # a success: untracked
                                     [(1, 1800000050.0), (2, None), (3, None)])
                    self.assertEqual(store.query("SELECT count(*) FROM meta WHERE key = 'lagging_series'"), [(0,)])
                    self.assertEqual(store.query("SELECT * FROM label_values"), [("host", 'n"as'), ("target", "a")])
                    self.assertEqual(store.query("SELECT id, own FROM series ORDER BY id"), [(1, 1), (2, 0), (3, 1)])

    def test_readonly_open_of_a_missing_store_creates_nothing(self):
        with mm.Store(self.db, readonly=True) as store:
            self.assertEqual(store.query("SELECT count(*) FROM samples"), [(0,)])
        self.assertEqual(os.listdir(self.tmp), [])

    def test_readonly_store_refuses_writes(self):
        with self.collector() as collector:
            collector.record("x", 1)
        with mm.Store(self.db, readonly=True) as store:
            with self.assertRaisesRegex(mm.StorageError, "is read-only$"):
                with store.write() as conn:
                    conn.execute("INSERT INTO meta VALUES ('k', 'v')")


_CLI_WRITER = """
import sys
import metasystem_monitor as mm
db, worker, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.stdin.readline()  # wait until every writer has started
for i in range(count):
    code = mm.main(["--db", db, "record", "w" + worker, str(i)])
    if code:
        sys.exit(code)
"""

_LIBRARY_WRITER = """
import sys
import metasystem_monitor as mm
db, worker, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.stdin.readline()  # wait until every writer has started
with mm.MetricsCollector(db) as collector:
    for i in range(count):
        collector.record("w" + worker, i)
"""


class MigrationRaceTest(StoreTestCase):
    def test_a_migration_committed_while_another_process_checks_the_file_is_seen_whole(self):
        # Process A migrates a fresh file; B checks the file's version and tables meanwhile. A commits
        # just as B's check starts a statement that reads sqlite_master: B must see A's schema whole,
        # never tables without a version (once two reads, which called the store another program's).
        migrating = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(migrating.close)
        migrating.execute("BEGIN IMMEDIATE")
        migrating.execute(f"PRAGMA application_id = {mm.APPLICATION_ID}")  # as _migrate does
        migrating.execute("CREATE TABLE series (id INTEGER PRIMARY KEY)")
        migrating.execute(f"PRAGMA user_version = {mm.SCHEMA_VERSION}")
        checking = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(checking.close)

        def commit_the_migration_now(sql):
            if "sqlite_master" in sql and migrating.in_transaction:
                migrating.execute("COMMIT")

        checking.set_trace_callback(commit_the_migration_now)
        self.assertEqual(mm._checked_schema_version(checking, self.db), mm.SCHEMA_VERSION)
        self.assertFalse(migrating.in_transaction)


class ConcurrentWritersTest(StoreTestCase):
    WRITERS = 8
    SAMPLES = 1000

    def start_together(self, argvs):
        procs = [
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=REPO, env=self.child_env())
            for argv in argvs
        ]
        for proc in procs:
            self.addCleanup(reap, proc)
        return procs

    def run_writers(self, script, samples):
        argvs = [[sys.executable, "-c", script, self.db, str(w), str(samples)] for w in range(self.WRITERS)]
        procs = self.start_together(argvs)
        results = [proc.communicate(b"go\n", timeout=SUBPROCESS_TIMEOUT_S) for proc in procs]
        self.assertEqual([(p.returncode, err) for p, (_, err) in zip(procs, results)], [(0, b"")] * self.WRITERS)
        self.assert_every_sample_stored(samples)

    def test_eight_processes_each_committing_a_thousand_samples_one_by_one(self):
        self.run_writers(_LIBRARY_WRITER, self.SAMPLES)

    def test_eight_processes_each_running_the_cli_main_a_hundred_times(self):
        # Each main() call opens, migrates if needed, commits and closes: a whole cron run.
        self.run_writers(_CLI_WRITER, 100)

    def test_eight_cli_batches_from_stdin_into_a_fresh_file(self):
        argvs = [[sys.executable, os.path.join(REPO, "metasystem_monitor.py"), "--db", self.db, "record", "-"]
                 for _ in range(self.WRITERS)]
        procs = self.start_together(argvs)
        results = [
            proc.communicate("".join(f"w{w} {i}\n" for i in range(self.SAMPLES)).encode(), timeout=SUBPROCESS_TIMEOUT_S)
            for w, proc in enumerate(procs)
        ]
        self.assertEqual([(p.returncode, out, err) for p, (out, err) in zip(procs, results)],
                         [(0, b"", b"")] * self.WRITERS)
        self.assert_every_sample_stored(self.SAMPLES)

    def assert_every_sample_stored(self, samples):
        self.assertEqual(sqlite_rows(self.db, "PRAGMA quick_check"), [("ok",)])
        rows = sqlite_rows(self.db, "SELECT name, count(*), sum(value) FROM samples JOIN series ON id = series_id "
                                    "GROUP BY name ORDER BY name")
        expected_sum = samples * (samples - 1) / 2
        self.assertEqual(rows, [(f"w{w}", samples, expected_sum) for w in range(self.WRITERS)])


_KILLED_WRITER = """
import sys
import metasystem_monitor as mm
collector = mm.MetricsCollector(sys.argv[1])
for i in range(10**9):
    collector.record("k", i, timestamp=1_800_000_000 + i)
    print(i, flush=True)
"""


class KilledWriterTest(StoreTestCase):
    def test_sigkill_mid_loop_keeps_every_returned_sample(self):
        confirmed = set()
        for round_number, stop_after in enumerate((50, 400, 1)):
            with self.subTest(round=round_number):
                proc = subprocess.Popen(
                    [sys.executable, "-c", _KILLED_WRITER, self.db],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=self.child_env(),
                )
                watchdog = threading.Timer(SUBPROCESS_TIMEOUT_S, proc.kill)
                watchdog.start()
                self.addCleanup(watchdog.cancel)
                seen = 0
                for _ in range(stop_after):
                    line = proc.stdout.readline()
                    if not line:
                        break
                    confirmed.add(int(line))
                    seen += 1
                proc.send_signal(signal.SIGKILL)
                rest, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
                confirmed.update(int(line) for line in rest.split())
                self.assertEqual((seen, proc.returncode, err), (stop_after, -signal.SIGKILL, b""))
                self.assertEqual(sqlite_rows(self.db, "PRAGMA quick_check"), [("ok",)])
                stored = {int(v) for (v,) in sqlite_rows(self.db, "SELECT value FROM samples")}
                self.assertEqual(confirmed - stored, set())
        # Each round restarts at 0, at the same instants: both samples of an instant are kept.
        self.assertEqual(sqlite_rows(self.db, "SELECT max(seq) >= 1 FROM samples WHERE value = 0"), [(1,)])


if __name__ == "__main__":
    unittest.main()


@unittest.skipUnless(os.geteuid() == 0, "a symlink owned by another user needs root to make (lchown)")
class ForeignSymlinkTest(StoreTestCase):
    """fs.protected_symlinks, done by the program: root never follows a link another user planted."""

    NOBODY = 65534

    def planted(self, name, target):
        """A symlink ``name`` -> ``target`` in a world-writable sticky folder, owned by another user."""
        shared = os.path.join(self.tmp, "shared")
        os.makedirs(shared, exist_ok=True)
        os.chmod(shared, 0o1777)
        link = os.path.join(shared, name)
        os.symlink(target, link)
        os.lchown(link, self.NOBODY, self.NOBODY)
        return link

    def test_store_lock_and_output_refuse_a_link_another_user_owns(self):
        victim = os.path.join(self.tmp, "victim")
        with open(victim, "wb") as handle:
            handle.write(b"root's own file\n")
        link = self.planted("metrics.db", victim)
        for args in (("record", "x", "1"), ("stats", "x")):
            with self.subTest(args=args):
                self.assertMainError(1, f"store {link} goes through a symlink owned by another user", "--db", link,
                                     *args)
        output = self.planted("metasystem.prom", victim)
        self.assertMainError(2, f"--output {output} goes through a symlink owned by another user", "--db", self.db,
                             "export", "--output", output, "--force")
        lock_folder = self.planted("locks", os.path.join(self.tmp, "elsewhere"))
        os.mkdir(os.path.join(self.tmp, "elsewhere"))
        status, out, err = self.run_main("--db", os.path.join(os.path.dirname(lock_folder), "m.db"), "run", "j",
                                         "--lock", "--", "true")
        self.assertEqual((status, out), (1, ""), err)
        self.assertIn("lock ", err)
        self.assertIn("goes through a symlink owned by another user", err)
        self.assertEqual(os.listdir(os.path.join(self.tmp, "elsewhere")), [])
        with open(victim, "rb") as handle:
            self.assertEqual(handle.read(), b"root's own file\n")

    def test_a_link_of_ones_own_is_followed_and_a_dangling_one_gets_a_0600_store(self):
        target = os.path.join(self.tmp, "real", "metrics.db")
        os.mkdir(os.path.dirname(target))
        link = os.path.join(self.tmp, "link.db")
        os.symlink(target, link)
        old = os.umask(0o022)
        try:
            self.assertEqual(self.run_main("--db", link, "record", "x", "1"), (0, "", ""))
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o600)
        self.assertTrue(os.path.islink(link))
        self.assertEqual(sqlite_rows(target, "SELECT count(*) FROM samples"), [(1,)])


class LockMessageTest(unittest.TestCase):

    def test_a_busy_returned_at_once_is_told_from_a_wait_to_the_timeout(self):
        locked = sqlite3.OperationalError("database is locked")
        self.assertEqual(str(mm._storage_error(locked, "/s.db", 5.0, 0.012)),
                         "store /s.db is locked by another process (busy at once, after 0.012 s)")
        self.assertEqual(str(mm._storage_error(locked, "/s.db", 5.0, 5.01)),
                         "store /s.db is locked by another process (gave up after 5 s)")
        self.assertEqual(str(mm._storage_error(locked, "/s.db", 5.0)),
                         "store /s.db is locked by another process (gave up after 5 s)")
