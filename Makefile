# Keyway: the two commands a newcomer runs are `make demo` and `make test`.
# Everything else here is a step of those two, or a convenience for developers.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The collection is importable as ansible_collections.keyway.ipsec through a
# symlink to this checkout; nothing is installed by hand.
COLLECTIONS := $(CURDIR)/.collections
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PYTHONPATH := $(COLLECTIONS)
LAB_HOSTS ?= 5
export KEYWAY_LAB_HOSTS := $(LAB_HOSTS)
PYTEST_ARGS ?=

.PHONY: help venv deps collection test test-kernel test-min-deps lint sanity docs nox fuzz demo lab-up lab-down build clean

help:
	@echo "make demo      build the netns lab, run the site playbook, show the result"
	@echo "make test      install what the tests need and run every tier"
	@echo "make lab-down  remove the lab (namespaces, links, processes, files)"
	@echo "make lint      ruff, ansible-lint (production profile), changelog fragments"
	@echo "make sanity    ansible-test sanity on the built collection"
	@echo "make docs      the docs site (antsibull-docs, Sphinx) in build/docs/html"
	@echo "make nox       the checks as antsibull-nox sessions (NOX_SESSIONS)"
	@echo "make build     ansible-galaxy collection build into build/ (tracked files only)"
	@echo "make fuzz      fuzz the IKE codec and engine, FUZZ_SECONDS (default 60) per target"

$(VENV)/.deps: pyproject.toml tools/pydeps.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $$($(PYTHON) tools/pydeps.py test lint docs fuzz)
	touch $@

# The oldest versions pyproject.toml admits, in a venv of their own (make test-min-deps).
VENV_MIN := .venv-min
$(VENV_MIN)/.deps: pyproject.toml tools/pydeps.py
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_MIN)/bin/python -m pip install --quiet $$($(PYTHON) tools/pydeps.py --oldest test)
	touch $@

venv: $(VENV)/.deps

collection:
	@mkdir -p $(COLLECTIONS)/ansible_collections/keyway
	@ln -sfn $(CURDIR) $(COLLECTIONS)/ansible_collections/keyway/ipsec

# Debian packages of the tiers that run on this host (tools/apt-deps.sh lists them), and
# libreswan's pluto extracted beside them (its package conflicts with strongSwan's).
deps: venv collection
	tools/apt-deps.sh host
	tools/libreswan-root.sh $(CURDIR)/build/libreswan

# ruff; ansible-lint's production profile (offline: nothing fetched from Galaxy); the
# changelog fragments.
lint: venv collection
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/ansible-lint --profile production --offline -q
	$(VENV)/bin/antsibull-changelog lint

# ansible-test sanity on the collection as it ships (tools/sanity.py: the built tarball,
# ansible-test's own virtualenvs from PyPI, cached after the first run).
sanity: venv
	$(PY) tools/sanity.py

# The checks (lint, sanity on this ansible-core, the nox sessions: lint, docs-check,
# sanity on the oldest supported ansible-core releases), then the host tiers (unit with
# the docs site built and opened in Chromium, netns, interop), the unit and netns tiers
# again on the oldest supported packages, then the kernel tier in one VM boot.
test: deps lint sanity nox
	$(PY) -m pytest -m "not kernel" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-min-deps
	$(MAKE) --no-print-directory test-kernel

# keywayd and the modules on the oldest cryptography, pyroute2, PyYAML and Jinja2 they
# support (Debian 12's), with the oldest ansible-core: tests/unit and tests/netns.
test-min-deps: $(VENV_MIN)/.deps collection
	$(VENV_MIN)/bin/python -c "import cryptography, pyroute2; print('min-deps: cryptography', cryptography.__version__, 'pyroute2', pyroute2.__version__)"
	$(VENV_MIN)/bin/python -m pytest tests/unit tests/netns $(PYTEST_ARGS)

# The real-kernel tier: tools/vm-setup.sh fetches the kernel and virtme-ng, then the
# guest runs tests/kernel in one pytest process; its exit code is the tier's result.
test-kernel: venv collection
	tools/vm-setup.sh
	tools/vm_run.py --timeout 1800 -- python -m pytest -m kernel tests/kernel -p no:cacheprovider $(PYTEST_ARGS)

demo: venv collection
	tools/apt-deps.sh demo
	$(PY) -m ansible_collections.keyway.ipsec.plugins.module_utils.lab up --hosts $(LAB_HOSTS)
	$(VENV)/bin/ansible-playbook -i inventory/lab playbooks/lab_partner.yml
	$(VENV)/bin/ansible-playbook -i inventory/lab playbooks/site.yml
	$(VENV)/bin/ansible-playbook -i inventory/lab playbooks/lab_status.yml
	@mkdir -p build
	$(VENV)/bin/ansible-playbook -i inventory/lab playbooks/status.yml -e keyway_status_graph=$(CURDIR)/build/tunnels
	@echo "The tunnels as a picture: build/tunnels.svg"

lab-up: venv collection
	$(PY) -m ansible_collections.keyway.ipsec.plugins.module_utils.lab up --hosts $(LAB_HOSTS)

lab-down: venv collection
	$(PY) -m ansible_collections.keyway.ipsec.plugins.module_utils.lab down

# Fuzz the IKE codec and engine (tools/fuzz_ike.py, atheris, coverage-guided) for
# FUZZ_SECONDS per target, from a seed corpus of real messages written to build/fuzz/TARGET,
# which keeps what the runs find; crashes land in build/fuzz too. (`make test` runs each
# target briefly: tests/unit/ike/test_fuzz.py.)
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= outer inner engine
fuzz: venv collection
	@mkdir -p build/fuzz
	for target in $(FUZZ_TARGETS); do \
		$(PY) tools/fuzz_ike.py --target $$target -max_total_time=$(FUZZ_SECONDS) \
			-rss_limit_mb=2048 -artifact_prefix=build/fuzz/ || exit 1; \
	done

# From the files git tracks only (tools/build_collection.py), less galaxy.yml's build_ignore.
build: venv
	rm -f build/keyway-ipsec-*.tar.gz
	$(PY) tools/build_collection.py build

# The docs site (tools/docs_site.py, the docs extra of pyproject.toml): every module,
# plugin and role, and the README as the guide, in build/docs/html; a warning fails it.
docs: venv
	$(PY) tools/docs_site.py

# The checks as antsibull-nox sessions (noxfile.py, antsibull-nox.toml), each in a
# virtualenv of its own under .nox, reused from run to run; NOX_SESSIONS picks them
# (`$(VENV)/bin/nox --list` shows all). antsibull-nox runs the venv's ansible-galaxy from
# PATH; nothing of the checkout's collections path reaches the sessions.
# (ansible-lint and sanity on this ansible-core are `make lint` and `make sanity`.)
NOX_SESSIONS ?= lint docs-check extra-checks sanity-2.17 sanity-2.18
nox: venv
	env -u PYTHONPATH -u ANSIBLE_COLLECTIONS_PATH -u ANSIBLE_CONFIG PATH=$(CURDIR)/$(VENV)/bin:$$PATH \
		$(VENV)/bin/nox --reuse-venv=yes -s $(NOX_SESSIONS)

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis
