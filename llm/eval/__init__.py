"""The evaluation stage: perplexity over a dataset (perplexity); `python -m llm.eval` is its command line."""
