"""``ctk simulate``: a discrete-event model of vLLM 0.32 engines that runs ctk's own policy code."""
