"""The training loop: packed batches -> token-weighted loss -> AdamW, with exact resume, DDP or FSDP2.

A run is a recipe in named stages (after torchtune's recipes), each a method of `TrainingRecipe`:

    setup             _setup_model, _setup_optimizer, _setup_data, load_checkpoint_state, wrap_model
    train             per step: train_step (one optimizer step), _record_step, validate_and_save
    finish            the final checkpoint, the summary, the dataset's end-of-run evaluation, files, push

Design choices:
- The loss of an optimiser step is the sum of cross-entropy over every supervised token of all its micro-batches on
  all ranks, divided by that global token count. So 2 processes with batch b give the same update as 1 process with
  batch 2b, and gradient accumulation is exact, whatever the packing.
- A checkpoint holds everything the next step depends on (weights, optimizer, scheduler, and the `RunState`: step,
  RNG states, the data loader's position including its packing buffer), so a resumed run reproduces the
  uninterrupted one.
- Ctrl-C / SIGTERM during a step finish it, save a checkpoint and return (`summary.interrupted_by`); while waiting
  for data or before the first step they stop at once (`training.signals`), saving what a finished step left.
- Three seams for what comes next (LoRA adapters, FSDP2), each marked `SEAM` below: `_setup_optimizer` chooses the
  trainable parameters, `training.parallel.wrap_model` wraps the model for distribution, and `save_checkpoint` /
  `load_checkpoint_state` are the one place checkpoint state is gathered, written and restored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nanovlm_cli.checkpoint.io import build_model, load_model, read_checkpoint_config, save_model
from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.data.sample import Batch
from nanovlm_cli.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from nanovlm_cli.errors import TrainingError
from nanovlm_cli.hub import push_checkpoint
from nanovlm_cli.models.lora import base_description, lora_config, prepare_lora
from nanovlm_cli.models.vlm import VisionLanguageModel, compile_blocks, eval_mode, loss_targets
from nanovlm_cli.training import fsdp
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
from nanovlm_cli.training.parallel import wrap_model
from nanovlm_cli.training.reporting import CallbackList, Reporter, check_reporter_installed
from nanovlm_cli.training.signals import StopFlag, TrainingInterrupted, signal_name
from nanovlm_cli.training.state import RunState

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
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            with _autocast(device):
                out = model.loss(batch.to(device))
            total += float(out.loss_sum)
            count += out.n_tokens
    total, count = all_reduce_sum(total, info, device), all_reduce_sum(count, info, device)
    return total / count if count else None


def train(model_cfg: VLMConfig, cfg: TrainConfig, *, callback: TrainCallback | None = None) -> TrainSummary:
    """Train (or resume, with `cfg.resume`) and return the run's summary. Rank 0 alone writes files.

    A SIGINT/SIGTERM before the first step raises `TrainingInterrupted` (nothing to save); later it returns the
    summary of the saved checkpoint with `interrupted_by` set (see `training.signals`).
    """
    callback = callback or NullCallback()
    check_reporter_installed(cfg.report_to)  # fail before any work starts
    if cfg.strategy == "fsdp":
        fsdp.check_fsdp_config(cfg)
    with StopFlag() as stop:
        info, device = init_distributed(cfg.device)
        if cfg.max_threads:
            torch.set_num_threads(cfg.max_threads)
        try:
            summary = TrainingRecipe(cfg, info, device, stop, callback).run(model_cfg)
            if info.enabled:  # no rank tears its connections down while another still finishes (rank 0 saves last)
                torch.distributed.barrier()
            return summary
        finally:
            shutdown(info)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured, summed over ranks."""

    loss: float  # per supervised token
    grad_norm: float  # before clipping
    n_samples: int
    n_tokens: int


class TrainingRecipe:
    """One training run in named stages: `run` = `setup` -> `train` -> `finish` (see the module docstring).

    The live `state` (a `RunState`) is the run's position; `setup` builds the rest.
    """

    run_dir: Path
    model_cfg: VLMConfig  # the model's own config (a resumed checkpoint's, not the one passed in)
    model: VisionLanguageModel
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: TrainingData
    n_trainable: int
    n_frozen: int
    lora_base: str | None  # what the adapters of a LoRA run apply to (see models.lora.base_description)

    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device, stop: StopFlag,
                 callback: TrainCallback) -> None:
        self.cfg, self.info, self.device, self.stop, self.callback = cfg, info, device, stop, callback
        self.state = RunState()
        self.start_step = 0
        self.last_loss: float | None = None  # of the last finite step
        self.val_loss: float | None = None  # of the last validation
        self.nonfinite_in_row = self.nonfinite_total = 0
        self.saved: tuple[int, Path] | None = None  # (step, directory) of the last step checkpoint written
        self.rng_after_step: dict[str, Any] | None = None  # single process: what a save after a data wait records
        self.metrics_file: Any = None
        self.wrapped: torch.nn.Module | None = None  # the model wrapped for distribution (DDP), None alone

    def run(self, model_cfg: VLMConfig) -> TrainSummary:
        t_start = time.perf_counter()
        self.setup(model_cfg)
        self.train()
        return self.finish(t_start)

    # ------------------------------------------------------------------ set up

    def setup(self, model_cfg: VLMConfig) -> None:
        """Model, optimizer and data (in that order: the optimizer needs the trainable parameters, the data the
        tokenizer), the resumed state, the run directory, then the compiled and wrapped model."""
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        checkpoint: Path | None = None
        if cfg.resume:
            checkpoint, self.run_dir = st.find_resume_checkpoint(cfg.resume)
            fsdp.check_resume_strategy(checkpoint, cfg.strategy == "fsdp", info)  # before any work starts
        else:
            self.run_dir = _run_dir(cfg)
        self._setup_model(model_cfg, checkpoint)
        self._setup_optimizer()
        self._setup_data()
        if checkpoint is not None:
            self.load_checkpoint_state(st.load_run_state(checkpoint), checkpoint)
        # The data position after the last finished step: a signal while the next batches load leaves the loader
        # ahead of the model, so a checkpoint saved then must not take the loader's live state.
        self.state.data, self.state.skips = self.data.loader.state_dict(), self.data.skips.state_dict()
        self.start_step = self.state.step
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_config = {"model": self.model_cfg.to_dict(), "train": cfg.to_dict()}
            (self.run_dir / "run_config.json").write_text(json.dumps(run_config, indent=2))
            st.truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
        if cfg.compile and not fsdp.is_sharded(self.model):  # FSDP compiles its blocks before sharding them
            compile_blocks(self.model, self.device)
        self.wrapped = wrap_model(self.model, info, self.device)  # SEAM (FSDP2): see training.parallel
        if info.is_main and cfg.report_to != "none":
            self.callback = CallbackList(self.callback, Reporter(cfg.report_to, self.model_cfg, cfg))
        self.n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.n_frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        self.callback.on_start(RunInfo(
            str(self.run_dir), self.run_dir.name, str(self.device), info.world_size, self.n_trainable,
            self.n_frozen, cfg.max_steps, self.state.step, str(cfg.resume) if cfg.resume else None))

    def _setup_model(self, model_cfg: VLMConfig, checkpoint: Path | None) -> None:
        """The model to train: the resumed checkpoint's, or a new one from `model_cfg` (pretrained backbones)."""
        device = torch.device("cpu") if self.cfg.strategy == "fsdp" else self.device  # FSDP moves only its shards
        if checkpoint is not None:
            loaded = load_model(checkpoint, device=device)
        else:
            loaded = build_model(model_cfg, load_backbones=True, device=device)
        self.model_cfg, self.model, self.tokenizer = loaded.cfg, loaded.model, loaded.tokenizer
        saved_lora = read_checkpoint_config(checkpoint).lora if checkpoint is not None else None
        self.lora_base = base_description(self.model_cfg, saved_lora)  # what LoRA checkpoints name as their base
        self.model.train()
        if self.cfg.gradient_checkpointing:
            self.model.vision.gradient_checkpointing = True
            self.model.language.gradient_checkpointing = True

    def _setup_optimizer(self) -> None:
        """Freeze what the config freezes, then the optimizer and LR schedule over the parameters left trainable."""
        # SEAM (LoRA): the trainable parameters are chosen here; the optimizer is built over those alone.
        if not prepare_lora(self.model, lora_config(self.cfg), resumed=bool(self.cfg.resume)):  # LoRA, or full
            apply_freezing(self.model, self.cfg)
        if self.cfg.strategy == "fsdp":  # SEAM (FSDP2): the optimizer must be built over the shards
            fsdp.shard_model(self.model, self.device, self.info, compile=self.cfg.compile)
        self.optimizer = build_optimizer(self.model, self.cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)

    def _setup_data(self) -> None:
        """This rank's loader, validation batches and the dataset's end-of-run evaluation (`training.data`)."""
        self.data = build_training_data(self.model_cfg, self.cfg, self.tokenizer, self.info)

    # ------------------------------------------------------------------ checkpoint state

    def save_checkpoint(self, rng: Any, name: str | None = None) -> Path:
        """Write the model files and the run state to checkpoints/step-N (then prune old ones), or to `name`.

        Rank 0 only (every rank under FSDP: each writes its shards); `rng` is `_gathered_rng()` (collected on every
        rank beforehand).
        """
        # SEAM (FSDP2, LoRA): checkpoint state is gathered here (weights, optimizer) and restored in
        # load_checkpoint_state.
        sharded = fsdp.is_sharded(self.model)  # the optimizer state goes to the shards (training.fsdp)
        snapshot = replace(self.state, rng=rng, optimizer={} if sharded else self.optimizer.state_dict(),
                           scheduler=self.scheduler.state_dict(), train_config=self.cfg.to_dict())
        directory = self.run_dir / (name or f"checkpoints/step-{self.state.step:06d}")
        extra = {st.STATE_FILE: st.serialize_state(snapshot.to_dict())}
        if sharded:
            path = fsdp.save_checkpoint(self.model, self.optimizer, directory, self.info, tokenizer=self.tokenizer,
                                        state_file=(st.STATE_FILE, extra[st.STATE_FILE]))
        else:
            path = save_model(self.model, directory, tokenizer=self.tokenizer, extra_files=extra,
                              lora_base=self.lora_base)
        if name is None:
            self.saved = (self.state.step, path)
            if self.info.is_main:
                st.prune_checkpoints(self.run_dir, self.cfg.keep_last_checkpoints, self.state.best_dir)
        return path

    def load_checkpoint_state(self, saved: RunState, checkpoint: Path) -> None:
        """Restore optimizer, schedule, data position and this rank's RNG from a saved run state."""
        # SEAM (FSDP2, LoRA): checkpoint state is restored here (gathered in save_checkpoint).
        if fsdp.is_sharded(self.model):
            fsdp.load_checkpoint(self.model, self.optimizer, checkpoint, self.info)
        else:
            self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        self.data.loader.load_state_dict(saved.data)
        self.data.skips.load_state_dict(saved.skips)
        st.restore_rng(saved.rng_for_rank(self.info.rank))
        self.state = replace(saved, optimizer={}, scheduler={}, rng=None)  # the live state keeps no stale copies

    def _gathered_rng(self) -> list[dict[str, Any]] | dict[str, Any]:
        """This process's RNG states, or every rank's under DDP (a collective: every rank must call it)."""
        if not self.info.enabled:
            return st.capture_rng()
        out: list[Any] = [None] * self.info.world_size
        torch.distributed.all_gather_object(out, st.capture_rng())
        return out

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        """Optimizer steps until `max_steps` or a stop signal (each step is finished before a signal stops it)."""
        cfg, info, stop = self.cfg, self.info, self.stop
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a") if info.is_main else None
        batches = iter(self.data.loader)
        self.rng_after_step = st.capture_rng()
        try:
            while self.state.step < cfg.max_steps:
                # Between steps a signal stops at once (nothing is half done), except under DDP where the ranks stop
                # together after a step; a second signal (`forced`) stops at once, even mid-step, without saving.
                t0 = time.perf_counter()
                with stop.deferred() if info.enabled else contextlib.nullcontext():
                    micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
                with stop.deferred():
                    self.state.data, self.state.skips = self.data.loader.state_dict(), self.data.skips.state_dict()
                    t_data = time.perf_counter() - t0
                    result = self.train_step(micro)
                    self._record_step(result, t0, t_data)
                    if self.validate_and_save():
                        break
                    if not info.enabled:
                        self.rng_after_step = st.capture_rng()
        except TrainingInterrupted as exc:
            self.data.loader.abandon()  # its threads may be stuck in a read: closing must not wait for them
            if exc.forced or self.state.step == 0:
                raise
        finally:
            stop.hold()  # until the evaluation, a signal only sets the flag: the last save must finish
            batches.close()
            if self.metrics_file is not None:
                self.metrics_file.close()

    def train_step(self, micro: list[Batch]) -> StepResult:
        """One optimizer step over the gradient-accumulation micro-batches `micro`: backward of the token-weighted
        loss, clipping, then the update, skipped when the loss or the gradient norm is not finite."""
        info, device, state = self.info, self.device, self.state
        local_tokens = sum(int(loss_targets(b)[1].sum()) for b in micro)
        global_tokens = all_reduce_sum(local_tokens, info, device)
        scale = info.world_size / max(global_tokens, 1.0)  # DDP averages gradients over ranks
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            loss_sum += self._backward(batch.to(device, non_blocking=True), scale, sync=i == len(micro) - 1)
        step_loss = all_reduce_sum(loss_sum, info, device) / max(global_tokens, 1.0)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.cfg.max_grad_norm))
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.nonfinite_in_row = 0
            self.last_loss = step_loss
        else:
            self._skip_nonfinite(step_loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        state.step += 1
        n_samples = int(all_reduce_sum(sum(b.n_samples for b in micro), info, device))
        n_tokens = int(all_reduce_sum(sum(b.n_tokens for b in micro), info, device))
        state.samples_seen += n_samples
        state.tokens_seen += n_tokens
        return StepResult(step_loss, grad_norm, n_samples, n_tokens)

    def _backward(self, batch: Batch, scale: float, sync: bool) -> float:
        """Forward and backward of one micro-batch; under DDP gradients are all-reduced only when `sync`."""
        ddp = self.wrapped  # DDP: gradients all-reduce in backward, except under no_sync
        with ddp.no_sync() if (ddp is not None and not sync) else contextlib.nullcontext():
            with _autocast(self.device):
                batch_loss = ddp(batch) if ddp is not None else self.model.loss(batch).loss_sum
            (batch_loss * scale).backward()
        return float(batch_loss.detach())

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        """Count a skipped step; too many in a row stop the run (the learning rate or the data is broken)."""
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        step = self.state.step + 1
        log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); step skipped", step, loss,
                    grad_norm)
        if self.nonfinite_in_row >= self.cfg.max_nonfinite_steps:
            raise TrainingError(f"{self.nonfinite_in_row} non-finite steps in a row at step {step}; lower the "
                                "learning rates or check the data (see metrics.jsonl)")

    def _record_step(self, result: StepResult, t0: float, t_data: float) -> None:
        """The step's metrics line (with the dataset's evaluation every `eval_interval` steps) and callbacks."""
        cfg, step = self.cfg, self.state.step
        dt = time.perf_counter() - t0
        metrics = StepMetrics(
            step=step, loss=result.loss, lr={g["name"]: g["lr"] for g in self.optimizer.param_groups},
            grad_norm=result.grad_norm, tokens_per_s=result.n_tokens / dt, samples_per_s=result.n_samples / dt,
            data_wait_fraction=t_data / dt, memory=memory_snapshot(self.device), step_time_s=dt,
            samples_seen=self.state.samples_seen, skipped_nonfinite=self.nonfinite_total,
        )
        line = metrics.to_dict()
        if cfg.eval_interval and step % cfg.eval_interval == 0 and self.data.final_eval is not None:
            model = fsdp.gathered_model(self.model, self.device, self.info)  # a collective under FSDP
            if self.info.is_main:
                line["eval"] = self.data.final_eval(model, self.device)
                self.model.train()
            barrier(self.info)
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(line) + "\n")
            self.metrics_file.flush()
        self.callback.on_step(metrics)

    def validate_and_save(self) -> bool:
        """Validate every `validation_steps` steps and at the last; checkpoint every `save_checkpoint_steps` steps
        or when any rank was asked to stop. True: stop now (the checkpoint is written)."""
        cfg, info, state = self.cfg, self.info, self.state
        step, validated = state.step, False
        if step % cfg.validation_steps == 0 or step == cfg.max_steps:
            measure = fsdp.validation_loss if fsdp.is_sharded(self.model) else validation_loss
            self.val_loss = measure(self.model, self.data.validation, self.device, info)
            if self.val_loss is not None:
                validated = True
                state.best_val_seen = self.val_loss if state.best_val_seen is None else min(state.best_val_seen,
                                                                                            self.val_loss)
                self.callback.on_validation(step, self.val_loss)
        stop_now = bool(all_reduce_sum(float(self.stop.requested), info, self.device))
        if step % cfg.save_checkpoint_steps == 0 or stop_now:
            if validated and step % cfg.validation_steps == 0 and (
                    state.best_val_loss is None or self.val_loss < state.best_val_loss):
                state.best_val_loss = self.val_loss
                state.best_dir = self.run_dir / "checkpoints" / f"step-{step:06d}"
            rng = self._gathered_rng()  # a collective under DDP: every rank joins
            if info.is_main or fsdp.is_sharded(self.model):
                path = self.save_checkpoint(rng)
                if not stop_now and info.is_main:  # an interrupted run names its checkpoint once, in its last line
                    self.callback.on_checkpoint(step, str(path))
            barrier(info)
        return stop_now

    # ------------------------------------------------------------------ finish

    def finish(self, t_start: float) -> TrainSummary:
        """The final checkpoint and the summary; then, unless interrupted, the dataset's end-of-run evaluation,
        the summary files and the optional push (rank 0)."""
        interrupted = self.stop.requested
        final_dir = self._save_final(interrupted)
        self.stop.release()
        summary = self._summary(t_start, interrupted, final_dir)
        if self.info.is_main and not interrupted:
            self._evaluate_and_publish(summary, final_dir)
        self.callback.on_end(summary)
        return summary

    def _save_final(self, interrupted: bool) -> Path | None:
        """final/ after a finished run; the last step checkpoint after an interrupted one (rank 0's path)."""
        info, step = self.info, self.state.step
        if interrupted and info.is_main and (self.saved is None or self.saved[0] != step):
            # Single process, stopped while the next batches loaded: save what the last finished step left.
            self.save_checkpoint(self.rng_after_step)
        rng_final = self._gathered_rng()
        final_dir: Path | None = None
        if info.is_main or fsdp.is_sharded(self.model):
            final_dir = self.saved[1] if interrupted and self.saved is not None else \
                self.save_checkpoint(rng_final, name="final")
        barrier(info)
        return final_dir

    def _summary(self, t_start: float, interrupted: bool, final_dir: Path | None) -> TrainSummary:
        cfg, state, stop = self.cfg, self.state, self.stop
        wall = time.perf_counter() - t_start
        return TrainSummary(
            run_dir=str(self.run_dir), steps=state.step, samples_seen=state.samples_seen,
            tokens_seen=state.tokens_seen, skipped=self.data.skips.all_reduced().as_dict(),
            final_loss=self.last_loss, best_val_loss=state.best_val_seen, final_val_loss=self.val_loss,
            wall_time_s=wall, samples_per_s=state.samples_seen / wall, tokens_per_s=state.tokens_seen / wall,
            final_checkpoint=str(final_dir) if final_dir else None, interrupted=interrupted, dataset=cfg.dataset,
            nonfinite_steps=self.nonfinite_total, interrupted_by=signal_name(stop.signum) if stop.signum else None,
            max_steps=cfg.max_steps, start_step=self.start_step, n_params=self.n_trainable + self.n_frozen,
            n_params_trainable=self.n_trainable, n_params_frozen=self.n_frozen,
        )

    def _evaluate_and_publish(self, summary: TrainSummary, final_dir: Path | None) -> None:
        """The dataset's end-of-run evaluation (a signal stops only it), summary files, and the push if asked."""
        if self.data.final_eval is not None:
            t_eval = time.perf_counter()
            try:  # nothing is lost by stopping here: the final checkpoint is written
                model = load_model(final_dir, device=self.device).model if fsdp.is_sharded(self.model) else self.model
                summary.eval = self.data.final_eval(model, self.device)
            except TrainingInterrupted as exc:
                summary.interrupted, summary.interrupted_by = True, signal_name(exc.signum)
                summary.interrupted_during = "evaluation"
            summary.eval_time_s = time.perf_counter() - t_eval
        text = json.dumps(summary.to_dict(), indent=2) + "\n"
        (self.run_dir / "summary.json").write_text(text)
        if final_dir is not None:
            (final_dir / "training_summary.json").write_text(text)
            if summary.eval:
                (final_dir / "eval_results.json").write_text(json.dumps(summary.eval, indent=2) + "\n")
        if self.cfg.hf_repo_name and not summary.interrupted:
            push_checkpoint(final_dir, self.cfg.hf_repo_name)

