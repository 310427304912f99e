# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv if missing, installs everything, then runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint setup system-deps protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	@touch $(STAMP)

# Debian packages: the Fashion-MNIST files and promtool. Installed only when run as root and absent.
system-deps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  need=""; \
	  [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need="$$need dataset-fashion-mnist"; \
	  command -v promtool >/dev/null || need="$$need prometheus"; \
	  if [ -n "$$need" ]; then \
	    echo "installing Debian packages:$$need"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$need >/dev/null; \
	  fi; \
	else \
	  echo "not root: skipping Debian packages (need dataset-fashion-mnist and prometheus)"; \
	fi

demo: setup
	$(VENV)/bin/splitinfer demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) scripts/gen_protos.py --check
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

protos: setup
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) runs .pytest_cache
