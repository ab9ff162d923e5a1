# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Each installs what it needs: a virtualenv in .venv with pinned packages, and the
# Debian tools the data generator and museval use, and QEMU's user mode, which runs onnxruntime on an
# emulated CPU without VNNI in the tests (when run as root).

PYTHON     ?= python3.11
VENV       := .venv
PY         := $(VENV)/bin/python
APT_TOOLS  := espeak-ng flite ffmpeg sox qemu-user
APT_CMDS   := espeak-ng flite ffmpeg sox qemu-x86_64
STAMP      := $(VENV)/.installed
# torch 2.14.1 from PyPI is the CUDA build: the venv takes 6.3 GB (3.2 GB of nvidia
# libraries that `import torch` loads even on CPU); pip peaked at 6.6 GB without its cache.
NEED_MB    := 7000

.PHONY: test demo install system-tools clean

test: install
	$(PY) -m pytest

demo: install
	PYTHONWARNINGS=ignore $(PY) -m fqss_plugin.demo

install: $(STAMP) system-tools

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (fqss needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python setup.cfg pyproject.toml constraints.txt
	@free=$$(df --output=avail -B1M . | tail -1); \
	if [ "$$free" -lt $(NEED_MB) ]; then \
	  echo "error: $$free MB free on the disk holding $(CURDIR); installing the pinned packages into $(VENV) needs about $(NEED_MB) MB"; exit 1; \
	fi
	PIP_NO_CACHE_DIR=1 $(PY) -m pip install -e ".[dev]" -c constraints.txt
	touch $(STAMP)

system-tools:
	@missing=""; for t in $(APT_CMDS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_TOOLS) >/dev/null; \
	  else \
	    echo "error: missing tools:$$missing. Install them with: sudo apt-get install $(APT_TOOLS)"; exit 1; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
