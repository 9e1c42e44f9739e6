# blockbroker: every target installs what it needs itself, idempotently, on Debian 12 as root.
#   make test    all lanes: lint, unit, host integration (root, real daemons), real Xen lab
#                (both dom0 flavours: the busybox one and the package under systemd, lab-systemd)
#   make demo    the main job in the real Xen lab under QEMU
#   make bench   benchmarks (see docs/benchmarks.md)
#   make chaos   random work, SIGKILLed daemons (systemd units), hostile loop users; invariants (CYCLES=N)
#   make lint    ruff + mypy --strict
#   make deb     the Debian packages, dist/deb/blockbroker_<version>_<arch>.deb and
#                blockbroker-gtk_<version>_all.deb (docs/packaging.md)
#   make fuzz    atheris/libFuzzer on every parser of untrusted input (FUZZ_RUNS=N per target)
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
PREFIX ?= /opt/blockbroker
VENV ?= $(PREFIX)/venv
PY := $(VENV)/bin/python
# Debian packages the project needs; tests and the lab use the real daemons these ship.
# lvm2 and thin-provisioning-tools: the Xen lab's dmlvm scenario runs the host's lvm (chrooted)
# against the lab dom0's device-mapper (a thin pool on a loop-backed PV; docs/xenlab.md).
# mmdebstrap and e2fsprogs (mkfs.ext4 -d): the systemd dom0's image (xenlab/build-systemd.sh).
# blockbroker-gtk: PyGObject, GTK 4 and libadwaita from Debian; its test: Xvfb and AT-SPI.
# polkitd also ships pkttyagent and polkit-agent-helper-1 (the prompt tests' real agent); passwd
# (useradd, chpasswd: their throwaway user) is in every Debian system.
APT_PACKAGES := python3 python3-venv python3-dev gcc libc6-dev linux-libc-dev libcap-dev libseccomp2 libseccomp-dev \
	dbus-daemon dbus-bin polkitd xen-utils-4.17 xenstore-utils util-linux mount systemd \
	qemu-system-x86 busybox-static cpio kmod mmdebstrap e2fsprogs clang-14 libfuzzer-14-dev libclang-rt-14-dev \
	python3-gi gir1.2-gtk-4.0 gir1.2-adw-1 xvfb at-spi2-core python3-pyatspi gir1.2-atspi-2.0 \
	lvm2 thin-provisioning-tools
SOURCES := $(shell find src -name '*.py' -o -name '*.typed') pyproject.toml
# blockbroker-block (the libxl hotplug script) is one static C program: docs/client.md.
BLOCK_SCRIPT_SRC := src/client/blockbroker-block.c
BLOCK_SCRIPT_CFLAGS := -O2 -static -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -fstack-protector-strong
PYTEST_ARGS ?=

.PHONY: all deps venv install install-system lint test bench chaos demo fuzz clean deb deb-deps screenshots lab-systemd

all: install

$(PREFIX)/.deps-stamp: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@getent group blockbroker >/dev/null || groupadd --system blockbroker
	@getent passwd blockbroker >/dev/null || useradd --system --gid blockbroker --no-create-home \
		--home-dir /nonexistent --shell /usr/sbin/nologin blockbroker
	@# the qrexec bridge runs with this group: the bus policy lets it call RequestExport
	@getent group blockbroker-qrexec >/dev/null || groupadd --system blockbroker-qrexec
	@mkdir -p $(PREFIX) && touch $@

deps: $(PREFIX)/.deps-stamp

$(VENV)/.venv-stamp: $(PREFIX)/.deps-stamp pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "dbus-fast==5.2.0" "pyxs==0.4.1" "python-prctl==1.8.1" "pyseccomp==0.1.2" \
		"pytest>=8" "hypothesis>=6" "ruff>=0.6" "mypy>=1.10" "atheris>=2.3"
	touch $@

venv: $(VENV)/.venv-stamp

# Non-editable install: the daemons run from $(VENV) as their own users, never from this tree.
# Built next to its destination and renamed over it: a running copy is never overwritten.
$(VENV)/bin/blockbroker-block: $(BLOCK_SCRIPT_SRC) Makefile | $(VENV)/.venv-stamp
	gcc $(BLOCK_SCRIPT_CFLAGS) -o $@.tmp $(BLOCK_SCRIPT_SRC) && chmod 0755 $@.tmp && mv -f $@.tmp $@

$(VENV)/.install-stamp: $(VENV)/.venv-stamp $(SOURCES) $(VENV)/bin/blockbroker-block
	flock $(PREFIX)/.install-lock sh -c 'rm -rf build src/*.egg-info && \
		$(PY) -m pip install -q --no-deps --no-build-isolation --force-reinstall . && \
		rm -rf build src/*.egg-info && chmod -R a+rX $(PREFIX)'
	# blockbroker-block (libxl hotplug script, static C): on PATH and where libxl's script= looks.
	mkdir -p /etc/xen/scripts && ln -sfn $(VENV)/bin/blockbroker-block /etc/xen/scripts/blockbroker-block
	ln -sfn $(VENV)/bin/blockbroker-block /usr/local/bin/blockbroker-block
	ln -sfn $(VENV)/bin/blockbroker /usr/local/bin/blockbroker
	ln -sfn $(VENV)/bin/blockbroker-gtk /usr/local/bin/blockbroker-gtk
	touch $@

install: $(VENV)/.install-stamp

# System integration for a real dom0 (not needed by the tests, which use private stacks):
# bus policy and activation, systemd units, polkit actions, policy, broker config, qrexec files,
# commands on PATH. DESTDIR stages it elsewhere (tests/test_install_system.py does).
DESTDIR ?=
install-system: install
	install -d -m 0755 $(DESTDIR)/etc/blockbroker $(DESTDIR)/etc/blockbroker/policy.d
	install -d -m 0750 $(DESTDIR)/var/lib/blockbroker/images
	test -e $(DESTDIR)/etc/blockbroker/broker.toml || \
		install -m 0644 policy/broker.toml $(DESTDIR)/etc/blockbroker/broker.toml
	install -m 0644 policy/policy.d/*.policy $(DESTDIR)/etc/blockbroker/policy.d/
	install -D -m 0644 dbus/org.qubes.BlockBroker1.conf \
		$(DESTDIR)/usr/share/dbus-1/system.d/org.qubes.BlockBroker1.conf
	install -D -m 0644 dbus/org.qubes.BlockBroker1.service \
		$(DESTDIR)/usr/share/dbus-1/system-services/org.qubes.BlockBroker1.service
	install -d -m 0755 $(DESTDIR)/usr/share/dbus-1/interfaces $(DESTDIR)/lib/systemd/system
	install -m 0644 dbus/org.qubes.BlockBroker1.*.xml $(DESTDIR)/usr/share/dbus-1/interfaces/
	install -m 0644 dbus/blockbroker-*.service dbus/blockbroker-*.socket \
		$(DESTDIR)/lib/systemd/system/
	install -D -m 0644 policy/org.qubes.blockbroker.policy \
		$(DESTDIR)/usr/share/polkit-1/actions/org.qubes.blockbroker.policy
	install -D -m 0755 policy/qrexec/blockbroker.RequestExport \
		$(DESTDIR)/etc/qubes-rpc/blockbroker.RequestExport
	install -D -m 0644 policy/qrexec/50-blockbroker.policy \
		$(DESTDIR)/etc/qubes/policy.d/50-blockbroker.policy
	# blockbroker-gtk: the desktop entry and icon are named after its application id
	install -D -m 0644 desktop/org.qubes.BlockBrokerGtk.desktop \
		$(DESTDIR)/usr/share/applications/org.qubes.BlockBrokerGtk.desktop
	install -D -m 0644 desktop/org.qubes.BlockBrokerGtk.svg \
		$(DESTDIR)/usr/share/icons/hicolor/scalable/apps/org.qubes.BlockBrokerGtk.svg
	install -d -m 0755 $(DESTDIR)/usr/bin $(DESTDIR)/etc/xen/scripts
	for cmd in blockbroker blockbroker-block blockbroker-gtk; do \
		ln -sfn $(VENV)/bin/$$cmd $(DESTDIR)/usr/bin/$$cmd; done
	ln -sfn $(VENV)/bin/blockbroker-block $(DESTDIR)/etc/xen/scripts/blockbroker-block

# The Debian packages (docs/packaging.md): built with dpkg-buildpackage from a copy of the tree in
# dist/deb/src (dpkg-buildpackage writes its results into the parent directory: dist/deb/;
# not build/, which `make install` removes),
# then checked with lintian, which fails the target on any error, and the desktop entry with
# desktop-file-validate. The build dependencies come from debian/control; lintian and
# desktop-file-utils are the target's own.
DEB_DIR := dist/deb
DEB_APT_PACKAGES := dpkg-dev debhelper lintian desktop-file-utils
deb-deps:
	@missing=$$(for p in $(DEB_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@dpkg-checkbuilddeps 2>/dev/null || DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq ./

# DEB_VERSION=V builds the package as version V (debian/changelog's top entry rewritten in the
# build copy only; the tree stays as it is): a test build, e.g. the newer package `make
# lab-systemd` upgrades to. DEB_DIR=DIR builds into DIR instead of dist/deb.
DEB_VERSION ?=
deb: deb-deps
	@[ -z "$(DEB_VERSION)" ] || echo "$(DEB_VERSION)" | grep -Eqx '[0-9][A-Za-z0-9.+~]*' || \
		{ echo "DEB_VERSION must be a native package version ([0-9][A-Za-z0-9.+~]*), got '$(DEB_VERSION)'"; exit 1; }
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	tar --exclude=./build --exclude=./dist --exclude=./.git --exclude='__pycache__' --exclude='*.egg-info' \
		--exclude=./debian/blockbroker --exclude=./debian/blockbroker-gtk \
		--exclude=./debian/build --exclude=./debian/.debhelper --exclude=./debian/tmp \
		-cf - . | tar -C $(DEB_DIR)/src -xf -
	[ -z "$(DEB_VERSION)" ] || sed -i '1s/^blockbroker ([^)]*)/blockbroker ($(DEB_VERSION))/' $(DEB_DIR)/src/debian/changelog
	cd $(DEB_DIR)/src && dpkg-buildpackage -b -us -uc
	lintian --fail-on error --info $(DEB_DIR)/blockbroker_*.deb $(DEB_DIR)/blockbroker-gtk_*.deb
	desktop-file-validate desktop/org.qubes.BlockBrokerGtk.desktop
	@ls -l $(DEB_DIR)/*.deb

lint: venv
	$(VENV)/bin/ruff check src tests scripts bench
	$(VENV)/bin/ruff format --check src tests scripts bench
	$(VENV)/bin/mypy --strict

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS) tests

# docs/gtk-request.png and docs/gtk-exports.png: blockbroker-gtk under Xvfb on the host stack,
# taken by its desktop test (root, real daemons).
screenshots: install
	BLOCKBROKER_VENV=$(VENV) BLOCKBROKER_SCREENSHOTS=$(CURDIR)/docs \
		$(PY) -m pytest -q tests/requests/test_gtk_desktop.py -k approve_then_detach

bench: install
	$(PY) bench/run.py

# Chaos run against the host stack (bench/chaos.py): exits non-zero if an invariant broke;
# the last line is `CHAOS {json}`. systemd mode by default (CHAOS_MODE=harness: no fd store).
CYCLES ?= 10000
chaos: install
	BLOCKBROKER_VENV=$(VENV) $(PY) bench/chaos.py --cycles $(CYCLES)

# Coverage-guided fuzzing (docs/fuzzing.md): FUZZ_RUNS executions per target (FUZZ_SECONDS caps
# each target's time, FUZZ_TARGETS picks some); a crash's input is kept in tests/fuzz/regressions/.
# The last line is `FUZZ {json}`; the status is non-zero if anything crashed.
FUZZ_RUNS ?= 1000000
fuzz: install
	FUZZ_RUNS=$(FUZZ_RUNS) $(PY) tests/fuzz/fuzzrun.py

# Real Xen 4.17 under QEMU (docs/xenlab.md): a host image exported through blockbroker to two
# PV guests sharing one loop device, policyd SIGKILLed and restarted (both exports recovered),
# then detached. Ends with `DEMO OK` or `DEMO FAILED <why>`.
# the Debian package in the systemd dom0 (docs/xenlab.md, "The systemd dom0"); prints last
# LAB-SYSTEMD OK or LAB-SYSTEMD FAILED <reason>. Two builds of the tree: the package, and the
# same as version <version>+next in dist/deb-next, which the lab upgrades to under load.
lab-systemd: deb
	$(MAKE) --no-print-directory deb DEB_DIR=dist/deb-next \
		DEB_VERSION=$$(dpkg-parsechangelog -S Version)+next
	xenlab/lab-systemd.sh $(DEB_DIR)/blockbroker_*.deb dist/deb-next/blockbroker_*.deb

# The demo runs on the systemd dom0 with the package (`make deb`) installed by apt: what an
# administrator gets. DEMO_DOM0=busybox: on the fast busybox dom0, blockbroker from $(VENV).
DEMO_DOM0 ?= systemd
demo: install $(if $(filter systemd,$(DEMO_DOM0)),deb)
	DEMO_DOM0=$(DEMO_DOM0) BLOCKBROKER_VENV=$(VENV) xenlab/demo.sh

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
