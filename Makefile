# The two set-up commands of the README. Each installs what it needs, then does its job.
CARGO ?= cargo

.PHONY: demo test deps build bench lint

deps:
	@bash scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace

demo: build
	./target/release/qgenome demo

test: deps
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --no-fail-fast

bench: build
	./target/release/qgenome bench split --size 256M --k 2 --n 3

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
