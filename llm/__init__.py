"""llm: a small, fast, hackable decoder-only LM stack."""
