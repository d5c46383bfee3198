"""`python -m llama2_edu` and the `llama2-edu` command: chapter 13's `llama2_edu.program.main`.

Written by hand, like `__init__.py`: nbdev exports each notebook into one module, and chapter 13's is `program`.
`python -m llama2_edu serve` is chapter 16's server (`llama2_edu.server.main`), imported only for that command,
since it needs FastAPI and uvicorn (the `serve` extra); uvicorn handles the server's signals (SIGINT and SIGTERM
shut it down gracefully). Otherwise the command owns its process, so it is the one place that sets a signal
handler: SIGTERM becomes a normal exit (status 143), so that cleanup (`finally` blocks, temporary folders, a pip
download's process group) runs.
`main()` itself, called from Python, changes nothing process-wide.
"""
import signal
import sys

from llama2_edu.program import main


def run() -> int:
    if sys.argv[1:2] == ["serve"]:  # chapter 16's server: uvicorn handles the signals
        from llama2_edu.server import main as serve

        return serve(sys.argv[2:])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return main()


if __name__ == "__main__":
    sys.exit(run())
