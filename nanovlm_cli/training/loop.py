"""The training loop: packed batches -> token-weighted loss -> AdamW, with exact resume and DDP.

Design choices:
- The loss of an optimiser step is the sum of cross-entropy over every supervised token of all its micro-batches on
  all ranks, divided by that global token count. So 2 processes with batch b give the same update as 1 process with
  batch 2b, and gradient accumulation is exact, whatever the packing.
- A checkpoint holds everything the next step depends on (weights, optimizer, scheduler, step, RNG states, the data
  loader's position including its packing buffer), so a resumed run reproduces the uninterrupted one.
- Ctrl-C / SIGTERM during a step finish it, save a checkpoint and return (`summary.interrupted_by`); while waiting
  for data or before the first step they stop at once (`training.signals`), saving what a finished step left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from nanovlm_cli.checkpoint.io import build_model, load_model, save_model
from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from nanovlm_cli.errors import TrainingError
from nanovlm_cli.models.vlm import compile_blocks, loss_targets
from nanovlm_cli.training import state as st
from nanovlm_cli.training.data import TrainingData, build_training_data
from nanovlm_cli.training.metrics import (
    NullCallback,
    RunInfo,
    StepMetrics,
    TrainCallback,
    TrainSummary,
    memory_snapshot,
)
from nanovlm_cli.training.optim import apply_freezing, build_optimizer, build_scheduler
from nanovlm_cli.training.reporting import CallbackList, Reporter, check_reporter_installed
from nanovlm_cli.training.signals import StopFlag, TrainingInterrupted, signal_name

log = logging.getLogger(__name__)


def _run_dir(cfg: TrainConfig) -> Path:
    name = cfg.run_name or time.strftime("nanovlm-%Y%m%d-%H%M%S")
    return Path(cfg.output_dir) / name


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list, device: torch.device, info: DistInfo) -> float | None:
    if not batches and not info.enabled:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with _autocast(device):
            out = model.loss(batch.to(device))
        total += float(out.loss_sum)
        count += out.n_tokens
    model.train(was_training)
    total, count = all_reduce_sum(total, info, device), all_reduce_sum(count, info, device)
    return total / count if count else None


def train(
    model_cfg: VLMConfig,
    cfg: TrainConfig,
    *,
    callback: TrainCallback | None = None,
) -> TrainSummary:
    """Train (or resume, with `cfg.resume`) and return the run's summary. Rank 0 alone writes files.

    A SIGINT/SIGTERM before the first step raises `TrainingInterrupted` (nothing to save); later it returns the
    summary of the saved checkpoint with `interrupted_by` set (see `training.signals`).
    """
    callback = callback or NullCallback()
    check_reporter_installed(cfg.report_to)  # fail before any work starts
    with StopFlag() as stop:
        info, device = init_distributed(cfg.device)
        if cfg.max_threads:
            torch.set_num_threads(cfg.max_threads)
        try:
            return _train(model_cfg, cfg, callback, info, device, stop)
        finally:
            shutdown(info)


def _train(model_cfg: VLMConfig, cfg: TrainConfig, callback: TrainCallback, info: DistInfo,
           device: torch.device, stop: StopFlag) -> TrainSummary:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    resume_state: dict[str, Any] | None = None
    if cfg.resume:
        checkpoint, run_dir = st.find_resume_checkpoint(cfg.resume)
        loaded = load_model(checkpoint, device=device)
        resume_state = st.load_training_state(checkpoint)
        model_cfg = loaded.cfg
    else:
        run_dir = _run_dir(cfg)
        loaded = build_model(model_cfg, load_backbones=True, device=device)
        model_cfg = loaded.cfg
    model, tokenizer = loaded.model, loaded.tokenizer
    model.train()
    apply_freezing(model, cfg)
    if cfg.gradient_checkpointing:
        model.vision.gradient_checkpointing = True
        model.language.gradient_checkpointing = True
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    data: TrainingData = build_training_data(model_cfg, cfg, tokenizer, info)
    step = 0
    best_val: float | None = None
    best_dir: Path | None = None  # the best checkpoint by validation (never pruned); best_val is its loss
    best_seen: float | None = None  # the lowest validation loss of the run, checkpointed or not
    samples_seen = tokens_seen = 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        data.loader.load_state_dict(resume_state["data"])
        data.skips.load_state_dict(resume_state["skips"])
        step = int(resume_state["step"])
        best_val = resume_state.get("best_val_loss")
        best_dir = Path(resume_state["best_dir"]) if resume_state.get("best_dir") else None
        best_seen = resume_state.get("best_val_seen", best_val)
        samples_seen, tokens_seen = int(resume_state["samples_seen"]), int(resume_state["tokens_seen"])
        st.restore_rng(resume_state["rng"][info.rank] if isinstance(resume_state["rng"], list) else resume_state["rng"])
    start_step = step
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_config.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict()},
                                                            indent=2))
        st.truncate_metrics(run_dir / "metrics.jsonl", step)
    if cfg.compile:
        compile_blocks(model, device)
    ddp_model = DistributedDataParallel(
        _LossModule(model), device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,  # text-only batches leave the vision encoder unused
    ) if info.enabled else None
    if info.is_main and cfg.report_to != "none":
        callback = CallbackList(callback, Reporter(cfg.report_to, model_cfg, cfg))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    callback.on_start(RunInfo(str(run_dir), run_dir.name, str(device), info.world_size, n_trainable, n_frozen,
                              cfg.max_steps, step, str(cfg.resume) if cfg.resume else None))

    # The data position after the last finished step: a signal while the next batches load leaves the loader
    # ahead of the model, so a checkpoint saved then must not take the loader's live state.
    data_state, skips_state = data.loader.state_dict(), data.skips.state_dict()

    def save(directory: Path, rng: Any) -> Path:
        extra = {st.STATE_FILE: st.serialize_state({
            "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "data": data_state, "skips": skips_state, "rng": rng,
            "samples_seen": samples_seen, "tokens_seen": tokens_seen, "best_val_loss": best_val,
            "best_dir": str(best_dir) if best_dir else None, "best_val_seen": best_seen,
            "train_config": cfg.to_dict(),
        })}
        return save_model(model, directory, tokenizer=tokenizer, extra_files=extra)

    def gathered_rng() -> list[dict[str, Any]] | dict[str, Any]:
        if not info.enabled:
            return st.capture_rng()
        out: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(out, st.capture_rng())
        return out

    metrics_file = (run_dir / "metrics.jsonl").open("a") if info.is_main else None
    batches = iter(data.loader)
    last_loss: float | None = None
    val_loss: float | None = None
    nonfinite_in_row = nonfinite_total = 0
    rng_after_step = st.capture_rng()  # single process: what a save after an interrupted data wait records
    saved: tuple[int, Path] | None = None  # (step, directory) of the last checkpoint written
    try:
        while step < cfg.max_steps:
            # Between steps a signal stops at once (nothing is half done), except under DDP where the ranks stop
            # together after a step; a second signal (`forced`) stops at once, even mid-step, without saving.
            t0 = time.perf_counter()
            with stop.deferred() if info.enabled else contextlib.nullcontext():
                micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
            with stop.deferred():
                data_state, skips_state = data.loader.state_dict(), data.skips.state_dict()
                t_data = time.perf_counter() - t0
                local_tokens = sum(int(loss_targets(b)[1].sum()) for b in micro)
                global_tokens = all_reduce_sum(local_tokens, info, device)
                scale = info.world_size / max(global_tokens, 1.0)  # DDP averages gradients over ranks
                loss_sum = 0.0
                for i, batch in enumerate(micro):
                    batch = batch.to(device, non_blocking=True)
                    sync = i == len(micro) - 1
                    ctx = ddp_model.no_sync() if (ddp_model is not None and not sync) else contextlib.nullcontext()
                    with ctx:
                        with _autocast(device):
                            batch_loss = ddp_model(batch) if ddp_model is not None else model.loss(batch).loss_sum
                        (batch_loss * scale).backward()
                    loss_sum += float(batch_loss.detach())
                step_loss = all_reduce_sum(loss_sum, info, device) / max(global_tokens, 1.0)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm))
                finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                    nonfinite_in_row = 0
                else:
                    nonfinite_in_row += 1
                    nonfinite_total += 1
                    log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); step skipped",
                                step + 1, step_loss, grad_norm)
                    if nonfinite_in_row >= cfg.max_nonfinite_steps:
                        raise TrainingError(f"{nonfinite_in_row} non-finite steps in a row at step {step + 1}; lower "
                                            "the learning rates or check the data (see metrics.jsonl)")
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                n_samples = int(all_reduce_sum(sum(b.n_samples for b in micro), info, device))
                n_tok = int(all_reduce_sum(sum(b.n_tokens for b in micro), info, device))
                samples_seen += n_samples
                tokens_seen += n_tok
                dt = time.perf_counter() - t0
                last_loss = step_loss if finite else last_loss
                metrics = StepMetrics(
                    step=step, loss=step_loss, lr={g["name"]: g["lr"] for g in optimizer.param_groups},
                    grad_norm=grad_norm, tokens_per_s=n_tok / dt, samples_per_s=n_samples / dt,
                    data_wait_fraction=t_data / dt, memory=memory_snapshot(device), step_time_s=dt,
                    samples_seen=samples_seen, skipped_nonfinite=nonfinite_total,
                )
                line = metrics.to_dict()
                if cfg.eval_interval and step % cfg.eval_interval == 0 and data.final_eval is not None:
                    if info.is_main:
                        line["eval"] = data.final_eval(model, device)
                        model.train()
                    barrier(info)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(line) + "\n")
                    metrics_file.flush()
                callback.on_step(metrics)
                validated = False
                if step % cfg.validation_steps == 0 or step == cfg.max_steps:
                    val_loss = validation_loss(model, data.validation, device, info)
                    if val_loss is not None:
                        validated = True
                        best_seen = val_loss if best_seen is None else min(best_seen, val_loss)
                        callback.on_validation(step, val_loss)
                stop_now = bool(all_reduce_sum(float(stop.requested), info, device))
                if step % cfg.save_checkpoint_steps == 0 or stop_now:
                    if validated and step % cfg.validation_steps == 0 and (best_val is None or val_loss < best_val):
                        best_val = val_loss
                        best_dir = run_dir / "checkpoints" / f"step-{step:06d}"
                    rng_for_save = gathered_rng()  # a collective under DDP: every rank joins
                    if info.is_main:
                        saved = (step, _save_step(save, run_dir, step, rng_for_save))
                        st.prune_checkpoints(run_dir, cfg.keep_last_checkpoints, best_dir)
                        if not stop_now:  # an interrupted run names its checkpoint once, in its last line
                            callback.on_checkpoint(step, str(saved[1]))
                    barrier(info)
                if stop_now:
                    break
                if not info.enabled:
                    rng_after_step = st.capture_rng()
    except TrainingInterrupted as exc:
        data.loader.abandon()  # its threads may be stuck in a read: closing must not wait for them
        if exc.forced or step == 0:
            raise
    finally:
        stop.hold()  # until the evaluation, a signal only sets the flag: the last save must finish
        batches.close()
        if metrics_file is not None:
            metrics_file.close()
    interrupted = stop.requested
    final_dir: Path | None = None
    if interrupted and info.is_main and (saved is None or saved[0] != step):
        # Single process, stopped while the next batches loaded: save what the last finished step left.
        saved = (step, _save_step(save, run_dir, step, rng_after_step))
        st.prune_checkpoints(run_dir, cfg.keep_last_checkpoints, best_dir)
    rng_final = gathered_rng()
    if info.is_main:
        final_dir = saved[1] if interrupted and saved is not None else \
            _save_step(save, run_dir, step, rng_final, name="final")
    barrier(info)
    stop.release()
    wall = time.perf_counter() - t_start
    summary = TrainSummary(
        run_dir=str(run_dir), steps=step, samples_seen=samples_seen, tokens_seen=tokens_seen,
        skipped=data.skips.all_reduced().as_dict(),
        final_loss=last_loss, best_val_loss=best_seen, final_val_loss=val_loss, wall_time_s=wall,
        samples_per_s=samples_seen / wall, tokens_per_s=tokens_seen / wall,
        final_checkpoint=str(final_dir) if final_dir else None, interrupted=interrupted, dataset=cfg.dataset,
        nonfinite_steps=nonfinite_total, interrupted_by=signal_name(stop.signum) if stop.signum else None,
        max_steps=cfg.max_steps, start_step=start_step, n_params=n_trainable + n_frozen,
    )
    if info.is_main and not interrupted:
        if data.final_eval is not None:
            t_eval = time.perf_counter()
            try:  # nothing is lost by stopping here: the final checkpoint is written
                summary.eval = data.final_eval(model, device)
            except TrainingInterrupted as exc:
                summary.interrupted, summary.interrupted_by = True, signal_name(exc.signum)
                summary.interrupted_during = "evaluation"
            summary.eval_time_s = time.perf_counter() - t_eval
        (run_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        if final_dir is not None:
            (final_dir / "training_summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
            if summary.eval:
                (final_dir / "eval_results.json").write_text(json.dumps(summary.eval, indent=2) + "\n")
        if cfg.hf_repo_name and not summary.interrupted:
            from nanovlm_cli.hub import push_checkpoint

            push_checkpoint(final_dir, cfg.hf_repo_name)
    callback.on_end(summary)
    return summary


class _LossModule(torch.nn.Module):
    """What DDP wraps: its forward is the summed loss, so DDP's gradient hooks see the whole computation."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.model.loss(batch).loss_sum


def _save_step(save: Any, run_dir: Path, step: int, rng: Any, name: str | None = None) -> Path:
    directory = run_dir / (name or f"checkpoints/step-{step:06d}")
    return save(directory, rng)
