# One-command set-up: every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# libseccomp's own Python binding, Debian's python3-seccomp: a C extension for the
# system's Python 3.11 that loads in about 1 ms, where pyseccomp (the pip dependency,
# same API) costs about 15 ms at every confined VMM start.  Installed where the
# set-up may (root with apt), and that one module linked into the venv when the
# venv's Python is 3.11; anywhere else dksm uses pyseccomp.
DEBIAN_SECCOMP := /usr/lib/python3/dist-packages/seccomp.cpython-311-x86_64-linux-gnu.so

.PHONY: demo test lint guests check-guests clean seccomp-binding

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(MAKE) --no-print-directory seccomp-binding
	touch $(STAMP)

seccomp-binding:
	@if [ ! -e $(DEBIAN_SECCOMP) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q python3-seccomp >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q python3-seccomp >/dev/null 2>&1; } \
	    || echo "python3-seccomp not installed: dksm uses pyseccomp"; \
	fi
	@if [ -e $(DEBIAN_SECCOMP) ] && $(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
	    ln -sf $(DEBIAN_SECCOMP) "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("platlib"))')/"; \
	fi

demo: $(STAMP)
	$(BIN)/dksm demo

test: $(STAMP) lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

# Rebuild the shipped guest images from guests/ (needs gcc); the result is
# byte-identical to what is committed under src/dksm/guests/images.
guests:
	$(PYTHON) guests/build.py --out src/dksm/guests/images

clean:
	rm -rf $(VENV) guests/build
