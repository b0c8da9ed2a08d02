# The two commands: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo lint bench bench-stream bench-publish soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch pinned and installed first: this spec takes the local CPU build, not CUDA.
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Debian's prometheus, unpacked under .venv (no service installed): the test that scrapes
# the daemons with a real Prometheus uses it, and skips with a reason where it is missing.
PROMETHEUS := $(VENV)/tools/usr/bin/prometheus

$(PROMETHEUS):
	@mkdir -p $(VENV)/tools/deb
	@cd $(VENV)/tools/deb && { apt-get download prometheus >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } \
		&& dpkg -x prometheus_*.deb .. \
		|| echo "Debian's prometheus could not be fetched: the real-Prometheus scrape test will skip"

# Lint first: a style slip or an import against the layers (pyproject's importlinter
# contracts) fails CI before the 14-minute suite starts.
test: lint
	-@$(MAKE) --no-print-directory $(PROMETHEUS)
	PROMETHEUS_BIN=$(abspath $(PROMETHEUS)) $(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/recstream demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py --json bench/results/train_throughput.json

bench-stream: $(STAMP)
	$(BIN)/python bench/stream_throughput.py --events 1000000 --interval 1 \
		--json bench/results/stream_throughput.json

# Every setting at its default: the index build chooses nprobe by a recall sweep.
bench-publish: $(STAMP)
	$(BIN)/python bench/publish.py --users 1000000 --items 1000000 --concurrency 2 \
		--json bench/results/publish.json

# CI mode of the soak: 60 s at 2,000 events/s and 50 recall QPS against the trainer, the
# lander and serving as processes; fails on a reconciliation gap or unbounded RSS. Long
# mode: $(BIN)/python bench/soak.py --duration 3600.
soak: $(STAMP)
	$(BIN)/python bench/soak.py --duration 60 --rate 2000 --qps 50 \
		--json bench/results/soak.json

clean:
	rm -rf $(VENV) var .pytest_cache
