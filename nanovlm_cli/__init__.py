"""nanovlm: train, fine-tune, evaluate and run small vision-language models in pure PyTorch.

The names users of the original nanoVLM repository know are re-exported here lazily, so that importing the
package (and `nanovlm --help`) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "VisionLanguageModel": "nanovlm_cli.models.vlm",
    "VLMConfig": "nanovlm_cli.config",
    "TrainConfig": "nanovlm_cli.config",
    "get_preset": "nanovlm_cli.presets",
    "NanoVLMError": "nanovlm_cli.errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nanovlm_cli' has no attribute {name!r}")
    return getattr(import_module(module), name)


__all__ = ["__version__", *_LAZY]  # noqa: PLE0604 (the keys are the lazy names)
