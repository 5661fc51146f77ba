"""`nanovlm chat` driven through piped stdin (one turn per line), and the conversation's context trimming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import solid_image, tiny_model

from nanovlm_cli.checkpoint.io import save_model
from nanovlm_cli.cli import app as app_module
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.serving.conversation import Conversation

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tiny = tiny_model(seed=3)
    return save_model(tiny.model, tmp_path_factory.mktemp("chat") / "ckpt", tokenizer=tiny.tokenizer)


def run_chat(checkpoint: Path, lines: list[str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanovlm_cli", "chat", "-c", str(checkpoint), "--greedy",
                           "--max-new-tokens", "16", "--device", "cpu", *flags], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


def test_two_turns_with_an_image_save_reset_and_a_bad_image(checkpoint, tmp_path, capsys):
    image = tmp_path / "red.png"
    solid_image((200, 30, 30)).save(image)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    result = run_chat(checkpoint, [
        f"/image {tmp_path / 'missing.png'}", f"/image {image}", "What colour is it?", "And the shape?",
        f"/save {first}", "/reset", "Hello there", f"/save {second}", "/exit", "never read"])
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.png does not exist" in errors[0]  # one line, and the session went on

    saved = json.loads(first.read_text())
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]
    assert saved[0]["content"] == [{"type": "image", "path": str(image)}, {"type": "text", "text": "What colour is it?"}]
    assert saved[2]["content"] == [{"type": "text", "text": "And the shape?"}]
    # the first answer is `generate --greedy`'s answer for the same image and prompt
    capsys.readouterr()
    code = app_module.run(["generate", str(image), "What colour is it?", "-c", str(checkpoint), "--greedy",
                           "--max-new-tokens", "16", "--device", "cpu", "--json"])
    assert code == 0
    assert saved[1]["content"][0]["text"] == json.loads(capsys.readouterr().out)["answers"][0]
    # stdout holds the answers, each followed by a newline, nothing else
    after_reset = json.loads(second.read_text())
    assert [m["role"] for m in after_reset] == ["user", "assistant"]
    answers = [saved[1], saved[3], after_reset[1]]
    assert result.stdout == "".join(m["content"][0]["text"] + "\n" for m in answers)


def test_history_is_trimmed_to_the_context_oldest_exchange_first():
    tiny = tiny_model(seed=3)
    processor = Processor(tiny.cfg, tiny.tokenizer)
    conversation = Conversation(system="Be brief.")
    conversation.attach(solid_image(), "a.png")
    conversation.add_user("first question " * 5)
    conversation.add_assistant("first answer " * 5)
    conversation.add_user("second question")
    whole = len(processor.encode_prompt(conversation._all(), conversation.images))
    fits = conversation.prompt(processor, 10, context=whole + 10)
    assert fits.dropped == 0 and len(fits.sample) == whole
    trimmed = conversation.prompt(processor, 10, context=whole + 9)
    assert trimmed.dropped == 1 and len(trimmed.sample) < whole
    assert [m["role"] for m in conversation.to_json()] == ["system", "user"]
    assert conversation.images == []  # the dropped exchange's image went with it


def test_ctrl_c_stops_the_answer_not_the_session(checkpoint, tmp_path):
    import signal

    saved = tmp_path / "chat.json"
    proc = subprocess.Popen([sys.executable, "-m", "nanovlm_cli", "chat", "-c", str(checkpoint), "--greedy",
                             "--max-new-tokens", "900", "--device", "cpu"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        proc.stdin.write("Tell me a very long story\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer has started streaming
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(f"/save {saved}\n/exit\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "(answer stopped)" in err
    answer = json.loads(saved.read_text())[1]["content"][0]["text"]
    assert 0 < len(answer) < 900  # the partial answer is kept in the history
