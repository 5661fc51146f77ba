"""`nanovlm serve`: the real `openai` client against a server started on a free local port with a tiny checkpoint."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from helpers import solid_image, tiny_model

from nanovlm_cli.checkpoint.io import save_model
from nanovlm_cli.cli import app as app_module

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanovlm_cli", "serve", "-c", str(checkpoint), "--port", str(port),
                             "--device", "cpu", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not come up in 60 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tiny = tiny_model(seed=3)
    return save_model(tiny.model, tmp_path_factory.mktemp("serve") / "ckpt", tokenizer=tiny.tokenizer)


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, base = start_server(checkpoint, "--max-images", "2", "--max-image-pixels", "250000",
                              "--max-image-bytes", "300000", "--max-tokens", "256", "--max-body-bytes", "2000000")
    yield base
    assert stop_server(proc) == 0, proc.stderr.read().decode()


@pytest.fixture(scope="module")
def client(server, checkpoint):
    c = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    c.model_id = str(checkpoint)  # type: ignore[attr-defined]
    return c


def image_file(tmp_path: Path, i: int) -> Path:
    path = tmp_path / f"img{i}.png"
    solid_image((i * 16, 255 - i * 16, (i * 40) % 256)).save(path)
    return path


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(prompt: str, *images: Path, image_last: bool = False) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
    text = [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": text + parts if image_last else parts + text}]


def generate_greedy(checkpoint: Path, image: Path, prompt: str, capsys) -> tuple[str, int]:
    capsys.readouterr()
    code = app_module.run(["generate", str(image), prompt, "-c", str(checkpoint), "--greedy", "--device", "cpu",
                           "--max-new-tokens", str(MAX_TOKENS), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    return result["answers"][0], result["prompt_tokens"]


def post(base: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    if len(data) > 1_000_000:  # the server answers 413 from the headers and may close before reading the body
        import http.client

        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders()
        try:
            conn.send(data)
        except OSError:
            pass
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    req = urllib.request.Request(base + "/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_greedy_answer_and_stream_equal_generate_greedy(client, checkpoint, tmp_path, capsys):
    image = image_file(tmp_path, 0)
    expected, prompt_tokens = generate_greedy(checkpoint, image, "What colour is it?", capsys)
    reply = client.chat.completions.create(model=client.model_id, messages=user("What colour is it?", image),
                                           temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == MAX_TOKENS if reply.choices[0].finish_reason == "length" else True
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # the image after the text is moved in front of it, where the model (and `generate`) puts it
    stream = client.chat.completions.create(model=client.model_id, stream=True, temperature=0,
                                            messages=user("What colour is it?", image, image_last=True),
                                            max_completion_tokens=MAX_TOKENS, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [reply.choices[0].finish_reason]
    assert chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == \
        reply.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})


def test_stream_ends_with_done(server, checkpoint, tmp_path):
    body = {"model": str(checkpoint), "messages": user("Hi", image_file(tmp_path, 1)), "max_tokens": 4,
            "stream": True}
    req = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_n2_with_a_seed_is_reproducible(client, tmp_path):
    image = image_file(tmp_path, 2)
    ask = lambda seed: client.chat.completions.create(model=client.model_id, messages=user("Describe.", image), n=2,
                                                      seed=seed, temperature=1.0, max_tokens=16)
    first, again, other = ask(7), ask(7), ask(8)
    texts = lambda r: [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(first.choices) == 2 and texts(first) == texts(again)
    assert texts(first) != texts(other)  # the seed matters (a fixed answer would pass the line above)
    assert 0 < first.usage.completion_tokens <= 2 * 16  # both choices counted


def test_16_concurrent_clients_each_get_their_solo_answer(client, tmp_path):
    images = [image_file(tmp_path, i) for i in range(16)]
    ask = lambda i: client.chat.completions.create(
        model=client.model_id, messages=user(f"Question {i}: what colour?", images[i]), temperature=0,
        max_tokens=MAX_TOKENS).choices[0].message.content
    solo = [ask(i) for i in range(16)]
    assert len(set(solo)) > 1, "the prompts must give different answers for this test to mean anything"
    barrier = threading.Barrier(16)

    def together(i: int) -> str:
        barrier.wait()
        return ask(i)

    batches = lambda: json.loads(urllib.request.urlopen(client.base_url.scheme + "://" + client.base_url.host + ":"
                                                        + str(client.base_url.port) + "/health").read())["batches"]
    before = batches()
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(together, range(16)))
    assert concurrent == solo
    assert batches() - before < 16  # they shared engine calls (requests joined the next batch)


BAD = [
    # (name, body, status, words in the message, param)
    ("malformed JSON", b'{"messages": [', 400, "not valid JSON", None),
    ("no messages", {"model": None}, 400, "'messages' is required", "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "non-empty list", "messages"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, 400, "content must be", "messages[0].content"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role is 'wizard'", "messages[0].role"),
    ("max_tokens 0", {"max_tokens": 0}, 400, "'max_tokens'=0", "max_tokens"),
    ("max_tokens huge", {"max_tokens": 10 ** 9}, 400, "'max_tokens'", "max_tokens"),
    ("max_tokens a string", {"max_tokens": "5"}, 400, "must be an integer", "max_tokens"),
    ("temperature -1", {"temperature": -1}, 400, "'temperature'=-1", "temperature"),
    ("unknown model", {"model": "gpt-4o"}, 404, "'gpt-4o' is not served", "model"),
]


def _image_part(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": "what?"}]}]}


def test_bad_requests_get_their_status_and_message_and_the_server_goes_on(server, client, checkpoint, tmp_path):
    good = {"model": str(checkpoint), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    png = image_file(tmp_path, 3)
    big = tmp_path / "big.png"
    solid_image(size=(600, 600)).save(big)
    noise = tmp_path / "noise.bmp"  # uncompressed: more bytes than --max-image-bytes
    solid_image(size=(320, 320)).save(noise)
    cases = list(BAD) + [
        ("broken base64", _image_part("data:image/png;base64,@@@not-base64@@@"), 400, "broken base64",
         "messages[0].content[0].image_url.url"),
        ("bytes that are not an image", _image_part("data:image/png;base64," + base64.b64encode(b"hello").decode()),
         400, "cannot be decoded", "messages[0].content[0].image_url.url"),
        ("too many pixels", _image_part(data_url(big)), 413, "--max-image-pixels",
         "messages[0].content[0].image_url.url"),
        ("too many bytes", _image_part("data:image/bmp;base64," + base64.b64encode(noise.read_bytes()).decode()),
         413, "--max-image-bytes", "messages[0].content[0].image_url.url"),
        ("too many images", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png)}}] * 3}]}, 400, "too many images",
         "messages[0].content[2]"),
        ("remote URL without the flag", _image_part("https://example.com/cat.png"), 400, "--allow-remote-images",
         "messages[0].content[0].image_url.url"),
        ("a local path", _image_part(str(png)), 400, "local paths", "messages[0].content[0].image_url.url"),
        ("file URL", _image_part(f"file://{png}"), 400, "local paths", "messages[0].content[0].image_url.url"),
        ("body too large", b"{" + b" " * 2_100_000 + b"}", 413, "--max-body-bytes", None),
    ]
    for name, changes, status, words, param in cases:
        body = changes if isinstance(changes, bytes) else {**good, **changes}
        if not isinstance(changes, bytes) and "model" in changes and changes["model"] is None:
            body = {"model": str(checkpoint)}
        code, reply = post(server, body)
        assert code == status, (name, code, reply)
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert words in error["message"], (name, error["message"])
        assert error["param"] == param, (name, error)
    with urllib.request.urlopen(server + "/health", timeout=5) as r:
        assert json.loads(r.read())["status"] == "ok"
    assert post(server, good)[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def wait_health(base: str, condition, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            health = json.loads(r.read())
        if condition(health):
            return health
        time.sleep(0.01)
    raise AssertionError(f"/health never satisfied the condition: {health}")


@pytest.mark.slow
def test_api_key_queue_limit_and_sigterm_drains(checkpoint, tmp_path):
    proc, base = start_server(checkpoint, "--api-key", "sekret", "--queue-size", "1", "--max-batch", "1")
    key = {"Authorization": "Bearer sekret"}
    try:
        body = {"model": str(checkpoint), "messages": user("Hi", image_file(tmp_path, 4)), "max_tokens": 900,
                "temperature": 0}
        code, reply = post(base, body)
        assert code == 401 and reply["error"]["code"] == "invalid_api_key"
        short = {**body, "max_tokens": 2}
        with ThreadPoolExecutor(2) as pool:  # requests in flight when SIGTERM arrives still get their answers
            decoding = pool.submit(post, base, body, key)
            wait_health(base, lambda h: h["batches"] >= 1)  # the long answer is decoding
            queued = pool.submit(post, base, short, key)  # waits in the queue (size 1) behind it
            wait_health(base, lambda h: h["queued"] == 1)
            code, reply = post(base, short, key)
            assert code == 503 and reply["error"]["code"] == "queue_full", reply
            proc.send_signal(signal.SIGTERM)
            (code, reply), (queued_code, _) = decoding.result(timeout=120), queued.result(timeout=120)
        assert code == 200 and queued_code == 200, reply
        assert reply["usage"]["completion_tokens"] >= 1
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_strings_cut_the_answer(client, tmp_path):
    ask = lambda **kw: client.chat.completions.create(
        model=client.model_id, messages=user("Question 0: what colour?", image_file(tmp_path, 0)), temperature=0,
        max_tokens=MAX_TOKENS, **kw).choices[0]
    whole = ask().message.content
    stop = whole.strip()[2:5]
    assert len(stop) == 3 and stop in whole, whole
    cut = ask(stop=[stop, "never appears"])
    assert cut.message.content == whole[:whole.index(stop)] and cut.finish_reason == "stop"


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    code = app_module.run(["serve", "-c", "/nonexistent"])
    err = capsys.readouterr().err
    assert code == 1
    assert "pip install 'nanovlm-cli[serve]'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_remote_images_with_the_flag_are_fetched_with_a_size_cap(checkpoint, tmp_path):
    import functools
    import http.server

    image = image_file(tmp_path, 5)
    big = tmp_path / "big.bmp"
    solid_image(size=(200, 200)).save(big)  # 120 kB uncompressed, over the cap below
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    proc, base = start_server(checkpoint, "--allow-remote-images", "--max-image-bytes", "50000")
    try:
        remote = f"http://127.0.0.1:{files.server_address[1]}"
        ask = lambda url: post(base, {**_image_part(url), "temperature": 0, "max_tokens": 8})
        code, fetched = ask(f"{remote}/{image.name}")
        assert code == 200, fetched
        assert fetched["choices"][0]["message"]["content"] == ask(data_url(image))[1]["choices"][0]["message"]["content"]
        code, reply = ask(f"{remote}/{big.name}")
        assert code == 413 and "--max-image-bytes" in reply["error"]["message"]
        code, reply = ask(f"{remote}/missing.png")
        assert code == 400 and "could not fetch" in reply["error"]["message"]
    finally:
        files.shutdown()
        assert stop_server(proc) == 0


def test_a_taken_port_is_one_line_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = app_module.run(["serve", "-c", "/nonexistent/checkpoint", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


def test_batcher_groups_only_jobs_that_compute_the_same_thing():
    from types import SimpleNamespace

    from nanovlm_cli.generation import SamplingConfig
    from nanovlm_cli.serving.batcher import Batcher, Job

    gate = threading.Event()
    calls: list[list[str]] = []

    class Engine:  # records which prompts went into each call; the first call waits until all jobs are queued
        def generate(self, prompts, sampling, on_text=None):
            gate.wait(10)
            calls.append(list(prompts))
            rows = [p for p in prompts for _ in range(sampling.num_generations)]
            return SimpleNamespace(texts=rows, new_tokens=[1] * len(rows), finish_reasons=["length"] * len(rows))

    batcher = Batcher(Engine(), queue_size=8, max_batch=16)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0)
    jobs = [batcher.submit(Job("first", greedy))]
    time.sleep(0.2)  # "first" is being decoded; the rest queue behind it
    jobs += [batcher.submit(Job(name, sampling)) for name, sampling in [
        ("g8", greedy), ("seeded-a", SamplingConfig(max_new_tokens=8, temperature=1, seed=1)),
        ("g8-again", greedy), ("g4", SamplingConfig(max_new_tokens=4, temperature=0)),
        ("seeded-b", SamplingConfig(max_new_tokens=8, temperature=1, seed=1))]]
    gate.set()
    assert all(job.wait(10).done.is_set() for job in jobs)
    batcher.close(timeout=10)
    assert calls == [["first"], ["g8", "g8-again"], ["seeded-a"], ["g4"], ["seeded-b"]]
    assert [job.texts for job in jobs[:2]] == [["first"], ["g8"]]
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit(Job("late", greedy))
