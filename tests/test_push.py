"""`nanovlm push`: the dry-run folder and model card, and the Hub calls (mocked only at the network edge)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from nanovlm_cli.checkpoint.io import build_model, save_model
from nanovlm_cli.cli.app import run
from nanovlm_cli.errors import HubError
from nanovlm_cli.hub import model_card, push_checkpoint
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
    (directory / "eval_results.json").write_text(json.dumps(
        {"benchmark": "shapes", "n": 200, "accuracy": 0.875, "by_category": {"colour": 0.9, "count": 0.85}}))
    return directory


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
    assert "| shapes | 0.8750 |" in card and "| shapes / colour | 0.9000 |" in card
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
