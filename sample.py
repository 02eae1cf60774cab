"""Generate text from a checkpoint: `python sample.py --checkpoint DIR --prompt TEXT`. See llm/generate/ (cli.py)."""

from llm.config import run_main
from llm.generate.cli import main

if __name__ == "__main__":
    run_main(main)
