"""`nanovlm export` (issue 15, Out): what we train runs in plain transformers exactly as in nanovlm.

Tiny models built offline: one trained a few steps by the training library in the Idefics3 layout, random ones with
a Llama and a Gemma-3 decoder, and a tiny Idefics3 saved by transformers itself (the import -> export round trip).
Each is exported, then loaded with `AutoModelForImageTextToText` + `AutoProcessor` (HF_HUB_OFFLINE): the same
input_ids, pixels, logits and greedy answers as ours. Measured differences are printed (`pytest -s`) and bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    pipeline,
)

from nanovlm_cli.checkpoint.export import ExportError, export_problems, export_transformers
from nanovlm_cli.checkpoint.io import build_model, load_model, save_model
from nanovlm_cli.cli import app as app_module
from nanovlm_cli.config import IMAGENET_MEAN, IMAGENET_STD, ImageConfig, VisionConfig, VLMConfig
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.data.sample import Record
from nanovlm_cli.data.shapes import render_example
from nanovlm_cli.data.tokenizer import end_of_turn_token
from nanovlm_cli.generation import Engine, SamplingConfig, generate_text
from nanovlm_cli.presets import get_preset
from nanovlm_cli.training import train

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = ROOT / "nanovlm_cli" / "assets" / "tiny_tokenizer"
UPSTREAM_FIXTURE = ROOT / "tests" / "fixtures" / "upstream" / "tiles-global"
IDEFICS3_TOKENS = {"image_token": "<image>", "global_image_token": "<global-img>"}
GEMMA = {"norm_unit_offset": True, "qk_norm": True, "post_norms": True, "embed_scale": True, "act": "gelu_tanh",
         "sliding_window": 8, "layer_types": ("sliding_attention", "full_attention") * 2,
         "query_pre_attn_scalar": 32.0, "rope_local_theta": 10000.0, "head_dim_override": 64}


def idefics3_tiny(image_size: int = 64, **language) -> VLMConfig:
    """The tiny preset in the Idefics3 layout (64 px tiles of 16 tokens, images up to 2x2 tiles + the global view)."""
    base = get_preset("tiny").model
    data = base.to_dict() | IDEFICS3_TOKENS
    data["image"] = ImageConfig(mode="idefics3", tile_size=64, max_side=128, resample="lanczos").to_dict()
    data["vision"] = base.vision.replace(image_size=image_size).to_dict()
    draft = VLMConfig.from_dict(data)
    data["language"] = base.language.replace(extra_vocab_size=len(draft.extra_tokens), **language).to_dict()
    return VLMConfig.from_dict(data)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


SIZES = {"square": (64, 64), "wide": (150, 60), "tall": (60, 150), "tiny": (5, 7)}


def _question(n_images: int) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(n_images)),
                                         {"type": "text", "text": "What colour is the shape?"}]}]


def _compare(loaded, hf_model, hf_processor, images: list[Image.Image]) -> tuple[float, float]:
    """(max |pixel difference|, max |logit difference|) of one generation prompt; its input_ids must be identical."""
    messages = _question(len(images))
    theirs = hf_processor(text=hf_processor.apply_chat_template(messages, add_generation_prompt=True),
                          images=images, return_tensors="pt")
    ours = Processor(loaded.cfg, loaded.tokenizer).encode_prompt(messages, images)
    assert ours.input_ids.tolist() == theirs["input_ids"][0].tolist()
    pixels = max(float((a - b).abs().max()) for a, b in zip(ours.images, theirs["pixel_values"][0]))
    with torch.no_grad():
        mine = loaded.model.logits(loaded.model(ours.input_ids[None], ours.images))[0]
        other = hf_model(**theirs).logits[0]
    assert other.shape[-1] >= mine.shape[-1]  # rows padded for tokens transformers' processor adds, never generated
    return pixels, float((mine - other[:, :mine.shape[-1]]).abs().max())


# ----------------------------------------------------------------------------------------------------------------
# A model trained by the training library in the Idefics3 layout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(our LoadedModel of the trained final checkpoint, its export directory, transformers model, processor)."""
    tmp = tmp_path_factory.mktemp("trained")
    run = get_preset("tiny").train.replace(
        dataset_size=200, max_steps=8, batch_size=4, max_seq_len=256, save_checkpoint_steps=8, validation_steps=8,
        validation_batches=1, eval_size=0, console_log_interval=1, output_dir=str(tmp), run_name="run",
        warmup_ratio=0.2, pack_buffer=2, max_threads=1, num_workers=0)
    summary = train(idefics3_tiny(), run)
    final = Path(summary.final_checkpoint)
    out = tmp / "hf"
    result = export_transformers(final, out)
    assert result.text_model_type == "llama"
    model = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    return load_model(final), out, model, AutoProcessor.from_pretrained(str(out))


def test_export_directory_has_every_file_transformers_reads(trained):
    loaded, out, model, processor = trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
            "README.md"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".hf.")]  # no temporary directory left
    assert isinstance(AutoConfig.from_pretrained(str(out)), Idefics3Config)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    settings = processor.image_processor
    assert (settings.size["longest_edge"], settings.max_image_size["longest_edge"]) == (128, 64)
    assert (settings.resample, settings.do_image_splitting, processor.image_seq_len) == (1, True, 16)
    assert list(settings.image_mean) == list(loaded.cfg.image.mean) and settings.do_normalize
    generation = GenerationConfig.from_pretrained(str(out))
    eot = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert eos[0] == eot and set(eos) == set(Processor(loaded.cfg, loaded.tokenizer).stop_token_ids)
    assert loaded.cfg.image_token_id in generation.suppress_tokens
    # Idefics3Processor adds <end_of_utterance>: its id gets a zero row (so every id fits) and is never generated
    padded = range(loaded.cfg.language.total_vocab_size, model.config.text_config.vocab_size)
    assert max(processor.tokenizer.get_vocab().values()) < model.config.text_config.vocab_size
    assert processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>") in padded
    assert set(padded) <= set(generation.suppress_tokens)
    assert not model.get_input_embeddings().weight[padded.start:].any()
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and 'pipeline("image-text-to-text"' in card


def test_trained_model_gives_the_same_ids_pixels_and_logits_in_transformers(trained):
    loaded, _, model, processor = trained
    worst_pixels = worst_logits = 0.0
    cases = [[_image(*size, seed=i)] for i, size in enumerate(SIZES.values())] + [[_image(64, 64), _image(150, 60)]]
    for images in cases:
        pixels, logits = _compare(loaded, model, processor, images)
        worst_pixels, worst_logits = max(worst_pixels, pixels), max(worst_logits, logits)
    print(f"trained export: max |pixel difference| {worst_pixels:.3g}, max |logit difference| {worst_logits:.3g}")
    assert worst_pixels <= 1e-6 and worst_logits <= 1e-4


def test_trained_model_gives_the_same_greedy_answer_in_transformers(trained):
    loaded, out, model, processor = trained
    image = Image.open(render_example(out.parent / "shape.png", seed=3)).convert("RGB")
    ours = generate_text(loaded.model, Processor(loaded.cfg, loaded.tokenizer), [image], "What colour is the shape?",
                         greedy=True, max_new_tokens=24)
    messages = _question(1)
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=[image],
                       return_tensors="pt")
    with torch.no_grad():  # generation_config.json alone: its stop tokens, its suppressed placeholders
        ids = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    theirs = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    # A few steps in, the answer may be just the end of the turn: compare 24 tokens with stopping switched off too.
    processor_ours = Processor(loaded.cfg, loaded.tokenizer)
    prompt = processor_ours.encode_prompt(messages, [image])
    processor_ours.stop_token_ids = []
    long_ours = Engine(loaded.model, processor_ours).generate([prompt], SamplingConfig(max_new_tokens=24, greedy=True))
    with torch.no_grad():
        long_theirs = model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=[])
    long_theirs = long_theirs[0, inputs["input_ids"].shape[1]:].tolist()
    print(f"trained export: nanovlm {ours!r}, transformers {theirs!r}; 24 tokens without stopping identical: "
          f"{long_ours.token_ids[0] == long_theirs}")
    assert ours == theirs
    assert len(long_theirs) == 24 and long_ours.token_ids[0] == long_theirs
    pipe = pipeline("image-text-to-text", model=str(out))
    chat = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What colour is the shape?"}]}]
    answer = pipe(text=chat, max_new_tokens=24, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert answer == ours


# ----------------------------------------------------------------------------------------------------------------
# Random models: a Llama decoder with a tile bigger than the encoder's resolution, and Gemma-3 (measured, not assumed)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_random_model_exports_exactly(kind, tmp_path):
    language = dict(GEMMA) if kind == "gemma3" else {}
    cfg = idefics3_tiny(image_size=32 if kind == "llama" else 64, tie_embeddings=False, **language)
    torch.manual_seed(0)
    loaded = build_model(cfg, load_backbones=False)
    stops = Processor(loaded.cfg, loaded.tokenizer).stop_token_ids
    with torch.no_grad():  # random norms too; no stop token ever wins, so 32 tokens are always compared
        for name, p in loaded.model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.02))
        loaded.model.language.lm_head.weight[stops] = 0.0  # logit 0: some other token always beats it
    out = tmp_path / "hf"
    result = export_transformers(loaded, out)
    assert result.text_model_type == ("gemma3_text" if kind == "gemma3" else "llama")
    model = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    pixels, logits = _compare(loaded, model, processor, [_image(150, 60)])
    processor_ours = Processor(loaded.cfg, loaded.tokenizer)
    prompt = processor_ours.encode_prompt(_question(1), [_image(150, 60)])
    mine = Engine(loaded.model, processor_ours).generate([prompt], SamplingConfig(max_new_tokens=32, greedy=True))
    with torch.no_grad():
        ids = model.generate(input_ids=prompt.input_ids[None], pixel_values=torch.stack(prompt.images)[None],
                             max_new_tokens=32, do_sample=False)
    theirs = ids[0, prompt.input_ids.shape[0]:].tolist()
    print(f"{kind} export: max |pixel difference| {pixels:.3g}, max |logit difference| {logits:.3g}, "
          f"{len(theirs)} greedy tokens identical={mine.token_ids[0] == theirs}")
    assert pixels <= 1e-6 and logits <= 1e-4
    assert len(theirs) == 32 and mine.token_ids[0] == theirs


# ----------------------------------------------------------------------------------------------------------------
# Import -> export: a checkpoint saved by transformers comes back tensor for tensor

SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
            *(f"<row_{i}_col_{j}>" for i in range(1, 5) for j in range(1, 5))]
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] =="
    " 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' "
    "%}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _save_idefics3(directory: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    tok.add_special_tokens({"additional_special_tokens": SPECIALS, "eos_token": "<end_of_utterance>"})
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": 32},
                                             resample=1, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Idefics3Processor(image_processor, tok, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
    config = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory


def test_import_then_export_gives_the_source_tensors(tmp_path):
    source = _save_idefics3(tmp_path / "source")
    out = tmp_path / "hf"
    export_transformers(source, out)
    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    a, b = json.loads((source / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert a["vision_config"] | b["vision_config"] == a["vision_config"] | {"model_type": "idefics3_vision"}
    for key in ("scale_factor", "image_token_id", "tie_word_embeddings"):
        assert a.get(key, False) == b[key], key
    original = Idefics3ForConditionalGeneration.from_pretrained(str(source)).eval()
    exported = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    messages = _question(1)
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       images=[_image(150, 60)], return_tensors="pt")
    reference = AutoProcessor.from_pretrained(str(source))
    expected = reference(text=reference.apply_chat_template(messages, add_generation_prompt=True),
                         images=[_image(150, 60)], return_tensors="pt")
    assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
    with torch.no_grad():
        diff = float((original(**expected).logits - exported(**inputs).logits).abs().max())
    print(f"import -> export: {len(before)} tensors identical, max |logit difference| {diff:.3g}")
    assert diff == 0.0


def test_an_export_loads_back_into_nanovlm_with_the_same_weights(trained):
    loaded, out, _, _ = trained
    again = load_model(out)  # the Idefics3 reader every command uses
    ours, back = loaded.model.state_dict(), again.model.state_dict()
    assert set(ours) == set(back)
    rows = loaded.cfg.language.total_vocab_size  # then the zero row of <end_of_utterance>
    assert all(torch.equal(ours[k], back[k] if back[k].shape == ours[k].shape else back[k][:rows]) for k in ours)
    fields = ("mode", "tile_size", "max_side", "resample", "split", "mean", "std")  # (max_grid: unused by idefics3)
    assert [getattr(again.cfg.image, f) for f in fields] == [getattr(loaded.cfg.image, f) for f in fields]
    assert again.cfg.image_token_id == loaded.cfg.image_token_id
    # fine-tuning the re-import masks the same labels: its turns end where ours do (<|im_end|> for this ChatML model)
    assert again.cfg.end_of_turn == end_of_turn_token(loaded.cfg.chat_template) == "<|im_end|>"
    record = Record(messages=_question(1) + [{"role": "assistant", "content": [{"type": "text", "text": "a red one"}]}],
                    images=[_image(64, 64)])
    mine = Processor(loaded.cfg, loaded.tokenizer).encode(record)
    theirs = Processor(again.cfg, again.tokenizer).encode(record)
    assert torch.equal(mine.input_ids, theirs.input_ids) and torch.equal(mine.labels, theirs.labels)
    assert mine.n_supervised > 0


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one line naming the reason and the fix, exit 1, nothing written


def _checkpoint(tmp_path: Path, cfg: VLMConfig, name: str) -> Path:
    torch.manual_seed(0)
    loaded = build_model(cfg, load_backbones=False)
    return save_model(loaded.model, tmp_path / name, tokenizer=loaded.tokenizer)


def _refused_config(kind: str) -> VLMConfig:
    tiny = get_preset("tiny").model
    if kind == "fixed layout":
        return tiny
    if kind in ("dinov2", "dinov3"):
        extra = {"use_cls": True, "layer_scale": True, "act": "gelu"}
        if kind == "dinov3":
            extra.update(n_registers=4, rope_theta=100.0, qkv_bias=(True, False, True))
        vision = VisionConfig(kind=kind, image_size=64, patch_size=8, hidden_dim=96, intermediate_dim=192,
                              n_layers=2, n_heads=4, **extra)
        return tiny.replace(vision=vision, image=ImageConfig(mode="fixed", tile_size=64, mean=IMAGENET_MEAN,
                                                             std=IMAGENET_STD))
    if kind == "mixed decoder":
        return idefics3_tiny(qk_norm=True)
    assert kind == "unnormalised pixels"
    cfg = idefics3_tiny()
    return cfg.replace(image=cfg.image.replace(mean=None, std=None))


REFUSALS = {
    "upstream": "upstream nanoVLM checkpoint",
    "dinov2": "vision encoder is dinov2",
    "dinov3": "vision encoder is dinov3",
    "fixed layout": "image layout is 'fixed'",
    "mixed decoder": "decoder mixes Llama and Gemma-3 features",
    "unnormalised pixels": "pixels are not normalised",
}


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.delenv("NANOVLM_DEBUG", raising=False)

    def invoke(*args: str):
        capsys.readouterr()
        code = app_module.run(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_what_cannot_be_exported_exactly_is_refused_before_anything_is_written(kind, tmp_path, cli):
    source = UPSTREAM_FIXTURE if kind == "upstream" else _checkpoint(tmp_path, _refused_config(kind), "ckpt")
    out = tmp_path / "out" / "hf"
    code, stdout, stderr = cli("export", str(source), str(out))
    lines = [line for line in stderr.splitlines() if line.strip()]
    print(f"{kind}: {lines}")
    assert code == 1 and stdout == ""
    assert len(lines) == 1 and lines[0].startswith("error: cannot export to transformers: ")
    assert REFUSALS[kind] in lines[0] and "; " in lines[0]  # the reason, then the fix
    assert not (tmp_path / "out").exists()


def test_export_problems_lists_every_reason_and_none_for_exportable_configs():
    assert export_problems(idefics3_tiny()) == []
    assert export_problems(idefics3_tiny(**GEMMA)) == []
    dino = _refused_config("dinov3")
    assert len(export_problems(dino)) == 2  # the encoder and the image layout
    with pytest.raises(ExportError, match="vision encoder is dinov3"):
        export_transformers(build_model(dino, load_backbones=False), "/nonexistent/never-written")


def test_export_refuses_a_non_empty_directory_and_a_failed_export_writes_nothing(tmp_path, cli, monkeypatch):
    source = _checkpoint(tmp_path, idefics3_tiny(), "ckpt")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, stderr = cli("export", str(source), str(busy))
    assert code == 1 and "is not empty; pass a new or empty directory" in stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    import nanovlm_cli.checkpoint.export as export_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_write_processor", broken)
    with pytest.raises(OSError, match="disk full"):
        export_transformers(source, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "ckpt"]


def test_cli_export_then_push_format_transformers_dry_run(tmp_path, cli):
    source = _checkpoint(tmp_path, idefics3_tiny(), "ckpt")
    code, stdout, stderr = cli("export", str(source), str(tmp_path / "hf"), "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["model_type"] == "idefics3" and result["text_model_type"] == "llama"
    assert "model.safetensors" in {f["name"] for f in result["files"]}
    code, _, stderr = cli("push", str(source), "me/tiny-vlm", "--format", "transformers", "--dry-run",
                          str(tmp_path / "upload"))
    assert code == 0, stderr
    upload = tmp_path / "upload"
    assert json.loads((upload / "config.json").read_text())["model_type"] == "idefics3"
    assert "me/tiny-vlm" in (upload / "README.md").read_text()
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert load_file(str(upload / "model.safetensors")).keys() == exported.keys()
    code, _, stderr = cli("push", str(_checkpoint(tmp_path, get_preset("tiny").model, "tiles")), "me/tiny-vlm",
                          "--format", "transformers", "--dry-run", str(tmp_path / "refused"))
    assert code == 1 and "cannot export to transformers" in stderr and not (tmp_path / "refused").exists()



# ----------------------------------------------------------------------------------------------------------------
# llama.cpp: its convert_hf_to_gguf.py reads the export (text model, and the vision part with --mmproj)

LLAMA_CPP = Path(os.environ.get("NANOVLM_LLAMA_CPP", Path.home() / ".cache" / "nanovlm" / "llama.cpp"))
# Run the converter with one change: the tiny test tokenizer is unknown to its pre-tokenizer table (real SmolLM2
# tokenizers are listed, as "smollm"), so the check that names it is answered with SmolLM2's name.
CONVERT = """
import runpy, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
script, sys.argv = sys.argv[1] + "/convert_hf_to_gguf.py", [sys.argv[1] + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
"""


def test_llama_cpp_converter_reads_the_export(tmp_path):
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        message = (f"llama.cpp's converter is not in {LLAMA_CPP}; `bash scripts/get_llama_cpp.sh` fetches it from "
                   "PyPI (llama-cpp-python's source distribution) and sets up sentencepiece")
        if os.environ.get("CI") == "true":  # .ci/run fetches it: a skip there would pass a check that never ran
            pytest.fail(f"{message}; CI=true, so this check must run")
        pytest.skip(message)
    torch.manual_seed(0)
    loaded = build_model(idefics3_tiny(), load_backbones=False)
    out = tmp_path / "hf"
    export_transformers(loaded, out)
    files = {"text": tmp_path / "text.gguf", "mmproj": tmp_path / "mmproj.gguf"}
    for kind, target in files.items():
        args = [str(out), "--outtype", "f32", "--outfile", str(target), *(["--mmproj"] if kind == "mmproj" else [])]
        run = subprocess.run([sys.executable, "-c", CONVERT, str(LLAMA_CPP), *args], capture_output=True, text=True,
                             timeout=600, check=False)
        assert run.returncode == 0 and target.is_file(), run.stderr[-3000:]
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(LLAMA_CPP / "gguf-py"))
    ours = loaded.model.state_dict()

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        return {t.name: torch.from_numpy(np.array(t.data)) for t in GGUFReader(str(path)).tensors}

    vision, text = tensors(files["mmproj"]), tensors(files["text"])
    assert torch.equal(vision["mm.model.fc.weight"], ours["projector.proj.weight"])
    assert torch.equal(vision["v.position_embd.weight"], ours["vision.pos_embed"][0])
    assert torch.equal(vision["v.blk.2.attn_q.weight"], ours["vision.blocks.2.attn.q_proj.weight"])
    assert torch.equal(vision["v.post_ln.weight"], ours["vision.norm.weight"])
    embedding = ours["language.embed_tokens.weight"]
    assert torch.equal(text["token_embd.weight"][: embedding.shape[0]], embedding)
    assert not text["token_embd.weight"][embedding.shape[0]:].any()  # the padded <end_of_utterance> row
    assert torch.equal(text["blk.3.ffn_down.weight"], ours["language.blocks.3.mlp.down_proj.weight"])
    assert torch.equal(text["output_norm.weight"], ours["language.norm.weight"])
    fields = GGUFReader(str(files["mmproj"])).fields
    value = lambda name: fields[name].parts[fields[name].data[0]].tolist()
    assert value("clip.vision.projector.scale_factor") == [2] and value("clip.vision.image_size") == [64]
    assert value("clip.vision.preproc_image_size") == [128]
    print(f"llama.cpp: {len(text)} text and {len(vision)} vision tensors converted, the checked ones identical")
