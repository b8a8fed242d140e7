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


class DeadlinesTest(AlertTestCase):
    """Every exchange has a wall-clock deadline over all of it, and a run's sending has one budget: a service
    that answers a byte at a time holds nothing past them. (Real time: the bounds are generous, for a busy
    machine; make bench measures them closely.)"""

    SLACK_S = 6.0  # what a loaded machine may add to a bound

    def timed(self, *args, stdin=b"", env=None):
        import time

        started = time.monotonic()
        result = self.run_cli(*args, stdin=stdin, env=env or self.cli_env(), timeout=60)
        return result, time.monotonic() - started

    def test_a_channel_that_trickles_its_answer_fails_within_its_budget(self):
        from .servers import HTTPServer, Reply

        with HTTPServer(default=Reply(200, trickle_s=0.5)) as slow:
            self.write_config(f"[alerting]\ntimeout = 1s\nchannel_budget = 2s\n\n[channel:slow]\ntype = webhook\n"
                              f"url = {slow.url('/s')}\n")
            result, took = self.timed("alert", "--critical", "Disk")
        self.assertEqual(result.returncode, 4, result.stderr)
        self.assertRegex(result.stderr.decode(), r"channel slow failed after [12] attempts?: no complete answer within "
                                                 r"(1|0\.\d+) s")
        self.assertLess(took, 2 + self.SLACK_S)
        self.assertEqual(sqlite_rows(self.db, "SELECT outcome, error_class FROM alert_deliveries WHERE channel = 'slow'"),
                         [("failed", "timeout")])

    def test_many_alerts_to_a_hanging_channel_share_one_budget_and_the_others_still_hear(self):
        import json

        from .servers import HTTPServer, Reply

        lines = "".join(json.dumps({"key": f"k{n}", "severity": "critical", "title": f"T{n}"}) + "\n"
                        for n in range(3))
        with HTTPServer(default=Reply(200, trickle_s=0.5)) as slow, HTTPServer() as fine:
            self.write_config(f"[alerting]\ntimeout = 1s\nchannel_budget = 2s\nrun_budget = 3s\n\n"
                              f"[channel:slow]\ntype = webhook\nurl = {slow.url('/s')}\n\n"
                              f"[channel:fine]\ntype = webhook\nurl = {fine.url('/f')}\n")
            result, took = self.timed("alert", "--batch", stdin=lines.encode())
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertLess(took, 3 + self.SLACK_S)  # 6 s one after another before: 2 s an alert
        self.assertEqual(sorted(r.json()["dedup_key"] for r in fine.requests), ["k0", "k1", "k2"])
        rows = sqlite_rows(self.db, "SELECT outcome, count(*) FROM alert_deliveries WHERE channel = 'slow' "
                                    "GROUP BY outcome")
        self.assertEqual(rows, [("failed", 3)])

    def test_a_ping_service_that_trickles_never_holds_the_job_back(self):
        from .servers import HTTPServer, Reply

        marker = os.path.join(self.tmp, "ran")
        with HTTPServer(default=Reply(200, trickle_s=0.5)) as slow:
            self.write_config("[alerting]\ntimeout = 1s\nrun_budget = 3s\n")
            result, took = self.timed("run", "backup", "--ping", slow.url("/p"), "--", "touch", marker)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(os.path.exists(marker))
        self.assertLess(took, 2 * 3 + self.SLACK_S)  # the start ping, then the end one: each within the budget
        self.assertEqual([r.path.split("?")[0] for r in slow.requests], ["/p/start", "/p"])
        self.assertIn("no complete answer within", result.stderr.decode())

    def test_an_smtp_server_that_talks_a_byte_a_second_is_cut_at_the_timeout(self):
        from .servers import SMTPServer

        with SMTPServer(trickle_s=0.5) as smtp:
            self.write_config(f"[alerting]\ntimeout = 1s\nchannel_budget = 2s\n\n[channel:mail]\ntype = email\n"
                              f"to = ops@example.com\nsmtp_host = 127.0.0.1\nsmtp_port = {smtp.port}\nsecurity = none\n")
            result, took = self.timed("alert", "--critical", "Disk")
        self.assertEqual(result.returncode, 4, result.stderr)
        self.assertLess(took, 2 + self.SLACK_S)
        self.assertRegex(result.stderr.decode(), r"channel mail failed after [12] attempts?: no complete answer "
                                                 r"within (1|0\.\d+) s")

    def test_http_and_tcp_checks_end_at_their_timeout_whatever_the_peer_trickles(self):
        from .servers import HTTPServer, Reply, TrickleServer

        with HTTPServer(default=Reply(200, trickle_s=0.5)) as web, TrickleServer(0.5) as tcp:
            self.write_config(f"[check:web]\ntype = http\nurl = {web.url('/')}\ntimeout = 1s\n\n"
                              f"[check:port]\ntype = tcp\naddress = 127.0.0.1:{tcp.port}\nexpect = READY\n"
                              "timeout = 1s\n")
            result, took = self.timed("check", "--no-alert")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertLess(took, 1 + self.SLACK_S)
        self.assertEqual(result.stdout.decode().splitlines()[1:], [
            f"CRITICAL web: http://127.0.0.1:{web.port}/: no complete answer within 1 s",
            f"CRITICAL port: 127.0.0.1:{tcp.port}: no complete answer within 1 s"])


class ClaimsOfTheDeadTest(AlertTestCase):
    """A claim is a lease on sending: one whose process is gone is over, whatever the clock says (a fixed
    METASYSTEM_NOW never reaches its end), and one held too long is taken over within the run's time."""

    def test_a_killed_senders_claim_never_holds_the_next_alert(self):
        from .servers import HTTPServer

        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nrun_budget = 3s\n\n[channel:hook]\ntype = webhook\nurl = {hook.url()}\n")
            env = self.cli_env(METASYSTEM_NOW=repr(T0))
            self.assertEqual(self.run_cli("alert", "--warning", "First", env=env).returncode, 0)
            dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  timeout=30).stdout.decode().strip()
            with mm.Store(self.db) as store, store.write() as conn:  # as a sender killed mid-send leaves them
                conn.execute("UPDATE alert_marks SET sent_at = NULL, claim_owner = ?, claim_until = ?",
                             (f"{dead}-cafe", T0 + 3600))
                conn.execute("INSERT INTO alert_channel_states (key, channel, delivered_at, severity, reminders, "
                             "held, claim_owner, claim_until, claim_kind, claim_severity) VALUES ('disk', 'hook', "
                             "NULL, NULL, 0, 0, ?, ?, 'firing', 'critical')", (f"{dead}-cafe", T0 + 3600))
            again = self.run_cli("alert", "--warning", "First", env=env, timeout=60)
            keyed = self.run_cli("alert", "--critical", "Disk", "--key", "disk", env=env, timeout=60)
        self.assertEqual((again.returncode, keyed.returncode), (0, 0), again.stderr + keyed.stderr)
        self.assertEqual([r.json()["title"] for r in hook.requests], ["First", "First"])
        self.assertIn(b"a run stopped while sending firing for disk; counted as delivered", keyed.stderr)


# Digits str.isdigit(), int() or float() take that are not 0-9, and the underscore int() and float() read.
NOT_ASCII_DIGITS = ("\u00b2", "\u0661\u0662", "\uff11\uff12", "1_0")  # ², ١٢ (Arabic-Indic), １２ (full width)
# A value of each configuration key that holds a number, with {v} where the number goes, and an ASCII value
# that is just as wrong: the other values must get the same answer, the value aside.
NUMBER_KEYS = [
    ("[alerting]\nresolve_after = {v}\n", "qq"), ("[alerting]\nmax_messages_per_run = {v}\n", "qq"),
    ("[alerting]\nfire_after = {v} within 5\n", "qq"), ("[alerting]\nfire_after = 2 within {v}\n", "qq"),
    ("[alerting]\ndedup_window = {v}m\n", "qq"), ("[alerting]\nrepeat_interval_critical = {v}h\n", "qq"),
    ("[alerting]\ntimeout = {v}s\n", "qq"), ("[storage]\nretention_days = {v}\n", "qq"),
    ("[storage]\nbusy_timeout = {v}s\n", "qq"), ("[serve]\nlisten = 127.0.0.1:{v}\n", "qq"),
    ("[serve]\ncache = {v}s\n", "qq"), ("[check]\ninterval = {v}m\n", "qq"),
    ("[channel:mail]\ntype = email\nto = root\nsmtp_host = localhost\nsmtp_port = {v}\n", "qq"),
    ("[channel:quiet]\ntype = log\naddress = none\nquiet_hours = {v}:00-06:00\n", "qq"),
    ("[channel:tg]\ntype = telegram\ntoken = 1:x\nchat_id = 5{v}\n", "q-q"),
    ("[maintenance:m]\nmatch = backup\ndaily = {v}:00-23:00\n", "qq"),
    ("[maintenance:m]\nmatch = backup\nfrom = 2026-12-{v}\nuntil = 2026-12-31\n", "qq"),
    ("[check:x]\ntype = tcp\naddress = 127.0.0.1:{v}\n", "qq"),
    ("[check:x]\ntype = tcp\naddress = 127.0.0.1:1\ntimeout = {v}s\n", "qq"),
    ("[check:x]\ntype = disk\npath = /\nwarning = {v}\n", "qq"),
    ("[check:x]\ntype = disk\npath = /\ncritical = {v}%:\n", "qq"),
    ("[check:x]\ntype = metric\nmetric = m\nhours = {v}\n", "qq"),
    ("[check:x]\ntype = http\nurl = http://127.0.0.1:1/\nstatus = {v}\n", "qq"),
    ("[check:x]\ntype = http\nurl = http://127.0.0.1:{v}/\n", "qq"),
    ("[channel:hook]\ntype = webhook\nurl = http://127.0.0.1:{v}/hook\n", "qq"),
    ("[check:job]\ntype = job\njob = backup\nexpected_every = {v}h\n", "qq"),
]
NOW = "1800000000"


class DigitsThatAreNotAsciiTest(AlertTestCase):
    """A number in the configuration is written with the digits 0-9: '²' (which str.isdigit() takes and int()
    refuses) ended config --check and check in 'unexpected ValueError', and '١٢', '１２' or '1_0' (which int()
    and float() read) were taken as 12 or 10. Each is now the one-line problem an ASCII typo gets."""

    def setUp(self):
        super().setUp()
        self.addCleanup(os.environ.pop, "METASYSTEM_NOW", None)
        os.environ["METASYSTEM_NOW"] = NOW

    def answers(self, text, db):
        """(exit code, stdout, stderr) of config --check and of check (in this process: there are hundreds)
        with ``text`` and a check whose verdict never changes."""
        self.write_config(f"[check:fixed]\ntype = tcp\naddress = 127.0.0.1:1\n\n{text}")
        answers = [self.run_main("--config", self.config_path, "--db", db, *command)
                   for command in (("config", "--check"), ("check",))]
        self.syslog.pending()  # the log channel's alert, if one went: a full socket would block the next one
        return answers

    def test_every_number_key_refuses_other_digits_as_it_refuses_a_typo(self):
        for number, (template, typo) in enumerate(NUMBER_KEYS):
            checked_typo, run_typo = self.answers(template.format(v=typo), os.path.join(self.tmp, f"{number}.db"))
            self.assertEqual((checked_typo[0], checked_typo[2]), (1, ""), template)
            [problem] = checked_typo[1].splitlines()
            section = template.split("]")[0] + "]"
            self.assertTrue(problem.startswith(f"{self.config_path}: {section} "), problem)
            for digits in NOT_ASCII_DIGITS:
                if typo == "q-q" and digits == "1_0":
                    continue  # 51_0 is a chat id: letters, digits and underscores
                with self.subTest(text=template.format(v=digits)):
                    db = os.path.join(self.tmp, f"{number}-{len(digits)}-{ord(digits[0])}.db")
                    checked, run = self.answers(template.format(v=digits), db)
                    self.assertEqual(checked, (1, problem.replace(typo, digits) + "\n", ""))
                    self.assertNotIn("unexpected", run[1] + run[2])
                    self.assertEqual(run, (run_typo[0], *(said.replace(typo, digits) for said in run_typo[1:])))

    def test_resolve_after_squared_is_a_problem_not_an_unexpected_error(self):
        checked, run = self.answers("[alerting]\nresolve_after = \u00b2\n", self.db)
        problem = f"{self.config_path}: [alerting] resolve_after: '\u00b2' is not a whole number of at least 1"
        self.assertEqual(checked, (1, problem + "\n", ""))
        self.assertEqual(run[0], 2)
        said = f"1 problem in {self.config_path}: [alerting] resolve_after: '\u00b2' is not a whole number of at least " \
               "1 (config --check lists every problem)"
        self.assertEqual(run[1], f"METASYSTEM CRITICAL - fixed CRITICAL: 127.0.0.1:1: connection refused; "
                                 f"configuration UNKNOWN: {said}\nCRITICAL fixed: 127.0.0.1:1: connection refused\n"
                                 f"UNKNOWN configuration: {said}\n")
        self.assertTrue(run[2].startswith(f"metasystem_monitor.py: error: {problem}\n"), run[2])

    def test_numbers_on_the_command_line_take_the_digits_0_9_only(self):
        self.write_config()
        for digits in NOT_ASCII_DIGITS:
            with self.subTest(digits=digits):
                for args, fragment in ((("record", "x", digits), f"value {digits!r} is not a number"),
                                       (("stats", "x", "--hours", digits), f"{digits!r} is not a number of hours"),
                                       (("anomalies", "x", "--min-samples", digits),
                                        f"{digits!r} is not a whole number"),
                                       (("demo", "--days", digits), f"{digits!r} is not a number"),
                                       (("silence", "remove", digits), "silence remove needs the ID")):
                    self.assertOneLineError(self.run_cli(*args, env=self.cli_env()), 2, fragment)
                result = self.run_cli("record", "x", "1", env=self.cli_env(METASYSTEM_NOW=digits))
                self.assertOneLineError(result, 2, f"METASYSTEM_NOW {digits!r} is not a number")
                dashboard = self.run_cli("--summary", "--hours", digits, module="monitoring_dashboard",
                                         env=self.cli_env())
                self.assertEqual((dashboard.returncode, dashboard.stdout), (2, b""))
                self.assertIn(f"must be a positive number of hours, got {digits!r}", dashboard.stderr.decode())

    def test_parse_helpers_read_ascii_digits_only(self):
        for digits in NOT_ASCII_DIGITS:
            with self.subTest(digits=digits):
                self.assertFalse(mm.ascii_digits(digits))
                with self.assertRaises(ValueError):
                    mm.decimal_number(digits)
                with self.assertRaises(ValueError):
                    mm.whole_number(digits)
                with self.assertRaises(mm.ValidationError):
                    mm.parse_listen(f"127.0.0.1:{digits}")
                with self.assertRaises(mm.ValidationError):
                    mm.parse_duration_s(f"{digits}m")
                self.assertIsNone(mm.parse_retry_after(digits, now=0.0))
        self.assertEqual((mm.decimal_number(" -2.5e1 "), mm.whole_number("+7"), mm.parse_listen("[::1]:80")),
                         (-25.0, 7, ("::1", 80)))


class WhatARunNoLongerSaysTest(AlertTestCase):
    """A channel whose secret has gone is heard as a problem, and an alert whose check was deleted resolves."""

    def test_a_channel_whose_secret_file_is_gone_is_the_configuration_check_even_when_all_is_ok(self):
        from .servers import HTTPServer

        gone = os.path.join(self.tmp, "hook-url")
        with HTTPServer() as ping:
            self.write_config(f"[check]\nping_url = {ping.url('/p')}\n\n[channel:hook]\ntype = webhook\n"
                              f"url_file = {gone}\n\n[check:age]\ntype = file_age\npath = {self.config_path}\n")
            result = self.run_cli("check", env=self.cli_env())
        said = f"{gone} cannot be read (No such file or directory)"
        lines = result.stderr.decode().splitlines()
        self.assertEqual((result.returncode, lines[0]), (
            3, f"metasystem_monitor.py: error: {self.config_path}: [channel:hook] channel hook cannot be used here: "
               f"{said}"))
        self.assertTrue(lines[1].startswith("metasystem_monitor.py: warning: [WARNING] check configuration | "), lines)
        self.assertEqual(result.stdout.decode().splitlines()[-1],
                         f"UNKNOWN configuration: 1 problem in {self.config_path}: [channel:hook] channel hook cannot "
                         f"be used here: {said} (config --check lists every problem)")
        self.assertEqual([r.path.split("?")[0] for r in ping.requests], ["/p/3"])

    def test_the_alert_of_a_deleted_check_resolves_at_the_next_run(self):
        from .servers import HTTPServer

        gone = os.path.join(self.tmp, "never")
        with HTTPServer() as hook:
            channel = f"[channel:hook]\ntype = webhook\nurl = {hook.url('/h')}\n\n"
            self.write_config(channel + f"[check:old]\ntype = file_age\npath = {gone}\n\n[check:age]\ntype = file_age\n"
                                        f"path = {self.config_path}\n")
            first = self.run_cli("check", env=self.cli_env(METASYSTEM_NOW=repr(T0)))
            self.write_config(channel + f"[check:age]\ntype = file_age\npath = {self.config_path}\n")
            second = self.run_cli("check", env=self.cli_env(METASYSTEM_NOW=repr(T0 + 300)))
            firing = self.run_cli("alerts", "--firing", env=self.cli_env(METASYSTEM_NOW=repr(T0 + 300)))
        self.assertEqual((first.returncode, second.returncode, firing.stdout), (2, 0, b""))
        self.assertEqual([(r.json()["dedup_key"], r.json()["kind"]) for r in hook.requests],
                         [("old", "firing"), ("old", "resolved")])
        self.assertEqual(hook.requests[1].json()["message"], "the check is no longer configured")
