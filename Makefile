# Developer entry points. `make run` starts the whole service; `make test` is
# what CI runs (through .ci/run). Every tool comes from .venv.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed-with stamp: reinstall only when pyproject.toml changes (or the
# venv is recreated; pyvenv.cfg is a plain file, unlike bin/python).
STAMP := .venv.stamp

.PHONY: venv run gen gen-check gen-tools example-tools node-modules lint test dovecot

venv: $(STAMP)

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(VENV)/pyvenv.cfg
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]'
	touch $@

run: venv
	$(BIN)/ingestion-grpc run

gen: venv gen-tools
	$(BIN)/python scripts/gen.py

# npm packages, pinned in package-lock.json, in ./node_modules: protoc-gen-es for
# `make gen`, TypeScript and Connect for examples/ts (npm workspaces: gen/ts,
# examples/ts). Installed again only when a package.json or the lock changes.
NODE_STAMP := node_modules/.installed.stamp
node-modules: $(NODE_STAMP)

$(NODE_STAMP): package.json package-lock.json gen/ts/package.json examples/ts/package.json
	@command -v npm >/dev/null || { echo "error: npm is missing (apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --no-audit --no-fund
	touch $@

# Debian packages are installed when some are missing and we can (root, apt).
installed = [ "$$(dpkg-query -W -f='$${db:Status-Status}\n' $(1) 2>/dev/null | grep -cx installed)" = "$(words $(1))" ]
define apt_install
	@if $(call installed,$(1)); then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(1); \
	else \
		echo "error: $(2) needs these Debian packages: apt-get install $(1)" >&2; exit 1; \
	fi
endef

# `make gen`'s plugins: protoc-gen-go, protoc-gen-go-grpc, protoc-gen-swagger
# (golang-grpc-gateway). scripts/gen.py checks their versions.
GEN_DEBS := protoc-gen-go protoc-gen-go-grpc golang-grpc-gateway
gen-tools: node-modules
	$(call apt_install,$(GEN_DEBS),make gen)

# The example clients' toolchains (tests/integration/test_example_clients.py): Go
# and Debian's gRPC and protobuf sources for a GOPATH build (the 1.5 golang/protobuf,
# whose API v1 wraps v2: the 1.3 one cannot marshal protoc-gen-go 1.28 messages).
EXAMPLE_DEBS := golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev \
	golang-google-protobuf-dev
example-tools: node-modules
	$(call apt_install,$(EXAMPLE_DEBS),the example clients' test)

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

test: venv dovecot example-tools
	$(BIN)/pytest

# IMAP import through the whole stack against a real Dovecot, compared with mbsync
# (needs PostgreSQL and Redis on 127.0.0.1, and isync). `make bench-imap N=2000`;
# more options with ARGS, e.g. ARGS='--repeat 3 --phases' or ARGS=--compare-rss.
# Figures and how to read them: docs/benchmarks.md.
N ?= 10000
.PHONY: bench-imap
bench-imap: venv dovecot
	$(BIN)/python bench/bench_imap.py --messages $(N) $(ARGS)

# A multi-gigabyte POST /v1/upload through Envoy to a server subprocess: MB/s, peak
# RSS of Envoy and of the server, SHA-256 of the stored file (needs PostgreSQL and
# Redis on 127.0.0.1). `make bench-upload SIZE=5G`; ARGS='--limit 1G' checks the 413.
SIZE ?= 2G
.PHONY: bench-upload
bench-upload: venv
	$(BIN)/python bench/bench_upload.py --size $(SIZE) $(ARGS)

# mbox import of SIZE (default 1G here) through the whole stack, next to the least work
# any importer must do (mailbox.mbox + SHA-256 + a fsync'd file per message), and the
# Enron PST next to `readpst -e` (needs PostgreSQL and Redis on 127.0.0.1, and
# pst-utils). `make bench-files SIZE=100M`; ARGS=--py-spy prof.svg profiles the worker.
# Figures: docs/benchmarks-files.md.
.PHONY: bench-files readpst
bench-files: venv readpst
	$(BIN)/python bench/bench_files.py \
		--size $(if $(filter command line environment,$(origin SIZE)),$(SIZE),1G) $(ARGS)

# readpst is bench-files' PST comparison; install it when we can (root, apt).
readpst:
	@if command -v readpst >/dev/null; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y pst-utils; \
	else \
		echo "warning: readpst is not installed (apt-get install pst-utils);" \
			"bench-files needs it, or ARGS=--no-pst" >&2; \
	fi

# Google Workspace import through the whole stack against a local fake of Google's
# token endpoint, Directory and Gmail that enforces the per-user quota, with 1, 2 and
# 4 worker processes (needs PostgreSQL and Redis on 127.0.0.1). `make bench-google
# USERS=16 PER_USER=1000`; figures: docs/benchmarks-google.md.
USERS ?= 16
PER_USER ?= 1000
.PHONY: bench-google bench-m365
bench-google: venv
	$(BIN)/python bench/bench_google.py --users $(USERS) --per-user $(PER_USER) $(ARGS)

# Microsoft 365 import through the whole stack against a local HTTPS fake of the
# identity platform and Graph that enforces Graph's per-mailbox limits, with 1, 2 and
# 4 worker processes. `make bench-m365 USERS=16 PER_USER=1000`; figures:
# docs/benchmarks-m365.md.
bench-m365: venv
	$(BIN)/python bench/bench_m365.py --users $(USERS) --per-user $(PER_USER) $(ARGS)

# Many IMAP mailboxes (MAILBOXES x PER_MAILBOX messages, one source each) imported
# with 1, 2 and 4 worker processes (`ingestion-grpc worker --processes P`): messages/s,
# efficiency against linear and the CPU each worker process used (needs PostgreSQL and
# Redis on 127.0.0.1). `make bench-scale MAILBOXES=8 PER_MAILBOX=500`; figures:
# docs/benchmarks-scale.md.
MAILBOXES ?= 32
PER_MAILBOX ?= 2000
.PHONY: bench-scale
bench-scale: venv dovecot
	$(BIN)/python bench/bench_scale.py --mailboxes $(MAILBOXES) --per-mailbox $(PER_MAILBOX) $(ARGS)
