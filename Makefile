# Tollgate: `make run` serves the reference server, `make test` runs every
# check CI runs. Both start PostgreSQL and Redis on loopback when needed.

CARGO ?= cargo

# CI builds once from a clean clone: incremental state would only take disk.
ifdef CI
export CARGO_INCREMENTAL = 0
endif

# `make run` defaults: the roles scripts/services.sh creates, development
# mode (a per-process token secret unless AUTH_SECRET is set).
run: export MIGRATION_DATABASE_URL ?= postgres://tollgate_owner:tollgate_owner@127.0.0.1:5432/tollgate
run: export TOLLGATE_ENV ?= development

.PHONY: run test services test-services fmt lint docs unit package bench cluster readme-config

run: services
	$(CARGO) run --release -p tollgate-server

test: test-services fmt lint docs package unit

services:
	bash scripts/services.sh

test-services:
	bash scripts/services.sh --with-test-tools

fmt:
	$(CARGO) fmt --all --check

lint:
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

docs:
	RUSTDOCFLAGS="-D warnings -D rustdoc::broken_intra_doc_links" \
		$(CARGO) doc --no-deps --all-features --workspace

unit:
	$(CARGO) test --workspace --all-features

# The library as crates.io would get it: packaged and built from the
# package (verification), with no warning (metadata, license files).
package:
	@out=$$($(CARGO) package -p tollgate --allow-dirty 2>&1); echo "$$out"; \
		! echo "$$out" | grep -q '^warning'

# Criterion (ns per check, tollgate vs governor), memory per key, and the
# load harness (every server configuration against bare axum, with oha;
# LOADGEN=wrk for wrk).
bench: services
	$(CARGO) bench -p tollgate --all-features --bench rate_limit
	$(CARGO) run --release -p tollgate --example memory_footprint
	bash load-tests/bench.sh
	bash load-tests/instructions.sh
	bash load-tests/connection_instructions.sh

# The docker-compose topology as local processes (three replicas, Caddy,
# Prometheus); `server/tests/lb_cluster.rs` tests the same topology.
cluster:
	bash scripts/cluster.sh

# Rewrites the README's configuration table from `config::VARIABLES` (a
# unit test fails while they differ).
readme-config:
	mkdir -p target
	$(CARGO) run -q -p tollgate-server -- config-table > target/config-table.md
	python3 scripts/replace_between.py README.md '<!-- config-table -->' '<!-- /config-table -->' target/config-table.md
