"""Execute notebooks in place so that their stored outputs are fresh (nbval later checks they reproduce).

    python tools/run_notebooks.py                 # every notebook, in order
    python tools/run_notebooks.py notebooks/03_*  # some of them

Runs with the same environment as the test suite (tests/conftest.py), then re-exports the package.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from notebook_env import NOTEBOOK_ENV  # noqa: E402  (the environment nbval runs notebooks in)


def run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # cells nbval skips (tag nbval-skip: real weights, a GPU) are not run here either
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "code" and "nbval-skip" in tags and "skip-execution" not in tags:
            cell.metadata["tags"] = tags + ["skip-execution"]
    start = time.time()
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    print(f"{path.name}: {time.time() - start:.0f} s")


if __name__ == "__main__":
    os.environ.update(NOTEBOOK_ENV)
    paths = [Path(p) for p in sys.argv[1:]] or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    for p in paths:
        run(p.resolve())
    subprocess.run(["nbdev-export"], cwd=ROOT, check=True)
