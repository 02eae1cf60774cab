"""The serving stage: an OpenAI-compatible HTTP server with continuous batching over a paged KV cache.

  protocol    request schemas (pydantic), OpenAI error objects, the default chat template
  engine      one batched step over the paged cache: prefill chunks, a decode step, per-row sampling
  scheduler   continuous batching: a bounded queue, admission at step boundaries, cancellation, drain
  metrics     Prometheus metrics (queue depth, running, tokens/s, TTFT / latency percentiles)
  app         the HTTP layer (FastAPI routes, SSE streaming, bearer-key check)
  __main__    `python -m llm.serve --checkpoint DIR`
"""
