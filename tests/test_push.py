"""`nanovlm push`: the dry-run folder and model card, and the Hub calls (mocked only at the network edge)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovlm_cli.checkpoint.card import card_license, eval_entries, model_card
from nanovlm_cli.checkpoint.io import build_model, save_model
from nanovlm_cli.cli.app import run
from nanovlm_cli.errors import HubError
from nanovlm_cli.hub import push_checkpoint
from nanovlm_cli.presets import get_preset

TOKEN = "hf_secret_test_token_123"
INFERENCE_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    loaded = build_model(get_preset("tiny").model, load_backbones=False)
    summary = {"dataset": "shapes", "steps": 600, "final_loss": 0.1234567}
    directory = save_model(loaded.model, tmp_path_factory.mktemp("push") / "ckpt", tokenizer=loaded.tokenizer,
                           summary=summary, extra_files={"training_state.pt": b"optimizer state"})
    (directory / "eval_results.json").write_text(json.dumps(TRAINING_EVAL))
    return directory


# What `nanovlm train` saves as eval_results.json on shapes: the letter-scored result, the same questions scored by
# option likelihood under "rank", and the open-answer result under "open" (the case: letter colour 0.025,
# open colour 1.0).
TRAINING_EVAL = {
    "benchmark": "shapes", "scoring": "generate", "n": 200, "accuracy": 0.22, "unanswered": 151,
    "by_category": {"colour": 0.025, "count": 0.5},
    "rank": {"benchmark": "shapes", "scoring": "rank", "n": 200, "accuracy": 0.875,
             "by_category": {"colour": 0.9, "count": 0.85}},
    "open": {"benchmark": "shapes-open", "scoring": "generate", "n": 200, "accuracy": 0.6,
             "by_category": {"colour": 0.4, "count": 1.0}},
}


@pytest.fixture
def copy(checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def _edit_weights(directory, edit) -> None:
    state = load_file(str(directory / "model.safetensors"))
    edit(state)
    save_file(state, str(directory / "model.safetensors"))


@pytest.fixture
def hub_calls(monkeypatch):
    """Replace the three HfApi methods that touch the network; record their arguments and the uploaded files."""
    calls: dict[str, dict] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, **kwargs):
        from pathlib import Path

        folder = Path(kwargs["folder_path"])
        calls["upload_folder"] = {**kwargs, "files": {p.name for p in folder.iterdir()},
                                  "readme": (folder / "README.md").read_text()}
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return calls


def _front_matter(card: str) -> str:
    assert card.startswith("---\n")
    return card.split("---\n")[1]


def test_dry_run_writes_the_upload_folder_with_a_card_from_the_real_config(checkpoint, tmp_path):
    result = push_checkpoint(checkpoint, "me/tiny-vlm", dry_run_dir=tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert INFERENCE_FILES | {"training_summary.json", "eval_results.json"} <= names
    assert "training_state.pt" not in names
    assert {f.name for f in result.files} == names and result.dry_run and result.url is None
    assert result.total_bytes == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    card = (tmp_path / "out" / "README.md").read_text()
    meta = _front_matter(card)
    assert "library_name: nanovlm" in meta and "pipeline_tag: image-text-to-text" in meta
    assert "# me/tiny-vlm" in card
    assert "| shapes | option likelihood | 200 | 0.875 | colour 0.900, count 0.850 |" in card
    assert "| steps | 600 |" in card and "| final_loss | 0.1235 |" in card
    assert "3 layers, 96 wide" in card  # the checkpoint's own vision config, not a template


def test_model_card_lists_pretrained_backbones_as_base_model():
    cfg = get_preset("tiny").model
    cfg = cfg.replace(vision=cfg.vision.replace(hub_id="google/siglip-base-patch16-224"),
                      language=cfg.language.replace(hub_id="HuggingFaceTB/SmolLM2-135M"))
    meta = _front_matter(model_card(cfg, n_params=1000, summary={"dataset": "HuggingFaceM4/the_cauldron"}))
    assert "base_model:\n  - google/siglip-base-patch16-224\n  - HuggingFaceTB/SmolLM2-135M" in meta
    assert "datasets:\n  - HuggingFaceM4/the_cauldron" in meta


def test_dry_run_refuses_a_non_empty_directory(checkpoint, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(HubError, match="not empty"):
        push_checkpoint(checkpoint, "me/tiny-vlm", dry_run_dir=tmp_path)


def test_push_creates_the_repo_and_uploads_one_commit(checkpoint, hub_calls):
    result = push_checkpoint(checkpoint, "me/tiny-vlm", private=True, revision="exp-1", commit_message="first")
    assert hub_calls["create_repo"]["repo_id"] == "me/tiny-vlm" and hub_calls["create_repo"]["private"] is True
    assert hub_calls["create_branch"] == {"repo_id": "me/tiny-vlm", "branch": "exp-1", "exist_ok": True,
                                          "repo_type": "model"}
    upload = hub_calls["upload_folder"]
    assert upload["repo_id"] == "me/tiny-vlm" and upload["revision"] == "exp-1"
    assert upload["commit_message"] == "first"
    assert INFERENCE_FILES <= upload["files"] and "training_state.pt" not in upload["files"]
    assert "pipeline_tag: image-text-to-text" in upload["readme"]
    assert result.url == "https://huggingface.co/me/tiny-vlm/commit/abc123"


def test_push_command_uploads_without_ever_printing_the_token(checkpoint, hub_calls, capsys):
    assert run(["push", str(checkpoint), "me/tiny-vlm", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["url"].endswith("/commit/abc123")
    assert hub_calls["create_repo"]["private"] is False and hub_calls["upload_folder"]["revision"] is None
    assert TOKEN not in captured.out + captured.err


def test_push_command_dry_run_lists_files_and_touches_no_network(checkpoint, tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("a dry run must not call the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", no_network)
    assert run(["push", str(checkpoint), "me/tiny-vlm", "--dry-run", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "README.md" in out and "total" in out


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "me/bad name", "/x"])
def test_bad_repo_id_exits_1_with_one_line(checkpoint, repo_id, hub_calls, capsys):
    assert run(["push", str(checkpoint), repo_id]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: repo id") and "\n" not in err
    assert not hub_calls  # nothing was sent


def test_missing_token_is_one_line_before_any_network(checkpoint, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no login cache either
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("network call"))
    assert run(["push", str(checkpoint), "me/tiny-vlm"]) == 1
    assert "no Hugging Face token" in capsys.readouterr().err


def test_upload_failure_becomes_a_hub_error(checkpoint, hub_calls, monkeypatch):
    def fail(self, **kwargs):
        raise OSError("403 Forbidden: you cannot write to this repo\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fail)
    with pytest.raises(HubError, match=r"upload to me/tiny-vlm failed \(OSError: 403 Forbidden") as info:
        push_checkpoint(checkpoint, "me/tiny-vlm")
    assert "\n" not in str(info.value)


def test_card_evaluation_shows_every_recorded_protocol_by_name(checkpoint, tmp_path):
    push_checkpoint(checkpoint, "me/tiny-vlm", dry_run_dir=tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    evaluation = card.split("## Evaluation")[1].split("\n## ")[0]
    assert "| shapes | letter | 200 | 0.220 | colour 0.025, count 0.500 |" in evaluation
    assert "| shapes | option likelihood | 200 | 0.875 | colour 0.900, count 0.850 |" in evaluation
    assert "| shapes-open | open answers | 200 | 0.600 | colour 0.400, count 1.000 |" in evaluation
    assert "151 of 200 replies named no option" in evaluation
    for name in ("letter", "option likelihood", "open answers"):
        assert f"- **{name}**:" in evaluation  # each protocol is explained


def test_eval_entries_read_the_summary_eval_and_keep_duplicates_once():
    entries = eval_entries(TRAINING_EVAL, {"eval": TRAINING_EVAL}["eval"])
    assert [(e.benchmark, e.protocol) for e in entries] == [
        ("shapes", "letter"), ("shapes", "option likelihood"), ("shapes-open", "open answers")]
    assert eval_entries(None, {"benchmark": "mmstar", "scoring": "rank", "n": 5, "accuracy": 0.4})[0].protocol \
        == "option likelihood"


def test_card_without_eval_results_says_it_was_not_evaluated():
    card = model_card(get_preset("tiny").model, n_params=1000)
    assert "Not evaluated" in card and "accuracy is unknown" in card


@pytest.mark.parametrize("vision,language,license,name", [
    ("google/siglip2-base-patch16-512", "HuggingFaceTB/SmolLM2-360M-Instruct", "apache-2.0", None),
    ("facebook/dinov3-vits16plus-pretrain-lvd1689m", None, "other", "dinov3-license"),
    ("google/siglip-base-patch16-224", "google/gemma-3-270m-it", "other", "multiple"),
    ("facebook/dinov2-vits14", "someone/unknown-lm", "other", "unknown"),
    (None, None, "other", "unknown"),
])
def test_card_license_comes_from_the_base_models(vision, language, license, name):
    cfg = get_preset("tiny").model
    cfg = cfg.replace(vision=cfg.vision.replace(hub_id=vision), language=cfg.language.replace(hub_id=language))
    meta = _front_matter(model_card(cfg, n_params=1000))
    assert f"license: {license}\n" in meta
    assert (f"license_name: {name}\n" in meta) if name else "license_name" not in meta
    assert "apache-2.0" not in meta or license == "apache-2.0"


def test_card_license_mixing_gemma_names_both_terms():
    text = card_license(["google/siglip-base-patch16-224", "google/gemma-3-270m-it"]).explanation
    assert "google/siglip-base-patch16-224 (apache-2.0)" in text and "google/gemma-3-270m-it (gemma)" in text


def test_push_license_flag_overrides_the_derived_license(checkpoint, tmp_path):
    assert run(["push", str(checkpoint), "me/tiny-vlm", "--dry-run", str(tmp_path / "out"), "--license", "mit"]) == 0
    assert "license: mit\n" in _front_matter((tmp_path / "out" / "README.md").read_text())


def test_card_has_intended_use_limitations_and_a_usage_question_the_model_answers(checkpoint, tmp_path):
    push_checkpoint(checkpoint, "me/tiny-vlm", dry_run_dir=tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Intended use" in card and "synthetic shapes dataset" in card
    limitations = card.split("## Limitations")[1].split("\n## ")[0]
    assert "parameters" in limitations and "600 steps on shapes" in limitations
    usage = card.split("## Usage")[1]
    # The open-answer scores say the model answers count questions (1.0), not colour ones (0.4): the example asks
    # a count question about an image it can make, and the Python example asks the same.
    assert usage.count('"How many shapes are there?"') == 2 and "render_example('shape.png')" in usage
    assert "What is in this image?" not in usage


def test_card_for_a_general_dataset_asks_a_general_question():
    card = model_card(get_preset("tiny").model, n_params=1000, summary={"dataset": "HuggingFaceM4/the_cauldron"})
    assert '"What is in this image?"' in card and "render_example" not in card and "synthetic" not in card


def _damage_nan(directory):
    _edit_weights(directory, lambda s: s["projector.proj.weight"].fill_(float("nan")))


def _damage_shape(directory):
    _edit_weights(directory, lambda s: s.__setitem__("language.norm.weight", torch.ones(7)))


def _damage_tokenizer(directory):
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        (directory / name).unlink(missing_ok=True)


def _damage_truncate(directory):
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize("damage,check", [(_damage_nan, "finite: 1 tensor(s) hold NaN"),
                                          (_damage_shape, "tensors: 1 with the wrong shape"),
                                          (_damage_tokenizer, "files: no tokenizer files"),
                                          (_damage_truncate, "model.safetensors cannot be read")])
@pytest.mark.parametrize("dry_run", [True, False])
def test_push_refuses_a_broken_checkpoint_with_one_line(copy, damage, check, dry_run, hub_calls, tmp_path, capsys):
    damage(copy)
    args = ["push", str(copy), "me/tiny-vlm", *(["--dry-run", str(tmp_path / "out")] if dry_run else [])]
    assert run(args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("error:"), err
    assert "fails validation, nothing was uploaded" in err and check in err
    assert not hub_calls and not (tmp_path / "out").exists()  # nothing sent, nothing written


def test_dry_run_onto_an_existing_file_is_one_line(checkpoint, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("mine")
    for target in (tmp_path / "file.txt", tmp_path / "file.txt" / "below"):
        assert run(["push", str(checkpoint), "me/tiny-vlm", "--dry-run", str(target)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: dry-run") and "is a file" in err and "\n" not in err, err
    assert (tmp_path / "file.txt").read_text() == "mine"
