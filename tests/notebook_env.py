"Environment variables that notebooks run under, both when their outputs are stored and when nbval replays them."
from pathlib import Path

NOTEBOOK_ENV = {
    "OMP_NUM_THREADS": "1",          # one CPU thread: the same arithmetic on every machine, and no thread
                                     # contention on small CPUs (tiny ops ran 100x slower with 2 busy threads)
    "TQDM_DISABLE": "1",             # progress bars show timings: hide them from stored outputs
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
    "PYTHONWARNINGS": "ignore",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_OFFLINE": "1",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    # figures at 150 dpi: the book's stored PNGs stay sharp on high-density screens
    "MATPLOTLIBRC": str(Path(__file__).resolve().parent / "matplotlibrc"),
}
