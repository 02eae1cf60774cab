"""The interop stage: Hugging Face model directories in (hf) and out (hf_export); `python -m llm.interop`."""
