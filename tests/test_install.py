"""make install, make uninstall and make man, run for real into folders of the sandbox (PREFIX and DESTDIR)."""

import os
import shutil
import subprocess
import sys

import metasystem_monitor as mm

from .support import REPO, SUBPROCESS_TIMEOUT_S, StoreTestCase

INSTALLED = ["bin/metasystem-monitor", "bin/monitoring-dashboard", "lib/metasystem-monitor/metasystem_monitor.py",
             "lib/metasystem-monitor/monitoring_dashboard.py",
             "share/bash-completion/completions/metasystem-monitor", "share/man/man1/metasystem-monitor.1"]


class MakeInstall(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.source = os.path.join(self.tmp, "src")  # a copy: make man writes build/ beside the Makefile
        os.mkdir(self.source)
        for name in ("Makefile", "metasystem_monitor.py", "monitoring_dashboard.py"):
            shutil.copy2(os.path.join(REPO, name), self.source)

    def make(self, *args, env=None):
        result = subprocess.run(["make", "-s", "-C", self.source, f"PYTHON={sys.executable}", *args],
                                capture_output=True, cwd=self.tmp, env=env, timeout=SUBPROCESS_TIMEOUT_S * 4)
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        return result

    def files_under(self, root):
        return sorted(os.path.relpath(os.path.join(folder, name), root)
                      for folder, _, names in os.walk(root) for name in names if "__pycache__" not in folder)

    def test_installed_launchers_use_the_bytecode_compiled_at_install_even_when_python_may_not_write_it(self):
        prefix = os.path.join(self.tmp, "prefix")
        self.make("install", f"PREFIX={prefix}")
        self.assertEqual(self.files_under(prefix), INSTALLED)
        launcher = os.path.join(prefix, "bin", "metasystem-monitor")
        with open(launcher, encoding="utf-8") as handle:
            self.assertEqual(handle.readline(), f"#!{sys.executable} -IS\n")
        cached = os.path.join(prefix, "lib", "metasystem-monitor", "__pycache__",
                              f"metasystem_monitor.{sys.implementation.cache_tag}.pyc")
        # As its #! line runs it, with -v added (-I ignores PYTHONVERBOSE): which file each import read.
        env = self.child_env(PYTHONDONTWRITEBYTECODE="1")
        recorded = subprocess.run([sys.executable, "-IS", "-v", launcher, "record", "x", "1.5"], capture_output=True,
                                  env=env, cwd=self.tmp, timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual(recorded.returncode, 0, recorded.stderr.decode()[-2000:])
        self.assertIn(f"code object from '{cached}'", recorded.stderr.decode())
        read = subprocess.run([launcher, "stats", "x", "--json"], capture_output=True, env=env, cwd=self.tmp,
                              timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((read.returncode, read.stderr, b'"latest": 1.5' in read.stdout), (0, b"", True))
        dashboard = subprocess.run([os.path.join(prefix, "bin", "monitoring-dashboard"), "--version"],
                                   capture_output=True, env=self.child_env(), cwd=self.tmp,
                                   timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual(dashboard.stdout.decode().split()[0], "monitoring_dashboard.py")
        self.make("uninstall", f"PREFIX={prefix}")
        self.assertEqual(self.files_under(prefix), [])
        self.assertFalse(os.path.exists(os.path.join(prefix, "lib", "metasystem-monitor")))

    def test_install_compiles_beside_the_module_whatever_pycache_prefix_the_caller_has(self):
        prefix, elsewhere = os.path.join(self.tmp, "prefix"), os.path.join(self.tmp, "pycache-prefix")
        self.make("install", f"PREFIX={prefix}", env=dict(os.environ, PYTHONPYCACHEPREFIX=elsewhere))
        library = os.path.join(prefix, "lib", "metasystem-monitor")
        tag = sys.implementation.cache_tag
        self.assertEqual(sorted(os.listdir(os.path.join(library, "__pycache__"))),
                         [f"metasystem_monitor.{tag}.pyc", f"monitoring_dashboard.{tag}.pyc"])
        self.assertFalse(os.path.exists(os.path.join(elsewhere, library.lstrip(os.sep))), os.listdir(self.tmp))
        launched = subprocess.run([sys.executable, "-IS", "-v", os.path.join(prefix, "bin", "metasystem-monitor"),
                                   "--version"], capture_output=True, env=self.child_env(PYTHONDONTWRITEBYTECODE="1"),
                                  cwd=self.tmp, timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual(launched.returncode, 0, launched.stderr.decode()[-2000:])
        self.assertIn(f"code object from '{library}/__pycache__/metasystem_monitor.{tag}.pyc'",
                      launched.stderr.decode())

    def test_destdir_stages_every_file_for_its_final_place_and_writes_nothing_there(self):
        final = "/usr/local/lib/metasystem-monitor"
        existed = os.path.exists(final)
        stage = os.path.join(self.tmp, "stage")
        self.make("install", f"DESTDIR={stage}", "PREFIX=/usr/local")
        self.assertEqual(self.files_under(os.path.join(stage, "usr", "local")), INSTALLED)
        with open(os.path.join(stage, "usr", "local", "bin", "metasystem-monitor"), encoding="utf-8") as handle:
            self.assertIn(f'sys.path.insert(0, "{final}")', handle.read())
        self.assertEqual(os.path.exists(final), existed)
        self.make("uninstall", f"DESTDIR={stage}", "PREFIX=/usr/local")
        self.assertEqual(self.files_under(stage), [])


class ManPage(StoreTestCase):
    def test_make_man_renders_without_warnings_and_holds_every_command_and_exit_code(self):
        page = os.path.join(self.tmp, "metasystem-monitor.1")
        result = self.run_cli("help", "man")
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        with open(page, "wb") as handle:
            handle.write(result.stdout)
        rendered = subprocess.run(["man", "--warnings", "-l", page], capture_output=True, cwd=self.tmp,
                                  env=self.child_env(MANWIDTH="100", MANPAGER="cat", PAGER="cat"),
                                  timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((rendered.returncode, rendered.stderr), (0, b""))
        text = " ".join(rendered.stdout.decode().split())
        for name, _, help_text, _, _ in mm._COMMANDS:
            self.assertIn(f"{name} {help_text}", text)
        for code, meaning in mm.EXIT_CODE_TABLE:
            self.assertIn(f"{code} {meaning}", text)
        self.assertIn("METASYSTEM_NOW", text)
