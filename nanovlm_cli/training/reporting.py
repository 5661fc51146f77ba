"""Optional experiment trackers (`--report-to wandb|tensorboard`), as training callbacks.

Both are optional extras: the tool works without them, and asking for one that is not installed fails before
training starts with the install command. Nothing is hard-coded: the wandb project and entity come from the train
config (or wandb's own environment variables).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.training.metrics import RunInfo, StepMetrics, TrainSummary

_EXTRA = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


def check_reporter_installed(report_to: str) -> None:
    if report_to == "none":
        return
    module, extra = _EXTRA[report_to]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--report-to {report_to} needs the {module} package; "
                          f"pip install 'nanovlm-cli[{extra}]' or use --report-to none")


def _flat(metrics: StepMetrics) -> dict[str, float]:
    out: dict[str, float] = {"train/loss": metrics.loss, "train/grad_norm": metrics.grad_norm,
                             "perf/tokens_per_s": metrics.tokens_per_s, "perf/samples_per_s": metrics.samples_per_s,
                             "perf/data_wait_fraction": metrics.data_wait_fraction}
    out.update({f"lr/{k}": v for k, v in metrics.lr.items()})
    out.update({f"memory/{k}": v for k, v in metrics.memory.items()})
    return out


class Reporter:
    """Forwards metrics to wandb or TensorBoard (rank 0 only: the loop builds it there)."""

    def __init__(self, report_to: str, model_cfg: VLMConfig, cfg: TrainConfig):
        check_reporter_installed(report_to)
        self.kind, self.model_cfg, self.cfg = report_to, model_cfg, cfg
        self._run: Any = None

    def on_start(self, info: RunInfo) -> None:
        config = {"model": self.model_cfg.to_dict(), "train": self.cfg.to_dict()}
        if self.kind == "wandb":
            import wandb

            self._run = wandb.init(project=self.cfg.wandb_project or "nanovlm", entity=self.cfg.wandb_entity,
                                   name=info.run_name, config=config, dir=info.run_dir, resume="allow")
        else:
            from torch.utils.tensorboard import SummaryWriter

            self._run = SummaryWriter(str(Path(info.run_dir) / "tensorboard"))

    def on_step(self, metrics: StepMetrics) -> None:
        values = _flat(metrics)
        if self.kind == "wandb":
            self._run.log(values, step=metrics.step)
        else:
            for key, value in values.items():
                self._run.add_scalar(key, value, metrics.step)

    def on_validation(self, step: int, val_loss: float) -> None:
        if self.kind == "wandb":
            self._run.log({"val/loss": val_loss}, step=step)
        else:
            self._run.add_scalar("val/loss", val_loss, step)

    def on_checkpoint(self, step: int, path: str) -> None:
        pass

    def on_end(self, summary: TrainSummary) -> None:
        if self._run is None:
            return
        if self.kind == "wandb":
            self._run.summary.update({k: v for k, v in summary.to_dict().items() if isinstance(v, (int, float))})
            self._run.finish()
        else:
            self._run.close()


class CallbackList:
    """Several callbacks as one, called in order."""

    def __init__(self, *callbacks: Any):
        self.callbacks = [c for c in callbacks if c is not None]

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            for callback in self.callbacks:
                getattr(callback, name)(*args, **kwargs)

        return call
