"""Run Prometheus's own linter over our exports: ``python3 tests/promtool_check.py PROMTOOL``.

Dev-only, for .ci/run where Debian's prometheus package (which holds promtool) can be had. It
fills a temporary store with every kind of series the export knows, then pipes ``export`` to
``promtool check metrics``; any problem it prints fails the run.
"""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import metasystem_monitor as mm  # noqa: E402


def fill(db):
    with mm.MetricsCollector(db) as metrics:
        for i in range(20):
            metrics.record_sync_metric("icloud", i % 5 != 0, 2.0 + i / 10, files_synced=i, conflicts=i % 2)
            metrics.record_agent_metric("cataloger", 1.0 + i / 100, i % 7 != 0, items_processed=3)
        metrics.record_circuit_breaker_metric("nas", "open", 3)
        metrics.record("disk.free%", 12.5, {"mount": "/", "path": 'C:\\x "quoted"\nnext'})
        metrics.record("requests_total", 7.0)
        metrics.record("queue_count", 3.0)
        mm.record_check_results(metrics, [mm.CheckResult("disk", "WARNING", "9% free", 9.0, "%")], metrics._now())
        runner = mm.JobRunner(metrics)
        runner.run("backup", [sys.executable, "-c", "pass"])
        runner.run("backup", [sys.executable, "-c", "raise SystemExit(2)"])
    with mm.AlertingSystem(os.path.join(os.path.dirname(db), "none.ini"), db_path=db) as alerts:
        alerts.send_info_alert("hello", "")


def main(promtool):
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "metrics.db")
        fill(db)
        with mm.MetricsCollector(db, readonly=True) as collector:
            text = mm.export_text(collector)
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    problems = (result.stdout + result.stderr).decode().strip()
    print(f"promtool check metrics: exit {result.returncode}, {len(text.splitlines())} lines checked"
          + (f"\n{problems}" if problems else ""))
    return 0 if result.returncode == 0 and not problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
