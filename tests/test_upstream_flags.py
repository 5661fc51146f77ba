"""The original nanoVLM's command lines, spelled `nanovlm <command>`, are accepted or refused with a reason.

The command lines come from the original repository's README, its scripts' argparse flags (train.py, generate.py,
eval/measure_vram.py, evaluation.py, run_evaluation.py, utils/run_checkpoint_evaluations.py) and the config
fields it documents as settings (models/config.py). Each is parsed by the real command (`make_context`: the same
parsing `nanovlm` does, without running the command, so nothing loads); train lines also run end to end with
`--dry-run --json`.
"""

from __future__ import annotations

import json
import shlex

import pytest

from nanovlm_cli.cli.app import get_command, run
from nanovlm_cli.cli.options import ALIASES, Refused

# (nanovlm command line, the parameters it must resolve to)
ACCEPTED = [
    # README
    ("train", {}),
    ("train --use_preset dinov3_gemma", {"preset": "dinov3_gemma"}),
    ("generate --checkpoint /your/path/to/trained_models --image cat.png --prompt 'What is this?'",
     {"checkpoint": "/your/path/to/trained_models", "image": "cat.png", "prompt": "What is this?"}),
    ("eval --model lusxvr/nanoVLM-450M --tasks mmstar,mme",
     {"checkpoint": "lusxvr/nanoVLM-450M", "tasks": "mmstar,mme", "backend": "lmms-eval"}),
    ("vram --batch_sizes '1 2 4 8'", {"batch_sizes": "1 2 4 8"}),
    ("vram --vlm_checkpoint_path path/to/your/model --batch_sizes '16 32 64'",
     {"checkpoint": "path/to/your/model", "batch_sizes": "16 32 64"}),
    # train.py's argparse flags
    ("train --lr_mp 0.01 --lr_vision_backbone 1e-5 --lr_language_backbone 2e-5",
     {"lr_mp": 0.01, "lr_vision": 1e-5, "lr_language": 2e-5}),
    ("train --vlm_checkpoint_path ckpt --resume_from_vlm_checkpoint",
     {"vlm_checkpoint_path": "ckpt", "resume_from_vlm_checkpoint": True}),
    ("train --compile --no_log_wandb", {"compile": True, "no_log_wandb": True}),
    ("train --log_wandb", {"report_to": "wandb"}),
    ("train --train_dataset_path HuggingFaceM4/the_cauldron", {"dataset": "HuggingFaceM4/the_cauldron"}),
    (("train --relevance_min_rating 3 --image_correspondence_min_rating 3 --visual_dependency_min_rating 3 "
     "--formatting_min_rating 3"), {"min_rating": 3}),
    # models/config.py TrainConfig fields as flags (the fork's README spelling)
    (("train --batch_size 4 --gradient_accumulation_steps 2 --max_grad_norm 0.5 --eval_interval 100 "
     "--max_training_steps 50 --stats_log_interval 10 --max_images_per_knapsack 8 --max_sample_length 512"),
     {"batch_size": 4, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5, "eval_interval": 100, "max_steps": 50,
      "console_log_interval": 10, "max_images_per_row": 8, "max_seq_len": 512}),
    ("train --train_dataset_name a,b --stream_dataset --wandb_entity me --hf_repo_name me/vlm",
     {"dataset_config": "a,b", "stream": True, "wandb_entity": "me", "hf_repo_name": "me/vlm"}),
    # generate.py
    (("generate --hf_model lusxvr/nanoVLM-450M --image cat.png --prompt 'What is this?' --generations 5 "
     "--max_new_tokens 300"), {"checkpoint": "lusxvr/nanoVLM-450M", "image": "cat.png", "prompt": "What is this?",
                              "num_generations": 5, "max_new_tokens": 300}),
    ("generate cat.png --prompt 'What is this?'", {"image": "cat.png", "prompt": "What is this?"}),
    # eval/measure_vram.py
    ("vram --compile --batch_sizes '1 2' --lm_max_length 128", {"compile": True, "seq_len": 128}),
    ("vram --use_preset original_small", {"preset": "original_small"}),
    # evaluation.py / run_evaluation.py / utils/run_checkpoint_evaluations.py
    ("eval --checkpoint_path runs/x/step-100 --tasks mmstar --limit 10 --batch_size 4",
     {"checkpoint": "runs/x/step-100", "limit": 10, "batch_size": 4, "backend": "lmms-eval"}),
    ("eval --model ckpt --device cuda --output_path out", {"device": "cuda", "output": "out"}),
    ("eval ckpt --eval_tasks mmstar mme --eval_results_dir out", {"tasks": "mmstar,mme", "output": "out"}),
    # the issue's own lines
    ("validate --checkpoint_dir DIR", {"checkpoint": "DIR"}),
    ("push --checkpoint_dir DIR --hf_repo_name me/vlm", {"checkpoint": "DIR", "repo_id": "me/vlm"}),
]

# (nanovlm command line, a piece of the one-line reason)
REFUSED = [
    ("train --use_lmms_eval --lmms_eval_tasks mmstar,mme --lmms_eval_limit 1000",
     "nanovlm eval CHECKPOINT --backend lmms-eval --tasks mmstar,mme --limit 1000"),
    ("train --lmms_eval_batch_size 8", "--batch-size 8"),
    ("train --compile True", "--compile is a flag and takes no value"),
    ("train --resume_from_vlm_checkpoint True --vlm_checkpoint_path x", "takes no value"),
    ("train --log_wandb False", "--log_wandb is a flag"),
    ("train --relevance_min_rating 1 --formatting_min_rating 2", "one threshold to every rating"),
    ("train --val_size 500", "--validation-batches"),
    ("train --eval_in_epochs", "counts steps, not epochs"),
    ("train --max_images_per_example 4", "--max-images-per-row"),
    ("train --lm_model_type HuggingFaceTB/SmolLM2-135M", "--language-model"),
    ("train --vit_model_type google/siglip2-base-patch16-512", "--vision-encoder"),
    ("train --lm_hidden_dim 576 --mp_pixel_shuffle_factor 2", ("--lm_hidden_dim, --mp_pixel_shuffle_factor: the "
                                                            "architecture comes from --preset")),
    ("train --max_img_size 1024", "image.max_side"),
    ("generate cat.png 'What is this?' --measure_vram", "does not measure memory"),
    ("generate --prompt 'What is this?'", "missing argument IMAGE"),
    ("vram --num_iterations 3", "2 training steps per batch size"),
    ("vram --lm_model_type HuggingFaceTB/SmolLM2-135M-Instruct", "--preset"),
    ("eval --checkpoints_dir runs/x --eval_tasks mmstar --steps 100 200", "scores one checkpoint"),
    ("eval --checkpoint_path c --global_step 5 --run_name r --tasks mmstar", "--global_step, --run_name:"),
    ("eval c --num_fewshot 0 --log_samples", "--num_fewshot, --log_samples: lmms-eval options"),
    ("eval c --force", "always scores afresh"),
    ("eval --config eval.yaml", "not a YAML file"),
]

# Every argparse flag of the original scripts (copied from them), and the command it translates to.
SCRIPT_FLAGS = {
    "train": ["--lr_mp", "--lr_vision_backbone", "--lr_language_backbone", "--vlm_checkpoint_path", "--compile",
              "--log_wandb", "--resume_from_vlm_checkpoint", "--no_log_wandb", "--train_dataset_path",
              "--relevance_min_rating", "--image_correspondence_min_rating", "--visual_dependency_min_rating",
              "--formatting_min_rating"],
    "generate": ["--checkpoint", "--hf_model", "--image", "--prompt", "--generations", "--max_new_tokens",
                 "--measure_vram"],
    "vram": ["--compile", "--batch_sizes", "--lm_max_length", "--lm_model_type", "--num_iterations",
             "--vlm_checkpoint_path"],
    "eval": ["--config", "--model", "--tasks", "--model_args", "--num_fewshot", "--batch_size", "--max_batch_size",
             "--device", "--output_path", "--limit", "--use_cache", "--cache_requests", "--check_integrity",
             "--write_out", "--log_samples", "--wandb_log_samples", "--log_samples_suffix", "--system_instruction",
             "--apply_chat_template", "--fewshot_as_multiturn", "--show_config", "--include_path", "--gen_kwargs",
             "--verbosity", "--wandb_args", "--timezone", "--hf_hub_log_args", "--predict_only", "--seed",
             "--trust_remote_code", "--no_log_wandb", "--process_with_media", "--checkpoint_path", "--global_step",
             "--run_name", "--checkpoints_dir", "--steps", "--eval_tasks", "--eval_results_dir", "--force"],
}


def _parse(line: str) -> dict:
    """The parameters `nanovlm <line>` resolves to, without running the command."""
    words = shlex.split(line)
    command = get_command().commands[words[0]]
    return command.make_context(words[0], words[1:]).params


@pytest.mark.parametrize("line,expected", ACCEPTED, ids=[line for line, _ in ACCEPTED])
def test_original_command_line_is_accepted(line, expected):
    params = _parse(line)
    for name, value in expected.items():
        assert str(params[name]) == str(value), f"nanovlm {line}: {name}={params[name]!r}, expected {value!r}"


# (--vlm_checkpoint_path names a checkpoint that must exist to resume from; the parse test above covers it)
@pytest.mark.parametrize("line", [line for line, _ in ACCEPTED if line.startswith("train") and "checkpoint" not in line])
def test_original_train_line_runs_as_a_dry_run(line, capsys):
    assert run([*shlex.split(line), "--dry-run", "--json"]) == 0, capsys.readouterr().err
    assert set(json.loads(capsys.readouterr().out)) == {"model", "train", "n_params_estimate"}


def test_use_preset_resolves_the_preset_in_the_dry_run(capsys):
    assert run(["train", "--use_preset", "dinov3_gemma", "--dry-run", "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["vision"]["kind"] == "dinov3" and model["chat_template"] == "gemma"


@pytest.mark.parametrize("line,reason", REFUSED, ids=[line for line, _ in REFUSED])
def test_meaningless_original_flag_is_refused_in_one_line(line, reason, capsys):
    assert run(shlex.split(line)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert reason in err and "No such option" not in err, err


@pytest.mark.parametrize("command", list(SCRIPT_FLAGS))
def test_every_flag_of_the_original_scripts_is_known_or_refused_with_a_reason(command):
    cmd = get_command().commands[command]
    ours = {name for p in cmd.params for name in (*p.opts, *getattr(p, "secondary_opts", ()))}
    aliases = ALIASES[command]
    for flag in SCRIPT_FLAGS[command]:
        kebab = "--" + flag[2:].replace("_", "-")
        assert flag in ours or kebab in ours or kebab in aliases, f"nanovlm {command} {flag}: No such option"
        if kebab in aliases and isinstance(aliases[kebab], Refused):
            assert aliases[kebab].why, f"{flag} is refused without a reason"


def test_aliases_never_shadow_an_option_of_the_command():
    for command, table in ALIASES.items():
        cmd = get_command().commands[command]
        ours = {name for p in cmd.params for name in (*p.opts, *getattr(p, "secondary_opts", ()))}
        assert not set(table) & ours, f"{command}: {sorted(set(table) & ours)} are real options"


def test_underscore_and_kebab_spellings_of_an_alias_agree():
    assert _parse("train --use-preset tiny")["preset"] == _parse("train --use_preset=tiny")["preset"] == "tiny"
