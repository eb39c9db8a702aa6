# llmproxy — `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 9002
export PORT
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install build run dev test test-all test-e2e test-packaging test-openai \
        test-anthropic test-gemini test-health env-check check fmt vet lint clean version \
        requirements bench bench-smoke

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

install: $(VENV)/.installed ## Create the virtualenv and install the proxy with its test tools

build: install ## Record git commit and build time (shown by make version, /health, --version)
	$(BIN)/python -m llmproxy build-info

run: build ## Start the proxy (gunicorn + gevent) on 0.0.0.0:$(PORT)
	$(BIN)/python -m gunicorn -c gunicorn.conf.py wsgi:app

dev: build ## Start with debug logs and one worker
	LOG_LEVEL=debug WEB_CONCURRENCY=1 $(BIN)/python -m gunicorn -c gunicorn.conf.py wsgi:app

test: install ## Run the offline suite (unit + end-to-end on loopback)
	$(BIN)/python -m pytest -m "not live" $(PYTEST_ARGS)

test-all: install ## Offline suite plus the live provider tests (those without keys skip)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-e2e: install ## Only the end-to-end tests (real gunicorn, fake upstream, official SDKs)
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

test-packaging: install ## Wheel and requirements.txt installs in fresh virtualenvs, started
	$(BIN)/python -m pytest -m packaging tests/packaging $(PYTEST_ARGS)

test-openai: install ## Real OpenAI API through the proxy (needs OPENAI_API_KEY)
	$(BIN)/python -m pytest -m live tests/live -k openai $(PYTEST_ARGS)

test-anthropic: install ## Real Anthropic API through the proxy (needs ANTHROPIC_API_KEY)
	$(BIN)/python -m pytest -m live tests/live -k anthropic $(PYTEST_ARGS)

test-gemini: install ## Real Gemini API through the proxy (needs GEMINI_API_KEY)
	$(BIN)/python -m pytest -m live tests/live -k gemini $(PYTEST_ARGS)

test-health: install ## Health-check tests only
	$(BIN)/python -m pytest -k health $(PYTEST_ARGS)

env-check: ## Show which provider API keys are set (never their values)
	@for v in OPENAI_API_KEY ANTHROPIC_API_KEY GEMINI_API_KEY; do \
	  if [ -n "$$(printenv $$v)" ]; then echo "$$v: set"; else echo "$$v: not set (live tests skip)"; fi; \
	done

fmt: install ## Format the code
	$(BIN)/ruff format llmproxy tests bench scripts wsgi.py gunicorn.conf.py
	$(BIN)/ruff check --fix llmproxy tests bench scripts wsgi.py gunicorn.conf.py

lint: install ## ruff
	$(BIN)/ruff check llmproxy tests bench scripts wsgi.py gunicorn.conf.py

vet: install ## Type check (mypy --strict on the package)
	$(BIN)/mypy --strict llmproxy

check: lint vet test ## Everything CI checks

version: ## Print version, git commit and build time
	@$(BIN)/python -m llmproxy --version

$(VENV)/.installed-pip-tools: | $(BIN)/python
	$(BIN)/python -m pip install --quiet pip-tools
	@touch $@

# The pins a PaaS installs (the app itself then runs from the checkout). Existing pins are
# kept unless pyproject.toml rules them out; `make requirements UPGRADE=1` moves all to the
# newest allowed.
requirements: $(VENV)/.installed-pip-tools ## Pin requirements.txt from pyproject.toml (UPGRADE=1: newest)
	CUSTOM_COMPILE_COMMAND="make requirements" $(BIN)/pip-compile --quiet --strip-extras \
	  --no-emit-options $(if $(UPGRADE),--upgrade) --output-file requirements.txt pyproject.toml

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $@

bench: $(VENV)/.installed-bench ## Full benchmark (direct vs through the proxy); see docs/benchmarks.md
	$(BIN)/python bench/run.py

bench-smoke: $(VENV)/.installed-bench ## A few-second run of the benchmark harness
	$(BIN)/python bench/run.py --smoke

clean: ## Remove the virtualenv, caches and build info
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache llmproxy/_build.json *.egg-info \
	  build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
