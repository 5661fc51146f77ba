"""Run directories, training checkpoints and exact resume.

Layout of a run:

    <output_dir>/<run_name>/
        run_config.json                 the model and train configs the run started with
        metrics.jsonl                   one line per optimiser step
        checkpoints/step-000200/        model files + training_state.pt (a RunState: optimizer, scheduler, step, RNG, data)
        final/                          the last model (also with training_state.pt)
        summary.json

Each checkpoint is written atomically by `checkpoint.io.save_model`, so a crash or SIGKILL mid-save leaves every
earlier checkpoint whole. `training_state.pt` is `RunState.to_dict()`: plain tensors and Python containers only, read
with `torch.load(weights_only=True)` and turned back into a `RunState` by `RunState.from_dict`. That one dataclass is
the only definition of what a run saves and restores.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from nanovlm_cli.errors import TrainingError

STATE_FILE = "training_state.pt"


@dataclass
class RunState:
    """Where a run stands: everything the next optimizer step depends on besides the weights.

    The training loop keeps one live `RunState` (the counters, the data position after the last finished step) and
    saves a copy completed with the optimizer, scheduler and RNG states; resuming reads it back with `from_dict`.
    The dict keys are the ones checkpoints have always used, so every `training_state.pt` ever written loads.
    """

    step: int = 0  # optimizer steps finished
    samples_seen: int = 0  # over all ranks
    tokens_seen: int = 0
    best_val_loss: float | None = None  # the validation loss of `best_dir`
    best_dir: Path | None = None  # the best checkpoint by validation loss (never pruned)
    best_val_seen: float | None = None  # the lowest validation loss of the run, checkpointed or not
    data: dict[str, Any] = field(default_factory=dict)  # TrainLoader.state_dict() after the last finished step
    skips: dict[str, int] = field(default_factory=dict)  # SkipCounter.state_dict() at the same point
    rng: Any = None  # capture_rng() of this process, or a list with one per rank under DDP
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)  # TrainConfig.to_dict() of the run that saved

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["best_dir"] = str(self.best_dir) if self.best_dir else None
        return out

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RunState:
        """Read a saved state; keys an older checkpoint lacks take their defaults (`best_val_seen`: the best loss)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(state) - known)
        if unknown:
            raise TrainingError(f"{STATE_FILE} has unknown keys {unknown}; it was written by a newer nanovlm, so "
                                "upgrade nanovlm-cli to resume from it")
        kept = {k: v for k, v in state.items() if k in known}
        kept.setdefault("best_val_seen", state.get("best_val_loss"))
        kept["best_dir"] = Path(state["best_dir"]) if state.get("best_dir") else None
        for name in ("step", "samples_seen", "tokens_seen"):
            kept[name] = int(kept.get(name, 0))
        return cls(**kept)

    def rng_for_rank(self, rank: int) -> dict[str, Any]:
        """This rank's RNG states (a run saved by one process holds a single dict)."""
        return self.rng[rank] if isinstance(self.rng, list) else self.rng


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def serialize_state(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The raw dict of a checkpoint's training state (`RunState.from_dict` reads it)."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"{checkpoint} has no {STATE_FILE}, so training cannot resume from it exactly; "
                            "pass a checkpoint written by `nanovlm train` (checkpoints/step-N or final)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_run_state(checkpoint: Path) -> RunState:
    return RunState.from_dict(load_training_state(checkpoint))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Step checkpoints of a run, oldest first (temporary and half-written directories are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) for `--resume PATH`, where PATH is a run directory or a checkpoint inside one."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return path, run_dir
    candidates = checkpoint_dirs(path)
    final = path / "final"
    if final.is_dir() and (final / STATE_FILE).is_file():
        candidates.append(final)
    if not candidates:
        raise TrainingError(f"no checkpoint with {STATE_FILE} under {path}; pass a run directory of "
                            "`nanovlm train` or one of its checkpoints/step-N directories")
    latest = max(candidates, key=lambda p: load_step(p))
    return latest, path


def load_step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)["step"])


def prune_checkpoints(run_dir: Path, keep_last: int, protect: Path | None) -> None:
    """Delete all but the newest `keep_last` step checkpoints, never the `protect`ed (best) one."""
    dirs = checkpoint_dirs(run_dir)
    for old in dirs[:-keep_last] if keep_last else dirs:
        if protect is not None and old.resolve() == protect.resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines after `last_step` (written by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
