# pgwarden: every target creates .venv on first use; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint format clean

NATIVE := $(VENV)/.compiled
# Unit tests of the compiled modules, run once more as plain Python (see test target).
PURE_TESTS := tests/test_analyzer.py tests/test_backlog.py tests/test_fingerprints.py \
	tests/test_statement_tracker.py tests/test_advice_clients.py tests/test_detectors_unit.py \
	tests/test_detector_options.py tests/test_protocol_editor.py tests/test_applications.py \
	tests/test_write_loop.py tests/test_application_rules.py tests/test_transaction_rules.py \
	tests/test_result_rules.py tests/test_protocol_framing.py tests/test_session_relay.py \
	tests/test_session_unit.py tests/test_session_handshake.py tests/test_session_hooks.py

# Dependencies only; the package itself is compiled by the next rule.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PGWARDEN_COMPILE=0 $(BIN)/pip install --quiet -e '.[test,fast,demo]'
	touch $(STAMP)

# mypyc compiles the analysis modules (setup.py). Any edit under proxy/ rebuilds them:
# what mypyc makes of a module depends on the types of the modules it imports.
$(NATIVE): $(STAMP) $(wildcard proxy/*.py proxy/*/*.py)
	@if [ "$$PGWARDEN_COMPILE" = 0 ]; then echo "installing pgwarden uncompiled (PGWARDEN_COMPILE=0)"; \
	else echo "compiling pgwarden's analysis modules with mypyc: about 1.5 minutes on 2 cores," \
		"silent meanwhile (PGWARDEN_COMPILE=0 skips it)"; fi
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(NATIVE)

# The whole suite runs on the compiled modules; their unit tests run interpreted too,
# which is what a machine without a C compiler gets.
test: $(NATIVE)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy proxy
	$(BIN)/pytest -q $(PYTEST_ARGS)
	PGWARDEN_PURE=1 $(BIN)/pytest -q $(PURE_TESTS)

demo: $(NATIVE)
	$(BIN)/pgwarden demo

bench: $(NATIVE)
	$(BIN)/python bench/run.py --variant relay-only=bench/analysis-off.yaml $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy proxy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find proxy -name '*.so' -delete
	rm -f pgwarden_native__mypyc*.so
