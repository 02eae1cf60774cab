"""`python -m llm.interop export CKPT OUT_DIR`: our checkpoint as a Hugging Face model directory."""

import sys

from llm.interop.hf_export import main

if __name__ == "__main__":
    sys.exit(main())
