"""Serve: the pin/TTL/ordering policy (plain Python) and its thin vLLM 0.32 scheduler adapter."""
