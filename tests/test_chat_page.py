"""The chat page at GET /, driven in a real headless Chromium over the DevTools protocol: attach an image, ask, watch
the answer stream in, compare it with the API's answer, and save a screenshot (chat_page.png in the test's
temporary directory, and in $NANOVLM_TEST_ARTIFACTS when that is set)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
websocket = pytest.importorskip("websocket")

from helpers import solid_image, tiny_model
from test_serve import post, start_server, stop_server

from nanovlm_cli.checkpoint.io import save_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PROMPT = "Question 0: what colour?"


class Page:
    """The smallest DevTools client: one websocket to one page target, calls answered by id."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                assert "error" not in message, (method, message["error"])
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        message = "no chromium on this machine (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":  # in CI a missing browser is a failure, never a pass
            pytest.fail(message)
        pytest.skip(message)
    profile = tmp_path / "profile"
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1000,760",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.time() + 60
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"chromium exited {proc.returncode}")
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            port = int(found.group(1)) if found else None
        assert port, "chromium did not report its DevTools port"
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10).read())
        page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        yield page
        page.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_chat_page_streams_an_answer_about_an_attached_image(browser, tmp_path):
    tiny = tiny_model(seed=3)
    checkpoint = save_model(tiny.model, tmp_path / "ckpt", tokenizer=tiny.tokenizer)
    image = tmp_path / "green.png"
    solid_image((0, 255, 0)).save(image)
    proc, base = start_server(checkpoint)
    try:
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                image.read_bytes()).decode()}}, {"type": "text", "text": PROMPT}]}]
        code, reply = post(base, {"messages": messages, "temperature": 0, "max_tokens": 48})
        assert code == 200, reply
        expected = reply["choices"][0]["message"]["content"]
        assert expected.strip(), "pick a prompt whose answer is visible"

        page = browser
        page.call("Page.enable")
        page.call("Page.navigate", url=base + "/")
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
        assert page.js("[...document.querySelectorAll('script[src], link[href], img[src]')].length") == 0  # no assets
        root = page.call("DOM.getDocument")["root"]["nodeId"]
        node = page.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        page.call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
        page.wait_for("document.getElementById('attached').textContent.includes('1 image(s) attached')")
        # count the answer's updates, to see it stream rather than arrive whole
        page.js("""window.updates = 0; new MutationObserver(() => window.updates++).observe(
                   document.getElementById('log'), {subtree: true, childList: true, characterData: true}); true""")
        page.js(f"""document.getElementById('temperature').value = '0';
                    document.getElementById('max_tokens').value = '48';
                    document.getElementById('input').value = {json.dumps(PROMPT)};
                    document.getElementById('send').click(); true""")
        page.wait_for("!!document.querySelector('.assistant[data-done]')")
        answer = page.js("document.querySelector('.assistant span').textContent")
        assert answer == expected
        assert page.js("window.updates") > 3
        assert page.js("document.querySelector('.user img').src.startsWith('data:image/png;base64,')")
        shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        assert shot.startswith(b"\x89PNG")
        (tmp_path / "chat_page.png").write_bytes(shot)
        if os.environ.get("NANOVLM_TEST_ARTIFACTS"):
            target = Path(os.environ["NANOVLM_TEST_ARTIFACTS"])
            target.mkdir(parents=True, exist_ok=True)
            (target / "chat_page.png").write_bytes(shot)
    finally:
        assert stop_server(proc) == 0
