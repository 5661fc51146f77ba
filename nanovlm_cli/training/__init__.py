"""Training: `train(model_cfg, train_cfg, callback=...)` runs (or resumes) a run and returns its summary."""

from nanovlm_cli.training.loop import train
from nanovlm_cli.training.metrics import RunInfo, StepMetrics, TrainCallback, TrainSummary

__all__ = ["RunInfo", "StepMetrics", "TrainCallback", "TrainSummary", "train"]
