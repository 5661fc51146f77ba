"""Optional lmms-eval integration: our model behind lmms-eval's `lmms` model interface.

Main design choice: lmms-eval is imported lazily, inside the functions, so the package never depends on it; when it
is missing the user gets one line naming the extra to install. The adapter class is built on first use (its base
class lives in lmms_eval) and answers `generate_until` requests with our own processor + KV-cache engine, batched
and greedy unless the task asks for sampling. Log-likelihood requests are not supported (our tasks of interest,
MMStar / MME / ..., are generative), which lmms-eval reports per task.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanovlm_cli.checkpoint.io import load_model
from nanovlm_cli.data.images import load_image
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.devices import resolve_device, resolve_dtype
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.generation import Engine, SamplingConfig, user_message

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'nanovlm-cli[lmms-eval]'"


def _require_lmms_eval() -> Any:
    """lmms-eval's `lmms` base class; imported here, on use, since lmms-eval is an optional extra."""
    try:
        import lmms_eval  # noqa: F401
        from lmms_eval.api.model import lmms
    except ImportError as exc:
        raise ConfigError(f"--backend lmms-eval needs the lmms-eval package ({exc.name or 'lmms_eval'} is not "
                          f"installed); install it with {INSTALL_HINT}") from exc
    return lmms


def _sampling_from(gen_kwargs: dict[str, Any]) -> Any:
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    greedy = not gen_kwargs.get("do_sample", False) or temperature == 0.0
    until = gen_kwargs.get("until") or ()
    return SamplingConfig(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or 64), temperature=temperature,
                          top_p=gen_kwargs.get("top_p") if not greedy else None, greedy=greedy,
                          stop_strings=tuple([until] if isinstance(until, str) else until))


def make_adapter(model: Any, processor: Any, *, batch_size: int = 1) -> Any:
    """An instance of lmms-eval's `lmms` wrapping `model` + `processor` (raises ConfigError without lmms-eval)."""
    base = _require_lmms_eval()

    class NanoVLMLmms(base):  # type: ignore[misc, valid-type]
        """lmms-eval's model interface over a nanovlm VisionLanguageModel."""

        def __init__(self) -> None:
            super().__init__()
            self.model, self.processor, self._batch_size = model, processor, batch_size
            self._rank, self._world_size = 0, 1
            self.engine = Engine(model, processor)

        @property
        def batch_size(self) -> int:
            return self._batch_size

        @property
        def max_length(self) -> int:
            return self.model.cfg.language.max_position_embeddings

        def _prompt(self, request: Any) -> Any:
            context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            images = [load_image(v) for v in (visuals or []) if v is not None]
            return self.processor.encode_prompt(user_message(context, len(images)), images)

        def generate_until(self, requests: list[Any]) -> list[str]:
            answers: list[str] = [""] * len(requests)
            groups: dict[str, list[int]] = {}  # same generation settings -> one batch
            for i, request in enumerate(requests):
                groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
            for indices in groups.values():
                sampling = _sampling_from(requests[indices[0]].args[1])
                for start in range(0, len(indices), self._batch_size):
                    chunk = indices[start:start + self._batch_size]
                    texts = self.engine.generate([self._prompt(requests[i]) for i in chunk], sampling).texts
                    for i, text in zip(chunk, texts):
                        answers[i] = text
            return answers

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            raise NotImplementedError("nanovlm's lmms-eval adapter supports generative tasks only")

        def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
            raise NotImplementedError("nanovlm's lmms-eval adapter does not support multi-round generation")

    return NanoVLMLmms()


@dataclass
class LmmsEvalResult:
    """Per-task metrics as lmms-eval reports them."""

    checkpoint: str
    tasks: list[str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": "lmms-eval", "checkpoint": self.checkpoint, "tasks": self.tasks, "results": self.results}


def run_lmms_eval(
    checkpoint: str,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    output_dir: str | None = None,
) -> LmmsEvalResult:
    """Score `checkpoint` on lmms-eval `tasks` (e.g. ["mmstar", "mme"]); writes lmms_results.json to `output_dir`."""
    _require_lmms_eval()
    from lmms_eval import evaluator  # the optional extra, checked above

    torch_device = resolve_device(device)
    loaded = load_model(checkpoint, device=torch_device, dtype=resolve_dtype("auto", torch_device))
    adapter = make_adapter(loaded.model, Processor(loaded.cfg, loaded.tokenizer), batch_size=batch_size)
    raw = evaluator.simple_evaluate(model=adapter, tasks=tasks, limit=limit, batch_size=batch_size,
                                    device=str(torch_device))
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
               for task, metrics in (raw or {}).get("results", {}).items()}
    result = LmmsEvalResult(str(checkpoint), list(tasks), results)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "lmms_results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
