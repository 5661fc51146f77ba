"""Finding and reading model files: a Hub id or a local directory through one code path.

`resolve_source` returns a local directory for either (the Hub goes through huggingface_hub's cache, so
`HF_HUB_OFFLINE=1` works with whatever is cached); `resolve_checkpoint` is the one resolver of what a user passes as
a checkpoint (a Hub id, a checkpoint directory, or a run directory of `nanovlm train`, which means its newest
checkpoint); `read_safetensors` reads single-file or sharded weights. Weights are safetensors only: we never unpickle
a weights file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nanovlm_cli.errors import CheckpointError

PICKLED_WEIGHT_STEMS = frozenset({"pytorch_model", "model", "weights", "consolidated", "adapter_model"})
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "README.md"]


def resolve_source(source: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local directory holding `source`: the directory itself, or a snapshot of the Hub repo `source`."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file, not a checkpoint directory; pass the directory that holds it")
    text = str(source)
    if text.lower().startswith(("http://", "https://")):
        repo = text.split("huggingface.co/", 1)[1].split("/tree/")[0].strip("/") if "huggingface.co/" in text else ""
        hint = f"pass the repo id {repo!r}" if repo.count("/") == 1 else "pass a Hub repo id (user/model)"
        raise CheckpointError(f"checkpoint {text} is a URL; {hint} or a local directory")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text.strip():
        raise CheckpointError(f"checkpoint directory {source} does not exist; check the path")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=allow_patterns or WEIGHT_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many types: offline, 404, gated, network
        raise CheckpointError(
            f"could not get {source!r} from the Hugging Face Hub ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "check the repo id, your network and HF_TOKEN, or pass a local directory"
        ) from exc


def resolve_checkpoint(source: str | Path) -> Path:
    """The checkpoint directory `source` names: a Hub repo's snapshot, a checkpoint directory, or for a run directory
    of `nanovlm train` (`run_config.json`, `final/`, `checkpoints/step-N/`) its `final/` checkpoint, else its newest
    step checkpoint (a run stopped before it finished)."""
    directory = resolve_source(source)
    if (directory / "config.json").is_file() or not (directory / "run_config.json").is_file():
        return directory  # a checkpoint (or not a run: reading its config.json names what is missing)
    if (directory / "final" / "config.json").is_file():
        return directory / "final"
    steps = [p for p in (directory / "checkpoints").glob("step-*")
             if p.name[5:].isdigit() and (p / "config.json").is_file()]
    if not steps:
        raise CheckpointError(f"{directory} is a training run without a saved checkpoint yet (no final/ and no "
                              "checkpoints/step-N); wait for the first checkpoint or pass another one")
    return max(steps, key=lambda p: int(p.name[5:]))


def new_or_empty_dir(path: str | Path, what: str, error: type[Exception]) -> Path:
    """`path` as a directory a command may fill: new or empty, creatable (no file in the way), else `error` naming
    `what` ("export directory", ...) and the fix."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise error(f"{what} {target} is a file; pass a new or empty directory")
    if target.is_dir() and any(target.iterdir()):
        raise error(f"{what} {target} is not empty; pass a new or empty directory")
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise error(f"{what} {target} cannot be created: {blocker} is a file; pass another directory")
    return target


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {path.parent}; the checkpoint is incomplete")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-save the checkpoint") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object of fields; re-save the "
                              "checkpoint")
    return data


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a directory: `model.safetensors` or the shards named by its index."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [directory / s for s in shards]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    # Pickled *weights* (pytorch_model.bin, model.pt...) get their own message; training state beside a checkpoint
    # (training_state.pt, optimizer.pt) is not weights, and a checkpoint that lost its model.safetensors is incomplete.
    pickled = sorted(p.name for p in (*directory.glob("*.bin"), *directory.glob("*.pt"), *directory.glob("*.pth"))
                     if p.stem.split(".")[0].split("-")[0] in PICKLED_WEIGHT_STEMS)
    if pickled:
        raise CheckpointError(
            f"{directory} has no model.safetensors, only pickled weights ({', '.join(pickled)}), which we never load "
            "(unpickling runs code); convert them to safetensors"
        )
    raise CheckpointError(f"model.safetensors is missing from {directory}; the checkpoint is incomplete (re-save or "
                          "re-download it)")


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors file(s), on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises SafetensorError / OSError on truncation
            raise CheckpointError(f"{file} cannot be read ({exc}); the file is truncated or corrupt, re-download it") from exc
    return tensors


def check_and_copy(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model` after checking that every key and every shape match (nothing is copied otherwise)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + "; the checkpoint does not match this architecture")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                              + "; the checkpoint does not match this architecture")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[key].shape)}; the config and the weights disagree")
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor)
