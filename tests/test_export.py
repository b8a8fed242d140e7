"""Prometheus hand-off: the exposition formats, the textfile, serve and push, against real parts."""

import collections
import concurrent.futures
import html.parser
import http.client
import json
import os
import select
import socket
import signal
import subprocess
import sys
import threading
import unittest

import metasystem_monitor as mm

from . import promparse
from .servers import HTTPServer, Reply
from .support import SUBPROCESS_TIMEOUT_S, AlertTestCase, FakeClock, StoreTestCase, file_bytes, reap

NOW = 1_800_000_000.0
HTTP_TIMEOUT_S = 10


def sample_of(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


class ParserTest(StoreTestCase):
    """The test parser itself refuses what Prometheus refuses, so the tests below can fail."""

    GOOD = "# HELP a_total things\n# TYPE a_total counter\na_total{x=\"1\"} 2\n"

    def test_it_accepts_a_good_exposition(self):
        samples, types = promparse.parse(self.GOOD)
        self.assertEqual((samples, types), ({("a_total", frozenset({("x", "1")})): 2.0}, {"a_total": "counter"}))

    def test_it_refuses_what_prometheus_refuses(self):
        for bad in (
            self.GOOD[:-1],  # no final newline
            "a_total 1\n# HELP a_total x\n# TYPE a_total counter\n",  # metadata after samples
            self.GOOD + "# HELP b x\n# TYPE b gauge\nb 1\na_total{x=\"2\"} 1\n",  # a family split apart
            self.GOOD + "a_total{x=\"1\"} 3\n",  # the same name and labels twice
            "# HELP a x\n# TYPE a gauge\na{x=\"\\t\"} 1\n",  # a bad escape
            "# HELP a x\n# TYPE a gauge\na 1 1700000000000\n",  # a timestamp
            "# HELP a x\n# TYPE a counter\na 1\n",  # a counter without _total
            "# HELP a_total x\n# TYPE a_total gauge\na_total 1\n",  # _total on a gauge
            "# HELP a_seconds x\n# TYPE a_seconds gauge\na_seconds{__x=\"y\"} 1\n",  # a reserved label
        ):
            with self.subTest(bad=bad), self.assertRaises(promparse.FormatError):
                promparse.parse(bad)
        with self.assertRaises(promparse.FormatError):
            promparse.parse("# TYPE a gauge\n# HELP a x\na 1\n", openmetrics=True)  # no # EOF


class ExpositionTest(AlertTestCase):
    """What the store holds, as metrics: names, labels, types and values checked against what was recorded."""

    def populate(self):
        clock = FakeClock(NOW - 7200)
        with mm.MetricsCollector(self.db, now=clock.time) as metrics:
            metrics.record_sync_metric("icloud", True, 2.0, files_synced=10, timestamp=NOW - 3600)
            metrics.record_sync_metric("icloud", True, 3.0, files_synced=5, conflicts=1, timestamp=NOW - 1800)
            metrics.record_sync_metric("icloud", False, 4.5, timestamp=NOW - 600)
            metrics.record_agent_metric("cataloger", 1.25, True, items_processed=45, timestamp=NOW - 300)
            metrics.record_circuit_breaker_metric("nas", "open", 3, timestamp=NOW - 100)
            metrics.record("disk.free%", 12.5, {"mount": "/", "__odd": "x"}, timestamp=NOW - 50)
            metrics.record("disk_free_", 99.0, timestamp=NOW - 50)  # the same name once mapped
            metrics.record("requests_total", 7.0, timestamp=NOW - 50)  # a gauge may not end in _total
            metrics.record("sync_attempts", 1.0, timestamp=NOW - 50)  # the name of one of our families
            mm.record_check_results(metrics, [mm.CheckResult("disk", "WARNING", "9% free", 9.0, "%")], NOW - 40)
        with self.system() as alerts:
            alerts.send_info_alert("hello", "", channels=["log"])
        runs = mm.JobRunner(mm.MetricsCollector(self.db), now=lambda: NOW - 30)
        with runs.collector:
            runs.run("backup", [sys.executable, "-c", "raise SystemExit(3)"])

    def export(self, fmt="prometheus"):
        with mm.MetricsCollector(self.db, readonly=True, now=lambda: NOW) as collector:
            return mm.export_text(collector, fmt)

    def test_every_family_with_its_values(self):
        self.populate()
        text = self.export()
        samples, types = promparse.parse(text)
        self.assertEqual(sample_of(samples, "metasystem_sync_attempts_total", target="icloud", result="success"), 2)
        self.assertEqual(sample_of(samples, "metasystem_sync_attempts_total", target="icloud", result="failure"), 1)
        self.assertEqual(sample_of(samples, "metasystem_sync_duration_seconds_sum", target="icloud", result="success"),
                         5.0)
        self.assertEqual(sample_of(samples, "metasystem_sync_duration_seconds_count", target="icloud",
                                   result="failure"), 1)
        self.assertEqual(sample_of(samples, "metasystem_sync_last_success_timestamp_seconds", target="icloud"),
                         NOW - 1800)
        self.assertEqual(sample_of(samples, "metasystem_sync_files_total", target="icloud"), 15)
        self.assertEqual(sample_of(samples, "metasystem_sync_conflicts_total", target="icloud"), 1)
        self.assertEqual(sample_of(samples, "metasystem_agent_executions_total", agent="cataloger", result="success"),
                         1)
        self.assertEqual(sample_of(samples, "metasystem_agent_items_total", agent="cataloger"), 45)
        self.assertEqual([sample_of(samples, "metasystem_circuit_breaker_state", breaker="nas", state=state)
                          for state in ("closed", "open", "half_open")], [0, 1, 0])
        self.assertEqual(sample_of(samples, "metasystem_circuit_breaker_failures", breaker="nas"), 3)
        self.assertEqual(sample_of(samples, "metasystem_check_state", check="disk"), 1)
        self.assertEqual(sample_of(samples, "metasystem_check_value", check="disk"), 9.0)
        self.assertEqual(sample_of(samples, "metasystem_check_last_run_timestamp_seconds", check="disk"), NOW - 40)
        self.assertEqual(sample_of(samples, "metasystem_job_last_exit_code", job="backup"), 3)
        self.assertNotIn(("metasystem_job_last_success_timestamp_seconds", frozenset({("job", "backup")})), samples)
        self.assertEqual(sample_of(samples, "metasystem_alert_deliveries_total", channel="log", outcome="sent"), 1)
        self.assertEqual(sample_of(samples, "metasystem_build_info", version=mm.__version__), 1)
        # Every other series: its latest value, under a valid name that collides with nothing.
        self.assertEqual(sample_of(samples, "metasystem_disk_free_", mount="/", odd="x"), 12.5)
        self.assertEqual(sample_of(samples, "metasystem_disk_free__2"), 99.0)
        self.assertEqual(sample_of(samples, "metasystem_requests_total_value"), 7.0)
        self.assertEqual(sample_of(samples, "metasystem_sync_attempts_2"), 1.0)
        self.assertEqual(types["metasystem_sync_attempts_total"], "counter")
        self.assertEqual(types["metasystem_sync_duration_seconds"], "summary")
        self.assertEqual(types["metasystem_disk_free_"], "gauge")
        self.assertIn("# HELP metasystem_disk_free_ the latest value recorded as disk.free%\n", text)
        # The same in OpenMetrics.
        om_samples, om_types = promparse.parse(self.export("openmetrics"), openmetrics=True)
        self.assertEqual(om_samples, samples)
        self.assertEqual(om_types["metasystem_sync_attempts"], "counter")
        self.assertEqual(om_types["metasystem_build"], "info")

    def test_an_empty_store_exports_only_the_build_info(self):
        self.assertEqual(self.export(), "# HELP metasystem_build_info the version of metasystem-monitor exporting\n"
                                        "# TYPE metasystem_build_info gauge\n"
                                        f'metasystem_build_info{{version="{mm.__version__}"}} 1\n')
        self.assertFalse(os.path.exists(self.db))

    def test_golden_label_escapes(self):
        family = mm.MetricFamily("metasystem_file_access_time_seconds", "gauge", "a help\\ with\nnewline \"quoted\"",
                                 [("", {"path": "C:\\DIR\\FILE.TXT", "error": 'Cannot find file:\n"FILE.TXT"'},
                                   1.458255915e9)])
        self.assertEqual(mm.exposition([family]), (
            '# HELP metasystem_file_access_time_seconds a help\\\\ with\\nnewline "quoted"\n'
            "# TYPE metasystem_file_access_time_seconds gauge\n"
            'metasystem_file_access_time_seconds{path="C:\\\\DIR\\\\FILE.TXT",'
            'error="Cannot find file:\\n\\"FILE.TXT\\""} 1458255915\n'))
        self.assertEqual(mm.exposition([family], "openmetrics"), (
            "# TYPE metasystem_file_access_time_seconds gauge\n"
            '# HELP metasystem_file_access_time_seconds a help\\\\ with\\nnewline \\"quoted\\"\n'
            'metasystem_file_access_time_seconds{path="C:\\\\DIR\\\\FILE.TXT",'
            'error="Cannot find file:\\n\\"FILE.TXT\\""} 1458255915\n# EOF\n'))
        samples, _ = promparse.parse(mm.exposition([family]))
        self.assertEqual(list(samples), [("metasystem_file_access_time_seconds", frozenset(
            {("path", "C:\\DIR\\FILE.TXT"), ("error", 'Cannot find file:\n"FILE.TXT"')}))])

    def test_values_and_names(self):
        family = mm.MetricFamily("metasystem_v", "gauge", "v", [("", {"i": str(i)}, value) for i, value in
                                                                enumerate((float("nan"), float("inf"), -float("inf"),
                                                                           0.1, 3.0, -2.0, 2.0 ** 60))])
        self.assertEqual(mm.exposition([family]).splitlines()[2:], [
            'metasystem_v{i="0"} NaN', 'metasystem_v{i="1"} +Inf', 'metasystem_v{i="2"} -Inf',
            'metasystem_v{i="3"} 0.1', 'metasystem_v{i="4"} 3', 'metasystem_v{i="5"} -2',
            'metasystem_v{i="6"} 1.152921504606847e+18'])
        self.assertEqual(mm.prometheus_name("load.1m"), "metasystem_load_1m")
        self.assertEqual(mm.prometheus_name("a b", {"metasystem_a_b", "metasystem_a_b_2"}), "metasystem_a_b_3")
        self.assertEqual(mm.prometheus_name("queue_count"), "metasystem_queue_count_value")
        self.assertEqual(mm.prometheus_labels({"9lives": "1", "__x": "2", "ok": ""}), {"_9lives": "1", "x": "2"})


class CycleCollectorTest(StoreTestCase):
    def test_export_gives_the_cycle_collector_back_as_it_found_it(self):
        import gc

        with mm.MetricsCollector(self.db) as collector:
            collector.record("x", 1.0)
            self.addCleanup(gc.enable)
            for enabled in (True, False):
                (gc.enable if enabled else gc.disable)()
                self.assertIn("x 1", mm.export_text(collector))
                self.assertEqual(gc.isenabled(), enabled)


class TextfileTest(StoreTestCase):

    def test_export_output_is_the_same_text_written_atomically(self):
        with mm.MetricsCollector(self.db) as metrics:
            metrics.record_sync_metric("icloud", True, 2.0)
        target = os.path.join(self.tmp, "textfile", "metasystem.prom")
        os.mkdir(os.path.dirname(target))
        printed = self.run_cli("export")
        written = self.run_cli("export", "--output", target)
        self.assertCleanExit(written, 0, "")
        with open(target, encoding="utf-8") as handle:
            self.assertEqual(handle.read(), printed.stdout.decode())
        self.assertEqual(os.listdir(os.path.dirname(target)), ["metasystem.prom"])
        promparse.parse(printed.stdout.decode())

    def test_a_failed_write_leaves_the_old_file_and_no_temporary(self):
        folder = os.path.join(self.tmp, "textfile")
        os.mkdir(folder)
        target = os.path.join(folder, "metasystem.prom")
        with open(target, "w", encoding="utf-8") as handle:
            handle.write("# the old one\n")
        with self.assertRaises(UnicodeEncodeError):
            mm.write_textfile(target, "\ud800 cannot be encoded\n")
        self.assertEqual((os.listdir(folder), file_bytes(target)), (["metasystem.prom"], b"# the old one\n"))
        self.assertMainError(1, "cannot write", "export", "--output", os.path.join(self.tmp, "missing", "x.prom"))

    def test_output_refuses_what_is_not_a_regular_file_of_its_own(self):
        os.mkfifo(os.path.join(self.tmp, "fifo"))
        os.mkdir(os.path.join(self.tmp, "folder"))
        os.symlink(os.devnull, os.path.join(self.tmp, "to-device"))
        os.symlink(os.path.join(self.tmp, "fifo"), os.path.join(self.tmp, "to-fifo"))
        os.symlink(os.path.join(self.tmp, "nowhere"), os.path.join(self.tmp, "dangling"))
        with open(os.path.join(self.tmp, "notes.txt"), "wb") as handle:
            handle.write(b"precious\n")
        def state():  # all but the access time: reading notes.txt's first line to refuse it may touch that
            return {name: (lambda s: (s.st_mode, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_nlink))(
                os.lstat(os.path.join(self.tmp, name))) for name in os.listdir(self.tmp)}

        before = state()
        for name, fragment in (("fifo", "is a FIFO, not a regular file"),
                               ("folder", "is a directory, not a regular file"),
                               ("to-device", "is a character device, not a regular file"),
                               ("to-fifo", "is a FIFO, not a regular file"),
                               ("dangling", "is a symlink to nowhere"),
                               ("notes.txt", "was not written by this program; give --force to replace it")):
            with self.subTest(target=name):
                self.assertMainError(2, fragment, "export", "--output", os.path.join(self.tmp, name))
        self.assertEqual(file_bytes(os.path.join(self.tmp, "notes.txt")), b"precious\n")
        self.assertEqual(state(), before)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "nowhere")))

    def test_output_replaces_its_own_file_and_with_force_a_foreign_one(self):
        target = os.path.join(self.tmp, "metasystem.prom")
        with open(target, "wb") as handle:
            handle.write(b"precious\n")
        self.assertEqual(self.run_main("export", "--output", target, "--force")[0], 0)
        self.assertTrue(file_bytes(target).startswith(b"# HELP metasystem_build_info "))
        for fmt in ("openmetrics", "prometheus"):  # each format replaces what either wrote
            self.assertEqual(self.run_main("export", "--format", fmt, "--output", target), (0, "", ""))
        self.assertTrue(file_bytes(target).startswith(b"# HELP metasystem_build_info "))
        link = os.path.join(self.tmp, "link.prom")
        os.symlink(target, link)  # a link to a file of its own: the file is replaced, the link kept
        self.assertEqual(self.run_main("export", "--output", link), (0, "", ""))
        self.assertTrue(os.path.islink(link))

    def test_a_reader_never_sees_a_partial_file(self):
        target = os.path.join(self.tmp, "metasystem.prom")
        texts = [mm.exposition([mm.MetricFamily(f"metasystem_m{i}", "gauge", "x" * 2000,
                                                [("", {"n": str(n)}, float(n)) for n in range(200 * (i + 1))])])
                 for i in range(2)]
        mm.write_textfile(target, texts[0])
        failures = []

        def write():
            try:
                for i in range(500):
                    mm.write_textfile(target, texts[i % 2])
            except Exception as err:  # reported below, in the test's own thread
                failures.append(err)

        writer = threading.Thread(target=write)
        writer.start()
        seen = set()
        for _ in range(2000):
            with open(target, encoding="utf-8") as handle:
                text = handle.read()
            self.assertIn(text, texts)
            seen.add(texts.index(text))
        writer.join(SUBPROCESS_TIMEOUT_S)
        self.assertEqual(failures, [])
        self.assertEqual(os.listdir(self.tmp), ["metasystem.prom"])
        for text in texts:
            promparse.parse(text)


class PageParser(html.parser.HTMLParser):
    """The tags, texts and attributes of the status page."""

    def __init__(self):
        super().__init__()
        self.tags, self.texts, self.meta = [], [], {}

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "meta":
            self.meta[attrs.get("name") or attrs.get("http-equiv") or "charset"] = attrs.get("content")

    def handle_data(self, data):
        if data.strip():
            self.texts.append(data.strip())


class ServeTestCase(AlertTestCase):
    """A store with a little of everything, the HTTP server of it on 127.0.0.1 in this process, and a real
    client."""

    def setUp(self):
        super().setUp()
        with mm.MetricsCollector(self.db, now=lambda: NOW - 60) as metrics:
            for i in range(30):
                metrics.record_sync_metric("icloud", i != 7, 2.0 + (i % 3) / 10, timestamp=NOW - 3600 + i * 60)
            metrics.record_agent_metric("<script>alert(1)</script>", 1.0, True, timestamp=NOW - 60)
            mm.record_check_results(metrics, [mm.CheckResult("disk", "OK", "plenty & more\x1b[31m")], NOW - 30)

    def start(self, listen="127.0.0.1:0", token=None, **kwargs):
        server = mm.make_server(listen, self.db, token=token, now=lambda: NOW, **kwargs)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        self.addCleanup(thread.join, HTTP_TIMEOUT_S)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return server.server_address[1]

    def get(self, port, path, headers=None, method="GET"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type"), response.read()
        finally:
            connection.close()

    def slow_client(self, port, head=b"GET /metrics HTTP/1.0\r\n"):
        """A connection that has sent part of a request head and sends no more."""
        client = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S)
        self.addCleanup(client.close)
        client.sendall(head)
        return client

    @staticmethod
    def read_to_end(client):
        answer = b""
        while True:
            chunk = client.recv(65536)
            if not chunk:
                return answer
            answer += chunk

    def get_full(self, port, path, headers=None):
        """(status, headers as a dict, body) of one GET."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()


class ServeTest(ServeTestCase):
    """What the server answers, and how it holds up against slow, many and hostile clients."""

    def test_a_client_that_trickles_its_head_is_cut_off_at_the_deadline(self):
        ticks = iter(range(0, 10_000, 4))  # each read of the head takes 4 s by this clock
        port = self.start(clock=lambda: float(next(ticks)))
        client = self.slow_client(port)
        sent = 0
        with self.assertRaises(OSError):  # the server closes: EPIPE or a reset, before the head is done
            for _ in range(50_000):  # one byte at a time of a header that never ends, as fast as it goes
                client.send(b"y" if sent else b"X-Slow: ")
                sent += 1
                readable, _, _ = select.select([client], [], [], 0)
                if readable and client.recv(1024) == b"":
                    raise ConnectionResetError("closed by the server")
        self.assertLess(sent, 50_000)

    def test_at_most_max_connections_are_served_at_once_and_the_rest_get_503(self):
        port = self.start(max_connections=3)
        held = [self.slow_client(port) for _ in range(3)]
        self.assertEqual(len(held), 3)
        # The server takes connections in order: once a fourth is answered 503, the three hold their slots.
        refused = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S)
        self.addCleanup(refused.close)
        self.assertEqual(self.read_to_end(refused), b"HTTP/1.0 503 Service Unavailable\r\n"
                                                    b"Content-Type: text/plain; charset=utf-8\r\n"
                                                    b"Retry-After: 1\r\nContent-Length: 14\r\n\r\ntoo many busy\n")
        held[0].sendall(b"\r\n")  # one finishes its request: once it has read the end, its slot is free again
        self.assertEqual(self.read_to_end(held[0]).split(b"\r\n")[0], b"HTTP/1.0 200 OK")
        held[0].close()
        self.assertEqual(self.get(port, "/healthz"), (200, "text/plain; charset=utf-8", b"ok\n"))  # no retry

    def test_a_client_that_has_read_its_answer_to_the_end_finds_its_slot_free(self):
        port = self.start(max_connections=1)
        firsts = []
        for _ in range(300):  # one after another, each read to the server's close (http.client stops sooner)
            with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S) as client:
                client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                firsts.append(self.read_to_end(client).split(b"\r\n")[0])
        self.assertEqual(firsts, [b"HTTP/1.0 200 OK"] * 300)

    def test_healthz_answers_while_two_hundred_slow_clients_are_connected(self):
        port = self.start()
        slow = [self.slow_client(port) for _ in range(200)]
        self.assertEqual(self.get(port, "/healthz"), (200, "text/plain; charset=utf-8", b"ok\n"))
        self.assertEqual(len(slow), 200)
        self.assertGreaterEqual(mm.SERVE_BACKLOG, 64)

    def test_accept_q_values_and_the_bearer_scheme_in_any_case(self):
        for accept, openmetrics in (("application/openmetrics-text;q=0", False),
                                    ("application/openmetrics-text; q=0.0, text/plain", False),
                                    ("text/plain;q=0.9, application/openmetrics-text;q=0.5", False),
                                    ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,"
                                     "*/*;q=0.1", True),
                                    ("APPLICATION/OPENMETRICS-TEXT", True), ("*/*", False), ("", False)):
            with self.subTest(accept=accept):
                self.assertEqual(mm.wants_openmetrics(accept), openmetrics)
        port = self.start(token="s3cret")
        for header, status in (("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER  s3cret ", 200),
                               ("Bearer wrong", 401), ("Basic s3cret", 401), ("s3cret", 401)):
            with self.subTest(authorization=header):
                self.assertEqual(self.get(port, "/metrics", {"Authorization": header})[0], status)

    def test_metrics_in_both_formats_by_the_accept_header(self):
        port = self.start()
        status, content_type, body = self.get(port, "/metrics")
        self.assertEqual((status, content_type), (200, "text/plain; version=0.0.4; charset=utf-8"))
        samples, _ = promparse.parse(body.decode("utf-8"))
        self.assertEqual(sample_of(samples, "metasystem_sync_attempts_total", target="icloud", result="failure"), 1)
        self.assertEqual(body.decode(), self.export_now())
        status, content_type, body = self.get(
            port, "/metrics", {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
        self.assertEqual((status, content_type), (200, "application/openmetrics-text; version=1.0.0; charset=utf-8"))
        self.assertTrue(body.endswith(b"# EOF\n"))
        promparse.parse(body.decode("utf-8"), openmetrics=True)

    def test_an_answer_is_built_once_per_cache_interval_and_says_its_age(self):
        clock = FakeClock()
        port = self.start(clock=clock.monotonic, cache_s=5.0)
        status, headers, first = self.get_full(port, "/metrics")
        self.assertEqual((status, headers["Age"], headers["Vary"]), (200, "0", "Accept-Encoding"))
        self.assertIn("Date", headers)
        with mm.MetricsCollector(self.db, now=lambda: NOW - 10) as metrics:
            metrics.record("fresh_metric", 42.0)
        clock.advance(4.5)
        status, headers, again = self.get_full(port, "/metrics")
        self.assertEqual((status, headers["Age"], again), (200, "4", first))  # the same answer, 4 s old
        self.assertNotIn(b"fresh_metric", again)
        clock.advance(0.5)
        status, headers, rebuilt = self.get_full(port, "/metrics")
        self.assertEqual((status, headers["Age"]), (200, "0"))
        self.assertIn(b"\nmetasystem_fresh_metric 42\n", rebuilt)
        self.assertEqual(rebuilt.decode(), self.export_now())

    def test_twenty_scrapers_at_once_get_one_answer(self):
        clock = FakeClock()
        port = self.start(clock=clock.monotonic)
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(self.get_full(port, "/metrics")))
                   for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HTTP_TIMEOUT_S)
        self.assertEqual(len(answers), 20)
        self.assertEqual({(status, headers["Age"], body) for status, headers, body in answers},
                         {(200, "0", self.export_now().encode())})

    def test_gzip_when_the_client_asks_and_never_when_it_refuses(self):
        import gzip

        port = self.start()
        plain = self.get_full(port, "/metrics")[2]
        status, headers, packed = self.get_full(port, "/metrics", {"Accept-Encoding": "br, gzip;q=0.8"})
        self.assertEqual((status, headers["Content-Encoding"], int(headers["Content-Length"])),
                         (200, "gzip", len(packed)))
        self.assertEqual(gzip.decompress(packed), plain)
        self.assertLess(len(packed), len(plain) / 3)
        for refusing in ("gzip;q=0", "identity", ""):
            status, headers, body = self.get_full(port, "/metrics", {"Accept-Encoding": refusing})
            self.assertEqual((status, headers.get("Content-Encoding"), body), (200, None, plain))
        status, headers, body = self.get_full(port, "/healthz", {"Accept-Encoding": "gzip"})
        self.assertEqual((status, headers.get("Content-Encoding"), body), (200, None, b"ok\n"))  # too small to pack

    def test_a_failed_answer_is_not_kept(self):
        clock = FakeClock()
        port = self.start(clock=clock.monotonic)
        os.rename(self.db, self.db + ".away")
        with open(self.db, "wb") as handle:
            handle.write(b"not a store at all, but long enough to be read as one" * 20)
        self.assertEqual(self.get_full(port, "/metrics")[0], 503)
        os.replace(self.db + ".away", self.db)
        status, _, body = self.get_full(port, "/metrics")
        self.assertEqual((status, body.decode()), (200, self.export_now()))

    def export_now(self):
        with mm.MetricsCollector(self.db, readonly=True, now=lambda: NOW) as collector:
            return mm.export_text(collector)

    def test_healthz_summary_404_and_head(self):
        port = self.start()
        self.assertEqual(self.get(port, "/healthz"), (200, "text/plain; charset=utf-8", b"ok\n"))
        status, content_type, body = self.get(port, "/api/summary")
        self.assertEqual((status, content_type), (200, "application/json"))
        self.assertEqual(json.loads(body), mm.read_summary(self.db, now=lambda: NOW))
        self.assertEqual(self.get(port, "/nope"), (404, "text/plain; charset=utf-8", b"not found\n"))
        self.assertEqual(self.get(port, "/metrics/extra")[0], 404)
        self.assertEqual(self.get(port, "/metrics", method="HEAD")[::2], (200, b""))

    def test_the_status_page_is_plain_html_with_inert_text(self):
        port = self.start()
        status, content_type, body = self.get(port, "/")
        self.assertEqual((status, content_type), (200, "text/html; charset=utf-8"))
        page = PageParser()
        page.feed(body.decode("utf-8"))
        self.assertNotIn("script", page.tags)
        self.assertEqual(page.tags.count("svg"), 2)  # the sync target and the agent
        self.assertEqual((page.meta["viewport"], page.meta["refresh"]),
                         ("width=device-width, initial-scale=1", str(mm.SERVE_PAGE_REFRESH_S)))
        self.assertIn("<script>alert(1)</script>", page.texts)  # shown, not run
        self.assertIn("plenty & more\\x1b[31m", page.texts)  # the escape sequence inert
        self.assertNotIn(b"\x1b", body)
        for heading in ("Sync operations", "Agents", "Recent alerts", "System health"):
            self.assertIn(heading, page.texts)
        self.assertNotIn("Circuit breakers", page.texts)  # none recorded: the section is hidden

    def test_each_series_has_its_own_page_with_a_chart_linked_from_the_overview(self):
        from urllib.parse import quote

        key = 'backup_bytes{host="<b>nas</b>"}'
        values = [100.0 + i % 3 for i in range(20)]
        values[12] = 5000.0
        with mm.MetricsCollector(self.db, now=lambda: NOW - 60) as metrics:
            for i, value in enumerate(values):
                metrics.record("backup_bytes", value, {"host": "<b>nas</b>"}, timestamp=NOW - 3000 + i * 60)
        port = self.start()
        link = f'<a href="series?key={quote(key, safe="")}">backup_bytes{{host=&quot;&lt;b&gt;nas&lt;/b&gt;&quot;}}</a>'
        self.assertIn(f"<tr><td>{link}</td><td>101 B</td>", self.get(port, "/")[2].decode())
        status, kind, body = self.get(port, f"/api/series?key={quote(key)}")
        self.assertEqual((status, kind), (200, "application/json"))
        detail = json.loads(body)
        self.assertEqual(detail, mm.read_series(self.db, key, now=lambda: NOW))
        self.assertEqual({field: detail[field] for field in ("key", "labels", "count", "min", "max", "latest",
                                                             "anomalies", "anomalous")},
                         {"key": key, "labels": {"host": "<b>nas</b>"}, "count": 20, "min": 100.0, "max": 5000.0,
                          "latest": values[-1], "anomalies": 1, "anomalous": [12]})
        self.assertEqual(detail["avg"], sum(values) / 20)
        self.assertEqual(detail["points"], [[NOW - 3000 + i * 60, value] for i, value in enumerate(values)])
        status, kind, body = self.get(port, f"/series?key={quote(key)}")
        self.assertEqual((status, kind), (200, "text/html; charset=utf-8"))
        page = PageParser()
        page.feed(body.decode("utf-8"))
        self.assertNotIn("script", page.tags)
        self.assertEqual((page.tags.count("svg"), page.tags.count("polyline"), page.tags.count("circle")), (1, 1, 1))
        self.assertIn(key, page.texts)
        for label, value in (("min", "100 B"), ("max", "5.0 KB"), ("samples", "20"), ("anomalies", "1")):
            self.assertEqual(page.texts[page.texts.index(label) + 1], value)
        self.assertNotIn(b"<b>nas", body)
        for path in ("/series?key=nope", "/series", "/api/series?key=backup_bytes"):
            self.assertEqual(self.get(port, path)[0], 404, path)

    def test_series_whose_plain_keys_were_alike_get_a_key_and_a_page_each(self):
        from urllib.parse import quote

        written = [("amb", {"a": "1,b=2"}, 1.0), ("amb", {"a": "1", "b": "2"}, 2.0),
                   ('amb{a="1",b="2"}', None, 3.0), ("amb", {"a": 'q"\\\n'}, 4.0)]
        with mm.MetricsCollector(self.db, now=lambda: NOW - 60) as metrics:
            for name, labels, value in written:
                metrics.record(name, value, labels, timestamp=NOW - 120)
        keys = ['amb{a="1,b=2"}', 'amb{a="1",b="2"}', '{"amb{a=\\"1\\",b=\\"2\\"}"}', 'amb{a="q\\"\\\\\\n"}']
        summary = mm.read_summary(self.db, now=lambda: NOW)["metrics"]
        self.assertEqual(sorted(summary), sorted(keys))
        self.assertEqual({key: summary[key]["latest"] for key in keys}, {key: value for key, (_, _, value)
                                                                        in zip(keys, written)})
        self.assertEqual([mm.series_name(key) for key in keys], ["amb", "amb", 'amb{a="1",b="2"}', "amb"])
        port = self.start()
        for key, (name, labels, value) in zip(keys, written):
            with self.subTest(key=key):
                status, _, body = self.get(port, f"/api/series?key={quote(key, safe='')}")
                detail = json.loads(body)
                self.assertEqual((status, detail["key"], detail["name"], detail["labels"], detail["points"]),
                                 (200, key, name, labels or {}, [[NOW - 120, value]]))
                status, _, page = self.get(port, f"/series?key={quote(key, safe='')}")
                self.assertEqual(status, 200)
                self.assertIn(f"<h1>{html.escape(key)}</h1>".encode(), page)
        self.assertEqual(self.get(port, f"/api/series?key={quote('amb{a=1,b=2}', safe='')}")[0], 404)

    def test_a_long_window_is_drawn_as_the_means_of_equal_slices(self):
        points = [(float(t), float(t % 10)) for t in range(1000)]
        flagged = [t == 555 for t in range(1000)]
        drawn, marked = mm._chart_points(points, flagged, 10)
        self.assertEqual(drawn, [(t * 100 + 49.5, 4.5) for t in range(10)])
        self.assertEqual(marked, [5])
        self.assertEqual(mm._chart_points(points[:5], flagged[:5], 10), (points[:5], []))

    def test_a_client_that_sends_nothing_does_not_block_the_others(self):
        port = self.start()
        idle = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S)
        self.addCleanup(idle.close)
        half = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S)
        self.addCleanup(half.close)
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        for _ in range(3):
            self.assertEqual(self.get(port, "/healthz")[0], 200)
            self.assertEqual(self.get(port, "/metrics")[0], 200)

    def test_off_loopback_only_with_a_token_compared_whole(self):
        with self.assertRaisesRegex(mm.ConfigError, "refusing to serve on 0.0.0.0:0 .*token_file"):
            mm.make_server("0.0.0.0:0", self.db)
        port = self.start("127.0.0.1:0", token="s3cret-token")
        self.assertEqual(self.get(port, "/metrics")[0], 401)
        self.assertEqual(self.get(port, "/metrics", {"Authorization": "Bearer s3cret-toke"})[0], 401)
        self.assertEqual(self.get(port, "/metrics", {"Authorization": "Bearer s3cret-token"})[0], 200)
        self.assertEqual(self.get(port, "/healthz")[0], 200)

    def test_the_command_serves_until_sigterm_or_sigint(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum.name):
                process = subprocess.Popen([sys.executable, "-m", "metasystem_monitor", "--db", self.db, "serve",
                                            "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE, env=self.child_env(),
                                           cwd=self.tmp)
                self.addCleanup(reap, process)
                line = process.stderr.readline().decode()
                self.assertRegex(line, r"^metasystem_monitor.py: serving http://127.0.0.1:\d+/ ")
                port = int(line.split(":")[3].split("/")[0])
                self.assertEqual(self.get(port, "/healthz")[0], 200)
                process.send_signal(signum)
                self.assertEqual(process.wait(SUBPROCESS_TIMEOUT_S), 0)
                self.assertEqual(process.stderr.read(), b"")

    def test_off_loopback_the_command_wants_a_readable_token_file(self):
        self.assertMainError(1, "refusing to serve on 0.0.0.0:0 (not loopback) without a token", "--db", self.db,
                             "serve", "--listen", "0.0.0.0:0")
        token_file = os.path.join(self.tmp, "token")
        self.write_config(f"[serve]\ntoken_file = {token_file}\n", log_channel=False)
        self.assertMainError(1, f"[serve] token_file {token_file} cannot be read", "--config", self.config_path,
                             "serve", "--listen", "0.0.0.0:0")
        with open(token_file, "w", encoding="utf-8") as handle:
            handle.write("\n")
        os.chmod(token_file, 0o600)  # others may not read it: a shared one draws a warning line too
        self.assertMainError(1, f"[serve] token_file {token_file} is empty", "--config", self.config_path, "serve")
        with open(token_file, "w", encoding="utf-8") as handle:
            handle.write("  s3cret-token\n")
        self.assertEqual(mm._serve_token(token_file), "s3cret-token")

    def test_the_serve_section_is_checked(self):
        self.write_config("[serve]\nlisten = nowhere\nport = 9473\ncache = soon\n", log_channel=False)
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [f"{self.config_path}: [serve] port: unknown key",
                                            f"{self.config_path}: [serve] listen: listen must be HOST:PORT, "
                                            "got 'nowhere'",
                                            f"{self.config_path}: [serve] cache: {self.duration_error('soon')}"])
        self.assertMainError(1, f"[serve] cache: {self.duration_error('soon')}", "--config", self.config_path,
                             "serve", "--listen", "127.0.0.1:0")

    @staticmethod
    def duration_error(text):
        try:
            mm.parse_duration_s(text)
        except mm.ValidationError as err:
            return str(err)
        raise AssertionError(f"{text!r} parsed")

    def test_a_listen_address_in_use_is_one_line(self):
        port = self.start()
        self.assertMainError(1, f"cannot listen on 127.0.0.1:{port}", "serve", "--listen", f"127.0.0.1:{port}")
        self.assertMainError(2, "listen must be HOST:PORT", "serve", "--listen", "nowhere")


GATE_TIMEOUT_S = 3 * HTTP_TIMEOUT_S  # a held build gives up after this: a client waiting behind it times out first


class GatedBuild:
    """serve_path for a server, except that a build of a gated (path, series) begins, says so and waits
    until the test opens its gate; it counts the builds of each (path, series)."""

    def __init__(self, *gated):
        self.lock = threading.Lock()
        self.builds = collections.Counter()
        self.started = {key: threading.Event() for key in gated}
        self.gates = {key: threading.Event() for key in gated}

    def __call__(self, path, accept, db_path, hours, now, options, series):
        key = (path, series)
        with self.lock:
            self.builds[key] += 1
        if key in self.gates:
            self.started[key].set()
            self.gates[key].wait(GATE_TIMEOUT_S)
        return mm.serve_path(path, accept, db_path, hours, now, options, series)

    def open_all(self):
        for gate in self.gates.values():
            gate.set()


class CountedAnswers(mm._Answers):
    """The server's answers, telling the test once ``expected`` requests have asked for one."""

    def __init__(self, *args, expected=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked, self.expected, self.all_asked = 0, expected, threading.Event()
        self.asked_lock = threading.Lock()

    def get(self, key, *args):
        with self.asked_lock:
            self.asked += 1
            if self.asked == self.expected:
                self.all_asked.set()
        return super().get(key, *args)


class ServeConcurrencyTest(ServeTestCase):
    """Builds held open by the test: who waits for whom."""

    def setUp(self):
        super().setUp()
        with mm.MetricsCollector(self.db, now=lambda: NOW - 60) as metrics:
            metrics.record_many([(name, float(i), None, NOW - 600 + i) for name in ("load1", "load5")
                                 for i in range(10)])
        self.clock = FakeClock()  # the answers never go stale while a test runs, however loaded the machine
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=12)
        self.addCleanup(self.pool.shutdown)

    def start_gated(self, *gated, expected=0):
        build = GatedBuild(*gated)
        answers = CountedAnswers(5.0, self.clock.monotonic, build, expected=expected)
        port = self.start(_answers=answers)
        self.addCleanup(build.open_all)  # before the server stops: no build is left waiting
        return port, build, answers

    def test_healthz_answers_while_a_series_page_is_being_built(self):
        port, build, _ = self.start_gated(("/series", "load1"))
        page = self.pool.submit(self.get_full, port, "/series?key=load1")
        self.assertTrue(build.started["/series", "load1"].wait(HTTP_TIMEOUT_S))
        self.assertEqual(self.get(port, "/healthz"), (200, "text/plain; charset=utf-8", b"ok\n"))
        self.assertEqual(self.get(port, "/healthz", method="HEAD"), (200, "text/plain; charset=utf-8", b""))
        self.assertFalse(page.done())  # the page is still being built
        build.gates["/series", "load1"].set()
        status, headers, body = page.result(HTTP_TIMEOUT_S)
        self.assertEqual((status, headers["Age"], body),
                         (200, "0", mm.serve_path("/series", "", self.db, mm.DEFAULT_WINDOW_HOURS, lambda: NOW,
                                                  None, "load1")[2]))
        self.assertEqual(build.builds, {("/series", "load1"): 1})  # /healthz is never built nor kept

    def test_two_pages_are_built_at_the_same_time(self):
        port, build, _ = self.start_gated(("/series", "load1"), ("/api/series", "load5"), ("/metrics", ""))
        asked = [self.pool.submit(self.get_full, port, path)
                 for path in ("/series?key=load1", "/api/series?key=load5", "/metrics")]
        for key in build.started:  # each begins while the others are held
            with self.subTest(key=key):
                self.assertTrue(build.started[key].wait(HTTP_TIMEOUT_S))
        build.open_all()
        self.assertEqual([future.result(HTTP_TIMEOUT_S)[0] for future in asked], [200, 200, 200])
        self.assertEqual(build.builds, {("/series", "load1"): 1, ("/api/series", "load5"): 1, ("/metrics", ""): 1})

    def test_a_page_asked_by_ten_clients_at_once_is_built_once(self):
        port, build, answers = self.start_gated(("/series", "load1"), expected=10)
        asked = [self.pool.submit(self.get_full, port, "/series?key=load1") for _ in range(10)]
        self.assertTrue(build.started["/series", "load1"].wait(HTTP_TIMEOUT_S))
        self.assertTrue(answers.all_asked.wait(HTTP_TIMEOUT_S))  # all ten have asked while it is held
        self.clock.advance(3)
        build.gates["/series", "load1"].set()
        got = [future.result(HTTP_TIMEOUT_S) for future in asked]
        self.assertEqual(build.builds, {("/series", "load1"): 1})
        self.assertEqual({(status, body) for status, _, body in got},
                         {(200, mm.serve_path("/series", "", self.db, mm.DEFAULT_WINDOW_HOURS, lambda: NOW,
                                              None, "load1")[2])})
        self.assertEqual(sorted(headers["Age"] for _, headers, _ in got), ["0"] + ["3"] * 9)  # as old as its build


class AnswersCacheTest(unittest.TestCase):
    """The answers kept: at most so many entries and bytes, the oldest dropped first."""

    def setUp(self):
        self.clock = FakeClock()
        self.built = []
        self.answers = mm._Answers(5.0, self.clock.monotonic, self.build, max_entries=3, max_bytes=1000)

    def build(self, name, body):
        self.built.append(name)
        return 200, "text/plain", body

    def ask(self, name, body=b""):
        answer, _ = self.answers.get(("/series", name), name, body)
        return answer

    def kept(self):
        return [name for _, name in self.answers.keys()], self.answers.kept_bytes

    def test_the_oldest_go_first_past_the_entries_or_the_bytes(self):
        for name in "abcd":
            self.ask(name, b"x" * 100)
        self.assertEqual(self.kept(), (["b", "c", "d"], 300))  # a fourth entry: a, the oldest, went
        self.ask("e", b"x" * 700)
        self.assertEqual(self.kept(), (["c", "d", "e"], 900))
        self.ask("f", b"x" * 250)  # four entries and 1150 bytes: c for the count, then d for the bytes
        self.assertEqual(self.kept(), (["e", "f"], 950))
        self.ask("e")
        self.assertEqual((self.built, self.kept()), (list("abcdef"), (["e", "f"], 950)))  # kept, not rebuilt
        self.ask("a", b"x" * 100)
        self.assertEqual((self.built[-1], self.kept()), ("a", (["f", "a"], 350)))  # 1050 bytes: e went

    def test_a_gzip_form_counts_and_can_push_the_oldest_out(self):
        import gzip
        import random

        self.ask("e", b"x" * 700)
        packed = self.answers.gzipped(("/series", "e"), self.ask("e"))
        self.assertEqual((gzip.decompress(packed), self.kept()), (b"x" * 700, (["e"], 700 + len(packed))))
        noise = random.Random(7).randbytes(250)
        answer = self.ask("f", noise)
        self.assertEqual(self.kept(), (["e", "f"], 950 + len(packed)))
        packed_noise = self.answers.gzipped(("/series", "f"), answer)
        self.assertGreater(len(packed_noise), 250)  # noise does not pack: 1200 bytes and more, e goes
        self.assertEqual(self.kept(), (["f"], 250 + len(packed_noise)))
        self.assertIs(self.answers.gzipped(("/series", "f"), answer), packed_noise)  # packed once

    def test_an_answer_bigger_than_the_bytes_is_served_not_kept(self):
        self.ask("a", b"x" * 100)
        self.assertEqual(self.ask("huge", b"x" * 1001).body, b"x" * 1001)
        self.assertEqual(self.ask("huge", b"x" * 1001).body, b"x" * 1001)
        self.assertEqual((self.built, self.kept()), (["a", "huge", "huge"], (["a"], 100)))

    def test_stale_answers_are_dropped_when_another_is_kept(self):
        self.ask("a", b"x" * 100)
        self.clock.advance(4)
        self.ask("b", b"x" * 100)
        self.clock.advance(1)  # a is 5 s old: stale
        self.ask("c", b"x" * 100)
        self.assertEqual(self.kept(), (["b", "c"], 200))


class ServeCacheTest(ServeTestCase):
    """A client walking every series through the server."""

    def test_walking_many_series_keeps_the_last_ones_within_the_bounds(self):
        from urllib.parse import quote

        names = [f"walk_{i:03d}" for i in range(mm.SERVE_CACHE_MAX_ENTRIES + 10)]
        with mm.MetricsCollector(self.db, now=lambda: NOW - 60) as metrics:
            metrics.record_many([(name, float(i), {"disk": "d/1"}, NOW - 600) for i, name in enumerate(names)])
        answers = mm._Answers(5.0, FakeClock().monotonic)
        port = self.start(_answers=answers)
        keys = [mm.series_key(name, {"disk": "d/1"}) for name in names]
        for key in keys:
            self.assertEqual(self.get(port, f"/series?key={quote(key)}")[0], 200)
        last = keys[-mm.SERVE_CACHE_MAX_ENTRIES:]
        self.assertEqual(answers.keys(), [("/series", key) for key in last])
        self.assertEqual(answers.kept_bytes, sum(len(mm.serve_path("/series", "", self.db, mm.DEFAULT_WINDOW_HOURS,
                                                                   lambda: NOW, None, key)[2]) for key in last))


class PushTest(StoreTestCase):
    """push against a fake Pushgateway that records what it receives."""

    def setUp(self):
        super().setUp()
        with mm.MetricsCollector(self.db) as metrics:
            metrics.record_sync_metric("icloud", True, 2.0)

    def test_put_post_and_delete_by_job_and_instance(self):
        with HTTPServer(default=Reply(200, "")) as gateway:
            for args in ((), ("--method", "post"), ("--delete",)):
                code, out, err = self.run_main("--db", self.db, "push", "--gateway", gateway.url("/"), "--instance",
                                               "nas", *args)
                self.assertEqual((code, out, err), (0, "", ""))
        put, post, delete = gateway.requests
        self.assertEqual([(r.method, r.path) for r in gateway.requests],
                         [(method, "/metrics/job/metasystem/instance/nas") for method in ("PUT", "POST", "DELETE")])
        self.assertEqual(put.headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8")
        with mm.MetricsCollector(self.db, readonly=True) as collector:
            self.assertEqual(put.body.decode(), mm.export_text(collector))
        self.assertEqual((post.body, delete.body), (put.body, b""))

    def test_grouping_values_with_a_slash_or_empty_go_as_base64(self):
        self.assertEqual(mm.push_url("http://gw:9091/", "backup/nightly", ""),
                         "http://gw:9091/metrics/job@base64/YmFja3VwL25pZ2h0bHk=/instance@base64/=")
        self.assertEqual(mm.push_url("http://gw:9091", "a b", "host-1"),
                         "http://gw:9091/metrics/job/a%20b/instance/host-1")

    def test_a_failed_push_is_one_line_masked_and_changes_nothing(self):
        before = file_bytes(self.db)
        with HTTPServer(default=Reply(400, "pushed metrics are invalid or inconsistent")) as gateway:
            url = gateway.url("/").replace("http://", "http://user:hunter2@")
            self.assertMainError(1, "HTTP 400: pushed metrics are invalid", "--db", self.db, "push", "--gateway", url)
            code, out, err = self.run_main("--db", self.db, "push", "--gateway", url)
        self.assertEqual(gateway.requests[0].headers["Authorization"], "Basic dXNlcjpodW50ZXIy")
        self.assertNotIn("hunter2", err)
        self.assertEqual(file_bytes(self.db), before)
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed = unused.getsockname()[1]
        self.assertMainError(1, "push to http://127.0.0.1", "push", "--gateway", f"http://127.0.0.1:{closed}")
