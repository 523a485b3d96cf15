# The way in: `make test` and `make demo` (both run `make setup` first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

# Idempotent: rebuilt only when the pins or the package metadata change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not dist"

demo: setup
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

bench: setup
	for b in bench/bench_cache_teacher.py bench/bench_distill.py bench/bench_eval.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
