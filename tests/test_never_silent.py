"""Never silent: whatever breaks at the seams between the features, the run still reaches a person, or says
why on stderr with a non-zero exit, within its deadline."""

import os
import subprocess
import sys

import metasystem_monitor as mm

from .support import AlertTestCase, sqlite_rows

QUICK_S = 20  # a run that should end at once: past this it hangs (a FIFO read, an endless file)


class FilesThatAreNotFilesTest(AlertTestCase):
    """A configuration or secret file is a small regular file; a FIFO blocks a read forever and /dev/zero
    never ends, so both are refused by name before anything is read."""

    def assertRefused(self, result, fragment):
        err = result.stderr.decode()
        self.assertNotEqual(result.returncode, 0, err)
        self.assertIn(fragment, err)
        self.assertNotIn("Traceback", err)

    def test_a_configuration_that_is_a_fifo_or_a_device_is_refused_at_once(self):
        fifo = os.path.join(self.tmp, "fifo.ini")
        os.mkfifo(fifo)
        zero = os.path.join(self.tmp, "zero.ini")
        os.symlink("/dev/zero", zero)
        for path, kind in ((fifo, "a FIFO"), (zero, "a character device")):
            for command in (["config", "--check"], ["alert", "--warning", "t"]):
                with self.subTest(path=path, command=command):
                    result = self.run_cli("--config", path, "--db", self.db, *command, timeout=QUICK_S)
                    self.assertRefused(result, f"{path} is {kind}, not a regular file")

    def test_a_configuration_larger_than_a_megabyte_is_refused(self):
        path = os.path.join(self.tmp, "huge.ini")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("[storage]\n" + "# padding\n" * 120_000)
        result = self.run_cli("--config", path, "config", "--check", timeout=QUICK_S)
        self.assertRefused(result, f"{path} is larger than 1,048,576 bytes")

    def test_a_fifo_is_not_opened_so_no_writer_is_ever_needed(self):
        fifo = os.path.join(self.tmp, "fifo.ini")
        os.mkfifo(fifo)
        child = subprocess.Popen([sys.executable, "-c", "import metasystem_monitor as mm, sys\n"
                                  "try:\n    mm.load_config(sys.argv[1])\nexcept mm.ConfigError as err:\n"
                                  "    print(err)\n", fifo], stdout=subprocess.PIPE, env=self.child_env())
        out, _ = child.communicate(timeout=QUICK_S)
        self.assertEqual(out.decode(), f"configuration file {fifo} is a FIFO, not a regular file\n")


class SuccessThatIsNotTest(AlertTestCase):
    """A run that says all went well when a person did not get the alert is a silent failure."""

    def test_without_syslog_the_alert_reaches_stderr_only_when_no_other_channel_took_it(self):
        from .servers import HTTPServer, Reply

        critical = f"[check:always]\ntype = command\ncommand = {sys.executable} -c \"raise SystemExit(2)\"\n"
        with HTTPServer() as hook, HTTPServer(default=Reply(400, "no")) as refusing:
            for url, expected in ((hook.url("/h"), ""), (refusing.url("/r"), "critical")):
                with self.subTest(url=url):
                    self.write_config(f"[channel:log]\ntype = log\naddress = none\n\n"
                                      f"[channel:hook]\ntype = webhook\nurl = {url}\n\n{critical}", log_channel=False)
                    if os.path.exists(self.db):
                        os.remove(self.db)
                    result = self.run_cli("check", env=self.cli_env())
                    said = [line.split(": ")[1] for line in result.stderr.decode().splitlines()
                            if "[CRITICAL] check always" in line]
                    self.assertEqual((result.returncode, said), (2, [expected] if expected else []),
                                     result.stderr)
        self.assertEqual((len(hook.requests), len(refusing.requests)), (1, 1))


T0 = 1_800_000_000.0
FAILING = f"[check:always]\ntype = command\ncommand = {sys.executable} -c \"print('CRITICAL - broken'); raise SystemExit(2)\"\n"


class ConfigurationProblemsTest(AlertTestCase):
    """A mistake in the file costs what it touches: the rest runs and alerts, the mistake is heard."""

    def run_check(self, when=T0, *args):
        return self.run_cli("check", *args, env=self.cli_env(METASYSTEM_NOW=repr(when)))

    def test_a_typo_in_one_check_makes_it_unknown_and_the_others_still_run_alert_and_ping(self):
        from .servers import HTTPServer

        with HTTPServer() as hook, HTTPServer() as ping:
            self.write_config(f"[check]\nping_url = {ping.url('/ping')}\n\n[channel:hook]\ntype = webhook\n"
                              f"url = {hook.url('/h')}\n\n[check:disk]\ntype = disk\nwarnig = 10GB:\n\n"
                              f"[check:slow]\ntype = disk\ntimeout = 5 min\n\n{FAILING}")
            result = self.run_check()
        self.assertEqual(result.returncode, 2)  # CRITICAL: the failing check; the broken ones are UNKNOWN
        self.assertEqual(result.stderr.decode().splitlines(), [
            f"metasystem_monitor.py: error: {self.config_path}: [check:disk] warnig: unknown key for a disk check",
            f"metasystem_monitor.py: error: {self.config_path}: [check:slow] timeout: '5 min' is not a duration "
            "such as 90s, 5m, 2h or 7d"])
        self.assertEqual(sorted((r.json()["dedup_key"], r.json()["severity"]) for r in hook.requests),
                         [("always", "critical"), ("disk", "warning"), ("slow", "warning")])
        self.assertEqual([r.path.split("?")[0] for r in ping.requests], ["/ping/2"])
        verdicts = dict(sqlite_rows(self.db, "SELECT name, state FROM check_results"))
        self.assertEqual(verdicts, {"always": "CRITICAL", "disk": "UNKNOWN", "slow": "UNKNOWN"})
        summary = mm.read_summary(self.db, now=lambda: T0, **mm.summary_options(mm.load_config(self.config_path)))
        self.assertEqual(summary["health"]["disk"]["summary"], "configuration: warnig: unknown key for a disk "
                                                               "check (config --check lists every problem)")

    def test_a_problem_outside_the_checks_is_the_configuration_check_and_it_resolves_when_mended(self):
        from .servers import HTTPServer

        with HTTPServer() as hook:
            broken = (f"[channel:hook]\ntype = webhook\nurl = {hook.url('/h')}\n\n[channel:typo]\ntype = webhook\n"
                      f"url = {hook.url('/t')}\nmin_severity = critcal\n\n[check:disk]\ntype = disk\n"
                      f"path = {self.tmp}\ncritical = 0:\n")
            self.write_config(broken)
            first = self.run_check(T0)
            summary = mm.read_summary(self.db, now=lambda: T0, **mm.summary_options(mm.load_config(self.config_path)))
            self.write_config(broken.replace("critcal", "critical"))
            for minute in (5, 10):
                self.run_check(T0 + 60 * minute)
            mended = mm.read_summary(self.db, now=lambda: T0 + 600,
                                     **mm.summary_options(mm.load_config(self.config_path)))
        problem = (f"1 problem in {self.config_path}: [channel:typo] min_severity: 'critcal' is not one of info, "
                   "warning, critical (config --check lists every problem)")
        self.assertEqual((first.returncode, first.stdout.decode().splitlines()[-1]),
                         (3, f"UNKNOWN configuration: {problem}"))
        self.assertEqual(summary["health"]["configuration"]["summary"], problem)
        self.assertEqual([(r.path, r.json()["dedup_key"], r.json()["kind"]) for r in hook.requests],
                         [("/h", "configuration", "firing"), ("/h", "configuration", "resolved")])
        self.assertNotIn("configuration", mended["health"])

    def test_a_file_that_cannot_be_read_at_all_is_said_on_stderr_and_shown_on_every_face(self):
        with open(self.config_path, "wb") as handle:
            handle.write(b"[check:x]\ntype = disk\n\xff\n")
        result = self.run_check()
        why = f"configuration file {self.config_path} is not UTF-8 text (byte 23)"
        self.assertEqual((result.returncode, result.stdout.decode(), result.stderr.decode()),
                         (3, f"METASYSTEM UNKNOWN - configuration: {why}\n", f"metasystem_monitor.py: error: "
                                                                              f"configuration: {why}\n"))
        summary = mm.read_summary(self.db, now=lambda: T0)
        self.assertEqual((summary["health"]["configuration"]["state"], summary["health"]["configuration"]["summary"]),
                         ("UNKNOWN", why))

    def test_as_root_a_configuration_others_can_change_is_refused_and_otherwise_warned(self):
        self.write_config(FAILING, mode=0o666)
        result = self.run_check()
        if os.geteuid() == 0:
            self.assertEqual((result.returncode, result.stdout.decode()), (3, (
                f"METASYSTEM UNKNOWN - configuration: configuration file {self.config_path} is refused: other users "
                "can change it, and it could run programs as root (chown root and chmod go-w)\n")))
        else:
            self.assertIn("other users can change it, and it can run programs as you", result.stderr.decode())
        self.write_config(FAILING, mode=0o600)
        self.assertEqual(self.run_check().returncode, 2)


class GraphsTest(AlertTestCase):
    """escalate_to, fallback and depends_on are graphs: config --check finds their cycles, and at run time a
    cycle never holds back or hides anything."""

    def test_an_escalation_cycle_is_said_and_both_channels_still_hear(self):
        from .servers import HTTPServer

        with HTTPServer() as oncall, HTTPServer() as manager, HTTPServer() as boss:
            self.write_config(f"[channel:oncall]\ntype = webhook\nurl = {oncall.url('/o')}\nescalate_after = 1h\n"
                              f"escalate_to = manager\n\n[channel:manager]\ntype = webhook\nurl = {manager.url('/m')}\n"
                              "escalate_after = 1h\nescalate_to = oncall\n\n[channel:old]\ntype = webhook\n"
                              f"url = {boss.url('/b')}\nenabled = false\nescalate_after = 1h\nescalate_to = boss\n\n"
                              f"[channel:boss]\ntype = webhook\nurl = {boss.url('/b')}\n")
            checked = self.run_cli("config", "--check", env=self.cli_env())
            sent = self.run_cli("alert", "--critical", "Down", "--key", "down", env=self.cli_env())
        self.assertEqual((checked.returncode, checked.stdout.decode()), (1, (
            f"{self.config_path}: [channel:manager] escalate_to: a cycle: manager -> oncall -> manager (nothing on it "
            "is ever followed; break it)\n")))
        self.assertEqual((sent.returncode, len(oncall.requests), len(manager.requests), len(boss.requests)),
                         (1, 1, 1, 1))

    def test_a_dependency_cycle_inhibits_nothing(self):
        from .servers import HTTPServer

        gone = os.path.join(self.tmp, "gone")
        with HTTPServer() as hook:
            self.write_config(f"[channel:hook]\ntype = webhook\nurl = {hook.url('/h')}\n\n"
                              f"[check:gateway]\ntype = file_age\npath = {gone}\ndepends_on = dns\n\n"
                              f"[check:dns]\ntype = file_age\npath = {gone}\ndepends_on = gateway\n\n"
                              f"[check:site]\ntype = file_age\npath = {gone}\ndepends_on = gateway\n")
            result = self.run_cli("check", env=self.cli_env(METASYSTEM_NOW=repr(T0)))
        self.assertEqual(result.returncode, 2)
        self.assertEqual(sorted(r.json()["dedup_key"] for r in hook.requests), ["configuration", "dns", "gateway"])
        self.assertEqual(sqlite_rows(self.db, "SELECT a.dedup_key, d.outcome, d.error FROM alert_deliveries d JOIN "
                                              "alerts a ON a.id = d.alert_id WHERE a.dedup_key = 'site' AND "
                                              "d.channel = 'hook'"),
                         [("site", "inhibited", "gateway is CRITICAL")])
        self.assertIn(f"{self.config_path}: [check:dns] depends_on: a cycle: dns -> gateway -> dns", result.stderr.decode())

    def test_fallbacks_are_followed_as_a_chain_and_a_cycle_ends_where_it_began(self):
        from .servers import HTTPServer, Reply

        with HTTPServer(default=Reply(400)) as a, HTTPServer(default=Reply(400)) as b, HTTPServer() as c:
            alerts = self.system(f"[channel:a]\ntype = webhook\nurl = {a.url()}\nfallback = b\n\n"
                                 f"[channel:b]\ntype = webhook\nurl = {b.url()}\nfallback = a\nmin_severity = critical\n"
                                 f"\n[channel:c]\ntype = webhook\nurl = {c.url()}\nmin_severity = critical\n", strict=False)
            looped = alerts.send_warning_alert("Loop")
            alerts.settings.channels["b"] = alerts.settings.channels["b"]._replace(fallback="c")
            alerts.channels["b"].spec = alerts.settings.channels["b"]
            chained = alerts.send_warning_alert("Chain")
        self.assertEqual({name: d.outcome for name, d in looped.outcomes.items()},
                         {"log": "sent", "a": "failed", "b": "failed"})
        self.assertEqual({name: (d.outcome, d.error) for name, d in chained.outcomes.items() if name == "c"},
                         {"c": ("sent", "fallback for b")})
        self.assertEqual((len(a.requests), len(b.requests), len(c.requests)), (2, 2, 1))
