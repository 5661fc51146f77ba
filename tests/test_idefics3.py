"""Idefics3 / SmolVLM import (issue 15, In): tiny random transformers models and processors, saved offline, against
ours: the same input_ids, pixels, logits and greedy answers; the key table both ways; a fine-tune that learns and
resumes exactly. Measured differences are printed (`pytest -s`) and bounded by the asserts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionEmbeddings
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE as SMOLVLM2_TEMPLATE

from nanovlm_cli.checkpoint.idefics3 import (
    config_from_idefics3,
    full_tile_position_ids,
    idefics3_to_ours,
    key_table,
    ours_to_idefics3,
)
from nanovlm_cli.checkpoint.io import load_model
from nanovlm_cli.data.processor import IGNORE_INDEX, Processor
from nanovlm_cli.data.sample import Record
from nanovlm_cli.errors import CheckpointError
from nanovlm_cli.generation import Engine, SamplingConfig
from nanovlm_cli.models.projector import pixel_shuffle

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "nanovlm_cli" / "assets" / "tiny_tokenizer"
# SmolVLM-256M/500M-Instruct's chat template (Idefics3); the SmolVLM2 family's is transformers' default above
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] =="
    " 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' "
    "%}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
            *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]
TILE, LONGEST = 32, 128  # max_image_size, size.longest_edge: up to 4x4 tiles of 4 tokens
KINDS = ("idefics3", "smolvlm")


def _tokenizer():
    """The project's tiny byte-level BPE with SmolVLM's special tokens (EOS = <end_of_utterance>, as SmolVLM's)."""
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    tok.add_special_tokens({"additional_special_tokens": SPECIALS, "eos_token": "<end_of_utterance>"})
    return tok


def _hf_config(kind: str, vocab: int, image_token_id: int):
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": TILE, "patch_size": 8}
    text = {"model_type": "llama", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    cls = Idefics3Config if kind == "idefics3" else SmolVLMConfig
    # SmolVLM tied, Idefics3 untied: both head layouts are covered
    return cls(vision_config=vision, text_config=text, scale_factor=2, image_token_id=image_token_id,
               tie_word_embeddings=kind == "smolvlm")


def _save_checkpoint(kind: str, directory: Path, split: bool = True) -> Path:
    tok = _tokenizer()
    image_kwargs = {"size": {"longest_edge": LONGEST}, "max_image_size": {"longest_edge": TILE}, "resample": 1,
                    "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_image_splitting": split}
    if kind == "idefics3":
        processor = Idefics3Processor(Idefics3ImageProcessor(**image_kwargs), tok, image_seq_len=4,
                                      chat_template=SMOLVLM_TEMPLATE)
        model_cls = Idefics3ForConditionalGeneration
    else:
        processor = SmolVLMProcessor(SmolVLMImageProcessor(**image_kwargs), tok, SmolVLMVideoProcessor(),
                                     image_seq_len=4, chat_template=SMOLVLM2_TEMPLATE)
        model_cls = SmolVLMForConditionalGeneration
    torch.manual_seed(0)
    model = model_cls(_hf_config(kind, len(tok), tok.convert_tokens_to_ids("<image>"))).eval()
    with torch.no_grad():  # random norms too, so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        # zero output rows for the specials (stop tokens included): their logit is 0 while some other token's is
        # positive, so greedy decoding never ends the turn early and every one of the 40 tokens is compared
        specials = [tok.convert_tokens_to_ids(t) for t in (*SPECIALS, "<|endoftext|>", "<|im_start|>", "<|im_end|>")]
        model.lm_head.weight[specials] = 0.0
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    """(kind, directory, transformers model, transformers processor, our LoadedModel)."""
    directory = _save_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    model_cls = Idefics3ForConditionalGeneration if request.param == "idefics3" else SmolVLMForConditionalGeneration
    hf_model = model_cls.from_pretrained(str(directory)).eval()
    return request.param, directory, hf_model, AutoProcessor.from_pretrained(str(directory)), load_model(directory)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


SIZES = {"square": (64, 64), "wide": (300, 100), "tall": (100, 300), "tiny": (5, 7), "odd": (129, 33)}


def _messages(n_images: int) -> list[dict]:
    return [
        {"role": "user", "content": [*({"type": "image"} for _ in range(n_images)),
                                     {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle, 12 px wide!"}]},
        {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Nothing."}]},
    ]


def _compare_processing(ours: Processor, theirs, images: list[Image.Image]) -> float:
    messages = _messages(len(images))
    expected = theirs(text=theirs.apply_chat_template(messages), images=images, return_tensors="pt")
    sample = ours.encode(Record(messages=messages, images=images, source_index=0))
    assert sample.input_ids.tolist() == expected["input_ids"][0].tolist()
    pixels = expected["pixel_values"][0]  # (views, 3, t, t), padded only when images differ in view count
    assert len(sample.images) == int(expected["pixel_attention_mask"][0].flatten(1).any(1).sum())
    return max(float((a - b).abs().max()) for a, b in zip(sample.images, pixels))


@pytest.mark.parametrize("split", [True, False])
def test_processing_matches_transformers_processor(checkpoint, split, tmp_path):
    kind, directory, _, theirs, loaded = checkpoint
    if not split:  # the same checkpoint saved with do_image_splitting=false
        directory = _save_checkpoint(kind, tmp_path / "nosplit", split=False)
        theirs, loaded = AutoProcessor.from_pretrained(str(directory)), load_model(directory)
    assert loaded.cfg.image.split is split
    ours = Processor(loaded.cfg, loaded.tokenizer)
    worst = 0.0
    for size in SIZES.values():
        worst = max(worst, _compare_processing(ours, theirs, [_image(*size)]))
    worst = max(worst, _compare_processing(ours, theirs, [_image(64, 64, 1), _image(300, 100, 2), _image(5, 7, 3)]))
    print(f"{kind} split={split}: max |pixel difference| {worst:.3g}")
    assert worst <= 1e-6


def test_prompt_matches_transformers_generation_prompt(checkpoint):
    _, _, _, theirs, loaded = checkpoint
    ours, image = Processor(loaded.cfg, loaded.tokenizer), _image(300, 100)
    messages = _messages(1)[:1]
    expected = theirs(text=theirs.apply_chat_template(messages, add_generation_prompt=True), images=[image])
    sample = ours.encode_prompt(messages, [image])
    assert sample.input_ids.tolist() == expected["input_ids"][0]
    assert (sample.labels == IGNORE_INDEX).all()


def test_labels_are_the_assistant_replies_and_their_end_of_utterance(checkpoint):
    _, _, _, _, loaded = checkpoint
    ours = Processor(loaded.cfg, loaded.tokenizer)
    sample = ours.encode(Record(messages=_messages(1), images=[_image(64, 64)], source_index=0))
    kept = sample.labels[sample.labels != IGNORE_INDEX].tolist()
    assert loaded.tokenizer.decode(kept) == " A red circle, 12 px wide!<end_of_utterance> Nothing.<end_of_utterance>"
    positions = (sample.labels != IGNORE_INDEX).nonzero().flatten()
    assert torch.equal(sample.labels[positions], sample.input_ids[positions])  # aligned, not shifted
    eou = loaded.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert eou in ours.stop_token_ids


def _logits(hf_model, loaded, sample) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        pixels = torch.stack(sample.images)[None]  # (1, views, 3, t, t)
        theirs = hf_model(input_ids=sample.input_ids[None], pixel_values=pixels).logits[0]
        ours = loaded.model.logits(loaded.model(sample.input_ids[None], sample.images))[0]
    return ours, theirs


def test_logits_match_transformers(checkpoint):
    kind, _, hf_model, _, loaded = checkpoint
    ours_processor = Processor(loaded.cfg, loaded.tokenizer)
    sample = ours_processor.encode(Record(messages=_messages(2), images=[_image(300, 100), _image(64, 64, 1)],
                                          source_index=0))
    ours, theirs = _logits(hf_model, loaded, sample)
    diff = float((ours - theirs).abs().max())
    print(f"{kind}: max |logit difference| {diff:.3g} over {ours.shape[0]} positions")
    assert diff <= 1e-4
    sample.images = sample.images[::-1]  # negative control: the views in the wrong order must show
    assert float((_logits(hf_model, loaded, sample)[0] - theirs).abs().max()) > 1e-3


def test_greedy_generation_matches_transformers_generate(checkpoint):
    kind, _, hf_model, _, loaded = checkpoint
    processor = Processor(loaded.cfg, loaded.tokenizer)
    prompt = processor.encode_prompt(_messages(1)[:1], [_image(300, 100)])
    engine = Engine(loaded.model, processor)
    ours = engine.generate([prompt], SamplingConfig(max_new_tokens=40, greedy=True)).token_ids[0]
    with torch.no_grad():
        out = hf_model.generate(input_ids=prompt.input_ids[None], pixel_values=torch.stack(prompt.images)[None],
                                max_new_tokens=40, do_sample=False, eos_token_id=processor.stop_token_ids,
                                suppress_tokens=engine._placeholder_ids(), pad_token_id=0)
    theirs = [t for t in out[0, prompt.input_ids.shape[0]:].tolist() if t not in processor.stop_token_ids]
    print(f"{kind}: {len(ours)} greedy tokens, identical={ours == theirs}")
    assert len(ours) >= 32 and ours == theirs


def test_key_table_round_trips_exactly_and_is_strict(checkpoint):
    _kind, _directory, hf_model, _, loaded = checkpoint
    theirs = {k: v for k, v in hf_model.state_dict().items()
              if not (loaded.cfg.language.tie_embeddings and k == "lm_head.weight")}
    ours = idefics3_to_ours(theirs, loaded.cfg)
    assert set(ours) == set(loaded.model.state_dict())
    assert all(torch.equal(ours[k], loaded.model.state_dict()[k]) for k in ours)
    back = ours_to_idefics3(loaded.model.state_dict(), loaded.cfg)
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)
    assert set(key_table(loaded.cfg)) == set(theirs)
    with pytest.raises(CheckpointError, match="unknown tensor model.connector.extra.weight"):
        idefics3_to_ours({**theirs, "model.connector.extra.weight": torch.zeros(1)}, loaded.cfg)
    missing = dict(theirs)
    missing.pop("model.text_model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match="missing tensor model.text_model.layers.1.mlp.up_proj.weight"):
        idefics3_to_ours(missing, loaded.cfg)
    with pytest.raises(CheckpointError, match="missing tensor projector.proj.weight"):
        ours_to_idefics3({k: v for k, v in loaded.model.state_dict().items() if k != "projector.proj.weight"},
                         loaded.cfg)


@pytest.mark.parametrize("factor", [2, 4])
def test_pixel_shuffle_is_idefics3_connector_pixel_shuffle(factor):
    x = torch.randn(3, 8 * 8, 5)
    theirs = Idefics3Connector.pixel_shuffle(None, x, scale_factor=factor)
    assert torch.equal(pixel_shuffle(x, 8, 8, factor), theirs)


@pytest.mark.parametrize("grid", [4, 19, 27, 32])
def test_full_tile_position_ids_are_idefics3_vision_embeddings(grid):
    """Read the ids transformers uses: position row i holds the value i, patch embeddings are zero."""
    config = Idefics3Config(vision_config={"hidden_size": 1, "image_size": grid * 2, "patch_size": 2}).vision_config
    embeddings = Idefics3VisionEmbeddings(config)
    with torch.no_grad():
        embeddings.patch_embedding.weight.zero_()
        embeddings.patch_embedding.bias.zero_()
        embeddings.position_embedding.weight.copy_(torch.arange(grid * grid, dtype=torch.float32)[:, None])
        out = embeddings(torch.zeros(1, 3, grid * 2, grid * 2), torch.ones(1, grid, grid, dtype=torch.bool))
    assert torch.equal(out[0, :, 0].long(), full_tile_position_ids(grid))
    identity = torch.equal(full_tile_position_ids(grid), torch.arange(grid * grid))
    assert identity is (grid != 19)  # 19: transformers' bucketize gives patch 12 the position of patch 11


def test_non_identity_position_grid_and_mismatched_tiles_are_refused():
    base = _hf_config("idefics3", 552, 514).to_dict()
    processor = {"size": {"longest_edge": 19 * 8 * 2}, "max_image_size": {"longest_edge": 19 * 8}}
    bad_grid = {**base, "vision_config": {**base["vision_config"], "image_size": 19 * 8}}
    with pytest.raises(CheckpointError, match="non-identity position ids"):
        config_from_idefics3(bad_grid, image_processor=processor, image_seq_len=None, chat_template="x")
    with pytest.raises(CheckpointError, match="max_image_size 64 differs from the vision image_size 32"):
        config_from_idefics3(base, image_processor={"max_image_size": {"longest_edge": 64}}, image_seq_len=None,
                             chat_template="x")
    with pytest.raises(CheckpointError, match="image_seq_len=9"):
        config_from_idefics3(base, image_processor={"max_image_size": {"longest_edge": 32}}, image_seq_len=9,
                             chat_template="x")


def test_image_settings_are_read_from_preprocessor_config_too(tmp_path):
    """Published repositories keep the image processor in preprocessor_config.json (transformers 5 nests it)."""
    directory = _save_checkpoint("idefics3", tmp_path / "ckpt")
    nested = json.loads((directory / "processor_config.json").read_text())
    settings = {**nested.pop("image_processor"), "size": {"longest_edge": 64}}
    (directory / "processor_config.json").write_text(json.dumps(nested))
    (directory / "preprocessor_config.json").write_text(json.dumps(settings))
    assert load_model(directory).cfg.image.max_side == 64


class _CrashAt:
    """A callback that crashes the run after `step` (a power cut between two checkpoints)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_start(self, info): pass
    def on_validation(self, step, val_loss): pass
    def on_checkpoint(self, step, path): pass
    def on_end(self, summary): pass

    def on_step(self, metrics):
        if metrics.step == self.step:
            raise RuntimeError("simulated crash")


def _llava_dataset(root: Path) -> Path:
    (root / "imgs").mkdir(parents=True)
    rows = []
    for i, (colour, name) in enumerate([((200, 30, 30), "red"), ((30, 200, 30), "green"), ((30, 30, 200), "blue")] * 3):
        Image.new("RGB", (40 + 8 * i, 48), colour).save(root / "imgs" / f"{i}.png")
        rows.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"It is {name}."}]})
    (root / "data.json").write_text(json.dumps(rows))
    return root / "data.json"


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in lines}


def test_fine_tune_from_an_imported_smolvlm_learns_and_resumes_exactly(tmp_path):
    from nanovlm_cli.checkpoint.io import read_model_config
    from nanovlm_cli.config import TrainConfig
    from nanovlm_cli.training import train

    source = _save_checkpoint("smolvlm", tmp_path / "smolvlm")
    model_cfg = read_model_config(source).replace(hub_id=str(source))  # what a smolvlm-* preset names
    data = _llava_dataset(tmp_path / "data")

    def cfg(name: str, **changes) -> TrainConfig:
        return TrainConfig(dataset=str(data), image_root=str(data.parent / "imgs"), max_steps=6, batch_size=3,
                           max_seq_len=512, save_checkpoint_steps=2, validation_steps=100, eval_size=0,
                           console_log_interval=1, output_dir=str(tmp_path / "runs"), run_name=name, lr_mp=3e-3,
                           lr_vision=3e-3, lr_language=3e-3, warmup_ratio=0.0, max_threads=1, **changes)

    full = train(model_cfg, cfg("full"))
    expected = _losses(Path(full.run_dir))
    print(f"fine-tune losses: {[round(expected[s], 4) for s in sorted(expected)]}")
    assert sorted(expected) == list(range(1, 7)) and expected[6] < 0.9 * expected[1]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model_cfg, cfg("cut"), callback=_CrashAt(3))
    cut = tmp_path / "runs" / "cut"
    train(model_cfg, cfg("cut", resume=str(cut)))
    assert _losses(cut) == expected  # bit for bit
    final = load_model(cut / "final")
    assert final.cfg.hub_id == str(source) and final.cfg.image.mode == "idefics3"
    trained = final.model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in load_model(source).model.state_dict().items())


@pytest.mark.slow
def test_commands_accept_an_idefics3_checkpoint(tmp_path, capsys):
    """validate, generate, eval, vram and push --dry-run run on the transformers checkpoint directory as saved."""
    from nanovlm_cli.cli import app as app_module

    directory = _save_checkpoint("idefics3", tmp_path / "ckpt")

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = app_module.run([str(a) for a in args])
        return code, capsys.readouterr().out

    image = tmp_path / "x.png"
    _image(90, 60).save(image)
    code, out = run("validate", directory, "--json")
    assert code == 0 and "transformers Idefics3/SmolVLM format" in out
    code, out = run("generate", image, "What is this?", "-c", directory, "--max-new-tokens", "4", "--device", "cpu")
    assert code == 0 and out.strip()
    code, out = run("eval", directory, "-b", "shapes", "--limit", "2", "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["n"] == 2
    code, out = run("vram", "-c", directory, "--batch-sizes", "1", "--json")
    assert code == 0
    code, out = run("push", directory, "user/model", "--dry-run", tmp_path / "upload")
    assert code == 0 and (tmp_path / "upload" / "model.safetensors").is_file()


@pytest.mark.slow
def test_train_preset_starts_from_the_published_smolvlm_weights(tmp_path, capsys):
    """`nanovlm train --preset smolvlm-256m --dataset my_llava.json --image-root imgs/`, with a tiny SmolVLM standing
    in for the Hub repository in the (offline) Hub cache: the run starts from those weights, architecture and all."""
    import os
    import shutil

    from nanovlm_cli.cli import app as app_module

    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--HuggingFaceTB--SmolVLM-256M-Instruct"
    _save_checkpoint("idefics3", repo / "snapshots" / ("1" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    data = _llava_dataset(tmp_path / "data")
    try:
        code = app_module.run(["train", "--preset", "smolvlm-256m", "--dataset", str(data), "--image-root",
                               str(data.parent / "imgs"), "--max-steps", "2", "--batch-size", "2",
                               "--gradient-accumulation-steps", "1", "--max-seq-len", "512", "--output-dir",
                               str(tmp_path / "runs"), "--run-name", "smol", "--max-threads", "1"])
        assert code == 0, capsys.readouterr().err
        final = load_model(tmp_path / "runs" / "smol" / "final")
        source = load_model(repo / "snapshots" / ("1" * 40))
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    assert final.cfg.hub_id == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert final.cfg.language.hidden_dim == 64 and final.cfg.image.max_side == LONGEST  # the checkpoint's, not 576
    trained, start = final.model.state_dict(), source.model.state_dict()
    assert set(trained) == set(start) and any(not torch.equal(trained[k], start[k]) for k in start)
