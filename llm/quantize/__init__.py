"""Quantize a checkpoint to weight-only int8 / int4 (`python -m llm.quantize`; the scheme is in llm.quant)."""
