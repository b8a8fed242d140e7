"""Shell habits: completion scripts and the reference (help TOPIC), generated from the tables the code
reads, so they cannot drift from it; the bash script runs in a real bash."""

import os
import re
import shutil
import subprocess

import metasystem_monitor as mm

from .support import SUBPROCESS_TIMEOUT_S, StoreTestCase

PROG = "metasystem_monitor.py"


class Reference(StoreTestCase):
    def run_ok(self, *args):
        result = self.run_cli(*args)
        self.assertEqual((result.returncode, result.stderr), (0, b""), result.stderr)
        return result.stdout.decode()

    def test_help_exit_codes_is_the_table_the_usage_shows(self):
        listed = self.run_ok("help", "exit-codes").splitlines()
        self.assertEqual(listed[0], "EXIT CODES")
        self.assertEqual(listed[1:4], ["  0      success (recording commands print nothing)",
                                       "  1      runtime error, one line on stderr (-v adds the traceback); a bad "
                                       "configuration",
                                       "  2      usage error: a bad option, argument or input value"])
        self.assertEqual(len(listed), 1 + len(mm.EXIT_CODE_TABLE))
        usage = " ".join(self.run_ok("--help").split())
        for code, meaning in mm.EXIT_CODE_TABLE:
            self.assertIn(f"{code} {meaning}", usage)

    def test_help_checks_lists_every_check_type_from_the_registry(self):
        text = self.run_ok("help", "checks")
        self.assertEqual(re.findall(r"^  (\w+): ", text, re.MULTILINE), sorted(mm.CHECK_TYPES))
        self.assertIn(
            "  disk: Free space of the filesystem holding path (default: the store), in bytes and percent.\n"
            "      keys: path\n"
            "      compares: bytes, percent, plain numbers; default warning 10GB:,10%:, critical 5GB:,5%:; runs\n"
            "      without the store\n"
            "  file_age: Monit's timestamp check: how long ago path was modified; a missing file is CRITICAL.\n"
            "      keys: path (required)\n", text)

    def test_help_config_names_every_key_the_configuration_takes(self):
        text = self.run_ok("help", "config")
        keys = set(mm.STORAGE_KEYS) | set(mm.ALERTING_KEYS) | set(mm.SEED_CHANNEL_KEYS) | set(mm.SERVE_KEYS)
        keys |= set(mm.CHANNEL_COMMON_KEYS) | set(mm.CHECK_COMMON_KEYS)
        for channel in mm.CHANNEL_TYPES.values():
            keys |= set(channel.keys) | {f"{key}_{suffix}" for key in channel.secrets for suffix in ("env", "file")}
        self.assertEqual({key for key in keys if not re.search(rf"\b{key}\b", text)}, set())
        self.assertIn("    telegram: ", text)
        self.assertIn("token / token_env / token_file (required)", text)

    def test_help_alone_lists_the_commands_and_a_wrong_topic_is_a_usage_error(self):
        self.assertIn("completion", self.run_ok("help"))
        wrong = self.run_cli("help", "confg")
        self.assertEqual((wrong.returncode, wrong.stdout), (2, b""))
        self.assertIn("did you mean 'config'?", wrong.stderr.decode())


class Completion(StoreTestCase):
    def script(self, shell):
        result = self.run_cli("completion", shell, env=self.child_env(METASYSTEM_DB=self.db))
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        return result.stdout.decode()

    def complete(self, script, *words):
        """What bash offers for the last of ``words`` (the command line so far), with the script loaded."""
        path = os.path.join(self.tmp, "completion.bash")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(script)
        program = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMPREPLY=(); '
                   '_metasystem_monitor; printf "%s\\n" "${COMPREPLY[@]}"')
        result = subprocess.run(["bash", "--norc", "--noprofile", "-c", program, "bash", path, PROG, *words],
                                capture_output=True, cwd=self.tmp, timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        return result.stdout.decode().split()

    def test_bash_completes_commands_options_and_values_in_a_real_bash(self):
        script = self.script("bash")
        self.assertEqual(self.complete(script, "rec"), ["record", "record-sync", "record-agent"])
        self.assertEqual(self.complete(script, "--db", "x.db", "st"), ["stats"])
        self.assertEqual(self.complete(script, "stats", "--p"), ["--percentiles"])
        self.assertEqual(self.complete(script, "anomalies", "--method", ""), ["robust", "zscore"])
        self.assertEqual(self.complete(script, "push", "--method", ""), ["put", "post"])
        self.assertEqual(self.complete(script, "export", "--format", "open"), ["openmetrics"])
        self.assertEqual(self.complete(script, "help", "e"), ["exit-codes"])
        self.assertEqual(self.complete(script, "completion", "z"), ["zsh"])
        self.assertEqual(self.complete(script, "stats", "--hours", ""), [])
        self.assertEqual(self.complete(script, "check", "--only", ""), ["disk", "database", "circuit_breaker"])
        os.mkdir(os.path.join(self.tmp, "stores"))
        self.assertEqual(self.complete(script, "--db", "sto"), ["stores"])

    def test_check_and_channel_names_come_from_the_configuration(self):
        config = os.path.join(self.tmp, "home", "alerting-config.ini")
        os.makedirs(os.path.dirname(config), exist_ok=True)
        with open(config, "w", encoding="utf-8") as handle:
            handle.write("[channel:ops]\ntype = log\n\n[check:nas]\ntype = disk\npath = /\n")
        script = self.script("bash")
        self.assertEqual(self.complete(script, "check", "--only", ""), ["nas"])
        self.assertEqual(self.complete(script, "alert-test", "--channel", ""), ["log", "ops"])

    def test_zsh_loads_the_same_function_through_bashcompinit(self):
        bash, zsh = self.script("bash").splitlines(), self.script("zsh").splitlines()
        self.assertEqual(zsh[:2], [f"# zsh completion for {PROG}, made by '{PROG} completion zsh'",
                                   "autoload -U +X bashcompinit && bashcompinit"])
        self.assertEqual(zsh[2:], bash[1:])

    def test_fish_lines_for_commands_options_and_values(self):
        lines = self.script("fish").splitlines()
        for line in (f"complete -c {PROG} -n '__fish_use_subcommand' -a record",
                     f"complete -c {PROG} -n '__fish_seen_subcommand_from anomalies' -l method -x -a 'robust zscore'",
                     f"complete -c {PROG} -n '__fish_seen_subcommand_from stats' -l db -r -F",
                     f"complete -c {PROG} -n '__fish_seen_subcommand_from stats' -l hours -x",
                     f"complete -c {PROG} -n '__fish_seen_subcommand_from stats' -l json",
                     "complete -c metasystem-monitor -n '__fish_use_subcommand' -a stats"):
            with self.subTest(line=line):
                self.assertIn(line, lines)


# Names that a shell would run if it expanded them: each would make a file in the test's folder.
HOSTILE = ("$(touch${IFS}made-by-dollar)", "`touch${IFS}made-by-backquote`", "(touch made-by-fish)",
           "$(touch made-by-space)", "*", "{a,b}", "it's", "back\\slash", "=ls", "~root")
MADE = ("made-by-dollar", "made-by-backquote", "made-by-fish", "made-by-space")


class CompletionRunsNothing(StoreTestCase):
    """Completion offers configured names; the shells must take each one as it is, never as code."""

    def write(self, name, text):
        path = os.path.join(self.tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def offered(self, shell, script, line):
        """What ``shell`` really offers after ``line`` (the command line so far), one word a line, with the
        script loaded: bash calls the function, zsh through bashcompinit's compgen, fish its complete -C."""
        program = shutil.which(shell)
        if program is None:
            self.skipTest(f"{shell} is not installed")
        path = self.write(f"completion.{shell}", script)
        words = line.split(" ")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.tmp, "XDG_CONFIG_HOME": self.tmp,
               "XDG_DATA_HOME": self.tmp, "XDG_CACHE_HOME": self.tmp, "TMPDIR": self.tmp}
        if shell == "fish":
            argv = [program, "--no-config", "-c", "source $argv[1]; complete -C $argv[2]", path, line]
        elif shell == "zsh":
            argv = [program, "-f", "-c", 'autoload -U compinit && compinit -D -u && source "$1" && shift && '
                    'COMP_WORDS=("$@") && COMP_CWORD=$(( $# - 1 )) && compgen -F _metasystem_monitor -- "${@[-1]}"',
                    "zsh", path, *words]
        else:
            argv = [program, "--norc", "--noprofile", "-c", 'source "$1"; shift; COMP_WORDS=("$@"); '
                    'COMP_CWORD=$(( $# - 1 )); _metasystem_monitor; printf "%s\\n" "${COMPREPLY[@]}"', "bash", path,
                    *words]
        result = subprocess.run(argv, capture_output=True, cwd=self.tmp, env=env, timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertEqual([name for name in MADE if os.path.exists(os.path.join(self.tmp, name))], [])
        lines = [line for line in result.stdout.decode().split("\n") if line]
        return sorted(lines) if shell == "fish" else lines  # fish sorts what it offers its own way

    def test_names_from_a_hostile_configuration_are_left_out_and_run_nothing(self):
        hostile = "".join(f"[check:{name}]\ntype = disk\n\n[channel:{name}]\ntype = log\n\n" for name in HOSTILE)
        self.write("home/alerting-config.ini", "[channel:ops]\ntype = log\n\n[check:nas]\ntype = disk\n\n" + hostile)
        for shell in ("bash", "zsh", "fish"):
            result = self.run_cli("completion", shell, env=self.child_env(METASYSTEM_DB=self.db))
            self.assertEqual((result.returncode, result.stderr), (0, b""))
            script = result.stdout.decode()
            for line, expected in (("metasystem_monitor.py check --only ", ["nas"]),
                                   ("metasystem_monitor.py alert-test --channel ", ["log", "ops"])):
                with self.subTest(shell=shell, line=line):
                    self.assertEqual(self.offered(shell, script, line), expected)

    def test_every_word_reaches_the_shell_as_it_is_written(self):
        """Were a name ever to reach the script, the shells offer it literally and run nothing."""
        names = {"--only": [*HOSTILE, "nas"], "--channel": ["log"]}
        for shell in ("bash", "zsh", "fish"):
            script = mm.completion_script(shell, mm.build_parser(), names)
            with self.subTest(shell=shell):
                offered = self.offered(shell, script, "metasystem_monitor.py check --only ")
                self.assertEqual(offered, sorted(names["--only"]) if shell == "fish" else names["--only"])
            if shell != "fish":  # fish would complete inside the "$(" it reads on the line
                with self.subTest(shell=shell, prefix="$("):
                    self.assertEqual(self.offered(shell, script, "metasystem_monitor.py check --only $("),
                                     ["$(touch${IFS}made-by-dollar)", "$(touch made-by-space)"])

    def test_fish_quotes_the_words_it_evaluates(self):
        script = mm.completion_script("fish", mm.build_parser(), {"--only": ["it's", "a\\b", "(x)", "ok"]})
        self.assertEqual([line for line in script.splitlines() if " -l only " in line], [
            f"complete -c {program} -n '__fish_seen_subcommand_from check' -l only -x -a "
            "'\\'it\\\\\\'s\\' \\'a\\\\\\\\b\\' \\'(x)\\' ok'" for program in (PROG, "metasystem-monitor")])


class NamesAShellCouldRun(StoreTestCase):
    """A check, job or maintenance name is what a channel name is: letters, digits, '-', '_' and '.'."""

    def test_config_check_names_each_section_whose_name_is_refused(self):
        config = os.path.join(self.tmp, "alerting-config.ini")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write("[check:$(touch${IFS}x)]\ntype = disk\n\n[check:a b]\ntype = disk\n\n[check:]\ntype = disk\n\n"
                         "[check:ok.name-1_x]\ntype = job\njob = `id`\n\n[job:nightly;id]\n\n[job:good]\n\n"
                         "[maintenance:*]\nmatch = x\ndaily = 01:00-02:00\n\n[channel:$(id)]\ntype = log\n")
        code, out, err = self.run_main("config", "--check", "--config", config)
        rule = "name takes letters, digits, '-', '_' and '.'"
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [f"{config}: {line}" for line in (
            f"[channel:$(id)] a channel {rule}",
            f"[maintenance:*] a maintenance {rule}",
            f"[check:$(touch${{IFS}}x)] a check {rule}",
            f"[check:a b] a check {rule}",
            f"[check:] a check {rule}",
            f"[check:ok.name-1_x] job: a job {rule}",
            f"[job:nightly;id] a job {rule}")])

    def test_run_refuses_such_a_job_name_before_it_starts_anything(self):
        for name in ("$(touch${IFS}x)", "a b", "nightly;id", "x/../y", ""):
            with self.subTest(name=name):
                result = self.run_cli("--db", self.db, "run", name, "--", "touch", "ran")
                why = "job name is empty" if not name else f"a job name takes letters, digits, '-', '_' and '.', " \
                                                           f"got {name!r}"
                self.assertOneLineError(result, 2, f"{PROG} run: error: argument NAME: {why} (see --help)")
                self.assertEqual(sorted(os.listdir(self.tmp)), [])
