# Two entry points for a newcomer: `make demo` and `make test` (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default (CI and laptops); on a GPU box use e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index.
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8

.PHONY: install demo test quick

# constraints.txt holds the versions the suite passed with; CONSTRAINTS= (empty) installs the newest.
CONSTRAINTS ?= -c constraints.txt

$(BIN)/.installed: pyproject.toml Makefile constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# DeepSpeed builds from source against the torch above; its CUDA ops compile lazily when first used.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation $(CONSTRAINTS) "$(DEEPSPEED_SPEC)"
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/dsdistill demo

# lint, format and types first (seconds), then the whole suite; `make quick` skips the slow multi-process tests
# The tests run on $(WORKERS) pytest-xdist workers, each test whole on one (work stealing evens out the long
# multi-process ones); WORKERS=0 runs them in this process.
WORKERS ?= 2
test: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -n $(WORKERS) --dist worksteal

quick: install
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -n $(WORKERS) --dist worksteal -m "not slow"
