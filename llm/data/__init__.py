"""The data stage: text sources (corpus) -> token shards and batches (shards); `python -m llm.data` prepares."""
