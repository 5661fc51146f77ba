"""`nanovlm train` under a hostile user: unusable data ends in one line, SIGINT/SIGTERM stop every phase with the
documented exit code and a loadable checkpoint, the printed resume command runs as printed, and the output reads
well through a pipe (one line per event, no carriage returns, a summary written for a person)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanovlm_cli.cli import app as app_module
from nanovlm_cli.cli.progress import summary_lines
from nanovlm_cli.data.loader import TrainLoader
from nanovlm_cli.data.sample import Record, Sample
from nanovlm_cli.data.schemas import RecordError
from nanovlm_cli.data.sources import StreamRecords
from nanovlm_cli.errors import DataError
from nanovlm_cli.training.metrics import TrainSummary
from nanovlm_cli.training.state import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
FAST = ("--preset", "tiny", "--dataset-size", "64", "--batch-size", "4", "--pack-buffer", "2", "--max-threads", "1",
        "--num-workers", "0", "--validation-steps", "100", "--eval-size", "0", "--console-log-interval", "1")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):  # as a user's shell has it
        env.pop(name, None)
    return env


def _nanovlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanovlm_cli", *args]


def _start(argv: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """A training process whose stderr goes to `log` (read while it runs) and stdout to `log`.out."""
    return subprocess.Popen(argv, cwd=cwd, env=_env(**env), stdout=log.with_suffix(".out").open("w"),
                            stderr=log.open("w"), text=True)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and text in log.read_text():
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"{text!r} never appeared:\n{log.read_text()[-3000:]}")


def _finish(proc: subprocess.Popen, timeout: float = 60) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------------------- no usable sample


def test_train_on_a_parquet_without_known_columns_ends_in_one_line_with_the_skip_counts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"foo": [1, 2, 3, 4, 5], "bar": ["a", "b", "c", "d", "e"]}), tmp_path / "wrong.parquet")
    result = subprocess.run(
        _nanovlm("train", "--preset", "tiny", "--max-steps", "2", "--dataset", "wrong.parquet", "--output-dir", "runs",
                 "--max-threads", "1"),
        cwd=tmp_path, env=_env(HF_DATASETS_CACHE=str(tmp_path / "cache")),  # a fresh cache: datasets shows its bars
        capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = _error_lines(result.stderr)
    assert "all 5 rows skipped" in line and "missing_field 5" in line and "fields: foo, bar" in line
    assert "give each row a 'messages', 'conversations' or 'texts' field" in line
    assert "Traceback" not in result.stderr
    assert "\r" not in result.stderr  # datasets' "Generating train split" bar stays out of a log


def test_train_where_every_sample_is_too_long_ends_in_one_line_naming_the_fix(tmp_path):
    """The issue's command: the preset's 6000 shapes samples, none fits in 16 tokens."""
    start = time.monotonic()
    result = subprocess.run(
        _nanovlm("train", "--preset", "tiny", "--max-steps", "2", "--max-seq-len", "16", "--output-dir", "runs",
                 "--max-threads", "1"),
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = _error_lines(result.stderr)
    assert "no usable training sample in shapes" in line and "too_long" in line
    assert "max_seq_len is 16" in line and "raise --max-seq-len" in line
    assert time.monotonic() - start < 180


class _Bad(DataError):
    reason = "no_supervised_tokens"


class _Budget:
    """Fails the test (instead of hanging it) when a loader reads far more records than it should."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise AssertionError("the loader kept reading unusable records: it would loop forever")


def _encoder(budget: _Budget):
    def encode(record: Record) -> Sample:
        """Record i is usable only when i % 25 == 0."""
        budget.spend()
        i = record.source_index
        if i % 25:
            raise _Bad(f"record {i} has nothing to supervise")
        ids = torch.full((4,), i + 1)
        return Sample(ids, ids.clone(), [], i)

    return encode


def test_loader_gives_up_after_a_run_of_unusable_records_but_not_on_sparse_usable_ones():
    records = [Record([], [], i) for i in range(2000)]
    loader = TrainLoader(records, _encoder(_Budget(4000)), batch_size=4, max_seq_len=24, max_images_per_row=1,
                         seed=0, pack_buffer=2, epochs=2, max_unusable_records=400)
    assert sum(b.n_samples for b in loader) == 2 * 2000 // 25  # 1 in 25 usable: never 400 unusable in a row

    all_bad = [Record([], [], i) for i in range(1, 2000) if i % 25]
    loader = TrainLoader(all_bad, _encoder(_Budget(5000)), batch_size=4, max_seq_len=24, max_images_per_row=1,
                         seed=0, pack_buffer=2, max_unusable_records=400)
    with pytest.raises(DataError, match=r"the last 400 rows read skipped \(no_supervised_tokens 400 \(e\.g\. record"):
        next(iter(loader))


def test_loader_gives_up_on_a_stream_with_no_usable_row_after_one_pass():
    budget = _Budget(300)

    def unusable(row: int, i: int) -> Record:
        budget.spend()
        raise RecordError("missing_field", f"row {i} has no messages")

    stream = StreamRecords(lambda: iter(range(30)), unusable)
    loader = TrainLoader(stream, _encoder(budget), batch_size=4, max_seq_len=24, max_images_per_row=1, seed=0)
    with pytest.raises(DataError, match=r"all 30 rows skipped \(missing_field 30 \(e\.g\. row 0 has no messages"):
        next(iter(loader))

    passes = _Budget(10)

    def no_rows():
        passes.spend()
        return iter(())

    empty = TrainLoader(StreamRecords(no_rows, unusable), _encoder(budget), batch_size=4, max_seq_len=24,
                        max_images_per_row=1, seed=0)
    with pytest.raises(DataError, match="all 0 rows skipped"):
        next(iter(empty))


# ----------------------------------------------------------------------------------------- signals


def _checkpoint_of(stderr: str) -> Path:
    last = stderr.rstrip().splitlines()[-1]
    assert "resume with: nanovlm train --resume " in last, stderr[-3000:]
    return Path(shlex.split(last.split("resume with: ", 1)[1])[-1])


@pytest.mark.slow
def test_ctrl_c_exits_130_with_a_loadable_checkpoint_and_the_printed_resume_command_runs_as_printed(tmp_path):
    from nanovlm_cli import VisionLanguageModel

    log = tmp_path / "first.log"
    proc = _start(_nanovlm("train", *FAST, "--max-steps", "300", "--save-checkpoint-steps", "1000",
                           "--output-dir", "runs", "--run-name", "cut"), tmp_path, log)
    _wait_for(log, "step 2/300", proc)
    proc.send_signal(signal.SIGINT)
    assert _finish(proc) == 130, log.read_text()[-3000:]
    checkpoint = _checkpoint_of(log.read_text())
    assert checkpoint.parent == Path("runs/cut/checkpoints")
    step = int(torch.load(tmp_path / checkpoint / STATE_FILE, weights_only=True)["step"])
    assert step >= 2 and checkpoint.name == f"step-{step:06d}"
    VisionLanguageModel.from_pretrained(tmp_path / checkpoint)  # loadable as a model

    # Exactly the printed command, with `nanovlm` on PATH (a shim for this checkout), from the same directory.
    command = log.read_text().rstrip().splitlines()[-1].split("resume with: ", 1)[1]
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "nanovlm").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m nanovlm_cli "$@"\n')
    (shim / "nanovlm").chmod(0o755)
    log2 = tmp_path / "resumed.log"
    proc = _start(shlex.split(command), tmp_path, log2, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    _wait_for(log2, f"step {step + 1}/300", proc)  # the run's own config: shapes, 300 steps, offline
    proc.send_signal(signal.SIGINT)
    assert _finish(proc) == 130, log2.read_text()[-3000:]
    resumed = log2.read_text()
    assert "resuming runs/cut with its saved training config" in resumed
    assert f"resumed from {checkpoint} at step {step}" in resumed
    assert _checkpoint_of(resumed).name > checkpoint.name


_STALLING_RUN = """
import sys, time
from pathlib import Path
import nanovlm_cli.training.datasets as training_data
from nanovlm_cli.cli.app import run

real_open, marker, after = training_data.open_source, Path(sys.argv[1]), int(sys.argv[2])

class Stalling:
    '''The training split: its records after the first `after` never arrive (a dead network mount).'''
    def __init__(self, source):
        self.source, self.calls = source, 0
    def __len__(self):
        return len(self.source)
    def __getitem__(self, i):
        self.calls += 1
        if self.calls > after:
            marker.write_text("stalled")
            while True:
                time.sleep(0.05)
        return self.source[i]

def open_source(spec, **kwargs):
    source = real_open(spec, **kwargs)
    return Stalling(source) if kwargs.get("split") == "train" else source

training_data.open_source = open_source
sys.exit(run(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])  # 2: prefetch and encode threads stuck in the read
def test_sigterm_while_waiting_for_data_saves_the_last_finished_step_and_resumes_exactly(tmp_path, workers):
    script = tmp_path / "stalling_run.py"
    script.write_text(_STALLING_RUN)
    common = (*FAST, "--num-workers", workers, "--max-steps", "8", "--save-checkpoint-steps", "100",
              "--output-dir", str(tmp_path))
    subprocess.run(_nanovlm("train", *common, "--run-name", "ref"), cwd=REPO, env=_env(), capture_output=True,
                   check=True, timeout=180)
    # Windows of 8 records give 2 batches each: 24 records are 6 steps, then the 4th window never arrives.
    marker, log = tmp_path / "stalled", tmp_path / "stall.log"
    proc = _start([sys.executable, str(script), str(marker), "24", "train", *common, "--run-name", "cut"], REPO, log)
    metrics, deadline = tmp_path / "cut" / "metrics.jsonl", time.time() + 120
    while not (marker.is_file() and metrics.is_file() and len(metrics.read_text().splitlines()) == 6):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(0.5)  # step 6 is done; the loop waits for a batch that never comes
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc) == 143, log.read_text()[-3000:]
    assert "interrupted by SIGTERM at step 6/8" in log.read_text()
    checkpoint = _checkpoint_of(log.read_text())
    assert checkpoint == tmp_path / "cut" / "checkpoints" / "step-000006"

    subprocess.run(_nanovlm("train", "--resume", str(checkpoint)), cwd=REPO, env=_env(), capture_output=True,
                   check=True, timeout=180)

    def losses(run: str) -> dict[int, float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {json.loads(x)["step"]: json.loads(x)["loss"] for x in lines}

    assert losses("cut") == losses("ref")  # the saved data position is the finished step's, not the loader's


def _writer_can_open(fifo: Path) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody has opened it for reading yet
        return None


def test_sigterm_while_the_dataset_is_being_opened_exits_143_at_once(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)  # reading it blocks until a writer sends data: a dataset that never finishes loading
    log = tmp_path / "open.log"
    proc = _start(_nanovlm("train", *FAST, "--max-steps", "2", "--dataset", str(fifo), "--output-dir", "runs"),
                  tmp_path, log)
    deadline, fd = time.time() + 120, None
    while fd is None:
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
        fd = _writer_can_open(fifo)
    try:
        time.sleep(0.3)  # the reader is now blocked in read()
        proc.send_signal(signal.SIGTERM)
        assert _finish(proc, timeout=30) == 143, log.read_text()[-3000:]
    finally:
        os.close(fd)
    last = log.read_text().rstrip().splitlines()[-1]
    assert last == "interrupted (SIGTERM) before the first step; no checkpoint was written by this process"


@pytest.mark.slow
def test_sigterm_during_steps_saves_a_checkpoint_and_exits_143(tmp_path):
    log = tmp_path / "term.log"
    proc = _start(_nanovlm("train", *FAST, "--max-steps", "300", "--save-checkpoint-steps", "1000",
                           "--output-dir", str(tmp_path), "--run-name", "term"), REPO, log)
    _wait_for(log, "step 2/300", proc)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc) == 143, log.read_text()[-3000:]
    saved = list((tmp_path / "term" / "checkpoints").iterdir())
    assert len(saved) == 1 and (saved[0] / STATE_FILE).is_file()
    assert log.read_text().count(str(saved[0])) == 1  # named once, in the resume command


# ----------------------------------------------------------------------------------------- resume config


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.delenv("NANOVLM_DEBUG", raising=False)

    def invoke(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = app_module.run(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def _fake_run(cli, run_dir: Path, *flags: str) -> dict:
    """A run directory as the loop leaves it (run_config.json and one checkpoint), without training."""
    code, out, err = cli("train", "--preset", "tiny", "--dry-run", "--json", *flags)
    assert code == 0, err
    saved = json.loads(out)
    (run_dir / "checkpoints" / "step-000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000004" / STATE_FILE).write_bytes(b"")
    (run_dir / "run_config.json").write_text(json.dumps({"model": saved["model"], "train": saved["train"]}))
    return saved


def test_resume_takes_the_runs_saved_config_and_flags_override_it_with_a_log_line(cli, tmp_path):
    saved = _fake_run(cli, tmp_path / "runs" / "a", "--max-steps", "500", "--dataset-size", "64")
    checkpoint = tmp_path / "runs" / "a" / "checkpoints" / "step-000004"
    code, out, err = cli("train", "--resume", str(checkpoint), "--dry-run", "--json")
    assert code == 0, err
    resolved = json.loads(out)
    assert resolved["model"] == saved["model"]
    assert resolved["train"] == {**saved["train"], "resume": str(checkpoint)}  # not the default preset
    assert "with its saved training config" in err

    code, out, err = cli("train", "--resume", str(checkpoint), "--max-steps", "900", "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["train"]["max_steps"] == 900 and json.loads(out)["train"]["dataset"] == "shapes"
    assert "max_steps 500 -> 900" in err


def test_resume_refuses_to_swap_the_model_of_a_run(cli, tmp_path):
    _fake_run(cli, tmp_path / "a")
    code, _, err = cli("train", "--resume", str(tmp_path / "a"), "--language-model", "gemma", "--dry-run")
    assert code == 1 and "--language-model cannot change the model of a resumed run" in err


def test_resume_of_an_output_directory_names_the_runs_it_holds(cli, tmp_path):
    _fake_run(cli, tmp_path / "runs" / "first")
    _fake_run(cli, tmp_path / "runs" / "second")
    code, _, err = cli("train", "--resume", str(tmp_path / "runs"), "--dry-run")
    [line] = _error_lines(err)
    assert code == 1 and "holding 2 run(s) (first, second)" in line and f"--resume {tmp_path / 'runs'}" in line


# ----------------------------------------------------------------------------------------- output


def test_plain_logs_through_a_pipe_are_one_line_per_event_and_the_summary_reads_well(tmp_path):
    result = subprocess.run(
        _nanovlm("train", *FAST[:-4], "--console-log-interval", "1", "--eval-size", "5", "--max-steps", "3",
                 "--save-checkpoint-steps", "2", "--output-dir", str(tmp_path), "--run-name", "pipe"),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    err_lines = result.stderr.splitlines()
    assert "\r" not in result.stderr and all(line == line.rstrip() for line in err_lines)
    assert any(len(line) > 80 for line in err_lines)  # long events stay whole: nothing wraps at 80 columns
    # Each log record is one line holding the whole message (Rich's columns used to split it over two).
    rank = [line for line in err_lines if "shapes-rank (rank): accuracy" in line]
    assert len(rank) == 1 and rank[0].endswith("s)") and " INFO " in rank[0]
    checkpoint = str(tmp_path / "pipe" / "checkpoints" / "step-000002")
    assert result.stderr.count(checkpoint) == 1  # the progress line, not also the library's "saved" log
    assert "done: 3 steps in" in result.stderr and "of evaluation" in result.stderr

    out = result.stdout.splitlines()
    assert out[0].startswith("trained a ") and "for 3 steps on shapes" in out[0]
    protocols = [line.strip().split("  ")[0] for line in out if line.strip().startswith(("open", "multiple"))]
    assert protocols == ["open answer (exact match of the short reply)", "multiple choice by option likelihood",
                         "multiple choice by generated letter (MMStar)"]
    assert "wall_time_s" not in result.stdout and f"model: {tmp_path / 'pipe' / 'final'}" in out
    saved = json.loads((tmp_path / "pipe" / "summary.json").read_text())  # the raw record stays complete
    assert saved["wall_time_s"] > 0 and saved["eval"]["open"]["n"] == 5
    assert saved["best_val_loss"] == saved["final_val_loss"] is not None  # one validation, at the end


def test_summary_lines_round_scores_and_name_each_protocol_letter_last():
    def result(accuracy: float, scoring: str) -> dict:
        return {"benchmark": "shapes", "scoring": scoring, "n": 200, "accuracy": accuracy,
                "by_category": {"colour": accuracy, "shape": 1 / 3}, "unanswered": 0}

    evaluation = {**result(0.2250000001, "generate"), "unanswered": 151,
                  "rank": result(0.6, "rank"), "open": result(0.8512345, "generate")}
    summary = TrainSummary(run_dir="runs/x", steps=20, samples_seen=1280, tokens_seen=150112, skipped={"too_long": 3},
                           final_loss=1.23456, best_val_loss=1.70211, final_val_loss=1.7763, wall_time_s=135.4,
                           samples_per_s=9.45, tokens_per_s=1108.7, final_checkpoint="runs/x/final", dataset="shapes",
                           eval=evaluation, eval_time_s=38.2, n_params=1_262_912)
    text = "\n".join(summary_lines(summary))
    assert text.splitlines()[0] == ("trained a 1,262,912-parameter model for 20 steps on shapes: 1,280 samples, "
                                    "150,112 tokens in 2m15s (1,109 tokens/s)")
    assert "loss: train 1.2346 (last step), validation 1.7763 (last), 1.7021 (best)" in text
    assert "skipped 3 samples: too_long 3" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("  ") and line.split()[-1][0].isdigit()]
    assert [row[-3:] for row in rows] == [["0.85", "0.85", "0.33"], ["0.60", "0.60", "0.33"],
                                          ["0.23", "0.23", "0.33"]]
    assert "151 of 200 replies named no option" in text and "0.2250000001" not in text
    assert all(line == line.rstrip() for line in text.splitlines())


def test_local_files_have_only_a_train_split_so_validation_never_reads_training_rows(tmp_path):
    from nanovlm_cli.data.sources import open_source
    from nanovlm_cli.presets import get_preset
    from nanovlm_cli.training.datasets import training_dataset

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    assert len(open_source(str(path))) == 1
    with pytest.raises(DataError, match=r"single split, 'train', not 'validation'"):
        open_source(str(path), split="validation")
    cfg = get_preset("tiny").train.replace(dataset=str(path))
    assert training_dataset(cfg).validation_source(None) is None  # no validation loss, rather than one on the training rows
