"""Replay every notebook as Colab opens it: each alone in an empty folder, the package installed from a wheel built
from this checkout (never the checkout itself), no cell skipped, and its stored outputs checked by nbval.

    python tools/run_alone.py                 # every notebook
    python tools/run_alone.py 07_transformer  # some of them

`make test-kernels` runs it on other CPU kernels than the CPU's best (the Makefile's KERNELS variables, which the
environment passes on). A notebook that reads a file beside the repository's copy of it (../benchmarks, ../book)
fails here, and so does one whose code is not in the wheel. Nothing is downloaded: pip is told there is no index,
the Hugging Face hub is offline; Llama 2's vocabulary comes from the package's cache, which `make test` fills.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from notebook_env import NOTEBOOK_ENV  # noqa: E402  (the environment the stored outputs were made in)

SKIPPING_TAGS = {"nbval-skip", "skip-execution", "raises-exception"}  # Colab knows none of them


def build_wheel(folder: Path) -> Path:
    "The package as a user installs it: a wheel, unpacked into `folder` / 'site'."
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(folder), str(ROOT)], check=True)
    (wheel,) = folder.glob("llama2_edu-*.whl")
    site = folder / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True)
    return site


def lay_out(notebooks, folder: Path) -> list:
    "Each notebook alone in a folder of its own, with every cell tag that skips a cell removed."
    paths = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            tags = [t for t in cell.metadata.get("tags", []) if t not in SKIPPING_TAGS]
            cell.metadata["tags"] = tags
        alone = folder / path.stem / path.name
        alone.parent.mkdir()
        nbformat.write(nb, alone)
        paths.append(alone)
    return paths


def main(names) -> int:
    notebooks = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    if names:
        notebooks = [p for p in notebooks if p.stem in names or p.name in names]
    with tempfile.TemporaryDirectory(prefix="llama2_edu-alone-") as tmp:
        tmp = Path(tmp)
        site = build_wheel(tmp)
        paths = lay_out(notebooks, tmp)
        env = {**os.environ, **NOTEBOOK_ENV, "PYTHONPATH": str(site), "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1"}
        where = subprocess.run([sys.executable, "-c", "import llama2_edu; print(llama2_edu.__file__)"], env=env,
                               cwd=tmp, capture_output=True, text=True, check=True).stdout.strip()
        assert Path(where).is_relative_to(site), f"llama2_edu comes from {where}, not the wheel"
        print(f"{len(paths)} notebooks, each alone in {tmp}/NN_name/, with llama2_edu from the wheel")
        (tmp / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
        command = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadfile", "-c", str(tmp / "pytest.ini"),
                   "--rootdir", str(tmp), "--nbval", "--nbval-current-env", "--nbval-sanitize-with",
                   str(ROOT / "tests" / "nbval_sanitize.cfg"), *map(str, paths)]
        return subprocess.run(command, env=env, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
