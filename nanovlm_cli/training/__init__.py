"""Training: `train(model_cfg, train_cfg, callback=...)` runs (or resumes) a run and returns its summary.

    loop.py       the recipe in named stages (`TrainingRecipe`: setup, train_step, validate_and_save, finish)
    state.py      `RunState` (what a checkpoint saves and a resume restores), run directories, pruning
    datasets.py   what a dataset supplies: its training split, its validation split, its end-of-run evaluation
    data.py       a run's loader and validation batches, built from its dataset
    optim.py      freezing, parameter groups, optimizers and the LR schedule
    parallel.py   wrapping the model for distributed training
    metrics.py, reporting.py, signals.py   step metrics and callbacks, trackers, Ctrl-C / SIGTERM handling
"""

from nanovlm_cli.training.loop import train
from nanovlm_cli.training.metrics import RunInfo, StepMetrics, TrainCallback, TrainSummary

__all__ = ["RunInfo", "StepMetrics", "TrainCallback", "TrainSummary", "train"]
