import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from nanovlm_cli.errors import TrainingError
from nanovlm_cli.models.vlm import LossOutput, VisionLanguageModel
from nanovlm_cli.presets import get_preset
from nanovlm_cli.training import train
from nanovlm_cli.training.state import STATE_FILE

REPO = Path(__file__).resolve().parents[1]


def _train_cfg(tmp_path: Path, name: str, **changes):
    base = get_preset("tiny").train.replace(
        dataset_size=400, max_steps=6, batch_size=4, max_seq_len=256, save_checkpoint_steps=2, validation_steps=3,
        validation_batches=1, eval_size=0, console_log_interval=1, output_dir=str(tmp_path), run_name=name,
        warmup_ratio=0.2, pack_buffer=2, max_threads=1,
    )
    return base.replace(**changes)


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in lines}


class _CrashAt:
    """A callback that crashes the run after `step` (like a power cut between two checkpoints)."""

    def __init__(self, step: int):
        self.step = step

    def on_start(self, info): pass
    def on_validation(self, step, val_loss): pass
    def on_checkpoint(self, step, path): pass
    def on_end(self, summary): pass

    def on_step(self, metrics):
        if metrics.step == self.step:
            raise RuntimeError("simulated crash")


def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(tmp_path):
    model_cfg = get_preset("tiny").model
    full = train(model_cfg, _train_cfg(tmp_path, "full"))
    expected = _losses(Path(full.run_dir))
    assert sorted(expected) == list(range(1, 7))

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model_cfg, _train_cfg(tmp_path, "cut"), callback=_CrashAt(3))
    cut_dir = tmp_path / "cut"
    assert _losses(cut_dir)[3] == expected[3]  # step 3 ran but was never checkpointed
    resumed = train(model_cfg, _train_cfg(tmp_path, "cut", resume=str(cut_dir)))
    got = _losses(cut_dir)
    assert sorted(got) == list(range(1, 7))  # the stale step-3 line was replaced, not duplicated
    for step in range(1, 7):
        assert got[step] == expected[step], (step, got[step], expected[step])
    assert resumed.steps == 6 and resumed.samples_seen == full.samples_seen
    final_a = VisionLanguageModel.from_pretrained(Path(full.run_dir) / "final").state_dict()
    final_b = VisionLanguageModel.from_pretrained(cut_dir / "final").state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_run_directory_has_metrics_summary_and_pruned_checkpoints(tmp_path):
    summary = train(get_preset("tiny").model, _train_cfg(tmp_path, "files", keep_last_checkpoints=1))
    run_dir = Path(summary.run_dir)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "data_wait_fraction", "memory"} <= set(lines[0])
    assert set(lines[0]["lr"]) == {"projector", "vision", "language"}
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["steps"] == 6 and saved["samples_seen"] > 0 and isinstance(saved["skipped"], dict)
    assert saved["best_val_loss"] is not None and saved["final_loss"] is not None
    assert (run_dir / "final" / STATE_FILE).is_file() and (run_dir / "final" / "model.safetensors").is_file()
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "step-000006" in kept and "step-000002" not in kept  # keep_last=1, plus the best one by validation


def test_frozen_parts_get_no_optimizer_state_and_do_not_change(tmp_path):
    summary = train(get_preset("tiny").model, _train_cfg(tmp_path, "frozen", freeze_vision_encoder=True, max_steps=2,
                                                         save_checkpoint_steps=2))
    state = torch.load(Path(summary.run_dir) / "final" / STATE_FILE, weights_only=True)
    names = [g["name"] for g in state["optimizer"]["param_groups"]]
    assert names == ["projector", "language"]


def test_repeated_non_finite_losses_stop_with_a_clear_error(tmp_path, monkeypatch):
    def broken_loss(self, batch):
        hidden = self.language.embed(batch.input_ids).sum()
        return LossOutput(hidden * float("nan"), 10)

    monkeypatch.setattr(VisionLanguageModel, "loss", broken_loss)
    with pytest.raises(TrainingError, match="non-finite steps in a row"):
        train(get_preset("tiny").model, _train_cfg(tmp_path, "nan", max_nonfinite_steps=3, max_steps=10,
                                                   save_checkpoint_steps=100, validation_steps=100))


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"run did not reach step {step}")


def _cli(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nanovlm_cli", "train", "--preset", "tiny", "--dataset-size", "400",
            "--batch-size", "4", "--max-seq-len", "256", "--output-dir", str(tmp_path), "--run-name", name,
            "--validation-steps", "100", "--max-threads", "1", "--pack-buffer", "2", *extra]


@pytest.mark.slow
def test_sigkill_between_saves_then_resume_matches_uninterrupted(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ("--max-steps", "8", "--save-checkpoint-steps", "3", "--eval-size", "0")
    subprocess.run(_cli(tmp_path, "ref", *common), check=True, env=env, capture_output=True, cwd=REPO)
    expected = _losses(tmp_path / "ref")
    proc = subprocess.Popen(_cli(tmp_path, "killed", *common), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path / "killed", 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "killed" / "checkpoints" / "step-000003" / STATE_FILE).is_file()
    subprocess.run(_cli(tmp_path, "killed", *common, "--resume", str(tmp_path / "killed")), check=True, env=env,
                   capture_output=True, cwd=REPO)
    got = _losses(tmp_path / "killed")
    assert got == expected


def test_missing_tracker_fails_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from nanovlm_cli.errors import ConfigError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"nanovlm-cli\[wandb\]"):
        train(get_preset("tiny").model, _train_cfg(tmp_path, "nowandb", report_to="wandb"))
    assert not (tmp_path / "nowandb").exists()


def test_wandb_reporter_logs_every_step_and_validation(tmp_path, monkeypatch):
    import importlib.machinery
    import types

    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class FakeRun:
        summary: typing.ClassVar[dict] = {}

        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"].append(True)

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(get_preset("tiny").model, _train_cfg(tmp_path, "wb", report_to="wandb", wandb_project="proj", max_steps=3,
                                               save_checkpoint_steps=3))
    assert calls["init"][0]["project"] == "proj" and calls["init"][0]["entity"] is None
    steps = [step for step, values in calls["log"] if "train/loss" in values]
    assert steps == [1, 2, 3]
    assert any("val/loss" in values for _, values in calls["log"])
    assert calls["finish"] == [True]


def test_eval_interval_records_accuracy_in_metrics(tmp_path):
    summary = train(get_preset("tiny").model, _train_cfg(tmp_path, "ev", eval_interval=2, eval_size=10, max_steps=2,
                                                         save_checkpoint_steps=2))
    lines = [json.loads(x) for x in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert "eval" not in lines[0] and 0.0 <= lines[1]["eval"]["accuracy"] <= 1.0 and lines[1]["eval"]["n"] == 10


@pytest.mark.slow
def test_compiled_training_matches_eager_losses(tmp_path):
    """--compile (every block compiled, one dense masked SDPA call per layer on the CPU) trains like eager."""
    import torch._dynamo

    model_cfg = get_preset("tiny").model
    eager = _losses(Path(train(model_cfg, _train_cfg(tmp_path, "eager", max_steps=4)).run_dir))
    torch._dynamo.reset()
    compiled = _losses(Path(train(model_cfg, _train_cfg(tmp_path, "compiled", max_steps=4, compile=True)).run_dir))
    torch._dynamo.reset()
    assert sorted(compiled) == sorted(eager) == [1, 2, 3, 4]
    for step in eager:
        assert abs(compiled[step] - eager[step]) <= 1e-4 * max(1.0, abs(eager[step])), (step, compiled, eager)


# The keys of training_state.pt as the loop wrote them before RunState (issue 14): every checkpoint has these.
_STATE_KEYS_BEFORE_RUNSTATE = {"step", "optimizer", "scheduler", "data", "skips", "rng", "samples_seen", "tokens_seen",
                               "best_val_loss", "best_dir", "best_val_seen", "train_config"}


def test_training_state_in_todays_format_loads_through_run_state(tmp_path):
    import io

    from nanovlm_cli.training.state import RunState, capture_rng, load_run_state

    rng = capture_rng()
    saved = {  # exactly the dict the pre-RunState loop passed to serialize_state
        "step": 4, "optimizer": {"state": {}, "param_groups": [{"name": "language", "lr": 1e-3, "params": [0]}]},
        "scheduler": {"last_epoch": 4}, "data": {"version": 1, "kind": "map", "epoch": 0, "start": 8},
        "skips": {"too_long": 2}, "rng": rng, "samples_seen": 32, "tokens_seen": 4000, "best_val_loss": 2.5,
        "best_dir": str(tmp_path / "checkpoints" / "step-000004"), "best_val_seen": 2.25,
        "train_config": get_preset("tiny").train.to_dict(),
    }
    assert set(saved) == _STATE_KEYS_BEFORE_RUNSTATE
    (tmp_path / "ckpt").mkdir()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    (tmp_path / "ckpt" / STATE_FILE).write_bytes(buffer.getvalue())
    state = load_run_state(tmp_path / "ckpt")
    assert (state.step, state.samples_seen, state.tokens_seen) == (4, 32, 4000)
    assert state.best_dir == tmp_path / "checkpoints" / "step-000004" and state.best_val_seen == 2.25
    assert state.skips == {"too_long": 2} and state.optimizer == saved["optimizer"]
    assert torch.equal(state.rng_for_rank(0)["torch"], rng["torch"])
    again = state.to_dict()
    assert set(again) == set(saved) and again["best_dir"] == saved["best_dir"]
    assert all(again[k] == saved[k] for k in saved if k != "rng")
    # Older checkpoints had no best_val_seen (it was the best loss) and no best checkpoint; DDP saved one RNG per rank.
    older = {k: v for k, v in saved.items() if k != "best_val_seen"} | {"best_dir": None, "rng": [rng, rng]}
    state = RunState.from_dict(older)
    assert state.best_val_seen == 2.5 and state.best_dir is None and state.rng_for_rank(1) is rng
    with pytest.raises(TrainingError, match="unknown keys"):
        RunState.from_dict(saved | {"lora": {}})


def test_a_run_saves_its_state_with_the_same_keys_as_before(tmp_path):
    summary = train(get_preset("tiny").model, _train_cfg(tmp_path, "keys", max_steps=2, save_checkpoint_steps=2))
    for checkpoint in (Path(summary.run_dir) / "final", Path(summary.run_dir) / "checkpoints" / "step-000002"):
        saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
        assert set(saved) == _STATE_KEYS_BEFORE_RUNSTATE
        assert saved["step"] == 2 and saved["samples_seen"] == summary.samples_seen


def test_each_dataset_supplies_its_own_validation_split_and_evaluation(tmp_path):
    from nanovlm_cli.data.skips import SkipCounter
    from nanovlm_cli.training.datasets import BUILTIN_DATASETS, ShapesDataset, SourceDataset, training_dataset

    cfg = get_preset("tiny").train.replace(dataset_size=10, validation_batches=2, batch_size=3, eval_size=5)
    shapes = training_dataset(cfg)
    assert isinstance(shapes, ShapesDataset) and BUILTIN_DATASETS["shapes"] is ShapesDataset
    assert len(shapes.train_source(SkipCounter())) == 10 and len(shapes.validation_source()) == 6
    assert callable(shapes.final_eval(processor=None))
    assert training_dataset(cfg.replace(eval_size=0)).final_eval(processor=None) is None
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    local = training_dataset(cfg.replace(dataset=str(path)))
    assert isinstance(local, SourceDataset) and local.name == str(path)
    assert len(local.train_source(SkipCounter())) == 1
    assert local.validation_source() is None and local.final_eval(processor=None) is None
