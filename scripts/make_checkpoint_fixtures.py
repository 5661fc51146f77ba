"""Make a checkpoint-format fixture (tests/fixtures/checkpoint_vN/) with this nanovlm's own save path.

A fixture is a tiny model (well under 1 MB: two-layer SigLIP-style encoder and Llama-style decoder, 32 wide, the
project's tiny tokenizer, tiles with a global view so the tile tokens are in the tokenizer) built with
`checkpoint.io.build_model` and written with `checkpoint.io.save_model`, the function `nanovlm train` calls for every
checkpoint directory (train adds its resume state, training_state.pt, which is not part of the inference format and
is left out). Beside the checkpoint files it writes

    expected.safetensors   input_ids (1, T), pixel_values (views, 3, H, W) and the logits (T, vocab) they give
    reference.json         which code wrote it: nanovlm version, git commit, format version (None before format 1)

tests/test_checkpoint_format.py loads every fixture with the current code and checks each tensor and the logits
bit-exactly, so a change of the format is caught by a test, not discovered by users. A fixture is made once, by the
code of its format, and then never rewritten: checkpoint_v0 was written by the code before config.json had a format
version, checkpoint_v1 by the first code that wrote `"format_version": 1`, checkpoint_v2 (`--lora`: rank-4 adapters on
the decoder's projections, the layout format 2 added) by the first code that wrote `"format_version": 2`.

When the format changes (`checkpoint.io.FORMAT_VERSION` bumped, the loader still reading every older format), run
this script once from the new code to write tests/fixtures/checkpoint_vN and add it to the list in
`test_every_format_has_a_fixture`. Make it from committed code (e.g. `git archive HEAD` into a temporary directory,
put first on sys.path), so the git commit recorded in reference.json is the code that wrote it.

Usage:
    python scripts/make_checkpoint_fixtures.py tests/fixtures/checkpoint_v1
    python scripts/make_checkpoint_fixtures.py tests/fixtures/checkpoint_v2 --lora
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanovlm_cli import __version__
from nanovlm_cli.checkpoint import io
from nanovlm_cli.config import ImageConfig, LanguageConfig, ProjectorConfig, VisionConfig, VLMConfig
from nanovlm_cli.models.lora import LoRAConfig, apply_lora


def fixture_config() -> VLMConfig:
    """A tiny model: 32 px tiles of 8 px patches, 2x2 pixel shuffle (4 tokens per view), up to 2x2 tiles + global."""
    return VLMConfig(
        vision=VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_dim=32, intermediate_dim=64,
                            n_layers=2, n_heads=2),
        language=LanguageConfig(tokenizer="builtin:tiny", vocab_size=512, extra_vocab_size=6, hidden_dim=32,
                                intermediate_dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                max_position_embeddings=256, rope_theta=10000.0),
        projector=ProjectorConfig(pixel_shuffle_factor=2),
        image=ImageConfig(mode="tiles", tile_size=32, max_side=64, max_grid=2),
        chat_template="chatml",
        max_images_per_sample=1,
    )


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


@torch.no_grad()
def make_fixture(out: Path, seed: int = 0, lora: bool = False) -> None:
    torch.manual_seed(seed)
    loaded = io.build_model(fixture_config(), load_backbones=False)
    model, cfg = loaded.model, loaded.cfg
    if lora:  # B starts at zero; the perturbation below makes every adapter tensor count in the logits
        apply_lora(model, LoRAConfig(r=4, alpha=8.0))
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():  # norms start at exactly 1 and biases at 0: make every tensor distinct
        param.add_(0.05 * torch.randn(param.shape, generator=gen))
    io.save_model(model, out, tokenizer=loaded.tokenizer, lora_base="random init (fixture)" if lora else None)

    n_views = 5  # a 2x2 grid of tiles and the global view
    image_ids = [cfg.image_token_id] * (n_views * cfg.image_tokens_per_tile)
    input_ids = torch.tensor([[1, 17, 99, 250, *image_ids, 7, 300, 42, 511, 3]])
    pixel_values = torch.randn(n_views, 3, 32, 32, generator=gen)
    logits = model.logits(model.eval()(input_ids, list(pixel_values)))[0]
    save_file({"input_ids": input_ids, "pixel_values": pixel_values, "logits": logits.contiguous()},
              str(out / "expected.safetensors"))
    saved = json.loads((out / io.CONFIG_FILE).read_text())
    reference = {"nanovlm_version": __version__, "git_commit": _git_commit(),
                 "format_version": saved.get("format_version"), "seed": seed,
                 "made_by": "scripts/make_checkpoint_fixtures.py"}
    (out / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the fixture directory to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", action="store_true", help="add LoRA adapters (the format-2 layout)")
    args = parser.parse_args()
    make_fixture(args.out, args.seed, lora=args.lora)


if __name__ == "__main__":
    main()
