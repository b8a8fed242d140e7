# make test      the unittest suite on the default python3
# make test-all  the same suite on every Python 3.9-3.13 that pyenv (or PATH) provides
# make bench     speed and size figures, each beside a baseline measured in the same run
PYTHON ?= python3
PYFLAGS ?=
VERSIONS := 3.9 3.10 3.11 3.12 3.13
TEST := -m unittest discover -s tests -t .

.PHONY: test test-all bench

test:
	$(PYTHON) $(PYFLAGS) $(TEST)

test-all:
	@root=$$(pyenv root 2>/dev/null); status=0; \
	for v in $(VERSIONS); do \
	  py=$$(ls -d "$$root"/versions/$$v.*/bin/python3 2>/dev/null | sort -V | tail -n 1); \
	  [ -n "$$py" ] || py=$$(command -v python$$v || true); \
	  if [ -z "$$py" ]; then echo "test-all: Python $$v not found"; status=1; continue; fi; \
	  echo "test-all: Python $$v at $$py"; \
	  "$$py" $(PYFLAGS) $(TEST) || status=1; \
	done; exit $$status

bench:
	$(PYTHON) tests/bench.py
