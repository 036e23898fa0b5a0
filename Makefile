# One-command set-up: every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint guests check-guests clean perf

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@$(MAKE) --no-print-directory perf
	touch $(STAMP)

# perf counts hardware events for `dksm bench runtime` where the machine has them;
# optional, so a host without apt or root only gets a note.
perf:
	@command -v perf >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get install -y -qq linux-perf >/dev/null 2>&1; } \
	  || echo "note: perf (Debian: linux-perf) is not installed; benchmarks will count no hardware events"

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
