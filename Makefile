# The two set-up commands of the README. Each installs what it needs, then does its job.
CARGO ?= cargo

.PHONY: demo test deps build release bench lint install install-files
# Where cargo puts its builds (CARGO_TARGET_DIR when set, as cargo does).
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
PREFIX ?= /usr/local

deps:
	@bash scripts/install-deps.sh

# deps first, then the build (never both at once under make -j: the build needs libpcsclite-dev).
build: deps
	$(MAKE) release

# The release binaries alone, without the test and demo packages (for `make install`).
release:
	$(CARGO) build --release --workspace

# Extra arguments for the demo, e.g. make demo DEMO_ARGS="--cram-size 256M --dir /srv/tmp"
DEMO_ARGS ?=

demo: build
	$(TARGET_DIR)/release/qgenome demo $(DEMO_ARGS)

test: deps
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --no-fail-fast

bench: build
	$(TARGET_DIR)/release/qgenome bench split --size 256M --k 2 --n 3

# What a server needs to build and run them (scripts/install-deps.sh --server), the binaries,
# the systemd units (made to run $(PREFIX)/bin/...), the design notes they link to,
# /etc/qgenome for the configurations and the /qgenome mountpoint (empty: the mount refuses
# anything else). Then: configure, `systemctl daemon-reload`, enable the units.
install:
	@bash scripts/install-deps.sh --server
	$(MAKE) release
	$(MAKE) install-files

# The files alone, from binaries already built (`make release` as a user whose rustup root's
# sudo does not see, then `sudo make install-files`).
install-files:
	install -D -m 0755 $(TARGET_DIR)/release/qgenome $(DESTDIR)$(PREFIX)/bin/qgenome
	install -D -m 0755 $(TARGET_DIR)/release/qgenome-mountd $(DESTDIR)$(PREFIX)/bin/qgenome-mountd
	install -d -m 0755 $(DESTDIR)/etc/systemd/system
	sed 's|/usr/local/bin/|$(PREFIX)/bin/|g' systemd/qgenome.service > $(DESTDIR)/etc/systemd/system/qgenome.service
	sed 's|/usr/local/bin/|$(PREFIX)/bin/|g' systemd/qgenome-mountd@.service > $(DESTDIR)/etc/systemd/system/qgenome-mountd@.service
	chmod 0644 $(DESTDIR)/etc/systemd/system/qgenome.service $(DESTDIR)/etc/systemd/system/qgenome-mountd@.service
	install -D -m 0644 docs/design.md $(DESTDIR)/usr/share/doc/qgenome/design.md
	install -D -m 0644 -t $(DESTDIR)/usr/share/doc/qgenome/examples examples/qgenome.toml examples/site-home.toml examples/site-sendai-1.toml
	install -d -m 0700 $(DESTDIR)/etc/qgenome $(DESTDIR)/var/lib/qgenome $(DESTDIR)/var/lib/qgenome/keys
	install -d -m 0755 $(DESTDIR)/qgenome

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
