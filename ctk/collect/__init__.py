"""Collect: record agent runs (mini-swe-agent, BFCL, a recording proxy) into the trace store."""
