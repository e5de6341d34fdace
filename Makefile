# Developer entry points. `make run` starts the whole service; `make test` is
# what CI runs (through .ci/run). Every tool comes from .venv.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed-with stamp: reinstall only when pyproject.toml changes (or the
# venv is recreated; pyvenv.cfg is a plain file, unlike bin/python).
STAMP := .venv.stamp

.PHONY: venv run gen gen-check lint test dovecot

venv: $(STAMP)

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(VENV)/pyvenv.cfg
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]'
	touch $@

run: venv
	$(BIN)/ingestion-grpc run

gen: venv
	$(BIN)/python scripts/gen.py

# Fails when the committed generated files differ from what `make gen` writes.
gen-check: gen
	@changes="$$(git status --porcelain -- gen envoy/ingestion.pb third_party)"; \
	if [ -n "$$changes" ]; then \
		echo "generated files are out of date; run 'make gen' and commit:"; \
		echo "$$changes"; \
		exit 1; \
	fi

lint: venv
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/mypy

# The IMAP tests need a real Dovecot; install it when we can (root, apt).
dovecot:
	@if command -v dovecot >/dev/null || [ -x /usr/sbin/dovecot ]; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y dovecot-imapd; \
	else \
		echo "warning: dovecot is not installed (apt-get install dovecot-imapd);" \
			"the IMAP tests need it" >&2; \
	fi

test: venv dovecot
	$(BIN)/pytest
