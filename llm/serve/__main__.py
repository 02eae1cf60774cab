"""`python -m llm.serve --checkpoint DIR`: see llm/serve/launch.py."""

from llm.config import run_main
from llm.serve.launch import main

if __name__ == "__main__":
    run_main(main)
