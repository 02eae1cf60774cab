"""Pretrain a model: `python train.py --help` lists every flag.

The flags live in llm/train/cli.py, the loop in llm/train/trainer.py.
"""

from llm.config import run_main
from llm.train.cli import main

if __name__ == "__main__":
    run_main(main)
