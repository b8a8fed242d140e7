"""One generative test over every subcommand: whatever the input, the program keeps its promises.

Seeded and bounded. Inputs mix the abuse suite's hostile words with bytes that are not UTF-8 (as Python
carries them in argv, lone surrogates), values at the limits of a double, timestamps at 0 and in the
year 9999, and targets that are FIFOs, folders, symlinks and another program's files, all inside the
test's folder. Invariants, after every run:

- a documented exit code, and no traceback or "unexpected" error (the mark of a bug);
- every --json output parses as strict JSON (no Infinity, no NaN);
- nothing written but the paths the command line names, the store beside it and the test's HOME;
  a target changes only where it was named as ``--output`` with ``--force``;
- a failing job or check is reported, with its exit code, even when the store or a channel fails.
"""

import contextlib
import io
import os
import random
import sys
import time

import metasystem_monitor as mm

from . import sandbox
from .servers import HTTPServer, Reply, SyslogSocket
from .support import StoreTestCase, strict_json
from .test_abuse import CODES, ENDINGS, HOSTILE, TARGETS, make_targets, options_of, target_state

SEED = 20261205
RUNS_PER_COMMAND = 60
TIME_BOUND_S = 90.0  # the whole walk; it stops early (and says how far it got) past this
EDGES = (
    "caf\udce9", "\udcff\udcfe", "x\udce9y=1", "1e308", "-1e308", "1.7976931348623157e308", "5e-324", "-0",
    "0", "253402300799", "253402300800", "1e10", "x", "big", "sync_x", "job", "k=v", "5m", "99999999d",
)
STDINS = (b"", b"big 1e308 0\nbig 1e308 253402300799\n", b"caf\xe9 1\n", b"boot 5 0\n", b"\xff\xfe\n",
          b'{"key": "k", "title": "caf\xe9"}\n', b"x nan\n", b"x 1 1e400\n")
FAILING_JOB = (sys.executable, "-c", "import sys; print('job failed on purpose'); sys.exit(3)")


def write_config(case, extra=""):
    """A configuration with a channel that always fails (a local server answering 400: no retries), and a
    check that is always CRITICAL; its path."""
    refusing = HTTPServer(default=Reply(400, "no"))
    refusing.__enter__()
    case.addCleanup(refusing.__exit__)
    path = os.path.join(case.tmp, "alerting-config.ini")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"{extra}[channel:refusing]\ntype = webhook\nurl = {refusing.url('/hook')}\n"
                     f"[check:always]\ntype = command\ncommand = {sys.executable} -c \"print('CRITICAL - "
                     "broken'); raise SystemExit(2)\"\n")
    os.chmod(path, 0o600)
    return path


class EveryCommandPropertyTest(StoreTestCase):

    def setUp(self):
        super().setUp()
        cwd = os.getcwd()
        self.cwd = sandbox.deep_folder(self.tmp)  # a relative path in argv lands here, and cannot climb out
        os.chdir(self.cwd)
        self.addCleanup(os.chdir, cwd)
        self.syslog = SyslogSocket(os.path.join(self.tmp, "log.sock"))
        self.addCleanup(self.syslog.__exit__)
        self.config = write_config(self, f"[channel:log]\ntype = log\naddress = {self.syslog.path}\n")
        self.targets = make_targets(self.tmp)

    def main(self, argv, stdin):
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = mm.main(argv)
        finally:
            sys.stdin = saved
        self.syslog.pending()  # drained: a full socket queue never holds up the next alert
        return code, out.getvalue(), err.getvalue()

    def entries(self):
        """What the test's folder and the working directory hold, by name."""
        return set(os.listdir(self.tmp)) | set(os.listdir(self.cwd))

    def allowed_entries(self, argv):
        """What a run may leave in the test's folder: the store's files, locks, HOME, and what argv names."""
        named = {os.path.basename(word.rstrip("/")) for word in argv if word}
        # A named symlink to nowhere gets its target made (a store through a dangling --db link).
        named |= {os.path.relpath(os.path.realpath(word), self.tmp).split(os.sep)[0]
                  for word in argv if word and "\x00" not in word and os.path.islink(word)}
        store = os.path.basename(self.db)
        return named | {store, f"{store}-wal", f"{store}-shm", f"{store}-journal", "locks", "home", "d",
                        os.path.basename(self.config), "log.sock"} | {name[1:] for name in TARGETS}

    def test_every_subcommand_keeps_its_promises_on_generated_input(self):
        rng = random.Random(SEED)
        pool = HOSTILE + EDGES
        commands = [entry[0] for entry in mm._COMMANDS]
        runs, inputs, started = 0, set(), time.monotonic()
        for command in commands:
            options = options_of(command)
            for _ in range(RUNS_PER_COMMAND):
                if time.monotonic() - started > TIME_BOUND_S:
                    break
                words = [command]
                for _ in range(rng.randint(0, 6)):
                    if options and rng.random() < 0.5:
                        words.append(rng.choice(options))
                    value = rng.choice(pool)
                    words.append(self.targets.get(value, value))
                words += ENDINGS.get(command, [])
                if command == "run" and rng.random() < 0.5:
                    words += ["--", *FAILING_JOB]
                db = self.targets[rng.choice(TARGETS)] if rng.random() < 0.15 else self.db
                argv = ["--db", db, "--config", self.config, *words]
                stdin = rng.choice(STDINS)
                inputs.update(words)
                before, listed = target_state(self.targets), self.entries()
                code, out, err = self.main(argv, stdin)
                runs += 1
                self.assertRun(command, argv, code, out, err, before, listed)
        self.assertEqual(runs, len(commands) * RUNS_PER_COMMAND, f"stopped early: {runs} runs")
        print(f"\nproperty: {runs} runs, {len(commands)} subcommands, {len(inputs)} distinct inputs", file=sys.stderr)

    def assertRun(self, command, argv, code, out, err, before, listed):
        shown = repr(argv)[:300]
        self.assertIn(code, CODES.get(command, {0, 1, 2}) | ({3} if command == "run" else set()),
                      f"{shown}: exit {code}: {err[:300]}")
        self.assertNotIn("Traceback", err, shown)
        self.assertNotIn("unexpected", err, f"{shown}: {err[:300]}")
        helped = {"-h", "--help", "--version"} & set(argv)
        if "--json" in argv and code == 0 and out.strip() and not helped:
            try:
                strict_json(out)
            except ValueError as err:
                self.fail(f"{shown}: --json printed what is not strict JSON ({err}): {out[:300]!r}")
        if command == "run" and "--" in argv and code != mm.EXIT_USAGE and not helped:
            self.assertEqual(code, 3, f"{shown}: {err[:300]}")  # the job's own code, store or no store
            self.assertIn("job failed on purpose", out, shown)
        added = self.entries() - listed
        self.assertTrue(added <= self.allowed_entries(argv), f"{shown} left {sorted(added - self.allowed_entries(argv))}")
        after = target_state(self.targets)
        for name, state in before.items():
            if after[name] != state:
                forced = "--force" in argv and any(argv[i] == "--output" and argv[i + 1] == self.targets[name]
                                                   for i in range(len(argv) - 1))
                self.assertTrue(forced, f"{shown} changed {name}")
                os.unlink(self.targets[name])
                self.targets = {**self.targets, **{name: make_one(self.tmp, name)}}


def make_one(folder, name):
    """The target ``name`` made again after a run that was allowed to replace it."""
    import tempfile

    fresh = make_targets(tempfile.mkdtemp(dir=folder))
    os.replace(fresh[name], os.path.join(folder, name[1:]))
    return os.path.join(folder, name[1:])


class FailuresAreHeardTest(StoreTestCase):
    """A failing job or check is reported on stdout and by its exit code whatever the store or channel does."""

    def test_a_failing_job_and_check_with_each_broken_store(self):
        config = write_config(self)
        targets = make_targets(self.tmp)
        for store in (self.db, *(targets[name] for name in TARGETS)):
            with self.subTest(store=os.path.basename(store)):
                job = self.run_main("--db", store, "--config", config, "run", "nightly", "--", *FAILING_JOB)
                self.assertEqual(job[0], 3, job[2])
                self.assertIn("job failed on purpose", job[1])
                self.assertNotIn("unexpected", job[2])
                check = self.run_main("--db", store, "--config", config, "check", "--only", "always")
                self.assertEqual(check[0], 2, check[2])
                self.assertTrue(check[1].startswith("METASYSTEM CRITICAL - "), check[1])
                self.assertIn("\nCRITICAL always: CRITICAL - broken\n", check[1])
                self.assertNotIn("unexpected", check[2])
