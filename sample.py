"""Generate text from a checkpoint: `python sample.py --checkpoint DIR --prompt TEXT`. See llm/generate/ (cli.py)."""

import sys

from llm.generate.cli import main

if __name__ == "__main__":
    sys.exit(main())
