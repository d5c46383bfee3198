"""`python -m llama2_edu` and the `llama2-edu` command: chapter 13's `llama2_edu.program.main`.

Written by hand, like `__init__.py`: nbdev exports each notebook into one module, and chapter 13's is `program`.
The command owns its process, so it is the one place that sets a signal handler: SIGTERM becomes a normal exit
(status 143), so that cleanup (`finally` blocks, temporary folders, a pip download's process group) runs.
`main()` itself, called from Python, changes nothing process-wide.
"""
import signal
import sys

from llama2_edu.program import main


def run() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return main()


if __name__ == "__main__":
    sys.exit(run())
