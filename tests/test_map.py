"""The module's map: its docstring names the banners, references point up the file, and the channel and
check registries are the only lists of their plug-ins."""

import ast
import os
import re
import unittest

import metasystem_monitor as mm

from .servers import HTTPServer
from .support import REPO, AlertTestCase
from .test_alert_cli import undocumented

MODULE = os.path.join(REPO, "metasystem_monitor.py")
EXAMPLE = os.path.join(REPO, "alerting-config.example.ini")

# The only places where a definition uses one that stands below it, and why.
REFERENCES_DOWN = {
    ("MetricsCollector", "system_summary"): "get_system_summary() is the original design's method; the summary "
                                            "is built in its own section from the collector's public queries",
    ("cmd_demo", "write_demo"): "the demo's made-up history stands last, apart from the code people read",
    ("cmd_help", "build_parser"): "help lists the commands of the parser whose table holds help itself",
    ("cmd_completion", "build_parser"): "completion reads the parser whose table holds completion itself",
}


def module_source() -> str:
    with open(MODULE, encoding="utf-8") as handle:
        return handle.read()


def defined_names(node: ast.stmt):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [name.id for target in node.targets for name in ast.walk(target) if isinstance(name, ast.Name)]
    if isinstance(node, ast.AnnAssign):
        return [node.target.id]
    return []


def used_names(node: ast.AST):
    """The names a definition reads when it runs; annotations are left out (they are never evaluated)."""
    annotations = set()
    for child in ast.walk(node):
        if isinstance(child, ast.arg) and child.annotation is not None:
            annotations.add(id(child.annotation))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and child.returns is not None:
            annotations.add(id(child.returns))
        elif isinstance(child, ast.AnnAssign):
            annotations.add(id(child.annotation))
    skipped = {id(inner) for top in ast.walk(node) if id(top) in annotations for inner in ast.walk(top)}
    return {child.id for child in ast.walk(node)
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load) and id(child) not in skipped}


def references_down(source: str):
    """(user, used) for each top-level definition that uses one defined further down."""
    body = ast.parse(source).body
    position = {}
    for index, node in enumerate(body):
        for name in defined_names(node):
            position.setdefault(name, index)
    found = set()
    for index, node in enumerate(body):
        own = defined_names(node)
        for name in used_names(node):
            if position.get(name, -1) > index and name not in own:
                found.add(((own or [type(node).__name__])[0], name))
    return found


class ModuleMapTest(unittest.TestCase):
    def test_the_docstring_map_names_every_banner_in_order(self):
        source = module_source()
        banners = re.findall(r"^## (.+?) #+$", source, re.MULTILINE)
        listed = re.findall(r"^    ([A-Z][A-Za-z]*(?: [a-z]+)*)  +\S", mm.__doc__.split("From cron:")[0], re.MULTILINE)
        self.assertEqual(listed, banners)
        self.assertEqual(banners, ["Constants", "Errors", "Configuration and units", "Storage", "Anomalies",
                                   "Metrics", "Retry and breakers", "Alerting", "Health checks", "Jobs", "Summary",
                                   "Export and serve", "CLI", "Demo"])

    def test_alerting_reads_model_channels_settings_then_the_system(self):
        source = module_source()
        alerting = source[source.index("## Alerting #"):source.index("## Health checks #")]
        self.assertEqual(re.findall(r"^# -- (.+?) -+$", alerting, re.MULTILINE),
                         ["the model", "channels", "settings", "the alerting system"])

    def test_references_point_up_the_file_but_for_the_listed_exceptions(self):
        self.assertEqual(references_down(module_source()), set(REFERENCES_DOWN))

    def test_the_reference_check_sees_a_use_down_the_file_and_ignores_annotations(self):
        source = ("def user(x: Later) -> Later:\n    return helper(x)\n\n"
                  "def helper(x):\n    return x\n\nclass Later:\n    pass\n")
        self.assertEqual(references_down(source), {("user", "helper")})

    def test_what_the_map_moved_out_of_the_collector_stays_out(self):
        source = module_source()
        collector = next(node for node in ast.parse(source).body
                         if isinstance(node, ast.ClassDef) and node.name == "MetricsCollector")
        methods = {node.name for node in collector.body if isinstance(node, ast.FunctionDef)}
        self.assertEqual(methods & {"_sync_summary", "_breaker_summary", "_agent_summary", "_runs"}, set())
        self.assertNotRegex(source, r"(collector|metrics)\._[a-z]")


class GoogleChatChannel(mm._HttpChannel):
    """What a newcomer adds for a new HTTP channel: one class."""

    kind = "googlechat"

    def payload(self, alert: mm.Alert) -> bytes:
        return mm.json_text({"text": alert.headline}, indent=None, compact=True).encode("utf-8")


def check_pong(spec: mm.CheckSpec, ctx: mm.CheckContext) -> mm.CheckResult:
    """What a newcomer adds for a new check type: one function..."""
    return mm.CheckResult(spec.name, "WARNING", f"pong {spec.settings['ball']}")


PONG = mm.CheckType(check_pong, keys=("ball",), required=("ball",), needs_store=False)  # ... and one entry


class RegistryIsTheOnlyListTest(AlertTestCase):
    def register_googlechat(self):
        self.assertNotIn("googlechat", mm.CHANNEL_TYPES)
        mm.register_channel(GoogleChatChannel)
        self.addCleanup(mm.CHANNEL_TYPES.pop, "googlechat")

    def register_pong(self):
        self.assertNotIn("pong", mm.CHECK_TYPES)
        mm.CHECK_TYPES["pong"] = PONG
        self.addCleanup(mm.CHECK_TYPES.pop, "pong")

    def test_a_channel_class_registered_in_a_test_is_configured_checked_shown_and_sent_to(self):
        self.register_googlechat()
        with HTTPServer() as chat:
            url = chat.url("/hooks/abc")
            config = self.write_config(f"[channel:chat]\ntype = googlechat\nurl = {url}\n")
            checked = self.run_main("--config", config, "config", "--check")
            shown = self.run_main("--config", config, "--db", self.db, "config")
            sent = self.run_main("--config", config, "--db", self.db, "alert-test", "--channel", "chat")
        self.assertEqual(checked, (0, "configuration OK: 2 channels (chat, log)\n", ""))
        self.assertEqual(shown[0], 0)
        self.assertIn(f"[channel:chat]\ntype = googlechat\nurl = {chat.url('')}/***  # from file\n", shown[1])
        self.assertEqual((sent[0], sent[1].splitlines()[0].split()[:2]), (0, ["chat:", "sent"]))
        [request] = chat.requests
        self.assertEqual((request.path, request.headers["Content-Type"]), ("/hooks/abc", "application/json"))
        self.assertRegex(request.body.decode(), r'^\{"text":"\[INFO\] Test alert from metasystem-monitor[^"]*"\}$')
        self.assertEqual(undocumented(EXAMPLE), (set(), {"googlechat"}))

    def test_a_registered_channel_type_is_validated_by_what_its_class_declares(self):
        self.register_googlechat()
        config = self.write_config("[channel:chat]\ntype = googlechat\nwebhook = x\n\n[channel:odd]\ntype = nope\n")
        code, out, err = self.run_main("--config", config, "config", "--check")
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [
            f"{config}: [channel:chat] webhook: unknown key for a googlechat channel",
            f"{config}: [channel:chat] url: required for a googlechat channel",
            f"{config}: [channel:odd] type: unknown channel type 'nope'; one of alertmanager, discord, email, "
            "googlechat, gotify, log, matrix, mattermost, ntfy, opsgenie, pagerduty, pushover, rocketchat, slack, "
            "teams, telegram, webhook",
        ])

    def test_a_check_type_registered_in_a_test_is_configured_checked_and_run(self):
        self.register_pong()
        config = self.write_config("[check:ping]\ntype = pong\nball = red\n")
        checked = self.run_main("--config", config, "config", "--check")
        ran = self.run_main("--config", config, "--db", self.db, "check", "--no-alert")
        self.assertEqual(checked, (0, "configuration OK: 1 channel (log)\n", ""))
        self.assertEqual(ran, (1, "METASYSTEM WARNING - ping WARNING: pong red\nWARNING ping: pong red\n", ""))
        self.assertEqual(undocumented(EXAMPLE), ({"ball"}, {"pong"}))

    def test_a_registered_check_type_is_validated_by_its_entry(self):
        self.register_pong()
        config = self.write_config("[check:ping]\ntype = pong\nbat = x\nwarning = 3\n\n[check:odd]\ntype = nope\n")
        code, out, err = self.run_main("--config", config, "config", "--check")
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [
            f"{config}: [check:ping] bat: unknown key for a pong check",
            f"{config}: [check:ping] warning: a pong check takes no thresholds",
            f"{config}: [check:ping] ball: required for a pong check",
            f"{config}: [check:odd] type: 'nope' is not one of anomaly, circuit_breaker, command, database, disk, "
            "file_age, http, inodes, job, load, memory, metric, pong, process, sync_recency, systemd_unit, tcp, tls_cert",
        ])


if __name__ == "__main__":
    unittest.main()
