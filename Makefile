# pykvm: the two set-up commands are `make run` and `make test` (see README.md).
# Both work on a fresh Debian 12 machine as root: `deps` installs what they need.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := gcc make binutils libc6-dev linux-libc-dev python3-venv python3-dev \
                e2fsprogs cpio busybox-static gdb passt mmdebstrap \
                qemu-system-common qemu-utils python3-nftables

.PHONY: all deps guests guest run test test-fast bench check clean

all: deps guests

deps: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@# tests/linux/test_debian_kernel.py fetches Debian's kernel with `apt-get download`,
	@# which needs package lists that know it (a fresh image may ship none)
	@apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,trace,plot]'
	touch $(STAMP)

guests: deps
	$(MAKE) -C guests/tutorial

guest: deps
	$(PY) -m pykvm guest build

run: guest
	$(PY) -m pykvm run

check: deps
	$(PY) -m pykvm check

# The Linux boots are long (minutes on kvm_pvm) and each keeps one CPU busy:
# they run two at a time, a test file per worker so a file's boot serves all of it.
test: deps guests guest
	$(PY) -m pytest -q -m "not linux"
	$(PY) -m pytest -q -m linux -n 2 --dist loadfile

test-fast: deps guests
	$(PY) -m pytest -q -m "not linux"

# Every bench in its short mode, each headline beside its last row in bench/RESULTS.md and
# the goal (bench/guard.py); BENCH_FLAGS="--linux --snapshot DIR" adds the Linux-guest ones.
bench: deps guests
	$(PY) bench/guard.py $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) build *.egg-info
	$(MAKE) -C guests/tutorial clean
