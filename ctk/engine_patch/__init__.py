"""The vLLM 0.32 adapter: the door to its internals, the scheduler mixin, plugin, request filter, metrics."""
