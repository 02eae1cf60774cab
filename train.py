"""Pretrain a model: `python train.py --help` lists every flag. The loop lives in llm/trainer.py."""

import sys

from llm.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
