"The book's frame: every chapter is in the table of contents, starts the same way, and carries its outputs."
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def cells(path):
    return json.loads(path.read_text())["cells"]


def source(cell):
    return "".join(cell["source"])


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def test_toc_lists_every_chapter_in_order():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    chapters = [f for f in files if f.startswith("notebooks/")]
    # the chapters in order; the appendix (chapter 0 in import order) at the end
    appendix = [f"notebooks/{p.stem}" for p in NOTEBOOKS if p.name.startswith("00_")]
    assert appendix and chapters == [f"notebooks/{p.stem}" for p in NOTEBOOKS[1:]] + appendix
    for f in files:
        assert any((ROOT / f).with_suffix(s).exists() for s in (".md", ".ipynb")), f"_toc.yml names a missing page {f}"


def test_every_notebook_starts_with_a_title_and_the_same_setup_cell():
    repo_url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    setups = {}
    for nb in NOTEBOOKS:
        first, second = cells(nb)[:2]
        assert first["cell_type"] == "markdown" and source(first).startswith("# "), f"{nb.name}: no title cell"
        assert second["cell_type"] == "code", f"{nb.name}: the setup cell must follow the title"
        setups[nb.name] = source(second)
    # chapter 14 runs Llama 2 alone: it installs the package with the hub extra, not the book's
    payoff = setups.pop("14_llama2_on_a_gpu.ipynb")
    assert len(set(setups.values())) == 1, f"setup cells differ: {sorted(setups)}"
    setup = next(iter(setups.values()))
    assert payoff == setup.replace("llama2-edu[book]", "llama2-edu[hub]") != setup
    assert "google.colab" in setup and f"git+{repo_url}" in setup, "the setup cell must install from _config.yml's repository.url"


def test_the_payoff_asks_colab_for_a_gpu():
    "Chapter 14's launch button opens a T4 runtime (Colab reads the notebook's metadata)."
    meta = json.loads((ROOT / "notebooks" / "14_llama2_on_a_gpu.ipynb").read_text())["metadata"]
    assert meta["accelerator"] == "GPU" and meta["colab"]["gpuType"] == "T4"


def test_every_notebook_has_stored_outputs():
    for nb in NOTEBOOKS:
        code = [c for c in cells(nb) if c["cell_type"] == "code" and source(c).strip()]
        unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None
                      and "nbval-skip" not in tags(c) and "remove-cell" not in tags(c)]
        assert not unexecuted, f"{nb.name}: code cells {unexecuted} were never run (python tools/run_notebooks.py {nb.name})"


def test_one_module_per_notebook():
    "A notebook that exports code names its one module; one that only runs the package (chapter 14) names none."
    exports = {}
    for nb in NOTEBOOKS:
        text = "\n".join(source(c) for c in cells(nb))
        names = re.findall(r"^#\|\s*default_exp\s+(\S+)", text, re.M)
        if not re.search(r"^#\|\s*export", text, re.M):
            assert not names, f"{nb.name}: exports nothing, so it names no module"
            continue
        assert len(names) == 1, f"{nb.name}: needs exactly one #| default_exp"
        exports[nb.name] = names[0]
    assert len(set(exports.values())) == len(exports), exports


def test_nbval_markers_are_cell_tags_not_comments():
    "nbval's comment markers would show in the book's code: the cells carry the tags instead."
    for nb in NOTEBOOKS:
        for i, c in enumerate(cells(nb)):
            if c["cell_type"] == "code":
                marked = re.findall(r"^\s*#\s*NBVAL_\w+", source(c), re.M)
                assert not marked, f"{nb.name} cell {i}: {marked[0]!r}: use the tag nbval-skip / nbval-ignore-output"
                if "nbval-skip" in tags(c):
                    assert "skip-execution" in tags(c), f"{nb.name} cell {i}: nbval-skip without skip-execution"


def test_notebooks_need_no_file_outside_themselves():
    """Colab opens a notebook alone: no cell reads a path above the notebook's folder, and chapter 7's figure is
    embedded (a data URI of book/images/llama2_architecture.png, which tools/draw_architecture.py writes)."""
    import base64
    for nb in NOTEBOOKS:
        for i, c in enumerate(cells(nb)):
            # links to other chapters and book pages are fine; files read or shown are not
            text = re.sub(r"\]\(\.\./book/[\w.]+\.md\)", "]()", source(c))
            outside = re.search(r"\.\./(benchmarks|book|tests|tools|llama2_edu|_static)/", text)
            assert not outside, f"{nb.name} cell {i} needs {outside[0]}…, a file outside the notebook"
    png = (ROOT / "book" / "images" / "llama2_architecture.png").read_bytes()
    chapter7 = "".join(source(c) for c in cells(ROOT / "notebooks" / "07_transformer.ipynb"))
    assert "data:image/png;base64," + base64.b64encode(png).decode() in chapter7
