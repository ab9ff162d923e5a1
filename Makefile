# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Each installs what it needs: a virtualenv in .venv with pinned packages, and the
# Debian tools the data generator and museval use (when run as root).

PYTHON     ?= python3.11
VENV       := .venv
PY         := $(VENV)/bin/python
APT_TOOLS  := espeak-ng flite ffmpeg sox
STAMP      := $(VENV)/.installed

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
	$(PY) -m pip install -e ".[dev]" -c constraints.txt
	touch $(STAMP)

system-tools:
	@missing=""; for t in $(APT_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
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
