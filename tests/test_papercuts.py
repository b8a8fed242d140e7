"""What a new user tripped over (issue 20): numbers cut to six digits, names that silently hold nothing,
errors that named the wrong thing, an empty answer with no word, a resolved notice shown as critical."""

import json
import os
import shutil
import subprocess
import sys
import time

import metasystem_monitor as mm

from .support import REPO, SUBPROCESS_TIMEOUT_S, AlertTestCase, StoreTestCase

PROG = "metasystem_monitor.py"
T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


class CommandLine(StoreTestCase):
    def env(self, **extra):
        return self.child_env(**{"METASYSTEM_DB": self.db, "METASYSTEM_NOW": f"{T0:.0f}", **extra})

    def run_ok(self, *args):
        result = self.run_cli(*args, env=self.env())
        self.assertEqual((result.returncode, result.stderr), (0, b""), result.stderr)
        return result.stdout.decode()

    def run_warned(self, *args):
        """(stdout, stderr) of a run that exits 0."""
        result = self.run_cli(*args, env=self.env())
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.decode(), result.stderr.decode()


class NumbersInFull(CommandLine):
    def test_stats_prints_15_significant_digits_and_the_unit_the_name_says(self):
        self.run_ok("record", "backup_bytes", "52428800", "--time", f"{T0 - 60:.0f}")
        self.run_ok("record", "backup_bytes", "52428801.5", "--time", f"{T0 - 30:.0f}")
        self.run_ok("record", "backup_seconds", "3725.5", "--time", f"{T0 - 30:.0f}")
        self.run_ok("record", "ratio", "0.1234567890123456789", "--time", f"{T0 - 30:.0f}")
        self.assertEqual(self.run_ok("stats", "backup_bytes").splitlines()[:7], [
            "backup_bytes (last 24h, times UTC)",
            "  count       2",
            "  avg         52428800.75 (52.4 MB)",
            "  min         52428800 (52.4 MB)",
            "  max         52428801.5 (52.4 MB)",
            "  stddev      1.06066017177982 (1 B)",
            "  latest      52428801.5 (52.4 MB)",
        ])
        self.assertEqual(self.run_ok("stats", "backup_seconds").splitlines()[2], "  avg         3725.5 (1h 2m)")
        self.assertEqual(self.run_ok("stats", "ratio").splitlines()[2], "  avg         0.123456789012346")
        self.assertEqual(self.run_ok("stats", "backup_bytes", "--percentiles").splitlines()[-2:],
                         ["  p50         52428800.75 (52.4 MB)", "  p95         52428801.425 (52.4 MB)"])


class NamesThatHoldNothing(CommandLine):
    def setUp(self):
        super().setUp()
        self.run_ok("record-sync", "icloud", "--success", "--duration", "2.5")
        self.run_ok("record", "backup_bytes", "1")
        self.run_ok("record", "old_metric", "1", "--time", f"{T0 - 48 * 3600:.0f}")

    def test_one_line_says_so_and_names_the_closest_name_and_the_exit_code_stays_0(self):
        hint = "('metrics' lists the names)\n"
        cases = [
            (("stats", "sync_icloud"), f"{PROG}: warning: no samples for 'sync_icloud'; did you mean "
                                       f"'sync_icloud_success'? {hint}"),
            (("stats", "bakup_bytes", "--json"), f"{PROG}: warning: no samples for 'bakup_bytes'; did you mean "
                                                 f"'backup_bytes'? {hint}"),
            (("success-rate", "sync_iclod"), f"{PROG}: warning: no samples for 'sync_iclod'; did you mean "
                                             f"'sync_icloud'? {hint}"),
            (("anomalies", "backup_byte"), f"{PROG}: warning: no samples for 'backup_byte'; did you mean "
                                           f"'backup_bytes'? {hint}"),
            (("stats", "zzz"), f"{PROG}: warning: no samples for 'zzz' {hint}"),
        ]
        for args, line in cases:
            with self.subTest(args=args):
                self.assertEqual(self.run_warned(*args)[1], line)

    def test_a_known_name_with_nothing_in_the_window_and_quiet_runs_say_nothing(self):
        self.assertEqual(self.run_warned("stats", "old_metric")[1], "")
        self.assertEqual(self.run_warned("success-rate", "sync_icloud", "--hours", "0.0001")[1], "")
        self.assertEqual(self.run_warned("-q", "stats", "sync_icloud")[1], "")


class ErrorsNameTheRealProblem(CommandLine):
    def test_a_file_where_a_folder_should_be_is_named_by_reads_writes_and_export(self):
        plain = os.path.join(self.tmp, "plain")
        with open(plain, "w", encoding="utf-8") as handle:
            handle.write("mine\n")
        store = os.path.join(plain, "metrics.db")
        for args, code, line in [
            (("--db", store, "stats", "x"), 1, f"store {store} cannot be reached: {plain} is a file, not a folder"),
            (("--db", store, "record", "x", "1"), 1,
             f"store {store} cannot be reached: {plain} is a file, not a folder"),
            (("--db", os.path.join(plain, "a", "b.db"), "metrics"), 1,
             f"store {os.path.join(plain, 'a', 'b.db')} cannot be reached: {plain} is a file, not a folder"),
            (("export", "--output", os.path.join(plain, "x.prom")), 2,
             f"--output {os.path.join(plain, 'x.prom')} cannot be written: {plain} is a file, not a folder; "
             "nothing was written"),
        ]:
            with self.subTest(args=args):
                result = self.run_cli(*args, env=self.env())
                self.assertEqual((result.returncode, result.stdout, result.stderr.decode()),
                                 (code, b"", f"{PROG}: error: {line}\n"))
        with open(plain, encoding="utf-8") as handle:
            self.assertEqual(handle.read(), "mine\n")

    def test_a_store_in_a_folder_that_cannot_be_searched_is_named_not_read_as_empty(self):
        locked = os.path.join(self.tmp, "locked")
        os.mkdir(locked, 0o700)
        store = os.path.join(locked, "metrics.db")
        self.run_ok("--db", store, "record", "x", "1")
        os.chmod(locked, 0o000 if os.geteuid() else 0o700)
        self.addCleanup(os.chmod, locked, 0o700)
        argv = [sys.executable, "-m", "metasystem_monitor", "--db", store, "stats", "x"]
        if os.geteuid() == 0:  # root searches any folder: ask as nobody, who can reach all but the locked one
            if not (shutil.which("setpriv") and os.path.exists("/usr/bin/python3")):
                self.skipTest("running as root without setpriv and /usr/bin/python3: no user to be refused")
            code = os.path.join(self.tmp, "code")
            os.mkdir(code)
            shutil.copy2(os.path.join(REPO, "metasystem_monitor.py"), code)
            sandbox = os.environ["METASYSTEM_TEST_SANDBOX"]
            above = [folder for folder in self.folders_down_to(os.path.dirname(sandbox))
                     if not os.stat(folder).st_mode & 0o001]
            if above:
                self.skipTest(f"the sandbox lies below {above[0]}, which other users cannot search")
            for folder in self.folders_down_to(self.tmp):
                if folder == os.path.dirname(sandbox):
                    break
                self.addCleanup(os.chmod, folder, os.stat(folder).st_mode & 0o7777)
                os.chmod(folder, os.stat(folder).st_mode | 0o011)  # searchable, not listable
            os.chmod(code, 0o755)
            os.chmod(os.path.join(code, "metasystem_monitor.py"), 0o644)
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-B",
                    os.path.join(code, "metasystem_monitor.py"), "--db", store, "stats", "x"]
        result = subprocess.run(argv, capture_output=True, env=self.env(), cwd="/", timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((result.returncode, result.stdout, result.stderr.decode()),
                         (1, b"", f"{PROG}: error: store {store} cannot be reached: folder {locked} cannot be "
                                  "searched (permission denied)\n"))

    @staticmethod
    def folders_down_to(path):
        """``path`` and every folder above it, up to the filesystem's root (excluded)."""
        folders = []
        while os.path.dirname(path) != path:
            folders.append(path)
            path = os.path.dirname(path)
        return folders

    def test_a_folder_given_as_the_store_or_the_output_is_named_a_directory(self):
        folder = os.path.join(self.tmp, "a-folder")
        os.mkdir(folder)
        for args, code, line in [
            (("--db", folder, "record", "x", "1"), 1, f"store {folder} is a directory, not a regular file; "
                                                      "it was left unchanged"),
            (("--db", folder, "stats", "x"), 1, f"store {folder} is a directory, not a regular file; "
                                                "it was left unchanged"),
            (("export", "--output", folder + "/"), 2, f"--output {folder}/ is a directory, not a regular file; "
                                                      "nothing was written"),
        ]:
            with self.subTest(args=args):
                result = self.run_cli(*args, env=self.env())
                self.assertEqual((result.returncode, result.stdout, result.stderr.decode()),
                                 (code, b"", f"{PROG}: error: {line}\n"))
        self.assertEqual(os.listdir(folder), [])


class MissingPlugins(CommandLine):
    def test_config_check_names_a_program_that_cannot_run_and_check_reports_it_unknown(self):
        plain = os.path.join(self.tmp, "not-executable")
        orphan = os.path.join(self.tmp, "orphan")
        for path, mode in ((plain, 0o644), (orphan, 0o755)):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write("#!/nonexistent/interpreter\n")
            os.chmod(path, mode)
        config = os.path.join(self.tmp, "checks.ini")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(f"[check:gone]\ntype = command\ncommand = check_nothing_here -w 1\n\n"
                         f"[check:plain]\ntype = command\ncommand = {plain}\n\n"
                         f"[check:orphan]\ntype = command\ncommand = {orphan}\n")
        checked = self.run_cli("--config", config, "config", "--check", env=self.env())
        self.assertEqual((checked.returncode, checked.stderr), (1, b""))
        self.assertEqual(checked.stdout.decode().splitlines(), [
            f"{config}: [check:gone] command: program 'check_nothing_here' is not on PATH",
            f"{config}: [check:plain] command: program {plain} is not an executable file",
        ])
        ran = self.run_cli("--config", config, "check", "--no-alert", env=self.env())
        self.assertEqual((ran.returncode, ran.stderr), (3, b""))
        self.assertEqual(ran.stdout.decode().splitlines()[1:], [
            "UNKNOWN gone: program 'check_nothing_here' is not on PATH",
            f"UNKNOWN plain: program {plain} is not an executable file",
            f"UNKNOWN orphan: {orphan} cannot be run: No such file or directory",
        ])


class EmptyAnswersInATerminal(CommandLine):
    def test_breakers_with_none_says_so_to_a_person_and_nothing_to_a_pipe(self):
        self.run_ok("record", "x", "1")
        self.assertEqual(self.run_ok("breakers"), "")
        leader, follower = os.openpty()
        try:
            result = subprocess.run([sys.executable, "-m", "metasystem_monitor", "breakers"], stdout=follower,
                                    stderr=subprocess.PIPE, env=self.env(), cwd=self.tmp,
                                    timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            os.close(follower)
            os.close(leader)
        self.assertEqual((result.returncode, result.stderr.decode()),
                         (0, f"{PROG}: warning: no circuit breakers recorded\n"))


class ArticlesFitTheirWords(CommandLine):
    def test_an_info_alert_and_an_anomaly_check(self):
        helped = self.run_cli("alert", "--help")
        self.assertIn(b"\n  --info              an info alert\n  --warning           a warning alert\n", helped.stdout)
        config = os.path.join(self.tmp, "a.ini")
        with open(config, "w") as handle:
            handle.write("[check:odd]\ntype = anomaly\nmetric = x\nwarning = 5GB\nbogus = 1\n\n"
                         "[channel:am]\ntype = alertmanager\ncolour = red\n")
        result = self.run_cli("config", "--check", "--config", config)
        self.assertEqual(result.stdout.decode().splitlines(), [
            f"{config}: [channel:am] colour: unknown key for an alertmanager channel",
            f"{config}: [channel:am] url: required for an alertmanager channel",
            f"{config}: [check:odd] bogus: unknown key for an anomaly check",
            f"{config}: [check:odd] warning: '5GB': an anomaly check compares plain numbers",
        ])


class ResolvedIsNews(AlertTestCase):
    def test_syslog_gets_a_resolved_notice_at_info_priority(self):
        alerts = self.system()
        alerts.fire("disk", "Disk full", severity=mm.AlertSeverity.CRITICAL)
        alerts.resolve("disk")
        alerts.resolve("disk")
        firing, resolved = self.syslog.pending()
        self.assertTrue(firing.startswith(b"<10>metasystem["), firing)  # user.crit
        self.assertTrue(resolved.startswith(b"<14>metasystem["), resolved)  # user.info
        self.assertIn(b": [RESOLVED] Disk full", resolved)

    def test_without_syslog_quiet_runs_keep_warnings_and_worse_and_a_resolved_notice_is_not_critical(self):
        self.write_config("[channel:log]\ntype = log\naddress = none\n", log_channel=False)
        env = self.cli_env(METASYSTEM_NOW=f"{T0:.0f}")
        runs = [self.run_cli(*args, env=env) for args in (
            ("-q", "alert", "--warning", "Disk low", "2 GB left", "--key", "disk"),
            ("-q", "alert", "--critical", "Disk low", "1 GB left", "--key", "disk"),
            ("-q", "alert", "--resolve", "disk", "fine"),
            ("-v", "alert", "--resolve", "disk", "fine"),
        )]
        self.assertEqual([run.returncode for run in runs], [0, 0, 0, 0])
        self.assertEqual(runs[0].stderr.decode(), f"{PROG}: warning: [WARNING] Disk low | 2 GB left\n")
        self.assertEqual(runs[1].stderr.decode(), f"{PROG}: critical: [CRITICAL] Disk low | severity raised from "
                                                  "warning to critical | 1 GB left\n")
        self.assertEqual(runs[2].stderr, b"")
        self.assertIn(f"{PROG}: info: [RESOLVED] Disk low | resolved after 0s", runs[3].stderr.decode())


class TimesInTheReadersZone(CommandLine):
    """Every face shows local time with its zone, compact; JSON keeps UTC (T0 is 08:00 UTC, 03:00 EST)."""

    SUMMER = T0 + 181 * 86400  # 2027-07-15 08:00 UTC, 04:00 EDT

    def env(self, **extra):
        return super().env(TZ="America/New_York", **extra)

    def setUp(self):
        super().setUp()
        self.run_ok("record", "backup_bytes", "1", "--time", f"{T0 - 3600:.0f}")
        synced = self.run_cli("record-sync", "icloud", "--success", "--duration", "2",
                              env=self.env(METASYSTEM_NOW=f"{T0 - 7200:.0f}"))
        self.assertEqual((synced.returncode, synced.stderr), (0, b""))

    def test_plain_outputs_are_local_and_json_stays_utc(self):
        stats = self.run_ok("stats", "backup_bytes").splitlines()
        self.assertEqual((stats[0], stats[7], stats[8]), (
            "backup_bytes (last 24h, times EST)", "  first_time  01-15 02:00:00", "  last_time   01-15 02:00:00"))
        self.assertIn("backup_bytes\t1\t01-15 02:00 EST\n", self.run_ok("metrics"))
        document = json.loads(self.run_ok("stats", "backup_bytes", "--json"))
        self.assertEqual(document["first_time"], "2027-01-15T07:00:00.000+00:00")
        summer = self.run_cli("record", "late", "1", "--time", f"{self.SUMMER:.0f}",
                              env=self.env(METASYSTEM_NOW=f"{self.SUMMER:.0f}"))
        self.assertEqual(summer.returncode, 0, summer.stderr)
        self.assertIn("late\t1\t07-15 04:00 EDT\n", self.run_ok("metrics"))

    def test_a_check_says_when_in_local_time(self):
        config = os.path.join(self.tmp, "checks.ini")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write("[check:icloud]\ntype = sync_recency\ntarget = icloud\n")
        result = self.run_cli("--config", config, "check", "--no-alert", env=self.env())
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertEqual(result.stdout.decode().splitlines()[1],
                         "OK icloud: icloud: last success 2h ago (01-15 01:00 EST)")

    def test_the_dashboard_once_shows_local_times_with_the_zone_in_its_header(self):
        result = subprocess.run([sys.executable, os.path.join(REPO, "monitoring_dashboard.py"), "--once"],
                                capture_output=True, env=self.env(), cwd=self.tmp, timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        lines = result.stdout.decode().splitlines()
        self.assertTrue(lines[0].endswith("updated 01-15 03:00:00 EST"), lines[0])

    def test_the_status_page_shows_local_times(self):
        saved = os.environ["TZ"]
        self.addCleanup(time.tzset)
        self.addCleanup(os.environ.__setitem__, "TZ", saved)
        os.environ["TZ"] = "America/New_York"
        time.tzset()
        summary = mm.read_summary(self.db, now=lambda: T0)
        self.assertIn("<p>updated 01-15 03:00:00 EST, window 24 h</p>", mm.status_page(summary))
        self.assertEqual(summary["generated_at"], "2027-01-15T08:00:00.000+00:00")
