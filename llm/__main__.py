"""`python -m llm COMMAND ...` is `llm COMMAND ...` (e.g. under `torchrun -m llm train ...`); see llm/cli.py."""

import sys

from llm.cli import main

if __name__ == "__main__":
    sys.exit(main())
