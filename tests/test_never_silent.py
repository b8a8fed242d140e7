"""Never silent: whatever breaks at the seams between the features, the run still reaches a person, or says
why on stderr with a non-zero exit, within its deadline."""

import os
import subprocess
import sys

import metasystem_monitor as mm

from .support import AlertTestCase

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
        self.assertEqual(run[1], "METASYSTEM CRITICAL - fixed CRITICAL: 127.0.0.1:1: connection refused\n"
                                 "CRITICAL fixed: 127.0.0.1:1: connection refused\n")
        self.assertEqual(run[2], f"metasystem_monitor.py: error: alerts not sent: {problem}\n")

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
