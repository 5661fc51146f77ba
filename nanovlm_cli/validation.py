"""Checkpoint pre-flight checks (`nanovlm validate`), in the spirit of litgpt's `scripts/validate.py`.

Main design choice: check without trusting and without loading more than needed. Tensor names, shapes and dtypes
are read from the safetensors headers (`safe_open`, no data) and compared with the model built on the meta
device; values are then streamed one tensor at a time for the NaN/Inf scan. Each check is independent and
reports a one-line detail, so a broken checkpoint lists every problem at once instead of the first exception;
a check that cannot run because an earlier one failed is recorded as skipped, never as passed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nanovlm_cli.checkpoint.files import read_json, resolve_checkpoint, weight_files
from nanovlm_cli.checkpoint.idefics3 import idefics3_tensor_to_ours
from nanovlm_cli.checkpoint.io import (
    CONFIG_FILE,
    CheckpointConfig,
    checkpoint_kind,
    classify_config,
    complete_config,
    load_checkpoint_tokenizer,
    load_model,
)
from nanovlm_cli.checkpoint.upstream import convert_upstream_state_dict
from nanovlm_cli.config import VLMConfig, check_field_types
from nanovlm_cli.errors import CheckpointError, NanoVLMError
from nanovlm_cli.models.lora import restore_adapters
from nanovlm_cli.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

HEAD, EMBED = "language.lm_head.weight", "language.embed_tokens.weight"
MAX_NAMED = 3  # tensors named in a detail line before "and N more"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    skipped: bool = False


@dataclass
class ValidationReport:
    source: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every check passed (a skipped check counts only when it was skipped on request, e.g. --no-generate)."""
        return all(c.ok for c in self.checks)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "ok": self.ok,
                "checks": [{"name": c.name, "ok": c.ok, "skipped": c.skipped, "detail": c.detail} for c in self.checks]}


def _named(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED])
    return shown + (f" (and {len(keys) - MAX_NAMED} more)" if len(keys) > MAX_NAMED else "")


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, NanoVLMError) and text else text or type(exc).__name__


def _count(n: int, word: str) -> str:
    """"1 token", "2 tokens"."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass
class _Header:
    """Name -> (shape, dtype) of every tensor, and name -> the file holding it."""

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    files: dict[str, Path]


def _read_headers(directory: Path) -> _Header:
    header = _Header({}, {})
    for file in weight_files(directory):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    piece = f.get_slice(key)
                    header.tensors[key] = (tuple(piece.get_shape()), _DTYPES.get(piece.get_dtype(), torch.float32))
                    header.files[key] = file
        except Exception as exc:  # SafetensorError on a truncated or corrupt header
            raise CheckpointError(f"{file.name} cannot be read ({_one_line(exc)}); the file is truncated or corrupt, "
                                  "re-save or re-download it") from exc
    return header


def _as_ours(header: _Header, cfg: VLMConfig, upstream: bool, kind: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """Stored name -> {our name: meta tensor of the converted shape}; upstream and Idefics3/SmolVLM go through their
    converters' tables."""
    metas = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype) in header.tensors.items()}
    untied = cfg.replace(language=cfg.language.replace(tie_embeddings=False))  # keep a stored head visible
    if kind == "idefics3":
        converted = {key: idefics3_tensor_to_ours(key, meta, untied) for key, meta in metas.items()}
        return {key: dict([c]) if c else {f"<unknown Idefics3 tensor {key}>": metas[key]}
                for key, c in converted.items()}
    if not upstream:
        return {key: {key: meta} for key, meta in metas.items()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, meta in metas.items():
        try:
            out[key] = convert_upstream_state_dict({key: meta}, untied)
        except CheckpointError:
            out[key] = {f"<unknown upstream tensor {key}>": meta}
    return out


def _meta_model(cfg: VLMConfig, lora: Any = None) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
        if lora is not None:  # a LoRA checkpoint's adapters, as loading re-creates them
            restore_adapters(model, lora)
    return model.state_dict()


class _Validator:
    """Runs the checks in order, sharing what earlier ones established (config, header, tokenizer)."""

    def __init__(self, source: str, device: str) -> None:
        self.report = ValidationReport(source)
        self.source, self.device = source, device
        self.directory: Path | None = None
        self.raw: dict[str, Any] = {}
        self.checkpoint: CheckpointConfig | None = None
        self.cfg: VLMConfig | None = None
        self.upstream = False
        self.kind = ""
        self.header: _Header | None = None
        self.tokenizer: Any = None

    # Checks run only once the values they need exist (see `run`), so these accessors never see None.
    @property
    def _cfg(self) -> VLMConfig:
        assert self.cfg is not None
        return self.cfg

    @property
    def _directory(self) -> Path:
        assert self.directory is not None
        return self.directory

    @property
    def _header(self) -> _Header:
        assert self.header is not None
        return self.header

    def run(self, name: str, needs: list[Any], fn: Callable[[], str]) -> bool:
        if any(n is None for n in needs):
            self.report.checks.append(Check(name, False, "skipped: an earlier check failed", skipped=True))
            return False
        try:
            self.report.checks.append(Check(name, True, fn()))
            return True
        except Exception as exc:  # every failure is a finding to report, not a crash
            log.debug("check %s failed", name, exc_info=True)
            self.report.checks.append(Check(name, False, _one_line(exc)))
            return False

    # -- checks ---------------------------------------------------------------------------------------------------

    def files(self) -> str:
        directory = resolve_checkpoint(self.source)
        self.raw = read_json(directory / CONFIG_FILE)
        self.directory = directory  # the config exists: later checks can run even if other files are missing
        self.kind = checkpoint_kind(self.raw) or ""
        self.upstream = self.kind == "upstream"
        found = ["config.json", *(w.name for w in weight_files(directory))]
        if not self.upstream:
            tokenizer_files = [n for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
                               if (directory / n).is_file()]
            if not set(tokenizer_files) - {"tokenizer_config.json"}:  # the config alone holds no vocabulary
                raise CheckpointError(f"no tokenizer files (tokenizer.json, tokenizer.model or vocab.json) in "
                                      f"{directory}; re-save the checkpoint with its tokenizer")
            found += tokenizer_files
        return f"{directory}: {', '.join(found)}"

    def config(self) -> str:
        if not self.upstream and isinstance(self.raw.get("model"), dict):  # name the file and the field
            check_field_types(VLMConfig, self.raw["model"], "model.", source=CONFIG_FILE)

        self.checkpoint = classify_config(self.raw, self._directory)  # VLMConfig validates itself
        cfg = self.checkpoint.cfg
        if cfg.image_token_id is not None and not 0 <= cfg.image_token_id < cfg.language.total_vocab_size:
            raise CheckpointError(f"image_token_id={cfg.image_token_id} is outside the {cfg.language.total_vocab_size}"
                                  "-row embedding; the config and the tokenizer disagree")
        self.cfg = cfg
        fmt = ("upstream nanoVLM format" if self.upstream else "transformers Idefics3/SmolVLM format"
               if self.kind == "idefics3" else f"nanovlm format {self.checkpoint.format_version}")
        return (f"{fmt}: {cfg.vision.kind} {cfg.vision.n_layers}L/{cfg.vision.hidden_dim}, decoder "
                f"{cfg.language.n_layers}L/{cfg.language.hidden_dim}, vocab {cfg.language.total_vocab_size}")

    def _buildable_cfg(self) -> VLMConfig:
        """The config with its image token id: a config saved without one (upstream) takes it from its tokenizer."""
        if self._cfg.image_token_id is None:
            assert self.checkpoint is not None
            self.tokenizer = load_checkpoint_tokenizer(self.checkpoint)
            self.cfg = complete_config(self._cfg, self.tokenizer)
        return self._cfg

    def tensors(self) -> str:
        directory = self._directory
        self.header = header = _read_headers(directory)
        cfg = self._buildable_cfg()
        expected = _meta_model(cfg, self.checkpoint.lora if self.checkpoint is not None else None)
        stored: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        head = None
        for mapped in _as_ours(header, cfg, self.upstream, self.kind).values():
            for name, meta in mapped.items():
                if name == HEAD and cfg.language.tie_embeddings:
                    head = (tuple(meta.shape), meta.dtype)
                    continue  # a stored head of a tied model is judged by the tied-weights check
                stored[name] = (tuple(meta.shape), meta.dtype)
        if self.upstream and head is not None and EMBED not in stored:
            stored[EMBED] = head  # upstream's save_model keeps the tied tensor once, as decoder.head.weight
        problems = []
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        if missing:
            problems.append(f"{len(missing)} missing: {_named(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {_named(unexpected)}")
        wrong = [f"{k} {list(stored[k][0])} (expected {list(expected[k].shape)})" for k in sorted(set(stored) & set(expected))
                 if tuple(stored[k][0]) != tuple(expected[k].shape)]
        if wrong:
            problems.append(f"{len(wrong)} with the wrong shape: {_named(wrong)}")
        bad_kind = sorted(k for k in set(stored) & set(expected)
                          if stored[k][1].is_floating_point != expected[k].dtype.is_floating_point)
        if bad_kind:
            problems.append(f"{len(bad_kind)} with a non-float dtype where weights are float: {_named(bad_kind)}")
        if problems:
            raise CheckpointError("; ".join(problems) + "; the weights do not match the config")
        dtypes = sorted({str(d).removeprefix("torch.") for _, d in header.tensors.values()})
        return (f"{_count(len(header.tensors), 'tensor')}, names and shapes match the config, "
                f"dtype {', '.join(dtypes)}")

    def finite(self) -> str:
        bad: list[str] = []
        by_file: dict[Path, list[str]] = {}
        for key, file in self._header.files.items():
            by_file.setdefault(file, []).append(key)
        n_values = 0
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in keys:
                    tensor = f.get_tensor(key)  # one tensor at a time: memory stays at the largest tensor
                    n_values += tensor.numel()
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        bad.append(key)
        if bad:
            raise CheckpointError(f"{len(bad)} tensor(s) hold NaN or Inf: {_named(bad)}; the weights are corrupt "
                                  "(a diverged run?), use an earlier checkpoint")
        return f"{n_values:,} values, all finite"

    def tied(self) -> str:
        cfg, header = self._cfg, self._header
        ours = {name: key for key, mapped in _as_ours(header, cfg, self.upstream, self.kind).items() for name in mapped}
        head, embed = ours.get(HEAD), ours.get(EMBED)
        if not cfg.language.tie_embeddings:
            if head is None:
                raise CheckpointError("the config has untied embeddings but no separate output head tensor is stored")
            return "untied: separate output head stored"
        if head is None:
            return "tied: the output head is the token embedding (stored once)"
        if embed is None:
            if self.upstream:  # what upstream's save_model writes: the shared tensor once, under the head's name
                return f"tied: stored once as {head}, which is also the token embedding"
            raise CheckpointError(f"{head} is stored but the token embedding is not")
        with safe_open(str(header.files[head]), framework="pt") as f:
            head_t = f.get_tensor(head)
        with safe_open(str(header.files[embed]), framework="pt") as f:
            embed_t = f.get_tensor(embed)
        if head_t.shape != embed_t.shape or not torch.equal(head_t, embed_t):
            raise CheckpointError(f"the config ties embeddings but {head} differs from {embed}; fix "
                                  "language.tie_embeddings or the weights")
        return f"tied: {head} stored and equal to {embed}"

    def tokenizer_check(self) -> str:
        assert self.checkpoint is not None
        directory = self._directory
        tokenizer = self.tokenizer or load_checkpoint_tokenizer(self.checkpoint)  # tensors may have loaded it
        cfg = self.cfg = complete_config(self._cfg, tokenizer)
        limit = cfg.language.total_vocab_size
        if len(tokenizer) > limit:
            raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the model has {limit} embedding "
                                  "rows; ids past the table would crash, set language.extra_vocab_size")
        image_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
        if image_id != cfg.image_token_id:
            named = tokenizer.convert_ids_to_tokens(cfg.image_token_id) if cfg.image_token_id < len(tokenizer) else None
            raise CheckpointError(f"config.json has image_token_id={cfg.image_token_id} (the tokenizer's "
                                  f"{named!r}) but the tokenizer maps {cfg.image_token} to id {image_id}; the config "
                                  "and the tokenizer disagree, re-save the checkpoint with its own tokenizer")
        # Prompts are built from the config's template name (`Processor`), so a tokenizer saved without its jinja
        # template still generates correctly here; only other runtimes (transformers' apply_chat_template) miss it.
        stored = not self.upstream and ((directory / "chat_template.jinja").is_file() or "chat_template" in (
            _json_or_empty(directory / "tokenizer_config.json")))
        if stored:
            template = f"{cfg.chat_template} (stored)"
        elif self.upstream:
            template = f"{cfg.chat_template} (from the config)"
        else:
            template = (f"{cfg.chat_template} (from the config; the tokenizer stores none, which only other runtimes "
                        "such as transformers' apply_chat_template would need)")
        self.tokenizer = tokenizer
        return (f"{_count(len(tokenizer), 'token')}, {_count(len(cfg.extra_tokens), 'extra token')} with ids < {limit}, "
                f"chat template {template}")

    def image_processing(self) -> str:
        image = self._cfg.image
        if not self.upstream and self.kind != "idefics3":  # Idefics3/SmolVLM: read from its image processor
            recorded = self.raw.get("model", {}).get("image", {})
            missing = [k for k in ("mode", "tile_size", "mean", "std") if k not in recorded]
            if missing:
                raise CheckpointError(f"config.json does not record image.{', image.'.join(missing)}; the model "
                                      "would be fed differently processed images, re-save it with nanovlm")
        norm = "ToTensor only" if image.mean is None else f"mean {list(image.mean)} std {list(image.std)}"
        return f"{image.mode}, {image.tile_size}px tiles, max side {image.max_side}, {norm}"

    def generation(self) -> str:
        from nanovlm_cli.data.processor import Processor
        from nanovlm_cli.data.shapes import mmstar_prompt, shapes_mmstar_rows
        from nanovlm_cli.devices import resolve_device
        from nanovlm_cli.generation import Engine, SamplingConfig, user_message

        loaded = load_model(self._directory, device=resolve_device(self.device))
        processor = Processor(loaded.cfg, loaded.tokenizer)
        row = shapes_mmstar_rows(1)[0]
        prompt = processor.encode_prompt(user_message(mmstar_prompt(row["question"]), 1), [row["image"]])
        start = time.perf_counter()
        result = Engine(loaded.model, processor).generate([prompt], SamplingConfig(max_new_tokens=8, greedy=True))
        return (f"{_count(result.new_tokens[0], 'token')} in {time.perf_counter() - start:.2f}s on a shapes image: "
                f"{result.texts[0]!r}")


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def validate_checkpoint(source: str | Path, *, generate: bool = True, device: str = "cpu") -> ValidationReport:
    """Run every pre-flight check on a checkpoint directory or Hub id; never raises for a broken checkpoint.

    A `device` this machine lacks is a `ConfigError` before any check (it is not the checkpoint's fault).
    """
    if generate:
        from nanovlm_cli.devices import resolve_device

        resolve_device(device)
    v = _Validator(str(source), device)
    v.run("files", [], v.files)
    v.run("config", [v.directory], v.config)
    tensors_ok = v.run("tensors", [v.cfg], v.tensors)
    v.run("finite", [v.header], v.finite)
    v.run("tied weights", [v.header, v.cfg], v.tied)
    v.run("tokenizer", [v.cfg], v.tokenizer_check)
    v.run("image processing", [v.cfg], v.image_processing)
    if not generate:
        v.report.checks.append(Check("generation", True, "skipped (--no-generate)", skipped=True))
    elif v.report.ok and tensors_ok:
        v.run("generation", [v.cfg], v.generation)
    else:
        v.report.checks.append(Check("generation", False, "skipped: an earlier check failed", skipped=True))
    return v.report
