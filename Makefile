# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: run test test-slow docker check lint bench install install-test unleash-spec redis-server nginx chromium clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "flagproxy needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

# Unleash's client specification (Apache-2.0) from the npm registry, pinned by package-lock.json
# (tests/test_unleash_spec.py; not vendored): without npm that test says why it skipped
UNLEASH_SPEC := tests/unleash_spec/node_modules/@unleash/client-specification/package.json
$(UNLEASH_SPEC): tests/unleash_spec/package-lock.json
	-cd tests/unleash_spec && npm ci --ignore-scripts --no-audit --no-fund --silent && touch node_modules/@unleash/client-specification/package.json
unleash-spec: $(UNLEASH_SPEC)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The demo origin on 127.0.0.1:9000 and the proxy on 127.0.0.1:8080 in front of it (Ctrl-C stops both).
run: install
	@echo "demo origin on http://127.0.0.1:9000, flagproxy on http://127.0.0.1:8080 (control endpoints: GET /__flags/)"
	@echo "try: curl -H 'X-User-Id: 42' localhost:8080/api/anything"
	@echo "DEMO-ONLY secrets from config/demo.toml (public; never use them in a deployment):"
	@echo "  export FLAGPROXY_ADMIN_TOKEN=demo-admin-token-not-secret        # admin API, flagproxy flags"
	@echo "  export FLAGPROXY_WEBHOOKS_SECRET=demo-webhook-secret-not-secret # native webhook signatures"
	@echo "  client key: demo-client-key-not-secret                         # client flags API"
	@echo "web console: http://127.0.0.1:8080/__flags/console/ (sign in with the demo admin token above)"
	@trap 'kill $$origin 2>/dev/null' EXIT INT TERM; \
	$(BIN)/flagproxy demo-origin --port 9000 --log-format text & origin=$$!; \
	$(BIN)/flagproxy serve --config config/demo.toml

redis-server:
	@sh scripts/ensure-redis-server.sh

# tests/test_differential.py compares flagproxy with nginx proxy_pass
nginx:
	@sh scripts/ensure-nginx.sh

# tests/test_client_browser.py drives Debian's headless Chromium with chromedriver; when neither can
# be installed the suite still runs and that test says why it skipped
chromium:
	-@sh scripts/ensure-chromium.sh

# The whole suite, with a coverage report of the code run in the test process.
test: install-test unleash-spec redis-server nginx chromium
	$(BIN)/pytest --cov --cov-report=term:skip-covered

# The long property, load and failover tests (a few minutes), left out of make test.
test-slow: install-test unleash-spec redis-server nginx
	$(BIN)/pytest -m slow

# Build the image and run it until Docker calls it healthy (needs a Docker engine and the base image
# present locally; another base: make docker FLAGPROXY_DOCKER_BASE=flagproxy-base:bookworm).
docker: install-test
	$(BIN)/pytest -m slow -rs tests/test_docker_image.py

# The gate CI runs before the tests: lint, formatting, types.
check: install-test
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy

lint: check

bench: install
	$(PY) bench/proxy.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .coverage .coverage.* .cache
