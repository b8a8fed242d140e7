"""Abuse: hostile arguments and malformed configuration never get a traceback, or anything in.

Every subcommand is driven through main() in this process (the same code a process runs, thousands
of times faster) with a seeded stream of hostile arguments; a few of them again as real processes.
Each run must end with a documented exit code and no traceback or 'unexpected' error (a bug's mark).
"""

import contextlib
import io
import os
import random
import sys

import metasystem_monitor as mm

from . import sandbox
from .support import StoreTestCase, sqlite_rows

SEED = 20261128
RUNS_PER_COMMAND = 110
HOSTILE = (
    "", " ", "-", "-1", "-1e308", "1e309", "nan", "NaN", "inf", "-inf", "0", "00", "9" * 400, "0x10", "1_000",
    "\x00", "a\x00b", "\x1b[31mred\x1b[0m", "\x1b]0;title\x07", "\r\n", "line\nbreak", "\t", "\u202e", "\ud800",
    "é", "名前", "🚀", "'; DROP TABLE series; --", "../../../etc/passwd", "%s%s%n", "{0}", "${HOME}",
    "a=b", "=", "key=", "=value", "x" * 1_000_000, "--", "-h", "--help", "--version", "--json", "--db", "--config",
    "@fifo", "@folder", "@link-to-device", "@link-to-nowhere", "@foreign-db", "@foreign-file",
)
# Targets that no writing command may harm, made inside each test's folder: "@fifo" in HOSTILE stands for
# the path of a FIFO there, and so on. Nothing absolute outside the sandbox is ever named: a command that
# wrote through "/dev/null" would replace the machine's device.
TARGETS = ("@fifo", "@folder", "@link-to-device", "@link-to-nowhere", "@foreign-db", "@foreign-file")
# The exit codes each command may end with; every other command: 0, 1 or 2. `run` ends with its command's
# code: none of the words above names a program, so a command it is given cannot be found (127) or run (126).
CODES = {"alert": {0, 1, 2, 3, 4}, "alert-test": {0, 1, 2, 3, 4}, "check": {0, 1, 2, 3},
         "run": {0, 1, 2, 126, 127}}
# `serve` would serve: it is always given a listen address it cannot use, last, so it stops at that.
ENDINGS = {"serve": ["--listen", "nowhere"]}


def hostile_argv(rng, command, options, targets):
    """A command with a shuffle of its own options and hostile values, some options repeated."""
    words = [command]
    for _ in range(rng.randint(0, 6)):
        if options and rng.random() < 0.5:
            words.append(rng.choice(options))
        value = rng.choice(HOSTILE)
        words.append(targets.get(value, value))
    return words + ENDINGS.get(command, [])


def make_targets(folder):
    """The hostile targets of TARGETS inside ``folder``; {placeholder: path}."""
    import sqlite3

    paths = {name: os.path.join(folder, name[1:]) for name in TARGETS}
    os.mkfifo(paths["@fifo"])
    os.mkdir(paths["@folder"])
    os.symlink(os.devnull, paths["@link-to-device"])
    os.symlink(os.path.join(folder, "nowhere", "at-all"), paths["@link-to-nowhere"])
    conn = sqlite3.connect(paths["@foreign-db"])
    conn.executescript("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ann'); PRAGMA user_version = 1;")
    conn.close()
    with open(paths["@foreign-file"], "w", encoding="utf-8") as handle:
        handle.write("precious\n")
    return paths


def target_state(paths):
    """What each target is, for comparing before and after."""
    state = {}
    for name, path in paths.items():
        info = os.lstat(path)
        if name.startswith("@foreign"):
            with open(path, "rb") as handle:
                content = handle.read()
        else:
            content = sorted(os.listdir(path)) if os.path.isdir(path) else os.path.realpath(path)
        state[name] = (oct(info.st_mode), content)
    return state


def options_of(command):
    parser = mm.build_parser(command)
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and command in choices:
            # -v prints the traceback on purpose: it is the way to ask for one.
            return sorted(option for option in choices[command]._option_string_actions
                          if option not in ("--help", "-v", "--verbose"))
    return []


class HostileArgumentsTest(StoreTestCase):

    def setUp(self):
        super().setUp()
        cwd = os.getcwd()
        os.chdir(sandbox.deep_folder(self.tmp))  # a relative --output lands here, deep in the test's folder
        self.addCleanup(os.chdir, cwd)
        self.targets = make_targets(self.tmp)
        self.untouched = target_state(self.targets)

    def test_no_hostile_path_can_leave_the_sandbox(self):
        box = sandbox.current()
        for value in HOSTILE:
            if "/" in value or value.startswith("."):
                self.assertTrue(box.inside(value), value)
        self.assertLess(max(value.count("..") for value in HOSTILE), sandbox.DEPTH)
        self.assertTrue(all(box.inside(os.path.dirname(path)) for path in self.targets.values()))

    def main(self, argv):
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = mm.main(["--db", self.db, *argv])
        finally:
            sys.stdin = saved
        return code, out.getvalue(), err.getvalue()

    def test_every_subcommand_survives_a_stream_of_hostile_arguments(self):
        rng = random.Random(SEED)
        commands = [entry[0] for entry in mm._COMMANDS]
        runs = 0
        for command in commands:
            options = options_of(command)
            for _ in range(RUNS_PER_COMMAND):
                argv = hostile_argv(rng, command, options, self.targets)
                code, out, err = self.main(argv)
                runs += 1
                shown = repr(argv)[:300]
                self.assertIn(code, CODES.get(command, {0, 1, 2}), f"{shown}: exit {code}: {err[:300]}")
                self.assertNotIn("Traceback", err, shown)
                self.assertNotIn("unexpected", err, f"{shown}: {err[:300]}")
                if code == 2 and not out:
                    self.assertEqual(len(err.splitlines()), 1, f"{shown}: {err[:500]}")
        self.assertGreaterEqual(runs, 2000)
        self.assertEqual(target_state(self.targets), self.untouched)
        self.assertEqual(sqlite_rows(self.db, "PRAGMA quick_check"), [("ok",)])
        self.assertIn(("series",), sqlite_rows(self.db, "SELECT name FROM sqlite_master"))  # nothing dropped

    def test_hostile_values_as_real_processes(self):
        # What reaches a real argv (no NUL: the kernel refuses it) through a real process.
        for args, code in ((("record", "\x1b[31mred", "1"), 2), (("record", "x", "nan"), 2),
                           (("record", "x" * 300, "1"), 2), (("record", "x", "1e309"), 2),
                           (("anomalies", "x", "--threshold", "-1"), 2), (("check", "--only", "\u202e"), 3),
                           (("stats", "\x1b[2Jx"), 2), (("retry-stats", "\x1b]0;pwned\x07"), 2)):
            with self.subTest(args=args):
                result = self.run_cli("--db", self.db, *args)
                self.assertEqual(result.returncode, code, result.stderr)
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)  # check's too: cron mails it
                self.assertNotIn(b"Traceback", result.stderr)
                for control in (b"\x1b", "\u202e".encode()):  # shown escaped, never sent to the terminal
                    self.assertNotIn(control, result.stderr)


class InertAlertTextTest(StoreTestCase):
    """An alert whose title and message hold escape sequences reaches no terminal raw."""

    def test_the_log_line_and_the_history_show_them_inert(self):
        title, message = "evil \x1b[2J\x1b]0;pwned\x07title", "line one\nline \x1b[31mtwo"
        sent = self.run_cli("--db", self.db, "alert", "--warning", title, message)
        listed = self.run_cli("--db", self.db, "alerts")
        self.assertEqual((sent.returncode, listed.returncode), (0, 0), sent.stderr)
        for output in (sent.stdout, sent.stderr, listed.stdout, listed.stderr):
            self.assertNotIn(b"\x1b", output)
            self.assertNotIn(b"\x07", output)
        self.assertIn(b"evil", listed.stdout)


class MalformedConfigurationTest(StoreTestCase):
    """Bad INI files: config --check names each problem; no command shows a traceback."""

    FILES = (
        "[alerting\nx = 1\n",  # bad syntax
        "[storage]\nretention_days = 1\n[storage]\nretention_days = 2\n",  # a duplicate section
        "[alerting]\ntimeout = 1\ntimeout = 2\n",  # a duplicate key
        "[channel:x]\ntype = carrier-pigeon\n",  # an unknown type
        "[channel:x]\ntype = slack\nurl = ftp://example.com\ncolour = red\n",  # a bad URL, an unknown key
        "[storage]\nretention_days = soon\nbusy_timeout = -1s\nsynchronous = sometimes\n",  # wrong units
        "[alerting]\ndedup_window = 5 parsecs\nfire_after = many\n",
        "[channel:x]\ntype = telegram\ntoken_file = /nonexistent/token\nchat_id = \x1b[2J\n",  # secrets
        "[channel:x]\ntype = email\nto = |/bin/sh\npassword = hunter2\n",
        "[check:x]\ntype = disk\nwarning = ten percent\n",
        "[serve]\nlisten = everywhere\n",
        "\xff\xfe not text",
        "[" + "x" * 100_000 + "]\n",
    )

    def test_each_file_is_named_problem_by_problem_and_nothing_tracebacks(self):
        path = os.path.join(self.tmp, "bad.ini")
        for number, text in enumerate(self.FILES):
            with self.subTest(file=number):
                with open(path, "w", encoding="utf-8", errors="surrogateescape") as handle:
                    handle.write(text)
                os.chmod(path, 0o600)
                code, out, err = self.run_main("config", "--check", "--config", path)
                self.assertEqual(code, 1, out + err)
                self.assertNotIn("Traceback", out + err)
                self.assertNotIn("unexpected", out + err)
                lines = (out + err).splitlines()
                self.assertTrue(all(line.startswith((path, f"{mm.PROG}: error: ")) for line in lines), out + err)
                self.assertNotIn("hunter2", out + err)
                for args in (("record", "x", "1"), ("alert", "--warning", "t"), ("check", "--no-alert"),
                             ("stats", "x")):
                    code, out, err = self.run_main("--config", path, "--db", self.db, *args)
                    self.assertNotIn("Traceback", out + err, args)
                    self.assertNotIn("unexpected", out + err, args)
                    self.assertIn(code, {0, 1, 3}, (args, out, err))
