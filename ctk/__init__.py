"""ctk: learn how long agent tool calls take, and keep the KV cache pinned exactly as long as it pays off.

Data flows collect -> predict -> serve -> measure:

- ``ctk.collect``: record agent runs (mini-swe-agent, BFCL, a recording proxy, trajectory import).
- ``ctk.store``: the DuckDB trace store that every part reads and writes.
- ``ctk.predict``: tool-duration predictors, the pin cost model and TTL tables (``model.pkl``).
- ``ctk.engine_patch``: the pin/TTL/ordering policy and its thin vLLM scheduler adapter (``ctk serve``).
- ``ctk.measure``: replay recorded programs against a live server, compare policies, report.
- ``ctk.datasets``: trace/trajectory formats, bundled sample traces and tasks.
"""

__version__ = "0.1.0"
