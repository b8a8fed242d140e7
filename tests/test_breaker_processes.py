"""One circuit breaker across processes: real subprocesses, each with its own fixed clock."""

import signal
import subprocess
import sys

import metasystem_monitor as mm

from .support import REPO, SUBPROCESS_TIMEOUT_S, StoreTestCase, sqlite_rows

T0 = 1_800_000_000.0

_CHILD = """
import sys
import metasystem_monitor as mm

db, now, action = sys.argv[1], float(sys.argv[2]), sys.argv[3]
breaker = mm.CircuitBreaker("shared", db_path=db, now=lambda: now)


def failing():
    raise ConnectionRefusedError("down")


def probe():
    print("called", flush=True)
    if sys.stdin.readline().strip() != "succeed":
        raise ConnectionRefusedError("still down")
    return "up"


if action == "trip":
    for _ in range(3):
        try:
            breaker.call(failing)
        except ConnectionRefusedError:
            pass
    print(breaker.status()["state"], flush=True)
else:
    sys.stdin.readline()  # start together
    try:
        print(breaker.call(probe), flush=True)
    except mm.CircuitOpenError as err:
        print("refused", "probing" if err.probing else "open", flush=True)
    except ConnectionRefusedError:
        print("probe failed", flush=True)
"""


class CrossProcessBreakerTest(StoreTestCase):
    def start(self, now, action):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, self.db, repr(now), action], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=self.child_env())
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.stderr.close)
        self.addCleanup(lambda: proc.stdin.closed or proc.stdin.close())
        return proc

    def finish(self, proc, stdin=b""):
        out, err = proc.communicate(stdin, timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((proc.returncode, err), (0, b""))
        return out.decode()

    def trip(self):
        """Trip the breaker in another process, which then exits."""
        self.assertEqual(self.finish(self.start(T0, "trip")), "open\n")

    def trip_here(self):
        """Trip it in this process: for tests about what the other processes do next."""
        with mm.MetricsCollector(self.db) as collector:
            breaker = mm.CircuitBreaker("shared", collector=collector, now=lambda: T0)
            for _ in range(3):
                with self.assertRaises(ConnectionRefusedError):
                    breaker.call(self._down)
            self.assertEqual(breaker.status()["state"], "open")

    def call_here(self, now):
        """What a caller in this process gets at ``now``: 'up', or how it was refused."""
        with mm.MetricsCollector(self.db) as collector:
            breaker = mm.CircuitBreaker("shared", collector=collector, now=lambda: now)
            try:
                return breaker.call(lambda: "up")
            except mm.CircuitOpenError as err:
                return "refused probing" if err.probing else "refused open"

    @staticmethod
    def _down():
        raise ConnectionRefusedError("down")

    def state(self):
        return sqlite_rows(self.db, "SELECT state FROM breakers WHERE name = 'shared'")[0][0]

    def test_tripped_in_one_process_open_in_the_next(self):
        self.trip()
        # Started while open: fails fast, and never calls the protected function.
        self.assertEqual(self.finish(self.start(T0 + 10, "call"), b"go\n"), "refused open\n")

    def test_exactly_one_of_five_processes_probes(self):
        self.trip_here()
        procs = [self.start(T0 + 61, "call") for _ in range(5)]
        for proc in procs:
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        firsts = [proc.stdout.readline().decode() for proc in procs]
        self.assertEqual(sorted(firsts), ["called\n"] + ["refused probing\n"] * 4)
        for proc, first in zip(procs, firsts):
            if first != "called\n":
                self.assertEqual(self.finish(proc), "")
        prober = procs[firsts.index("called\n")]
        self.assertEqual(self.finish(prober, b"succeed\n"), "up\n")
        self.assertEqual(self.state(), "closed")
        transitions = sqlite_rows(self.db, "SELECT from_state, to_state FROM breaker_transitions ORDER BY ts, rowid")
        self.assertEqual(transitions, [("closed", "open"), ("open", "half_open"), ("half_open", "closed")])

    def test_a_killed_probers_lease_expires(self):
        self.trip_here()
        prober = self.start(T0 + 61, "call")
        prober.stdin.write(b"go\n")
        prober.stdin.flush()
        self.assertEqual(prober.stdout.readline(), b"called\n")
        prober.send_signal(signal.SIGKILL)
        prober.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual(self.call_here(T0 + 62), "refused probing")  # the dead prober's lease still holds
        self.assertEqual(self.finish(self.start(T0 + 122, "call"), b"go\nsucceed\n"), "called\nup\n")
        self.assertEqual(self.state(), "closed")

    def test_a_failed_probe_reopens_for_longer(self):
        self.trip_here()
        self.assertEqual(self.finish(self.start(T0 + 61, "call"), b"go\nstill down\n"), "called\nprobe failed\n")
        self.assertEqual(self.state(), "open")
        self.assertEqual(self.finish(self.start(T0 + 61 + 119, "call"), b"go\n"), "refused open\n")
        self.assertEqual(self.call_here(T0 + 61 + 120), "up")
