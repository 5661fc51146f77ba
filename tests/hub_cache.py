"""A private Hugging Face Hub cache for tests (and scripts/make_upstream_fixtures.py): the project's tiny tokenizer
stored under the Hub ids that the upstream nanoVLM fixture configs name in `lm_tokenizer`.

Upstream checkpoints name their tokenizer by Hub id only; offline, `AutoTokenizer.from_pretrained(hub_id)` then
resolves it from the cache exactly as it would on a user's machine after one download. No torch import here: the
conftest calls this before anything imports huggingface_hub.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "nanovlm_cli" / "assets" / "tiny_tokenizer"
UPSTREAM_TOKENIZER_IDS = ("HuggingFaceTB/cosmo2-tokenizer", "HuggingFaceTB/SmolLM2-135M",
                          "HuggingFaceTB/SmolLM2-360M-Instruct")
REVISION = "0" * 40


def make_hub_cache(root: Path) -> Path:
    """Write the cache layout (models--org--name/snapshots/<rev>/..., refs/main) under `root` and return it."""
    for repo_id in UPSTREAM_TOKENIZER_IDS:
        repo = root / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / REVISION
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(TINY_TOKENIZER / name, snapshot / name)
        (snapshot / "config.json").write_text('{"model_type": "llama"}\n')  # the real repositories have one
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(REVISION)
    return root
