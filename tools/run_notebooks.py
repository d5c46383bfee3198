"""Execute notebooks in place so that their stored outputs are fresh (nbval later checks they reproduce).

    python tools/run_notebooks.py                 # every notebook, in order
    python tools/run_notebooks.py notebooks/03_*  # some of them
    python tools/run_notebooks.py --run-all       # as Colab's "Run all" would: every cell, tags ignored

Runs with the same environment as the test suite (tests/conftest.py), then re-exports the package.
`--run-all` writes nothing: it executes a copy of each notebook with every cell tag ignored (Colab does not
know nbval's `nbval-skip` or Jupyter Book's `skip-execution`), and fails, naming the cell, if any cell raises.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from notebook_env import NOTEBOOK_ENV  # noqa: E402  (the environment nbval runs notebooks in)


def execute(nb, path: Path) -> None:
    client = NotebookClient(nb, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()


def run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # cells nbval skips (tag nbval-skip: real weights, a GPU) are not run here either
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "code" and "nbval-skip" in tags and "skip-execution" not in tags:
            cell.metadata["tags"] = tags + ["skip-execution"]
    start = time.time()
    execute(nb, path)
    nbformat.write(nb, path)
    print(f"{path.name}: {time.time() - start:.0f} s")


def run_all(path: Path) -> bool:
    "Execute every cell of a copy, tags ignored; True if none raised."
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("tags", None)
    start = time.time()
    try:
        execute(nb, path)
    except CellExecutionError as e:
        print(f"{path.name}: a cell raised under Run all:\n{str(e)[-2000:]}")
        return False
    print(f"{path.name}: Run all ran every cell ({time.time() - start:.0f} s)")
    return True


if __name__ == "__main__":
    os.environ.update(NOTEBOOK_ENV)
    args = sys.argv[1:]
    check = "--run-all" in args
    args = [a for a in args if a != "--run-all"]
    paths = [Path(p) for p in args] or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    if check:
        sys.exit(0 if all([run_all(p.resolve()) for p in paths]) else 1)
    for p in paths:
        run(p.resolve())
    subprocess.run(["nbdev-export"], cwd=ROOT, check=True)
