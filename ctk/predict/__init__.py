"""Predict: tool-duration predictors, the pin cost model, TTL tables and the model file.

Serve-time modules (pure Python, imported by the engine's scheduler): ``features.command_keys``,
``cost`` (``CostModel``, ``choose_ttl``), ``tables`` (``TTLTables``), ``modelfile`` (restricted loading).
Training-time modules (pandas / numpy / lightgbm): ``dataset``, ``survival``, ``predictors``, ``evaluate``,
``train``, ``profile``; CLI in ``commands``.
"""
