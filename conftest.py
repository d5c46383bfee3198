"Root pytest configuration: notebooks (nbval) and tests run in the environment the stored outputs were made in."
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tests"))
from notebook_env import NOTEBOOK_ENV  # noqa: E402

os.environ.update(NOTEBOOK_ENV)  # inherited by the kernels nbval starts (--nbval-current-env)
