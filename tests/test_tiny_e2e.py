"""The README's main job, end to end: `nanovlm train --preset tiny` learns offline, then `generate` answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanovlm_cli.data.shapes import Scene, Shape

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_preset_learns_shapes_and_generate_answers(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "nanovlm_cli", "train", "--preset", "tiny", "--output-dir",
                          str(tmp_path), "--run-name", "tiny", "--no-dashboard"],
                         check=False, env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    open_accuracy = summary["eval"]["open"]["by_category"]
    # Held-out images (eval split), short answers: what the preset trains for.
    assert open_accuracy["colour"] >= 0.9, summary["eval"]
    assert open_accuracy["shape"] >= 0.9, summary["eval"]
    assert summary["eval"]["open"]["accuracy"] >= 0.6, summary["eval"]
    # The same held-out multiple-choice questions, each option's text scored as the reply (rank scoring).
    rank_accuracy = summary["eval"]["rank"]["by_category"]
    assert rank_accuracy["colour"] >= 0.9, summary["eval"]["rank"]
    assert rank_accuracy["shape"] >= 0.9, summary["eval"]["rank"]
    assert summary["skipped"] == {}, summary["skipped"]  # the built-in shapes samples all fit: none is dropped

    image = tmp_path / "red_circle.png"
    Scene((Shape("circle", "red", (33, 31), 22),), (255, 255, 255), "centre", "large").render().save(image)
    answer = subprocess.run([sys.executable, "-m", "nanovlm_cli", "generate", str(image), "What colour is the shape?",
                             "--checkpoint", str(tmp_path / "tiny" / "final"), "--json"],
                            check=False, env=env, cwd=REPO, capture_output=True, text=True)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert json.loads(answer.stdout)["answers"][0].strip() == "red"
