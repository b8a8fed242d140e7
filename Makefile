# make test      the unittest suite on the default python3
# make test-all  the same suite on every Python 3.9-3.13 that pyenv (or PATH) provides
# make bench     speed and size figures, each beside a baseline measured in the same run
# make demo      a week of demo data in a temporary store, shown in the dashboard (q quits)
# make man       the manual page, build/metasystem-monitor.1 (man -l build/metasystem-monitor.1)
# make install   PREFIX=/usr/local (DESTDIR honoured): the module compiled once, launchers on PATH,
#                the man page and bash completion; make uninstall takes them away
PYTHON ?= python3
PYFLAGS ?=
VERSIONS := 3.9 3.10 3.11 3.12 3.13
TEST := -m unittest discover -s tests -t .

PREFIX ?= /usr/local
LIBDIR = $(PREFIX)/lib/metasystem-monitor
BINDIR = $(PREFIX)/bin
MANDIR = $(PREFIX)/share/man/man1
COMPLETIONDIR = $(PREFIX)/share/bash-completion/completions

.PHONY: test test-all bench demo man install uninstall

test:
	$(PYTHON) $(PYFLAGS) $(TEST)

test-all:
	@root=$$(pyenv root 2>/dev/null); status=0; found=""; \
	for v in $(VERSIONS); do \
	  py=$$(ls -d "$$root"/versions/$$v.*/bin/python3 2>/dev/null | sort -V | tail -n 1); \
	  [ -n "$$py" ] || py=$$(command -v python$$v || true); \
	  if [ -z "$$py" ]; then \
	    case $$v in 3.9|3.13) echo "test-all: Python $$v not found: the oldest and newest supported must be tested"; status=1;; \
	      *) echo "test-all: Python $$v not found; skipped";; esac; \
	    continue; \
	  fi; \
	  echo "test-all: Python $$v at $$py"; found="$$found $$v"; \
	  "$$py" $(PYFLAGS) $(TEST) || status=1; \
	done; echo "test-all: tested on$$found"; exit $$status

bench:
	$(PYTHON) tests/bench.py

demo:
	@dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	$(PYTHON) metasystem_monitor.py demo --db "$$dir/demo.db" > /dev/null && \
	$(PYTHON) monitoring_dashboard.py --db "$$dir/demo.db"

man:
	mkdir -p build
	$(PYTHON) metasystem_monitor.py help man > build/metasystem-monitor.1

# The launchers run the interpreter that compiled the bytecode, so a cron run reads the cached
# bytecode even with PYTHONDONTWRITEBYTECODE set; -I -S (isolated, no site-packages: the standard
# library is all it needs) spare it the rest of a start. The copied script keeps working as before.
# compileall runs isolated too: a PYTHONPYCACHEPREFIX of the caller would put the bytecode where the
# launchers (which ignore it) never look.
install: man
	@python=$$($(PYTHON) -c "import sys; print(sys.executable)") && \
	install -d "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(MANDIR)" "$(DESTDIR)$(COMPLETIONDIR)" && \
	install -m 644 metasystem_monitor.py monitoring_dashboard.py "$(DESTDIR)$(LIBDIR)/" && \
	"$$python" -I -m compileall -q -d "$(LIBDIR)" "$(DESTDIR)$(LIBDIR)" && \
	for tool in metasystem-monitor:metasystem_monitor monitoring-dashboard:monitoring_dashboard; do \
	  printf '#!%s -IS\nimport sys\nsys.path.insert(0, "%s")\nfrom %s import main\nsys.exit(main())\n' \
	    "$$python" "$(LIBDIR)" "$${tool#*:}" > "$(DESTDIR)$(BINDIR)/$${tool%%:*}" && \
	  chmod 755 "$(DESTDIR)$(BINDIR)/$${tool%%:*}" || exit 1; \
	done && \
	install -m 644 build/metasystem-monitor.1 "$(DESTDIR)$(MANDIR)/" && \
	METASYSTEM_HOME=/nonexistent "$$python" metasystem_monitor.py completion bash \
	  > "$(DESTDIR)$(COMPLETIONDIR)/metasystem-monitor" && \
	echo "installed: $(BINDIR)/metasystem-monitor, $(BINDIR)/monitoring-dashboard, man metasystem-monitor"

uninstall:
	rm -f "$(DESTDIR)$(BINDIR)/metasystem-monitor" "$(DESTDIR)$(BINDIR)/monitoring-dashboard" \
	  "$(DESTDIR)$(MANDIR)/metasystem-monitor.1" "$(DESTDIR)$(COMPLETIONDIR)/metasystem-monitor"
	rm -rf "$(DESTDIR)$(LIBDIR)"
