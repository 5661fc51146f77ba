"""LoRA in a real training run: flags, counts, checkpoints, exact resume, and the commands that load the result."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nanovlm_cli.cli.app import app
from nanovlm_cli.config import TrainConfig
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.generation import generate_from_checkpoint
from nanovlm_cli.models.lora import LoRALinear
from nanovlm_cli.models.vlm import VisionLanguageModel
from nanovlm_cli.presets import get_preset
from nanovlm_cli.training import train
from nanovlm_cli.training.state import STATE_FILE
from tests.helpers import solid_image, tiny_model


def _train_cfg(tmp_path: Path, name: str, **changes) -> TrainConfig:
    base = get_preset("tiny").train.replace(
        dataset_size=400, max_steps=6, batch_size=4, max_seq_len=256, save_checkpoint_steps=2, validation_steps=3,
        validation_batches=1, eval_size=0, console_log_interval=1, output_dir=str(tmp_path), run_name=name,
        warmup_ratio=0.2, pack_buffer=2, max_threads=1, lora_r=4, lora_alpha=8.0, lr_language=1e-2,
    )
    return base.replace(**changes)


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in lines}


class _CrashAt:
    def __init__(self, step: int):
        self.step = step

    def on_start(self, info): pass
    def on_validation(self, step, val_loss): pass
    def on_checkpoint(self, step, path): pass
    def on_end(self, summary): pass

    def on_step(self, metrics):
        if metrics.step == self.step:
            raise RuntimeError("simulated crash")


def test_lora_flags_are_validated_in_one_line():
    with pytest.raises(ConfigError, match="freeze_vision_encoder does not combine with LoRA"):
        TrainConfig(lora_r=8, freeze_vision_encoder=True)
    with pytest.raises(ConfigError, match="lora_dropout"):
        TrainConfig(lora_r=8, lora_dropout=1.0)
    with pytest.raises(ConfigError, match="names no module"):
        TrainConfig(lora_r=8, lora_targets=" , ")
    assert TrainConfig(lora_r=0, freeze_vision_encoder=True).lora_r == 0  # full fine-tuning keeps its flags


def test_a_lora_run_trains_only_adapters_and_projector_and_reports_the_counts(tmp_path):
    summary = train(get_preset("tiny").model, _train_cfg(tmp_path, "lora", max_steps=4, save_checkpoint_steps=4))
    run_dir = Path(summary.run_dir)
    saved = json.loads((run_dir / "summary.json").read_text())
    initial = tiny_model(seed=0).model  # the recipe seeds with cfg.seed before building: the same base weights
    n_total = sum(p.numel() for p in initial.parameters())
    n_projector = initial.projector.proj.weight.numel()
    assert saved["n_params_frozen"] == n_total - n_projector
    assert saved["n_params_trainable"] + saved["n_params_frozen"] == saved["n_params"]
    final = run_dir / "final"
    lora = json.loads((final / "config.json").read_text())["lora"]
    assert lora["r"] == 4 and lora["alpha"] == 8.0 and lora["base"] is None  # random init: no pretrained base
    modules = dict(VisionLanguageModel.from_pretrained(final).named_modules())
    adapted = [n for n, m in modules.items() if isinstance(m, LoRALinear)]
    assert adapted == lora["modules"] and all(n.startswith("language.blocks.") for n in adapted)
    trained = VisionLanguageModel.from_pretrained(final).state_dict()
    adapters = sum(trained[f"{n}.lora_A"].numel() + trained[f"{n}.lora_B"].numel() for n in adapted)
    assert saved["n_params_trainable"] == adapters + n_projector
    for key, value in initial.state_dict().items():  # the base stayed put; the projector trained
        assert torch.equal(trained[key], value) != key.startswith("projector."), key
    assert any(trained[f"{n}.lora_B"].abs().sum() > 0 for n in adapted)  # B left zero: the adapters learned
    state = torch.load(final / STATE_FILE, weights_only=True)["optimizer"]
    n_state = sum(s["exp_avg"].numel() for s in state["state"].values())
    assert n_state == saved["n_params_trainable"]  # AdamW moments for the trainable parameters only


def test_an_interrupted_lora_run_resumes_to_the_uninterrupted_losses(tmp_path):
    model_cfg = get_preset("tiny").model
    full = train(model_cfg, _train_cfg(tmp_path, "full", lora_dropout=0.1))
    expected = _losses(Path(full.run_dir))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model_cfg, _train_cfg(tmp_path, "cut", lora_dropout=0.1), callback=_CrashAt(3))
    cut_dir = tmp_path / "cut"
    resumed = train(model_cfg, _train_cfg(tmp_path, "cut", lora_dropout=0.1, resume=str(cut_dir)))
    got = _losses(cut_dir)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == expected[step], (step, got[step], expected[step])
    assert resumed.steps == 6
    final_a = VisionLanguageModel.from_pretrained(Path(full.run_dir) / "final").state_dict()
    final_b = VisionLanguageModel.from_pretrained(cut_dir / "final").state_dict()
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resuming_a_lora_checkpoint_without_lora_is_refused(tmp_path):
    train(get_preset("tiny").model, _train_cfg(tmp_path, "r", max_steps=2, save_checkpoint_steps=2))
    with pytest.raises(ConfigError, match="has LoRA adapters"):
        train(get_preset("tiny").model, _train_cfg(tmp_path, "r", lora_r=0, max_steps=4, resume=str(tmp_path / "r")))


def test_generate_and_eval_run_an_adapter_checkpoint_directly(tmp_path):
    summary = train(get_preset("tiny").model, _train_cfg(tmp_path, "g", max_steps=2, save_checkpoint_steps=2))
    final = str(Path(summary.run_dir) / "final")
    image = tmp_path / "red.png"
    solid_image().save(image)
    result = generate_from_checkpoint(final, [str(image)], "What colour is the shape?", device="cpu",
                                      max_new_tokens=4, greedy=True)
    assert len(result.texts) == 1 and 1 <= result.new_tokens[0] <= 4
    run = CliRunner().invoke(app, ["eval", final, "--benchmark", "shapes", "--limit", "5", "--device", "cpu",
                                   "--json"])
    assert run.exit_code == 0, run.output
    assert "accuracy" in json.loads(run.stdout)


def test_fsdp_with_lora_is_refused_in_one_line():
    from nanovlm_cli.training.fsdp import check_fsdp_config

    with pytest.raises(ConfigError, match="--strategy fsdp does not train LoRA adapters"):
        check_fsdp_config(TrainConfig(lora_r=8))
    check_fsdp_config(TrainConfig())  # full fine-tuning passes



def test_train_with_fsdp_and_lora_is_refused_before_any_work(tmp_path):
    cfg = _train_cfg(tmp_path, "fsdp", strategy="fsdp")
    with pytest.raises(ConfigError, match="--strategy fsdp does not train LoRA adapters"):
        train(get_preset("tiny").model, cfg)
    assert not (tmp_path / "fsdp").exists()  # nothing was written


def test_export_merges_the_adapters_and_transformers_computes_the_adapter_model(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from nanovlm_cli.checkpoint.export import export_transformers
    from nanovlm_cli.checkpoint.io import build_model
    from nanovlm_cli.models.lora import LoRAConfig, apply_lora, has_lora
    from tests.test_export import _compare, _image, idefics3_tiny

    torch.manual_seed(0)
    loaded = build_model(idefics3_tiny(image_size=64), load_backbones=False)
    apply_lora(loaded.model, LoRAConfig(r=4, alpha=8.0, targets=("language", "vision")))
    with torch.no_grad():  # trained-looking adapters: B no longer zero
        for name, p in loaded.model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    loaded.model.eval()
    export_transformers(loaded, tmp_path / "hf")
    assert has_lora(loaded.model)  # the export merged a copy
    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf")).eval()
    _, logits = _compare(loaded, hf, AutoProcessor.from_pretrained(str(tmp_path / "hf")), [_image(150, 60)])
    assert logits <= 1e-4, logits


def test_push_merges_the_adapters_unless_asked_to_keep_them(tmp_path):
    from nanovlm_cli.hub import push_checkpoint

    summary = train(get_preset("tiny").model, _train_cfg(tmp_path, "p", max_steps=2, save_checkpoint_steps=2))
    final = Path(summary.run_dir) / "final"
    merged = push_checkpoint(final, "me/tiny-lora", dry_run_dir=tmp_path / "merged")
    kept = push_checkpoint(final, "me/tiny-lora", dry_run_dir=tmp_path / "kept", keep_adapters=True)
    assert "lora" not in json.loads((Path(merged.folder) / "config.json").read_text())
    assert "lora" in json.loads((Path(kept.folder) / "config.json").read_text())
    adapter = VisionLanguageModel.from_pretrained(final).eval()
    plain = VisionLanguageModel.from_pretrained(merged.folder).eval()
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    ids = torch.randint(5, 200, (1, 12))
    with torch.no_grad():
        assert (adapter.logits(adapter(ids)) - plain.logits(plain(ids))).abs().max() <= 1e-5


def test_train_command_takes_the_lora_flags_and_logs_the_counts(tmp_path, capsys):
    from nanovlm_cli.cli import app as app_module

    code = app_module.run(["train", "--preset", "tiny", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.05",
                           "--lora-targets", "language,vision", "--no-lora-train-projector", "--max-steps", "2",
                           "--dataset-size", "100", "--batch-size", "4", "--eval-size", "0", "--num-workers", "0",
                           "--max-threads", "1", "--output-dir", str(tmp_path), "--run-name", "cli", "--no-dashboard"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert f"{summary['n_params_trainable']:,} trainable / {summary['n_params_frozen']:,} frozen" in captured.err
    lora = json.loads((tmp_path / "cli" / "final" / "config.json").read_text())["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (4, 8.0, 0.05)
    assert any(m.startswith("vision.") for m in lora["modules"]) and any(m.startswith("language.") for m in lora["modules"])
    model = VisionLanguageModel.from_pretrained(tmp_path / "cli" / "final")
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert summary["n_params_trainable"] == adapters  # the projector stayed frozen
