"""`python -m llm.serve --checkpoint DIR`: see llm/serve/launch.py."""

import sys

from llm.serve.launch import main

if __name__ == "__main__":
    sys.exit(main())
