"""The engine-free policy core: the pin/TTL/ordering rules that both vLLM and the simulator drive."""
