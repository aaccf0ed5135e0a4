"""Predict: tool-duration predictors, the pin cost model, TTL tables and the model file."""
