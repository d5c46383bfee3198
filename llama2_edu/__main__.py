"""`python -m llama2_edu`: the command line of chapter 13, `llama2_edu.program.main`.

Written by hand, like `__init__.py`: nbdev exports each notebook into one module, and chapter 13's is `program`.
"""
import sys

from llama2_edu.program import main

if __name__ == "__main__":
    sys.exit(main())
