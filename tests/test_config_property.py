"""The monitor's one promise, as a property over generated configurations: whatever the file says, a failing
check (and a failing job) reaches a person, or the run says why on stderr and exits non-zero.

Each configuration is seeded and built from every section and key the registries know: valid values,
typos, wrong units, missing secrets, disabled channels, fallback, escalation and depends_on graphs with
cycles, maintenance windows at the edges of time, lines that are not KEY = VALUE. Each has one check that
fails (``failing``) and one webhook channel on a local server that would take its alert. After a ``check``
run and a ``run`` of a failing job, for every one:

- a channel that is not a log received the alert (its text names it), or the process wrote to stderr and
  exited non-zero;
- no traceback and no "unexpected" error (the mark of a bug);
- within the run's deadline: the checks' timeouts and ``[alerting] run_budget``, and a little more.

What a person chose to hold back is not generated for the failing check and job (a maintenance window that
holds now, quiet hours that cover now, a dependency on a check that is down): the windows that match them
are all in the past or the future, so a window that holds when it should not is caught too. Nothing here
sleeps: a real sleep (a retry's backoff) fails the test, so the generated services answer at once.
"""

import contextlib
import io
import os
import random
import sys
import time

import metasystem_monitor as mm

from .servers import HTTPServer, Reply, SMTPServer
from .support import StoreTestCase, forbid_real_sleep

SEED = 20261208
CONFIGURATIONS = 500
T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC: the runs' fixed clock
DEADLINE_SLACK_S = 10.0  # what a loaded machine may add to a run's own bound
DURATIONS = ("1s", "2s", "90s", "5m", "1h", "2d", "5 min", "soon", "-1s", "\u00b2", "1e400", "", "nan", "0")
BOOLEANS = ("true", "false", "yes", "no", "0", "1", "maybe", "\u00b2", "")
COUNTS = ("1", "2", "1 within 3", "\u00b2", "0", "-1", "3 within 2", "x")
SEVERITIES = ("info", "warning", "critical", "critcal", "", "none")
THRESHOLDS = ("10", "10:", "~:10", "@1:2", "5GB:", "10%", "90%:", "20:10", "5 min", "\u00b2", "1h", "")
TEMPLATES = ("$title on $host", "$severity: $title ($key)", "$nope", "cost $", "$$title")
TIMEZONES = ("UTC", "Europe/Berlin", "Asia/Tokyo", "America/New_York", "Pacific/Kiritimati", "Mars/Base", "")
PAST_OR_FUTURE = (("2000-01-01", "2000-01-02"), ("0001-01-01", "0001-01-02"), ("9999-12-30", "9999-12-31 23:59"),
                  ("2026-12-31 23:00", "2027-01-15 07:00"), ("2027-01-16", "2027-02-01"))
ANY_DATES = PAST_OR_FUTURE + (("0001-01-01", "9999-12-31 23:59"), ("2027-01-15", "2027-01-16"), ("soon", "later"))
OTHER_CHECKS = ("disk", "inodes", "load", "memory", "database", "circuit_breaker", "file_age", "http", "tcp",
                "process", "metric", "anomaly", "sync_recency", "job", "systemd_unit", "tls_cert", "command")

setUpModule, tearDownModule = forbid_real_sleep()


class Services:
    """The local services a configuration's channels, pings and checks point at."""

    def __init__(self, case):
        self.reach = HTTPServer()  # 200 "ok": what a working webhook (and Slack) answers
        self.refuse = HTTPServer(default=Reply(400, "no"))  # permanent: never retried, never a backoff
        self.smtp = SMTPServer()
        for server in (self.reach, self.refuse, self.smtp):
            server.__enter__()
            case.addCleanup(server.__exit__)


class Generator:
    """One configuration from a seed: the INI text, and what its failing check and job are called."""

    def __init__(self, seed, services, folder):
        self.rng = random.Random(seed)
        self.seed = seed
        self.services = services
        self.folder = folder
        self.sections = []
        self.channels = ["reach"]
        self.checks = ["failing"]

    def pick(self, values, valid_share=0.8):
        """A value: usually the first half's (valid), sometimes any (a typo, a wrong unit)."""
        if self.rng.random() < valid_share:
            return self.rng.choice(values[:max(1, len(values) // 2)])
        return self.rng.choice(values)

    def url(self, good=True):
        server = self.services.reach if good else self.services.refuse
        return server.url(f"/c{self.seed}/{self.rng.randrange(1000)}")

    def section(self, name, items):
        self.sections.append((name, [(key, value) for key, value in items if value is not None]))

    def maybe(self, share=0.5):
        return self.rng.random() < share

    def build(self):
        rng = self.rng
        self.alerting()
        self.reachable()
        for number in range(rng.randint(0, 4)):
            self.channel(f"ch{number}")
        self.failing_check()
        for number in range(rng.randint(0, 4)):
            self.check(f"other{number}")
        self.graphs()
        for number in range(rng.randint(0, 3)):
            self.maintenance(f"window{number}")
        self.others()
        return self.text()

    def alerting(self):
        keys = {"timeout": DURATIONS, "channel_budget": DURATIONS, "run_budget": DURATIONS,
                "dedup_window": DURATIONS, "repeat_interval_critical": DURATIONS + ("never",),
                "repeat_interval_warning": DURATIONS, "fire_after": ("1", "1 within 3", "\u00b2", "x", "0"),
                "resolve_after": COUNTS, "max_messages_per_run": COUNTS, "tiemout": DURATIONS}
        items = [(key, self.pick(values)) for key, values in keys.items() if self.maybe(0.3)]
        if self.maybe(0.2):
            items.append(("webhook_url", self.url(self.maybe())))
        self.section("alerting", items)

    def reachable(self):
        items = [("type", "webhook"), ("url", self.url())]
        if self.maybe(0.3):
            items.append(("min_severity", self.pick(SEVERITIES)))
        if self.maybe(0.2):
            items.append(("enabled", self.pick(BOOLEANS)))
        if self.maybe(0.2):
            items.append(("quiet_hours", self.rng.choice(("22:00-07:30", "09:00-10:00", "25:00-26:00", "x"))))
        if self.maybe(0.2):
            items.append(("title_template", self.rng.choice(TEMPLATES)))
        if self.maybe(0.1):
            items.append(("secret", self.rng.choice(("s3cret", "whsec_abc", "whsec_c2VjcmV0"))))
        self.section("channel:reach", items)

    def channel(self, name):
        rng = self.rng
        kind = rng.choice(sorted(mm.CHANNEL_TYPES) + ["victorops", ""])
        self.channels.append(name)
        items = [("type", kind)]
        cls = mm.CHANNEL_TYPES.get(kind)
        if kind == "email":
            items += [("to", rng.choice(("ops@example.com", "-oQ/tmp", ""))), ("smtp_host", "127.0.0.1"),
                      ("smtp_port", str(self.services.smtp.port)), ("security", self.pick(("none", "starttls", "tls")))]
        elif kind == "log":
            items.append(("address", "none"))
        elif cls is not None:
            for key in cls.secrets:
                how = rng.choice(("", "_env", "_file", "", "skip"))
                if how == "skip":
                    continue
                value = self.url(self.maybe(0.3)) if key in ("url",) else f"value-{self.seed}"
                if how == "_env":
                    value = rng.choice(("MM_PROPERTY_UNSET", "PATH"))
                elif how == "_file":
                    value = os.path.join(self.folder, rng.choice(("missing", "secret")))
                items.append((key + how, value))
            for key in cls.keys:
                if self.maybe(0.3):
                    items.append((key, self.url(False) if key in ("api_url", "homeserver", "url") else
                                  rng.choice(("1", "!room:example.org", "x", "false", "-100123"))))
        if self.maybe(0.3):
            items.append(("enabled", self.pick(BOOLEANS)))
        if self.maybe(0.2):
            items.append(("min_severity", self.pick(SEVERITIES)))
        if self.maybe(0.1):
            items.append(("colour", "red"))  # a key no channel takes
        self.section(f"channel:{name}", items)

    def failing_check(self):
        missing = os.path.join(self.folder, "never-there")
        kind = self.rng.choice(("file_age", "file_age", "command"))
        items = [("type", kind)]
        if kind == "file_age":
            items.append(("path", missing))
        else:
            items.append(("command", "false"))
        if self.maybe(0.2):
            items.append(("timeout", self.pick(DURATIONS)))
        if self.maybe(0.15):
            items.append(("warnig", "10"))  # a typo: the check is then UNKNOWN, and still heard
        self.section("check:failing", items)

    def check(self, name):
        rng = self.rng
        kind = rng.choice(OTHER_CHECKS + ("nope",))
        self.checks.append(name)
        check = mm.CHECK_TYPES.get(kind)
        items = [("type", kind)]
        values = {"path": self.folder, "url": self.url(self.maybe()), "address": f"127.0.0.1:{self.services.refuse.port}",
                  "metric": rng.choice(("host_load1", "x{a=b}")), "target": "nas", "job": "nightly",
                  "command": rng.choice(("true", "false", "no-such-program-here", "'unbalanced")),
                  "name": "no-such-process", "unit": "nothing.service", "send": "PING\\r\\n", "expect": "PONG"}
        for key in (check.required if check else ()):
            items.append((key, values.get(key, "1")))
        for key in (check.keys if check else ()):
            if key not in check.required and self.maybe(0.15):
                items.append((key, values.get(key, self.pick(BOOLEANS + DURATIONS))))
        for key in ("warning", "critical"):
            if self.maybe(0.3):
                items.append((key, self.pick(THRESHOLDS)))
        items.append(("timeout", self.rng.choice(("1s", "2s"))))
        self.section(f"check:{name}", items)

    def graphs(self):
        """fallback and escalate_to among the channels, depends_on among the checks: chains, cycles,
        self-references and names that do not exist. The failing check depends only within a cycle or on
        nothing real: a dependency on a check that is down would hold its alert back on purpose."""
        rng = self.rng
        for name, items in self.sections:
            if name.startswith("channel:"):
                if self.maybe(0.25):
                    items.append(("fallback", rng.choice(self.channels + ["nowhere"])))
                if self.maybe(0.2):
                    items += [("escalate_after", self.pick(DURATIONS)), ("escalate_to",
                                                                          rng.choice(self.channels + ["nowhere"]))]
            elif name.startswith("check:") and name != "check:failing" and self.maybe(0.3):
                items.append(("depends_on", rng.choice(self.checks + ["nothere"])))
        if self.maybe(0.3):
            failing = dict(self.sections)["check:failing"]
            if len(self.checks) > 1 and self.maybe():
                other = rng.choice(self.checks[1:])
                failing.append(("depends_on", other))
                own = dict(self.sections)[f"check:{other}"]
                own[:] = [(key, value) for key, value in own if key != "depends_on"] + [("depends_on", "failing")]
            else:
                failing.append(("depends_on", rng.choice(("failing", "nothere"))))

    def maintenance(self, name):
        rng = self.rng
        holds_now = self.maybe()
        match = rng.choice(self.checks[1:] + ["nothing-at-all"]) if holds_now else rng.choice(("failing", "job", "always"))
        items = [("match", match)]
        starts, ends = rng.choice(ANY_DATES if holds_now else PAST_OR_FUTURE)
        if holds_now and self.maybe():
            items.append(("daily", rng.choice(("01:00-03:00", "00:00-24:00", "25:00-26:00", "07:00-09:00"))))
        else:
            items += [("from", starts), ("until", ends)]
        if self.maybe(0.6):
            items.append(("timezone", rng.choice(TIMEZONES)))
        self.section(f"maintenance:{name}", items)

    def others(self):
        rng = self.rng
        if self.maybe(0.4):
            self.section("check", [("ping_url", self.url(self.maybe(0.7))), ("interval", self.pick(DURATIONS))])
        if self.maybe(0.3):
            self.section("storage", [(key, self.pick(values)) for key, values in (
                ("retention_days", ("30", "7d", "a week", "-1")), ("synchronous", ("normal", "full", "sometimes")),
                ("busy_timeout", DURATIONS)) if self.maybe()])
        if self.maybe(0.2):
            self.section(f"job:job-{self.seed}", [("ping_url", self.url(self.maybe(0.7)))])
        if self.maybe(0.15):
            self.section(rng.choice(("serve", "collect", "dashboard", "bogus")),
                         [(rng.choice(("listen", "cpu", "metrics", "x")), rng.choice(("127.0.0.1:1", "maybe", "*")))])

    def text(self):
        rng = self.rng
        lines = []
        if self.maybe(0.05):
            lines.append("stray = line before any section")
        for name, items in self.sections:
            lines.append(f"[{name}]")
            lines += [f"{key} = {value}" for key, value in items]
            if self.maybe(0.03):
                lines.append("this line has no equals sign")
            if self.maybe(0.03) and items:
                lines.append(f"{items[0][0].upper()} = {items[0][1]}")  # a key given twice, in another case
            lines.append("")
        if self.maybe(0.03):
            lines += [f"[{self.sections[0][0]}]", ""]  # a section given twice
        return "\n".join(lines)


class ConfigurationPropertyTest(StoreTestCase):
    """Never both silent, never a traceback, never past the deadline: on CONFIGURATIONS generated files."""

    def setUp(self):
        super().setUp()
        self.services = Services(self)
        saved = os.environ.get("METASYSTEM_NOW")
        os.environ["METASYSTEM_NOW"] = repr(T0)
        self.addCleanup(lambda: os.environ.pop("METASYSTEM_NOW") if saved is None else
                        os.environ.__setitem__("METASYSTEM_NOW", saved))

    def main(self, argv):
        out, err = io.StringIO(), io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = mm.main(argv)
        return code, out.getvalue(), err.getvalue(), time.monotonic() - started

    def heard(self, seed, name, mails_before):
        """Whether a channel that is not a log got an alert that names ``name`` in this configuration."""
        bodies = [request.body.decode("utf-8", "replace") for request in self.services.reach.requests
                  if request.path.startswith(f"/c{seed}/")]
        bodies += [mail.data.decode("utf-8", "replace") for mail in self.services.smtp.mails[mails_before:]]
        return any(name in body for body in bodies)

    def test_a_failing_check_and_job_are_heard_whatever_the_configuration(self):
        checked = runs = heard = 0
        for number in range(CONFIGURATIONS):
            seed = SEED + number
            folder = os.path.join(self.tmp, f"c{number}")
            os.mkdir(folder)
            with open(os.path.join(folder, "secret"), "w", encoding="utf-8") as handle:
                handle.write(self.services.refuse.url(f"/c{seed}/secret") + "\n")
            os.chmod(os.path.join(folder, "secret"), 0o600)
            text = Generator(seed, self.services, folder).build()
            config = os.path.join(folder, "alerting-config.ini")
            with open(config, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(config, 0o600)
            base = ["--config", config, "--db", os.path.join(folder, "metrics.db")]
            for argv, name in ((base + ["check"], "failing"),
                               (base + ["run", f"job-{seed}", "--", "false"], f"job job-{seed}")):
                mails_before = len(self.services.smtp.mails)
                code, out, err, took = self.main(argv)
                said = f"seed {seed} ({argv[4]}), configuration:\n{text}\nexit {code}\nstdout:\n{out[:2000]}\n" \
                       f"stderr:\n{err[:3000]}"
                self.assertNotIn("Traceback", err, said)
                self.assertNotIn("unexpected", err, said)
                if self.heard(seed, name, mails_before):
                    heard += 1
                else:
                    self.assertNotEqual(code, 0, said)
                    self.assertTrue(err.strip(), said)
                self.assertLess(took, self.deadline(text) + DEADLINE_SLACK_S, said)
                runs += 1
            checked += 1
        self.assertEqual((checked, runs), (CONFIGURATIONS, 2 * CONFIGURATIONS))
        print(f"\nconfiguration property: {checked} configurations (seeds {SEED}-{SEED + CONFIGURATIONS - 1}), {runs} "
              f"runs, {heard} heard on a channel, {runs - heard} said on stderr with a non-zero exit", file=sys.stderr)

    @staticmethod
    def deadline(text):
        """The run's own bound: the longest check timeout it may have, and the run's sending budget (the
        default when the file's value cannot be read)."""
        budgets = [mm.DEFAULT_RUN_BUDGET_S] + [mm.parse_duration_s(line.split("=", 1)[1]) for line in text.splitlines()
                                               if line.startswith("run_budget = ") and _is_duration(line.split("=", 1)[1])]
        return 10.0 + max(budgets)


def _is_duration(text):
    try:
        mm.parse_duration_s(text)
    except mm.ValidationError:
        return False
    return True
