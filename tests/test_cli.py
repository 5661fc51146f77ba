"""The `nanovlm` app: help, version, train --dry-run, the error contract, flag spellings, unimplemented commands."""

import json
import subprocess
import sys
import textwrap

import pytest

from nanovlm_cli import __version__
from nanovlm_cli.cli import app as app_module
from nanovlm_cli.cli.app import UsageError
from nanovlm_cli.cli.vram import parse_batch_sizes
from nanovlm_cli.presets import PRESETS, get_preset
from nanovlm_cli.run_config import TRAIN_FIELDS

COMMANDS = ["train", "generate", "eval", "vram", "validate", "push", "export", "chat", "serve"]


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the real app in-process: returns (exit code, stdout, stderr)."""
    monkeypatch.delenv("NANOVLM_DEBUG", raising=False)

    def invoke(*args: str):
        capsys.readouterr()
        code = app_module.run(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def dry_run_json(cli, *args: str) -> dict:
    code, out, err = cli("train", "--dry-run", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_version(cli):
    code, out, _ = cli("--version")
    assert (code, out.strip()) == (0, f"nanovlm {__version__}")


@pytest.mark.parametrize("command,expected", [
    ("train", ["--preset", "--config", "--dinov3-model", "--lr-backbones", "--gradient-accumulation-steps",
               "--no-compile", "--resume", "--resume-from-vlm-checkpoint", "--no-log-wandb", "--dry-run"]),
    ("generate", ["IMAGE", "PROMPT", "--checkpoint", "--max-new-tokens", "--greedy", "--num-generations", "--dtype"]),
    ("eval", ["CHECKPOINT", "--benchmark", "--limit", "--compare", "--backend", "--tasks"]),
    ("vram", ["--batch-sizes", "--preset", "--checkpoint", "--max-batch-size-for", "--stop-on-oom", "--plot"]),
    ("validate", ["CHECKPOINT", "--no-generate", "--device", "--json"]),
    ("push", ["CHECKPOINT", "REPO_ID", "--private", "--revision", "--commit-message", "--dry-run"]),
])
def test_help_of_every_command_shows_its_options(cli, command, expected):
    code, out, _ = cli(command, "--help")
    assert code == 0
    for name in expected:
        assert name in out, f"{name} missing from `nanovlm {command} --help`"


def test_root_help_lists_every_command(cli):
    code, out, _ = cli("--help")
    assert code == 0
    assert all(c in out for c in COMMANDS)


def test_help_and_dry_run_do_not_import_torch():
    script = textwrap.dedent("""
        import sys
        from nanovlm_cli.cli.app import run
        codes = [run(["--help"])] + [run([c, "--help"]) for c in {commands!r}]
        codes.append(run(["train", "--preset", "tiny", "--dry-run", "--json"]))
        assert codes == [0] * len(codes), codes
        heavy = sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules)
        assert not heavy, heavy
    """).format(commands=COMMANDS)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_console_script_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanovlm_cli", "train", "--preset", "tiny", "--dry-run", "--json"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["train"]["dataset"] == "shapes"  # stdout holds only the JSON


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dry_run_json_is_the_resolved_preset(cli, preset):
    data = dry_run_json(cli, "--preset", preset)
    assert set(data) == {"model", "train", "n_params_estimate"}
    assert data["model"] == get_preset(preset).model.to_dict()
    assert data["train"] == get_preset(preset).train.to_dict()
    assert data["n_params_estimate"] == get_preset(preset).model.n_params_estimate() > 0


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dry_run_table_shows_model_train_and_size(cli, preset):
    code, out, _ = cli("train", "--preset", preset, "--dry-run")
    assert code == 0
    assert f"model (preset {preset})" in out and "vision.hidden_dim" in out and "batch_size" in out
    assert f"{get_preset(preset).model.n_params_estimate():,}" in out


def test_bad_value_exits_1_with_one_line_naming_the_field(cli):
    code, out, err = cli("train", "--preset", "tiny", "--dry-run", "--warmup-ratio", "3")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error:") and "warmup_ratio" in err and "Traceback" not in err


def test_out_of_range_flag_is_a_usage_error_naming_the_option(cli):
    code, out, err = cli("train", "--preset", "tiny", "--dry-run", "--batch-size", "0")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error:") and "--batch-size" in err and "Traceback" not in err


def test_bad_config_file_field_exits_1_naming_it(cli, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("lr_visoin = 1e-4\n")
    code, _, err = cli("train", "--config", str(cfg), "--dry-run")
    assert code == 1 and "lr_visoin" in err and len(err.strip().splitlines()) == 1


def test_usage_error_is_one_line_and_exit_2(cli):
    code, _, err = cli("train", "--dry-run", "--vision-encoder", "clip")
    assert code == 2 and "clip" in err and len(err.strip().splitlines()) == 1


def test_underscore_spellings_are_accepted(cli):
    data = dry_run_json(cli, "--preset", "tiny", "--batch_size", "3", "--gradient_accumulation_steps", "2",
                        "--lr_mp=0.01", "--no_packing", "--freeze_vision_encoder", "--max_steps", "5")
    train = data["train"]
    assert (train["batch_size"], train["gradient_accumulation_steps"], train["lr_mp"]) == (3, 2, 0.01)
    assert (train["packing"], train["freeze_vision_encoder"], train["max_steps"]) == (False, True, 5)


def test_boolean_flags_are_real_flags(cli, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("compile = true\ngradient_checkpointing = true\n")
    assert dry_run_json(cli, "--preset", "tiny", "--compile")["train"]["compile"] is True
    train = dry_run_json(cli, "--preset", "tiny", "--config", str(cfg), "--no-compile", "--no_gradient_checkpointing")
    assert (train["train"]["compile"], train["train"]["gradient_checkpointing"]) == (False, False)
    assert dry_run_json(cli, "--preset", "tiny", "--config", str(cfg))["train"]["compile"] is True
    code, _, err = cli("train", "--dry-run", "--compile", "False")  # "False" is not a value that means True
    assert code == 2 and "False" in err


def test_lr_backbones_sets_both_unless_one_is_given(cli):
    train = dry_run_json(cli, "--preset", "tiny", "--lr-backbones", "1e-4")["train"]
    assert train["lr_vision"] == train["lr_language"] == 1e-4
    train = dry_run_json(cli, "--preset", "tiny", "--lr-backbones", "1e-4", "--lr-vision", "2e-5")["train"]
    assert (train["lr_vision"], train["lr_language"]) == (2e-5, 1e-4)


def test_original_resume_spelling(cli, tmp_path):
    saved = dry_run_json(cli, "--preset", "tiny")  # a run directory: what the training loop writes first
    (tmp_path / "run_config.json").write_text(json.dumps({"model": saved["model"], "train": saved["train"]}))
    train = dry_run_json(cli, "--resume_from_vlm_checkpoint", "--vlm_checkpoint_path", str(tmp_path))["train"]
    assert train["resume"] == str(tmp_path)
    code, _, err = cli("train", "--dry-run", "--resume_from_vlm_checkpoint")
    assert code == 1 and "--vlm_checkpoint_path" in err


def test_report_to_and_no_log_wandb(cli):
    assert dry_run_json(cli, "--preset", "tiny", "--report-to", "wandb")["train"]["report_to"] == "wandb"
    assert dry_run_json(cli, "--preset", "tiny", "--no_log_wandb")["train"]["report_to"] == "none"
    code, _, err = cli("train", "--dry-run", "--report-to", "wandb", "--no-log-wandb")
    assert code == 1 and "--no-log-wandb" in err


def test_hf_repo_name_none_disables(cli, tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"hf_repo_name": "me/vlm"}))
    assert dry_run_json(cli, "--config", str(cfg))["train"]["hf_repo_name"] == "me/vlm"
    assert dry_run_json(cli, "--config", str(cfg), "--hf-repo-name", "None")["train"]["hf_repo_name"] is None


def test_backbone_flags_and_dinov3_alias(cli):
    model = dry_run_json(cli, "--dinov3-model", "vitl14", "--language-model", "gemma")["model"]
    assert model["vision"]["hub_id"] == "facebook/dinov3-vitl16-pretrain-lvd1689m"
    assert model["language"]["hub_id"] == "google/gemma-3-270m-it" and model["chat_template"] == "gemma"


def test_every_train_config_field_has_a_flag():
    train = app_module.get_command().commands["train"]
    options = {name for p in train.params for name in p.opts}
    missing = [f for f in TRAIN_FIELDS if "--" + f.replace("_", "-") not in options]
    assert not missing, (f"TrainConfig fields without a train flag: {missing}; declare them with "
                         "option(help=..., group=...) in nanovlm_cli/train_config.py and run `python scripts/gen_docs.py`")


def test_debug_shows_the_traceback(cli, monkeypatch):
    code, _, err = cli("--debug", "train", "--dry-run", "--warmup-ratio", "3")
    assert code == 1 and "Traceback" in err and "ConfigError" in err
    monkeypatch.setenv("NANOVLM_DEBUG", "1")
    code, _, err = cli("train", "--dry-run", "--warmup-ratio", "3")
    assert code == 1 and "Traceback" in err


def test_keyboard_interrupt_exits_130(cli, monkeypatch):
    from nanovlm_cli.cli import train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "resolve_run_config", interrupted)
    code, _, _ = cli("train", "--dry-run")
    assert code == 130


def test_generate_missing_image_is_a_one_line_error(cli, tmp_path):
    code, _, err = cli("generate", str(tmp_path / "missing.png"), "What is this?")
    assert code == 1 and "missing.png" in err and len(err.strip().splitlines()) == 1


def test_vram_batch_sizes_take_several_values():
    assert parse_batch_sizes("1", ["2", "4"]) == [1, 2, 4]
    assert parse_batch_sizes("1,2,8", []) == [1, 2, 8]
    assert parse_batch_sizes(None, []) == [1, 2, 4, 8]
    with pytest.raises(UsageError, match="'x'"):  # a usage error: exit 2
        parse_batch_sizes("1", ["x"])
    with pytest.raises(UsageError, match="unexpected"):
        parse_batch_sizes(None, ["3"])
