"""The training stage: the loop (trainer), data parallelism and its state (distributed), telemetry (metrics)."""
