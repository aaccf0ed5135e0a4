"""The model shipped with ctk: a histogram trained on the bundled sample of real agent timings.

``ctk serve`` without ``--ttl-model`` starts from it (:func:`ctk.predict.modelfile.default_model_path`), and
the engine's online adaptation takes over from its tables as the deployment's own calls finish. Rebuild it
with ``make default-model`` (or ``python -m ctk.predict.default_model``) after changing the predictors,
the tables or the sample; it stays small (tens of kB).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ctk.predict.modelfile import default_model_path


def build_default_model(output: Path | None = None) -> Path:
    """Train the histogram (with the running-mean baseline) on the bundled sample; write the model file."""
    import pandas as pd

    from ctk.datasets.samples import sample_traces_dir
    from ctk.predict.cost import CostModel
    from ctk.predict.dataset import prepare_frame
    from ctk.predict.train import TrainConfig, train_model

    csv = sample_traces_dir() / "tool_calls.csv.gz"
    frame, skipped = prepare_frame(pd.read_csv(csv))
    config = TrainConfig(predictor="histogram", eval_folds=2, baselines=("running-mean",))
    info = {"store": "bundled sample"}
    model, _ = train_model(frame, config, CostModel(), skipped_rows=skipped, store_info=info)
    model.evaluation = {"split": model.evaluation["split"]}  # the figures live in bench/, not here
    return model.save(output or default_model_path())


if __name__ == "__main__":
    path = build_default_model(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")
