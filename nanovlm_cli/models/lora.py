"""LoRA adapters: a trainable low-rank update beside frozen linear layers (Hu et al., 2021).

A `LoRALinear` computes  y = x W^T + b + (alpha / r) * dropout(x) A^T B^T  with W (out, in) and b frozen, A (r, in)
initialised like nn.Linear (Kaiming-uniform) and B (out, r) zeros, so at step 0 the adapted model computes exactly
what the base model does. Merging folds the update into the weight: W' = W + (alpha / r) * B @ A.

Worked example, r = 1, alpha = 2 (scale 2), a 2 -> 2 layer:  W = [[1, 0], [0, 1]], A = [[1, 1]], B = [[0.5], [0]]:
scale * B @ A = 2 * [[0.5, 0.5], [0, 0]] = [[1, 1], [0, 0]], so W' = [[2, 1], [0, 1]]; x = [1, 2] gives
x W^T + scale * (x A^T) B^T = [1, 2] + 2 * 3 * [0.5, 0] = [4, 2] = x W'^T.

Main design choice: our own small module rather than `peft`. `LoRALinear` *is* an `nn.Linear` that keeps the base
layer's own `weight` and `bias` parameters, so state-dict keys stay `...q_proj.weight` (peft renames them
`...q_proj.base_layer.weight` and wraps the model in a `PeftModel`), and every piece of code that reads
`model.projector.proj.weight`, walks `isinstance(m, nn.Linear)` (Muon's parameter choice, weight init, the memory
model) or compiles `model.language.blocks` keeps working on an adapted model. Adapters are added to the modules
whose qualified names match glob patterns; the names of the adapted modules are what a checkpoint records
(`lora_spec`), so loading re-creates exactly those adapters before the weights are checked and copied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanovlm_cli.config import VLMConfig
from nanovlm_cli.config_base import _Config, _require
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.train_config import TrainConfig

# What `--lora-targets` aliases expand to: attention and MLP projections of a part (the projector's single linear).
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "language": ("language.blocks.*.attn.*_proj", "language.blocks.*.mlp.*_proj"),
    "vision": ("vision.blocks.*.attn.*_proj", "vision.blocks.*.mlp.*_proj"),
    "projector": ("projector.proj",),
}
DEFAULT_TARGETS = ("language",)
ADAPTER_NAMES = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoRAConfig(_Config):
    """Which linear layers get adapters, of what rank and scale, and whether the projector trains fully."""

    _label = "lora"

    r: int = 16  # rank of the update B @ A
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input (training only)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # glob patterns over module names, or the aliases above
    train_projector: bool = True  # the projector's own weights train fully (it is not LoRA-adapted then)

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.r > 0, f"lora.r={self.r} must be a positive rank (e.g. 16)")
        _require(self.alpha > 0 and math.isfinite(self.alpha), f"lora.alpha={self.alpha} must be a positive number")
        _require(0 <= self.dropout < 1, f"lora.dropout={self.dropout} must be in [0, 1)")
        _require(bool(self.targets) and all(t.strip() for t in self.targets),
                 f"lora.targets={self.targets!r} names no module; give glob patterns such as "
                 "'language.blocks.*.attn.*_proj' or the aliases language, vision, projector")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def patterns(self) -> tuple[str, ...]:
        """The targets with aliases expanded."""
        return tuple(p for t in self.targets for p in TARGET_ALIASES.get(t.strip(), (t.strip(),)))


def lora_config(train: TrainConfig) -> LoRAConfig | None:
    """The adapters a training config asks for (`--lora-r` and friends), None for full fine-tuning."""
    if not train.lora_r:
        return None
    targets = tuple(t.strip() for t in train.lora_targets.split(",") if t.strip())
    return LoRAConfig(r=train.lora_r, alpha=train.lora_alpha, dropout=train.lora_dropout, targets=targets,
                      train_projector=train.lora_train_projector)


class LoRALinear(nn.Linear):
    """An `nn.Linear` (same `weight`/`bias` parameters, frozen) plus the low-rank update `lora_B @ lora_A`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's parameters are reused, not reallocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout_p = dropout
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init; B = 0 keeps step 0 exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p else x
        return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale  # (..., r) -> (..., out)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A, computed in fp32 and returned in the weight's dtype."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (out, in)
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}"


@dataclass(frozen=True)
class ParameterCounts:
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Trainable and frozen parameter counts (a tied weight counted once)."""
    trainable = frozen = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return ParameterCounts(trainable, frozen)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


def resolve_targets(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of the `nn.Linear` modules matching any pattern, in model order; a pattern matching none is an error."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [name for name in linears if fnmatchcase(name, pattern)]
        if not hits:
            examples = ", ".join(linears[:3])
            raise ConfigError(f"LoRA target {pattern!r} matches no linear layer of this model; use glob patterns "
                              f"over module names (e.g. {examples}) or the aliases {', '.join(TARGET_ALIASES)}")
        chosen.update(hits)
    return [name for name in linears if name in chosen]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def add_adapters(model: nn.Module, names: Iterable[str], r: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap each named `nn.Linear` in a `LoRALinear` (in place); returns the names. Seed the RNG first: A is random."""
    names = list(names)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
            raise ConfigError(f"module {name!r} is not a plain linear layer; LoRA adapts nn.Linear modules only")
        _replace(model, name, LoRALinear(module, r, alpha, dropout))
    return names


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Add adapters to the modules `cfg.targets` name and freeze everything else (the projector trains fully when
    `cfg.train_projector`). Returns the adapted module names."""
    names = resolve_targets(model, cfg.patterns)
    if cfg.train_projector and any(n.startswith("projector.") for n in names):
        raise ConfigError("the projector is both LoRA-adapted (lora targets) and fully trained (lora train_projector);"
                          " drop it from the targets or pass --no-lora-train-projector")
    add_adapters(model, names, cfg.r, cfg.alpha, cfg.dropout)
    mark_trainable(model, cfg.train_projector)
    return names


def prepare_lora(model: nn.Module, cfg: LoRAConfig | None, *, resumed: bool = False) -> bool:
    """Choose the trainable parameters of a run; True when LoRA chose them, False for the caller to freeze what
    full fine-tuning freezes (`cfg` None).

    A resumed LoRA checkpoint keeps its adapters (only the trainable flags are set), and resuming one without LoRA
    is refused. A new run that starts from a checkpoint with adapters (`VLMConfig.hub_id`) first merges them: its
    base is the merged model, and it trains new adapters (or, without LoRA, the merged weights).
    """
    if has_lora(model) and resumed:
        if cfg is None:
            raise ConfigError("this checkpoint has LoRA adapters, so it resumes with them: resume it with its own "
                              "--lora-r (its saved run config has it unless a flag overrides it)")
        mark_trainable(model, cfg.train_projector)
        return True
    merge_lora(model)
    if cfg is None:
        return False
    apply_lora(model, cfg)
    return True


def mark_trainable(model: nn.Module, train_projector: bool) -> None:
    """requires_grad only on the adapters (and the projector's parameters when `train_projector`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in lora_modules(model):
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    projector = getattr(model, "projector", None)
    if train_projector and projector is not None:
        for p in projector.parameters():
            p.requires_grad_(True)


def base_description(cfg: VLMConfig, saved_lora: Mapping[str, Any] | None = None) -> str | None:
    """What a LoRA run's adapters apply to, as its checkpoints name it (config.json's lora.base): the base a
    resumed checkpoint already names, else the model's pretrained weights (whole model, or the backbones); None for
    a model initialised at random. Informative only: the base weights themselves are in the checkpoint."""
    if saved_lora is not None:
        return saved_lora.get("base")
    if getattr(cfg, "hub_id", None):
        return str(cfg.hub_id)  # type: ignore[attr-defined]
    parts = [f"{name}: {sub.hub_id}" for name, sub in (("vision", cfg.vision), ("language", cfg.language))
             if sub.hub_id]
    return ", ".join(parts) or None


def lora_spec(model: nn.Module) -> dict[str, Any] | None:
    """What a checkpoint records to re-create the adapters: rank, alpha, dropout and the adapted module names."""
    modules = list(lora_modules(model))
    if not modules:
        return None
    _, first = modules[0]
    if any((m.r, m.alpha, m.dropout_p) != (first.r, first.alpha, first.dropout_p) for _, m in modules):
        raise ConfigError("LoRA adapters of different ranks, alphas or dropouts in one model cannot be saved; "
                          "adapt all modules with one LoRAConfig")
    return {"r": first.r, "alpha": first.alpha, "dropout": first.dropout_p, "modules": [n for n, _ in modules]}


def restore_adapters(model: nn.Module, spec: dict[str, Any], source: str = "checkpoint") -> list[str]:
    """Re-create the adapters a checkpoint's `lora` entry records (before its weights are copied in)."""
    try:
        r, alpha, dropout, names = int(spec["r"]), float(spec["alpha"]), float(spec["dropout"]), list(spec["modules"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: the 'lora' entry of config.json is malformed ({exc!r}); it needs r, alpha, "
                          "dropout and modules; re-save the checkpoint") from None
    try:
        return add_adapters(model, names, r, alpha, dropout)
    except AttributeError as exc:
        raise ConfigError(f"{source}: a LoRA module named in config.json does not exist in this model ({exc}); "
                          "the config and the weights disagree") from None


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer (W + (alpha/r)·B@A) and put plain `nn.Linear`s back, in place; returns
    the model, whose state dict then has the base model's keys only. A model without adapters is returned as is."""
    for name, module in list(lora_modules(model)):
        w = module.weight
        merged = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=w.device, dtype=w.dtype)
        merged.weight.copy_(module.merged_weight())
        merged.weight.requires_grad_(w.requires_grad)
        if module.bias is not None:
            merged.bias.copy_(module.bias)
            merged.bias.requires_grad_(module.bias.requires_grad)
        merged.train(module.training)
        _replace(model, name, merged)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (`...q_proj.lora_A`, `...q_proj.lora_B`), detached: what a separate adapter file
    holds."""
    return {f"{name}.{key}": getattr(module, key).detach() for name, module in lora_modules(model) for key in ADAPTER_NAMES}
