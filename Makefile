# `make train` and `make test` set up .venv on first use, then do their work.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU build of torch keeps set-up small where there is no NVIDIA GPU.
TORCH_PIN ?= 2.13.0
LLAMACPP_PIN ?= 0.3.36
LLAMACPP_STAMP := $(VENV)/.llamacpp-installed
ARGS    ?=

.PHONY: train test lint bench bench-kernels sample clean help aot check-gpu

help:
	@echo "make train   - set up .venv, prepare the embedded corpus, pretrain the default (tiny) model"
	@echo "make test    - set up .venv and run the test suite"
	@echo "make bench   - run every kernel benchmark (needs CUDA) ; make lint - ruff"
	@echo "make aot     - compile every kernel configuration for sm_80/sm_90, refresh benchmarks/results/aot/"
	@echo "make check-gpu - every kernel vs its reference in bf16/fp16 on this GPU, with one timing per op"

# Set-up prints each step and pip's own progress (a first set-up downloads ~1 GB and takes minutes).
$(STAMP): pyproject.toml
	@echo "set-up 1/3: virtual environment $(VENV) (python: $$($(PY) --version 2>&1))"
	test -d $(VENV) || $(PY) -m venv $(VENV)
	@echo "set-up 2/3: PyTorch (the CPU build, ~0.7 GB installed, unless an NVIDIA GPU is present)"
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/pip install torch; \
	else \
	  $(BIN)/pip install "torch==$(TORCH_PIN)" || $(BIN)/pip install torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	@echo "set-up 3/3: this project and its dev extra (triton ~1 GB, test tools ~0.7 GB: README.md says what takes the space)"
	$(BIN)/pip install -e ".[dev]"
	@# A venv set up while transformers 5.25 was allowed holds Hugging Face's `kernels`, whose import name is ours
	@# (pyproject.toml says why transformers stays below 5.25): nothing here needs it, and outside the repo root it
	@# would be imported in place of kernels/.
	$(BIN)/pip uninstall -y -q kernels 2>/dev/null || true
	touch $(STAMP)
	@echo "set-up done: $(VENV) holds $$(du -sh $(VENV) | cut -f1)"

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

# The test suite also needs llama-cpp-python (tests/test_llama_cpp.py: llama.cpp loads our GGUF files, tokenizes as we
# do, and its f32 greedy tokens equal ours). pip builds llama.cpp from source: ~5.5 min on 2 idle cores the first
# time (CMAKE_BUILD_PARALLEL_LEVEL: every core), then pip's cache holds the wheel. `make train` does not need it.
$(LLAMACPP_STAMP): $(STAMP)
	@echo "set-up for the tests: llama-cpp-python $(LLAMACPP_PIN) (builds llama.cpp from source the first time, ~5 min)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install "llama-cpp-python==$(LLAMACPP_PIN)"
	touch $(LLAMACPP_STAMP)

test: $(STAMP) $(LLAMACPP_STAMP)
	$(BIN)/python -m pytest $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all $(ARGS)

# Ahead-of-time compile check (no GPU needed); tests/test_aot.py runs the same check inside `make test`.
aot: $(STAMP)
	env -u TRITON_INTERPRET $(BIN)/python -m kernels.aot $(ARGS)

check-gpu: $(STAMP)
	$(BIN)/python -m kernels.selfcheck

clean:
	rm -rf $(VENV) out data
