"""Make the upstream nanoVLM fixture checkpoints in tests/fixtures/upstream/ with the original repository's own code.

For each checkpoint generation of huggingface/nanoVLM this script extracts the repository at a pinned commit, and in
a subprocess that imports only that code (its `models/` and `data/` packages) it:

1. builds its `VisionLanguageModel` on a tiny config (its own `VLMConfig`, a few fields shrunk),
2. trains it for a few steps with its own `forward(..., targets=...)` on two synthetic images, so that its
   greedy answers are multi-token strings (exercising its KV-cache decode), not near-ties of a random model,
3. writes the checkpoint with its own `save_pretrained` and reloads it with its own `from_pretrained`,
4. records, for two fixed images and questions, what its own processing and model produce: the prompt token ids
   (built the way that commit's `generate.py` builds them), the pixel tensor, the full-vocabulary logits of the
   prompt (fp32) and its own greedy `generate()` output.

The tokenizer is the project's tiny tokenizer, placed in a private Hugging Face cache under the Hub id that the
commit's config names (`lm_tokenizer`), so the saved config.json is byte-for-byte what the original writes.

5. loads the fixture with nanovlm, writes it back with `save_upstream`, and loads that with the original code's own
   `from_pretrained` (strict safetensors `load_model`): the largest logit difference goes in reference.json.

Shims needed to run the original code on today's libraries (applied by the driver, listed in each reference.json):
- transformers 5 removed `batch_encode_plus`: the v0.1/v0.2 prompts are encoded with `tokenizer([text])`, which is
  what `batch_encode_plus` called;
- transformers 5's `apply_chat_template(tokenize=True)` returns a BatchEncoding: called with `return_dict=False`;
- v0.1's `generate()` only samples (`torch.multinomial`): greedy answers come from the same `generate()` with
  `torch.multinomial` replaced by argmax for the call;
- the language model is built with `load_backbone=False`, so its Hub backbone loader (and the `rope_theta` lookup in
  it, which fails on transformers 5 configs) never runs; no attention mask is passed, so its SDPA path never combines
  a mask with `is_causal=True`.

Usage (needs the repository's extra dependency `einops` for the tiles generations):
    python scripts/make_upstream_fixtures.py --repo /path/to/nanoVLM[.git] [--out tests/fixtures/upstream]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from hub_cache import make_hub_cache

# name -> (commit, how that commit's generate.py builds a prompt)
GENERATIONS = {
    # v0.1: image embeddings concatenated in front of "Question: ... Answer:", no extra tokens (nanoVLM-222M era)
    "v0.1-prefix": ("6ba9082e16f1fc8c21a1f8d0c54b26c9233c8771", "prefix"),
    # v0.2: one <|image|> placeholder per image token, still the plain "Question: ... Answer:" prompt
    "v0.2-image-token": ("731d8c6786fdf5c68d49af2693ff83104d44da09", "placeholder"),
    # 2025-07-11, last commit before image splitting: placeholders inside a ChatML user turn (lm_chat_template)
    "chat-image-token": ("8c14ccbdf768ed933f1b221d54409b5868535f5d", "chat"),
    # 2025-08-12, image splitting before the global view existed: <row_i_col_j> tiles only
    "tiles": ("9e9dc3399e27474f72c82bb08a92e7d4c678edbe", "tiles"),
    # current main (nanoVLM-450M layout): global view first, then tiles; resize_to_max_side_len
    "tiles-global": ("4e0c0961846135c2217f95e54cb4c2d66eb55e42", "tiles"),
}
# (image, question, the answer it is trained to give)
CASES = [("wide.png", "What colour is the shape?", "a red square"), ("small.png", "What is in the image?", "a blue disc")]

# Runs inside the extracted repository: only its code and the libraries it imports.
DRIVER = r'''
import dataclasses, json, sys
import torch
from PIL import Image
from safetensors.torch import save_file

out, images_dir, style, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
from models.config import VLMConfig
from models.vision_language_model import VisionLanguageModel
from data import processors

fields = {f.name for f in dataclasses.fields(VLMConfig)}
tiny = dict(vit_hidden_dim=32, vit_inter_dim=64, vit_patch_size=8, vit_img_size=32, vit_n_heads=2, vit_n_blocks=2,
            lm_hidden_dim=64, lm_inter_dim=128, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2,
            lm_max_position_embeddings=512, lm_max_length=256, mp_pixel_shuffle_factor=2, mp_image_token_length=4,
            max_img_size=64, vlm_load_backbone_weights=False, vlm_checkpoint_path="checkpoints")
kwargs = {k: v for k, v in tiny.items() if k in fields}
extra = VLMConfig().vlm_extra_tokens if "vlm_extra_tokens" in fields else None
if extra is not None:
    kwargs.update(lm_base_vocab_size=512, extra_token_amount=len(extra), lm_vocab_size=512 + len(extra))
else:
    kwargs.update(lm_vocab_size=515)  # the tiny tokenizer's 512 tokens + its 3 specials
if "lm_eos_token_id" in fields:
    kwargs["lm_eos_token_id"] = 2
cfg = VLMConfig(**kwargs)

def tokenizer_of(cfg):
    if extra is None:
        return processors.get_tokenizer(cfg.lm_tokenizer)
    if hasattr(cfg, "lm_chat_template"):
        return processors.get_tokenizer(cfg.lm_tokenizer, cfg.vlm_extra_tokens, cfg.lm_chat_template)
    return processors.get_tokenizer(cfg.lm_tokenizer, cfg.vlm_extra_tokens)

def image_tensor(cfg, tokenizer, image):
    """Pixels and the image string, as this commit's generate.py makes them."""
    if style != "tiles":
        proc = processors.get_image_processor(cfg.vit_img_size)
        string = "" if style == "prefix" else tokenizer.image_token * cfg.mp_image_token_length
        return proc(image).unsqueeze(0), string
    if hasattr(cfg, "resize_to_max_side_len"):
        proc = processors.get_image_processor(cfg.max_img_size, cfg.vit_img_size, cfg.resize_to_max_side_len)
    else:
        proc = processors.get_image_processor(cfg.max_img_size, cfg.vit_img_size)
    pixels, grid = proc(image)
    if not hasattr(tokenizer, "global_image_token") and grid[0] * grid[1] == len(pixels) - 1:
        pixels = pixels[1:]
    return pixels, processors.get_image_string(tokenizer, [grid], cfg.mp_image_token_length)

def prompt_ids(tokenizer, image_string, question, reply=None):
    if style in ("prefix", "placeholder"):
        text = f"{image_string}Question: {question} Answer:" + ("" if reply is None else f" {reply}{tokenizer.eos_token}")
        return tokenizer([text], return_tensors="pt")["input_ids"]
    messages = [{"role": "user", "content": image_string + question}]
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    ids = tokenizer.apply_chat_template([messages], tokenize=True, add_generation_prompt=reply is None,
                                        return_dict=False)
    return torch.tensor(ids)

torch.manual_seed(0)
model = VisionLanguageModel(cfg, load_backbone=False)
tokenizer = tokenizer_of(cfg)

# a few steps of its own forward/loss on the two cases, so that greedy answers are decisive multi-token strings,
# not near-ties of a random model
batches = []
for image_name, question, reply in cases:
    pixels, image_string = image_tensor(cfg, tokenizer, Image.open(f"{images_dir}/{image_name}").convert("RGB"))
    prompt = prompt_ids(tokenizer, image_string, question)
    full = prompt_ids(tokenizer, image_string, question, reply=reply)
    targets = torch.full_like(full, -100)
    targets[:, prompt.shape[1] - 1:-1] = full[:, prompt.shape[1]:]
    batches.append((full, pixels, targets))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
model.train()
for step in range(60):
    loss = sum(model(full, pixels, targets=targets)[1] for full, pixels, targets in batches)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"final training loss {loss.item():.4f}", file=sys.stderr)

model.save_pretrained(out)
model = VisionLanguageModel.from_pretrained(out).eval()  # its own loader reads what its own writer wrote

tensors, records = {}, []
for k, (image_name, question, _) in enumerate(cases):
    image = Image.open(f"{images_dir}/{image_name}").convert("RGB")
    pixels, image_string = image_tensor(cfg, tokenizer, image)
    ids = prompt_ids(tokenizer, image_string, question)
    with torch.no_grad():
        out_ = model(ids, pixels)[0]
        hidden = out_[0] if isinstance(out_, tuple) else out_
        logits = model.decoder.head(hidden)
    if style == "prefix":  # v0.1 generate() only samples; greedy = the same loop with argmax
        multinomial = torch.multinomial
        torch.multinomial = lambda probs, num_samples: probs.argmax(dim=-1, keepdim=True)
        try:
            generated = model.generate(ids, pixels, max_new_tokens=8)
        finally:
            torch.multinomial = multinomial
    else:
        generated = model.generate(ids, pixels, max_new_tokens=8, greedy=True)
    tensors[f"case{k}.input_ids"] = ids[0].contiguous()
    tensors[f"case{k}.pixel_values"] = pixels.contiguous()
    tensors[f"case{k}.logits"] = logits[0].contiguous()
    tensors[f"case{k}.generated_ids"] = generated[0].contiguous()
    records.append({"image": image_name, "question": question,
                    "answer": tokenizer.batch_decode(generated, skip_special_tokens=True)[0]})
save_file(tensors, f"{out}/reference.safetensors")
print(json.dumps(records))
'''


# Runs inside the extracted repository: its own from_pretrained on a directory our `save_upstream` wrote, then its
# own forward on the recorded prompts; prints the largest logit difference from the recorded reference.
ROUND_TRIP_DRIVER = r'''
import sys, torch
from safetensors.torch import load_file
from models.vision_language_model import VisionLanguageModel
ours, reference = sys.argv[1], load_file(sys.argv[2])
model = VisionLanguageModel.from_pretrained(ours).eval()
worst, k = 0.0, 0
while f"case{k}.input_ids" in reference:
    ids, pixels = reference[f"case{k}.input_ids"][None], reference[f"case{k}.pixel_values"]
    if sys.argv[3] == "prefix":  # v0.1's prompt, read in v0.2's format: the image placeholders go first
        image = torch.full((1, model.cfg.mp_image_token_length), model.tokenizer.image_token_id)
        ids = torch.cat([image, ids], dim=1)
    with torch.no_grad():
        out = model(ids, pixels)[0]
        logits = model.decoder.head(out[0] if isinstance(out, tuple) else out)[0]
    expected = reference[f"case{k}.logits"]  # v0.1 written in v0.2's format has one more row (the image token)
    worst = max(worst, (logits[:, :expected.shape[-1]] - expected).abs().max().item())
    k += 1
print(worst)
'''


def _round_trip(name: str, out: Path, repo: Path, tmp: Path, env: dict[str, str]) -> float:
    """Load a fixture with nanovlm, write it back with `save_upstream`, load that with the original code: the
    largest logit difference from the original's own reference (v0.1 is written in v0.2's format, so v0.2 reads it)."""
    from nanovlm_cli.checkpoint.io import load_model
    from nanovlm_cli.checkpoint.upstream import save_upstream

    loaded = load_model(out)
    ours = save_upstream(loaded.model.state_dict(), loaded.cfg, tmp / f"{name}-ours")
    reader = "v0.2-image-token" if name == "v0.1-prefix" else name
    source = tmp / f"{reader}-reader"
    if not source.exists():
        source.mkdir()
        _extract(repo, GENERATIONS[reader][0], source)
    result = subprocess.run([sys.executable, "-c", ROUND_TRIP_DRIVER, str(ours), str(out / "reference.safetensors"),
                             GENERATIONS[name][1]],
                            check=False, cwd=source, env=dict(env, PYTHONPATH=str(source)), capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"round trip of {name} through the original loader failed:\n{result.stderr[-4000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def _draw_images(directory: Path) -> None:
    """Two deterministic images: a wide one (tiles 1x2) with a red square, a small one with a blue disc."""
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    wide = Image.new("RGB", (100, 30), (235, 235, 235))
    ImageDraw.Draw(wide).rectangle((10, 5, 30, 25), fill=(220, 30, 30))
    wide.save(directory / "wide.png")
    small = Image.new("RGB", (20, 18), (20, 20, 20))
    ImageDraw.Draw(small).ellipse((3, 3, 16, 15), fill=(30, 60, 220))
    small.save(directory / "small.png")


def _extract(repo: Path, commit: str, dest: Path) -> None:
    git_dir = ["--git-dir", str(repo)] if (repo / "HEAD").exists() and not (repo / ".git").exists() else ["-C", str(repo)]
    # only the Python packages the driver imports (large assets may be missing from a partial mirror)
    archive = subprocess.run(["git", *git_dir, "archive", commit, "models", "data"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a clone (or bare mirror) of huggingface/nanoVLM")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "upstream")
    parser.add_argument("--only", nargs="*", choices=sorted(GENERATIONS), help="make only these generations")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # our loader below (round trips) too
    images = args.out / "images"
    _draw_images(images)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HUB_CACHE=str(make_hub_cache(Path(tmp) / "hub")), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for name in args.only or GENERATIONS:
            commit, style = GENERATIONS[name]
            source = Path(tmp) / name
            source.mkdir()
            _extract(args.repo, commit, source)
            out = args.out / name
            shutil.rmtree(out, ignore_errors=True)
            result = subprocess.run(
                [sys.executable, "-c", DRIVER, str(out), str(images.resolve()), style,
                 json.dumps(CASES)],
                check=False, cwd=source, env=dict(env, PYTHONPATH=str(source)), capture_output=True, text=True,
            )
            if result.returncode != 0:
                sys.exit(f"{name} ({commit[:8]}) failed:\n{result.stderr[-4000:]}")
            cases = json.loads(result.stdout.strip().splitlines()[-1])
            reference = {
                "generation": name, "upstream_repository": "https://github.com/huggingface/nanoVLM",
                "upstream_commit": commit, "prompt_style": style, "made_by": "scripts/make_upstream_fixtures.py",
                "tokenizer": "nanovlm_cli/assets/tiny_tokenizer, cached under the config's lm_tokenizer Hub id",
                "shims": ["tokenizer([text]) for the removed batch_encode_plus",
                          "apply_chat_template(..., return_dict=False)",
                          "v0.1 greedy: torch.multinomial -> argmax during its generate()",
                          "load_backbone=False (no Hub backbone loader, no rope_theta lookup); no attention mask"],
                "cases": cases,
            }
            os.environ["HF_HUB_CACHE"] = env["HF_HUB_CACHE"]  # our loader resolves lm_tokenizer from the same cache
            reference["to_upstream_round_trip"] = {
                "read_by": reference["upstream_commit"] if name != "v0.1-prefix" else GENERATIONS["v0.2-image-token"][0],
                "max_abs_logit_diff": _round_trip(name, out, args.repo, Path(tmp), env),
            }
            (out / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
            last = [line for line in result.stderr.splitlines() if line.startswith("final training loss")]
            print(f"{name:18s} {commit[:8]}  {last[-1] if last else ''}  answers: {[c['answer'] for c in cases]}  "
                  f"round trip through the original loader: {reference['to_upstream_round_trip']['max_abs_logit_diff']:.2e}")


if __name__ == "__main__":
    main()
