# make test      the unittest suite on the default python3
# make test-all  the same suite on every Python 3.9-3.13 that pyenv (or PATH) provides
# make bench     speed and size figures, each beside a baseline measured in the same run
# make demo      a week of demo data in a temporary store, shown in the dashboard (q quits)
PYTHON ?= python3
PYFLAGS ?=
VERSIONS := 3.9 3.10 3.11 3.12 3.13
TEST := -m unittest discover -s tests -t .

.PHONY: test test-all bench demo

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
