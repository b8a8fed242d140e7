"""The public surface: names, cheap import, and the original design's examples."""

import contextlib
import io
import os
import re
import subprocess
import sys
import textwrap
import unittest

import metasystem_monitor as mm

from .support import REPO, StoreTestCase


def names_in_source(path, pattern):
    with open(os.path.join(REPO, path), encoding="utf-8") as handle:
        return re.findall(pattern, handle.read())


class PublicNamesTest(unittest.TestCase):
    def test_all_is_written_sorted_public_and_defined(self):
        import ast

        with open(os.path.join(REPO, "metasystem_monitor.py"), encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        [written] = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                     and any(getattr(target, "id", "") == "__all__" for target in node.targets)]
        self.assertEqual(written, sorted(written))  # as written in the source, not sorted at import
        self.assertEqual(mm.__all__, written)
        for name in mm.__all__:
            with self.subTest(name=name):
                self.assertFalse(name.startswith("_"))
                self.assertTrue(hasattr(mm, name))

    def test_every_name_the_dashboard_uses_is_exported(self):
        used = set(names_in_source("monitoring_dashboard.py", r"\bmm\.([A-Za-z_][A-Za-z0-9_]*)"))
        self.assertTrue(used)
        self.assertEqual(sorted(used - set(mm.__all__) - {"__version__"}), [])  # module metadata aside

    def test_original_names_are_exported(self):
        for name in ("MetricsCollector", "MonitorError", "ValidationError", "StorageError", "main"):
            self.assertIn(name, mm.__all__)

    def test_validation_error_is_a_value_error(self):
        self.assertTrue(issubclass(mm.ValidationError, ValueError))
        self.assertTrue(issubclass(mm.ValidationError, mm.MonitorError))


class ImportIsCheapTest(StoreTestCase):
    HEAVY = ("argparse", "curses", "email", "http.server", "smtplib", "urllib.request", "configparser", "statistics")

    def test_import_loads_no_heavy_module_and_touches_nothing(self):
        home = os.path.join(self.tmp, "home")
        code = (
            "import sys; before = set(sys.modules); import metasystem_monitor; "
            "print(' '.join(sorted(set(sys.modules) - before)))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True, text=True, cwd=REPO, timeout=60,
            env=self.child_env(METASYSTEM_DB=os.path.join(self.tmp, "never.db")),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        loaded = set(result.stdout.split())
        self.assertIn("metasystem_monitor", loaded)
        self.assertEqual(sorted(loaded & set(self.HEAVY)), [])
        self.assertFalse(os.path.exists(home))
        self.assertEqual(os.listdir(self.tmp), [])


class UnclosedCollectorTest(StoreTestCase):
    def test_a_collector_never_closed_leaves_no_warning(self):
        # The original examples never call close(); Python 3.13 warns about unclosed connections.
        code = "import metasystem_monitor as mm; m = mm.MetricsCollector(); m.record('x', 1)"
        result = subprocess.run([sys.executable, "-W", "error", "-X", "dev", "-c", code], capture_output=True,
                                cwd=REPO, env=self.child_env(), timeout=60)
        self.assertEqual((result.returncode, result.stderr), (0, b""))


class OriginalDocumentExamplesTest(StoreTestCase):
    """The MetricsCollector section of PHASE_17_IMPLEMENTATION_SUMMARY.md, as written there."""

    RECORDING = textwrap.dedent(
        """
        from metasystem_monitor import MetricsCollector

        metrics = MetricsCollector()

        # Record sync operation
        metrics.record_sync_metric(
            target='icloud',
            success=True,
            duration=2.5,
            files_synced=10,
            conflicts=0
        )

        # Record circuit breaker change
        metrics.record_circuit_breaker_metric(
            breaker_name='icloud_sync',
            state='closed',
            failure_count=0
        )

        # Record agent execution
        metrics.record_agent_metric(
            agent_name='cataloger',
            duration=1.2,
            success=True,
            items_processed=45
        )
        """
    )
    QUERYING = textwrap.dedent(
        """
        # Get success rate
        icloud_rate = metrics.get_success_rate('sync_icloud', hours=24)
        print(f"iCloud sync success rate (24h): {icloud_rate:.1f}%")

        # Get detailed statistics
        stats = metrics.get_metric_stats('sync_icloud_success', hours=24)
        print(f"Avg duration: {stats['avg']:.2f}s")
        print(f"Attempts: {stats['count']}")

        # Get system summary
        summary = metrics.get_system_summary()
        # Returns current state of key metrics
        """
    )

    def run_example(self, source, namespace):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(source, "<seed example>", "exec"), namespace)
        return out.getvalue()

    def test_recording_and_querying_examples(self):
        namespace = {}
        self.assertEqual(self.run_example(self.RECORDING, namespace), "")
        self.addCleanup(namespace["metrics"].close)
        self.assertTrue(os.path.exists(os.path.join(self.tmp, "home", "metrics.db")))
        printed = self.run_example(self.QUERYING, namespace)
        self.assertEqual(printed, "iCloud sync success rate (24h): 100.0%\nAvg duration: 2.50s\nAttempts: 1\n")
        summary = namespace["summary"]
        self.assertEqual(summary["sync"]["icloud"]["attempts"], 1)
        self.assertEqual(summary["sync"]["icloud"]["success_rate"], 100.0)
        self.assertEqual(summary["circuit_breakers"]["icloud_sync"]["state"], "closed")
        self.assertEqual(summary["circuit_breakers"]["icloud_sync"]["failures"], 0)
        self.assertEqual(summary["agents"]["cataloger"]["executions"], 1)
        self.assertEqual(summary["agents"]["cataloger"]["latest_duration"], 1.2)

    def test_quick_reference_positional_call(self):
        namespace = {}
        self.run_example(
            "from metasystem_monitor import MetricsCollector\n"
            "metrics = MetricsCollector()\n"
            "metrics.record_sync_metric('icloud', success=True, duration=2.5)\n"
            "metrics.record_sync_metric('icloud', success=False, duration=4.0)\n"
            "summary = metrics.get_system_summary()\n",
            namespace,
        )
        self.addCleanup(namespace["metrics"].close)
        self.assertEqual(namespace["metrics"].get_success_rate("sync_icloud", hours=24), 50.0)
        self.assertEqual(namespace["summary"]["sync"]["icloud"]["avg_duration"], 3.25)


if __name__ == "__main__":
    unittest.main()


def load_tests(loader, tests, pattern):
    """The module's doctests run with the suite: an example in a docstring that goes stale fails."""
    import doctest

    tests.addTests(doctest.DocTestSuite(mm))
    return tests
