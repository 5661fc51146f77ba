"""Shared pieces of the benchmark suite: matched model pairs (ours vs transformers), timing and memory helpers.

Main design choice: every comparison runs ours and the reference on the *same weights and inputs* in the same
process, interleaved (ref, ours, ref, ours, ...), and reports the per-repeat ratio (median, min, max). Absolute
numbers on a shared 2-core CPU are noise; ratios measured side by side are not.

The reference is built from transformers modules only where transformers has them: `SiglipVisionModel` (no
pooling head, `vision_use_head=False`) -> our pixel-shuffle projector (a copy, same weights) -> `LlamaForCausalLM`
fed `inputs_embeds` + `position_ids`, no attention mask and `use_cache=False`. With packed rows, transformers derives the block-causal
mask from the position ids (a position that does not follow its predecessor starts a new sequence), which is exactly
our segment mask: positions restart at 0 per sample and each padding token sits at 0, alone. Its loss is the usual
`labels=` path (full-vocabulary logits, mean over supervised tokens); ours is the chunked loss over supervised
positions only. Both sides then run the same clip + AdamW step.
"""

from __future__ import annotations

import copy
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch

from nanovlm_cli.checkpoint.io import LoadedModel, build_model
from nanovlm_cli.config import ImageConfig, LanguageConfig, ProjectorConfig, VisionConfig, VLMConfig
from nanovlm_cli.data.sample import Batch


@dataclass(frozen=True)
class ModelSize:
    """A benchmark model: SigLIP-style encoder + Llama-style decoder (GQA, tied embeddings)."""

    name: str
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    lm_hidden: int
    lm_intermediate: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    tile: int = 32  # tiles mode: a 64x64 shapes image -> 2x2 tiles + a global view = 5 views
    patch: int = 4  # 32 / 4 = 8x8 patches -> pixel shuffle 2 -> 16 tokens per view
    shuffle: int = 2
    vocab: int = 512  # the builtin tiny tokenizer's ids; larger sizes add unused rows (real LM-head cost)


SIZES = {
    "tiny": ModelSize("tiny", 64, 256, 2, 4, 96, 256, 4, 4, 2),
    "20m": ModelSize("20m", 256, 1024, 8, 4, 384, 1024, 8, 6, 2),
    # The presets' backbone shapes (random weights; GPU suite): SigLIP-base + SmolLM2-135M / -360M.
    "original_small": ModelSize("original_small", 768, 3072, 12, 12, 576, 1536, 30, 9, 3, tile=224, patch=16,
                                vocab=49152),
    "default": ModelSize("default", 768, 3072, 12, 12, 960, 2560, 32, 15, 5, tile=512, patch=16, shuffle=4,
                         vocab=49152),
}


def vlm_config(size: ModelSize, vision_dir: str, language_dir: str) -> VLMConfig:
    n_extra = 2 + 4  # image + global image tokens, <row_r_col_c> for a 2x2 grid
    return VLMConfig(
        vision=VisionConfig(kind="siglip", hub_id=vision_dir, image_size=size.tile, patch_size=size.patch,
                            hidden_dim=size.vision_hidden, intermediate_dim=size.vision_intermediate,
                            n_layers=size.vision_layers, n_heads=size.vision_heads),
        language=LanguageConfig(hub_id=language_dir, tokenizer="builtin:tiny", vocab_size=size.vocab,
                                extra_vocab_size=n_extra, hidden_dim=size.lm_hidden,
                                intermediate_dim=size.lm_intermediate, n_layers=size.lm_layers,
                                n_heads=size.lm_heads, n_kv_heads=size.lm_kv_heads, max_position_embeddings=2048,
                                rope_theta=10000.0),
        projector=ProjectorConfig(pixel_shuffle_factor=size.shuffle),
        image=ImageConfig(mode="tiles", tile_size=size.tile, max_side=2 * size.tile, max_grid=2),
        chat_template="chatml",
        max_images_per_sample=1,
    )


@dataclass
class ModelPair:
    size: ModelSize
    ours: LoadedModel
    hf_vision: torch.nn.Module  # SiglipVisionModel
    hf_language: torch.nn.Module  # LlamaForCausalLM with our extended vocabulary rows
    n_params: int


def build_pair(size: ModelSize, seed: int = 0) -> ModelPair:
    """Random transformers backbones saved to a temporary directory, loaded into ours; HF copies share the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        vdir, ldir = str(Path(tmp) / "vision"), str(Path(tmp) / "language")
        SiglipVisionModel(SiglipVisionConfig(
            hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate,
            num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads, image_size=size.tile,
            patch_size=size.patch, vision_use_head=False)).save_pretrained(vdir)
        LlamaForCausalLM(LlamaConfig(
            vocab_size=size.vocab, hidden_size=size.lm_hidden, intermediate_size=size.lm_intermediate,
            num_hidden_layers=size.lm_layers, num_attention_heads=size.lm_heads,
            num_key_value_heads=size.lm_kv_heads, max_position_embeddings=2048, rope_theta=10000.0,
            tie_word_embeddings=True)).save_pretrained(ldir)
        ours = build_model(vlm_config(size, vdir, ldir), load_backbones=True)
        hf_vision = SiglipVisionModel.from_pretrained(vdir, attn_implementation="sdpa")
        hf_language = LlamaForCausalLM.from_pretrained(ldir, attn_implementation="sdpa")
    # The VLM's extra token rows (mean-initialised by our loader) are copied into the reference's embedding.
    hf_language.resize_token_embeddings(ours.cfg.language.total_vocab_size, mean_resizing=False)
    with torch.no_grad():
        hf_language.get_input_embeddings().weight.copy_(ours.model.language.embed_tokens.weight)
    n_params = sum(p.numel() for p in ours.model.parameters())
    return ModelPair(size, ours, hf_vision, hf_language, n_params)


class ReferenceVLM(torch.nn.Module):
    """The same VLM step from transformers modules: SiglipVisionModel -> our projector (a copy) -> LlamaForCausalLM."""

    def __init__(self, pair: ModelPair) -> None:
        super().__init__()
        self.vision = copy.deepcopy(pair.hf_vision)
        self.projector = copy.deepcopy(pair.ours.model.projector)
        self.language = copy.deepcopy(pair.hf_language)
        self.image_token_id = pair.ours.model.image_token_id
        self.grid = pair.size.tile // pair.size.patch

    def embed(self, input_ids: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
        embeds = self.language.get_input_embeddings()(input_ids)  # (B, L, D)
        if not images:
            return embeds
        pixels = torch.stack(images).to(self.projector.proj.weight.dtype)  # all views share the tile size here
        features = self.vision(pixel_values=pixels).last_hidden_state  # (N, grid*grid, D_vision)
        tokens = self.projector(features, self.grid, self.grid).flatten(0, 1)  # (N * tokens, D)
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(mask, tokens.to(embeds.dtype))

    def loss(self, batch: Batch) -> torch.Tensor:
        embeds = self.embed(batch.input_ids, batch.images)
        # use_cache=False matters: with a cache, transformers skips the packed-sequence detection (plain causal).
        return self.language(inputs_embeds=embeds, position_ids=batch.position_ids, labels=batch.labels,
                             use_cache=False).loss


def make_optimizer(module: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)


def train_step(loss_fn: Callable[[], torch.Tensor], module: torch.nn.Module, optimizer: torch.optim.Optimizer,
               sync: Callable[[], None]) -> float:
    """One optimizer step as the training loop does it (loss, backward, clip 1.0, AdamW, zero_grad); seconds."""
    t0 = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0


def our_loss_fn(model: torch.nn.Module, batch: Batch) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        out = model.loss(batch)
        return out.loss_sum / max(out.n_tokens, 1)
    return run


# ------------------------------------------------------------------------------------------------------------------
# Statistics and memory


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(reference: list[float], ours: list[float]) -> dict[str, float]:
    """Per-repeat reference/ours of paired times (> 1 means ours is faster)."""
    return stats([r / o for r, o in zip(reference, ours)])


class PeakMemory:
    """Peak memory of one case: CUDA peak allocated, or the process's peak RSS with the high-water mark reset.

    On Linux, writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS, so each case gets its own peak;
    where that is not allowed the process-lifetime peak (ru_maxrss) is reported and `reset` says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset_ok = False
        self.peak_mb = 0.0

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset_ok = True
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.reset_ok = True
            except OSError:
                self.reset_ok = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        hwm = _vm_hwm_kb()
        kb = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mb = kb / 1024


def _vm_hwm_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def environment(device: torch.device) -> dict[str, Any]:
    import platform

    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
