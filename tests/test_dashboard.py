"""Training progress views: the live dashboard (terminal), the plain log lines (CI / log file), rank-0-only output,
and the `nanovlm train` wiring (interrupted runs exit 0 naming their checkpoint). No real training runs here: the
callbacks are driven with synthetic RunInfo / StepMetrics and a fake clock."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console
from rich.text import Text

import nanovlm_cli.training
from nanovlm_cli.cli import app as app_module
from nanovlm_cli.cli.dashboard import Dashboard, progress_callback
from nanovlm_cli.cli.progress import (
    LogProgress,
    SilentProgress,
    end_line,
    format_bytes,
    format_duration,
    sparkline,
)
from nanovlm_cli.training.metrics import RunInfo, StepMetrics, TrainSummary

GiB, MiB = 2**30, 2**20
LR = {"projector": 2e-3, "vision": 1e-3, "language": 1e-3}
CPU_MEMORY = {"rss": 812 * MiB}
CUDA_MEMORY = {"cuda_allocated": 1.5 * GiB, "cuda_reserved": 2.25 * GiB, "cuda_peak": 3.5 * GiB,
               "cuda_total": 79.25 * GiB}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_info(max_steps: int = 600, start_step: int = 0, device: str = "cpu", resumed_from: str | None = None
             ) -> RunInfo:
    return RunInfo("runs/demo", "demo", device, 1, 1_234_567, 7_654_321, max_steps, start_step, resumed_from)


def step_metrics(step: int, loss: float, memory: dict[str, float] = CPU_MEMORY) -> StepMetrics:
    return StepMetrics(step=step, loss=loss, lr=dict(LR), grad_norm=0.81, tokens_per_s=3100.0, samples_per_s=64.0,
                       data_wait_fraction=0.03, memory=dict(memory), step_time_s=0.5, samples_seen=step * 32)


def drive(callback, clock: FakeClock, steps: range, memory: dict[str, float] = CPU_MEMORY,
          seconds_per_step: float = 0.5) -> None:
    for step in steps:
        clock.now += seconds_per_step
        callback.on_step(step_metrics(step, loss=3.0 - step / 100, memory=memory))


def rendered(dashboard: Dashboard) -> str:
    console = Console(record=True, width=120, force_terminal=True)
    console.print(dashboard.render())
    return console.export_text()


def visible(stream: io.StringIO) -> str:
    """What a terminal shows: the written text without colour and cursor escape codes."""
    return Text.from_ansi(stream.getvalue()).plain


def summary(steps: int, interrupted: bool = False, checkpoint: str | None = "runs/demo/final") -> TrainSummary:
    return TrainSummary(run_dir="runs/demo", steps=steps, samples_seen=steps * 32, tokens_seen=steps * 1000,
                        skipped={}, final_loss=1.0, best_val_loss=None, final_val_loss=None, wall_time_s=151.0,
                        samples_per_s=1.0, tokens_per_s=1.0, final_checkpoint=checkpoint, interrupted=interrupted,
                        interrupted_by="SIGINT" if interrupted else None, max_steps=600)


# --------------------------------------------------------------------------------------------------- helpers


def test_sparkline_scales_losses_between_window_min_and_max():
    assert sparkline([3.0, 2.0, 1.0, 1.0]) == "█▅▁▁"
    assert sparkline([2.0, 2.0]) == "▄▄"  # flat series: mid height, no division by zero
    assert sparkline([1.0, float("nan"), 2.0]) == "▁!█"  # a non-finite step is visible, not hidden


def test_formatters_pick_readable_units():
    assert format_bytes(812 * MiB) == "812 MiB"
    assert format_bytes(3.5 * GiB) == "3.50 GiB"
    assert [format_duration(s) for s in (45, 151, 3720, 2 * 86400 + 3 * 3600)] == ["45s", "2m31s", "1h02m", "2d03h"]


# --------------------------------------------------------------------------------------------------- dashboard


def test_dashboard_shows_run_progress_eta_loss_trend_lr_throughput_and_rss():
    clock = FakeClock()
    dashboard = Dashboard(Console(file=io.StringIO()), clock=clock)
    dashboard.state.start(run_info(max_steps=600))
    drive(dashboard, clock, range(1, 41))  # 0.5 s per step
    dashboard.on_validation(40, 1.2345)
    dashboard.on_checkpoint(40, "runs/demo/checkpoints/step-000040")
    text = rendered(dashboard)
    assert "demo" in text and "cpu" in text and "world size 1" in text
    assert "1,234,567 trainable / 7,654,321 frozen" in text
    assert "40/600" in text
    assert "eta 4m40s" in text  # 560 steps left at 0.5 s each, measured on the clock
    assert "2.6000" in text  # the last loss
    assert "████" not in text.split("2.6000")[0]  # the sparkline follows the loss ...
    spark = sparkline([3.0 - s / 100 for s in range(1, 41)])
    assert spark in text and spark[0] == "█" and spark[-1] == "▁"  # ... and falls with it
    assert "projector 2.0e-03 vision 1.0e-03 language 1.0e-03" in text
    assert "0.810" in text  # grad norm
    assert "3,100 tok/s" in text and "64.0 samples/s" in text
    assert "3% of step time" in text  # data wait
    assert "1.2345 (step 40)" in text and "runs/demo/checkpoints/step-000040" in text
    assert "process RSS 812 MiB" in text


def test_dashboard_memory_panel_shows_cuda_allocated_reserved_peak_total():
    clock = FakeClock()
    dashboard = Dashboard(Console(file=io.StringIO()), clock=clock)
    dashboard.state.start(run_info(device="cuda:0"))
    drive(dashboard, clock, range(1, 3), memory=CUDA_MEMORY)
    text = rendered(dashboard)
    for header in ("allocated", "reserved", "peak", "total"):
        assert header in text
    for value in ("1.50 GiB", "2.25 GiB", "3.50 GiB", "79.25 GiB"):
        assert value in text
    assert "cuda:0" in text and "RSS" not in text


def test_dashboard_progress_counts_from_the_resume_step():
    clock = FakeClock()
    dashboard = Dashboard(Console(file=io.StringIO()), clock=clock)
    dashboard.state.start(run_info(max_steps=200, start_step=100, resumed_from="runs/demo/checkpoints/step-000100"))
    assert "100/200" in rendered(dashboard)  # before the first step: the resume point, not 0
    drive(dashboard, clock, range(101, 111), seconds_per_step=2.0)
    text = rendered(dashboard)
    assert "110/200" in text and "resumed at step 100" in text
    assert "eta 3m00s" in text  # 90 steps left at 2 s each


def test_eta_counts_down_between_steps_instead_of_growing():
    clock = FakeClock()
    dashboard = Dashboard(Console(file=io.StringIO()), clock=clock)
    dashboard.state.start(run_info(max_steps=100))
    drive(dashboard, clock, range(1, 11), seconds_per_step=1.0)
    assert "eta 1m30s" in rendered(dashboard)
    clock.now += 20.0  # a validation runs: no step for 20 s
    assert "eta 1m10s" in rendered(dashboard)


def test_dashboard_live_view_runs_from_start_to_end_then_prints_the_end_line():
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=120)
    dashboard = Dashboard(console, refresh_per_second=20)
    dashboard.on_start(run_info(max_steps=3))
    assert dashboard._live is not None and dashboard._live.is_started
    for step in (1, 2, 3):
        dashboard.on_step(step_metrics(step, 2.0 / step))
    dashboard.on_end(summary(3))
    assert dashboard._live is None
    output = visible(stream)
    assert "3/3" in output  # the last frame stays on screen
    assert output.rstrip().endswith("done: 3 steps in 2m31s")
    dashboard.close()  # idempotent


def test_dashboard_context_manager_stops_live_view_when_training_raises():
    console = Console(file=io.StringIO(), force_terminal=True)
    with pytest.raises(RuntimeError), Dashboard(console) as dashboard:
        dashboard.on_start(run_info())
        raise RuntimeError("boom")
    assert dashboard._live is None
    assert console._live_stack == []  # no Live left attached to the console


# --------------------------------------------------------------------------------------------------- plain log


def plain(interval: int = 20, max_steps: int = 600) -> tuple[LogProgress, io.StringIO, FakeClock]:
    stream, clock = io.StringIO(), FakeClock()
    progress = LogProgress(interval, Console(file=stream, width=80), clock=clock)
    progress.on_start(run_info(max_steps=max_steps))
    return progress, stream, clock


def test_plain_log_writes_a_step_line_every_interval_and_not_in_between():
    progress, stream, clock = plain(interval=20, max_steps=600)
    drive(progress, clock, range(1, 41))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("run demo -> runs/demo on cpu (world size 1); 1,234,567 trainable")
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in step_lines] == ["step 20/600", "step 40/600"]
    assert step_lines[1] == ("step 40/600 | loss 2.6000 | lr projector 2.0e-03 vision 1.0e-03 language 1.0e-03 | "
                             "grad 0.81 | 3,100 tok/s 64.0 samples/s | data 3% | rss 812 MiB | eta 4m40s")
    assert all("\x1b[" not in line for line in lines)  # no colour codes in a log file


def test_plain_log_always_writes_the_last_step_and_cuda_memory():
    progress, stream, clock = plain(interval=20, max_steps=25)
    drive(progress, clock, range(1, 26), memory=CUDA_MEMORY)
    step_lines = [line for line in stream.getvalue().splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in step_lines] == ["step 20/25", "step 25/25"]
    assert "cuda 1.50 GiB alloc / 2.25 GiB reserved / 3.50 GiB peak of 79.25 GiB" in step_lines[-1]
    assert step_lines[-1].endswith("eta 0s")


def test_plain_log_writes_a_line_per_validation_and_checkpoint():
    progress, stream, _ = plain(interval=100)
    progress.on_validation(50, 1.5)
    progress.on_checkpoint(50, "runs/demo/checkpoints/step-000050")
    progress.on_end(summary(600))
    assert stream.getvalue().splitlines()[1:] == [
        "step 50/600 | validation loss 1.5000",
        "step 50/600 | checkpoint runs/demo/checkpoints/step-000050",
        "done: 600 steps in 2m31s",
    ]


@pytest.mark.parametrize("mode", ["plain", "dashboard"])
def test_interrupted_run_ends_with_one_line_naming_the_checkpoint_once(mode):
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=mode == "dashboard", width=200)
    callback = LogProgress(10, console) if mode == "plain" else Dashboard(console)
    callback.on_start(run_info())
    callback.on_end(summary(123, interrupted=True, checkpoint="runs/demo/checkpoints/step-000123"))
    assert visible(stream).rstrip().splitlines()[-1] == (
        "interrupted by Ctrl-C (SIGINT) at step 123/600; checkpoint saved, "
        "resume with: nanovlm train --resume runs/demo/checkpoints/step-000123")


def test_resume_command_quotes_a_checkpoint_path_with_spaces():
    line = end_line(summary(5, interrupted=True, checkpoint="my runs/a b/checkpoints/step-000005"))
    assert line.endswith("resume with: nanovlm train --resume 'my runs/a b/checkpoints/step-000005'")


# --------------------------------------------------------------------------------------------------- selection


def test_progress_callback_is_a_dashboard_on_a_terminal_and_plain_lines_otherwise(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress_callback(20, console=terminal), Dashboard)
    assert type(progress_callback(20, console=terminal, dashboard=False)) is LogProgress
    log_file = Console(file=io.StringIO(), force_terminal=False)
    chosen = progress_callback(7, console=log_file)
    assert type(chosen) is LogProgress and chosen.interval == 7


def test_progress_callback_is_silent_on_ranks_other_than_zero(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    stream = io.StringIO()
    callback = progress_callback(1, console=Console(file=stream, force_terminal=True))
    assert type(callback) is SilentProgress
    callback.on_start(run_info())
    callback.on_step(step_metrics(1, 2.0))
    callback.on_end(summary(1))
    assert stream.getvalue() == ""
    monkeypatch.setenv("RANK", "0")
    assert isinstance(progress_callback(1, console=Console(file=io.StringIO(), force_terminal=True)), Dashboard)


# --------------------------------------------------------------------------------------------------- CLI wiring


@pytest.fixture
def fake_training(monkeypatch, capsys):
    """Replace the library's train() with one that reports two steps then returns `result` (no model built)."""
    monkeypatch.delenv("RANK", raising=False)
    calls: dict = {}

    def run(result: TrainSummary, *args: str):
        def fake_train(model_cfg, cfg, *, callback):
            calls["callback"] = callback
            callback.on_start(run_info(max_steps=2))
            callback.on_step(step_metrics(1, 2.0))
            callback.on_step(step_metrics(2, 1.0))
            callback.on_end(result)
            return result

        monkeypatch.setattr(nanovlm_cli.training, "train", fake_train)
        capsys.readouterr()
        code = app_module.run(["train", "--preset", "tiny", "--console-log-interval", "1", *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err, calls["callback"]

    return run


def test_train_without_a_terminal_logs_plain_lines_and_prints_the_summary(fake_training):
    code, out, err, callback = fake_training(summary(2))
    assert code == 0 and type(callback) is LogProgress and callback.interval == 1
    assert "step 1/2 | loss 2.0000" in err and "step 2/2 | loss 1.0000" in err
    assert "model: runs/demo/final" in out and "step 1/2" not in out  # progress on stderr, results on stdout
    code, out, _, _ = fake_training(summary(2), "--json")
    assert code == 0 and json.loads(out)["final_checkpoint"] == "runs/demo/final"  # the raw record


@pytest.mark.parametrize(("signal_name", "exit_code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_train_interrupted_exits_128_plus_the_signal_with_one_line_naming_the_checkpoint(fake_training, signal_name,
                                                                                         exit_code):
    checkpoint = "runs/demo/checkpoints/step-000002"
    result = summary(2, interrupted=True, checkpoint=checkpoint)
    result.interrupted_by = signal_name
    code, out, err, _ = fake_training(result)
    assert code == exit_code and out == ""
    assert err.rstrip().splitlines()[-1].endswith(f"resume with: nanovlm train --resume {checkpoint}")
    assert err.count(checkpoint) == 1
    code, out, _, _ = fake_training(result, "--json")
    assert code == exit_code and json.loads(out)["interrupted_by"] == signal_name
