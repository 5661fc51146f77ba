"""Serving benchmark: aggregate tokens/s and p50/p95 request latency at 1, 4 and 16 concurrent clients.

Starts the real `nanovlm serve` on a free local port with a checkpoint (default: the `tiny` preset, random weights,
saved to a temporary directory) and sends greedy chat completions (an image + a question, a fixed `max_tokens`)
from N client threads at once, each client sending its next request as soon as its answer arrives. Aggregate
tokens/s is all completion tokens (from `usage`) over the wall time of the level; latency is per request, from
send to the whole answer. The levels run interleaved for `--repeats` rounds and the median round is reported.
Goal (issue 16): 16 clients give at least 4x the aggregate tokens/s of 1 client, which only dynamic batching can
give on a CPU whose cores one client already uses.

The server runs with OMP_NUM_THREADS=1 by default (`--threads`): on a 2-core CPU shared with other work, torch's
two-thread kernels spin against each other and make single numbers swing 10x; one thread keeps them comparable.

Run: `python benchmarks/serve.py [--checkpoint DIR] [--clients 1 4 16] [--max-tokens 32] [--device cpu]`;
writes `benchmarks/results/serve_<device>.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_checkpoint(directory: Path) -> Path:
    import torch

    from nanovlm_cli.checkpoint.io import build_model, save_model
    from nanovlm_cli.presets import get_preset

    torch.manual_seed(3)
    tiny = build_model(get_preset("tiny").model, load_backbones=False)
    return save_model(tiny.model, directory / "tiny", tokenizer=tiny.tokenizer)


def image_url(i: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (i * 16 % 256, 255 - i * 16 % 256, i * 40 % 256)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start(checkpoint: Path, device: str, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanovlm_cli", "serve", "-c", str(checkpoint), "--port", str(port),
                             "--device", device, "--max-batch", str(max_batch)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return proc, base
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start in 120 s")


def body(model: str, i: int, max_tokens: int) -> bytes:
    return json.dumps({"model": model, "temperature": 0, "max_tokens": max_tokens, "messages": [{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(i)}},
                                    {"type": "text", "text": f"Question {i}: what?"}]}]}).encode()


def level(base: str, model: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """`clients` threads, each on its own keep-alive connection, sending prepared bodies back to back."""
    host, port = base.removeprefix("http://").split(":")
    bodies = [[body(model, c * requests_per_client + k, max_tokens) for k in range(requests_per_client)]
              for c in range(clients)]  # built before the clock starts: the client's cost is not the server's
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        barrier.wait()
        for data in bodies[c]:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
            response = conn.getresponse()
            reply = json.loads(response.read())
            seconds = time.perf_counter() - t0
            assert response.status == 200, reply
            with lock:
                latencies.append(seconds)
                tokens[0] += int(reply["usage"]["completion_tokens"])
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"clients": clients, "requests": len(latencies), "completion_tokens": tokens[0], "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens[0] / wall, 1), "p50_latency_s": round(statistics.median(ordered), 3),
            "p95_latency_s": round(p95, 3)}


def http_stack() -> str:
    """What uvicorn runs on here: httptools and uvloop when installed, else h11 and asyncio."""
    import importlib.util

    have = lambda name: importlib.util.find_spec(name) is not None
    return f"uvicorn + {'httptools' if have('httptools') else 'h11'} + {'uvloop' if have('uvloop') else 'asyncio'}"


def median_run(runs: list[dict]) -> dict:
    """The round with the median tokens/s, with every round's tokens/s beside it."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "tokens_per_s_rounds": [r["tokens_per_s"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint directory (default: a tiny random one)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (split between the clients)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median round is reported")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's OMP_NUM_THREADS (0: torch's default); 1 keeps a shared CPU's numbers stable")
    parser.add_argument("--output", help="JSON file (default: benchmarks/results/serve_<device>.json)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(Path(tmp))
        proc, base = start(checkpoint, args.device, args.max_batch, args.threads)
        try:
            model = json.loads(urllib.request.urlopen(base + "/v1/models").read())["data"][0]["id"]
            level(base, model, 1, 2, args.max_tokens)  # warm-up
            runs: dict[int, list[dict]] = {c: [] for c in args.clients}
            for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every level alike
                for c in args.clients:
                    runs[c].append(level(base, model, c, max(1, args.requests // c), args.max_tokens))
            rows = [median_run(runs[c]) for c in args.clients]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    base_rate = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_first"] = round(row["tokens_per_s"] / base_rate, 2) if base_rate else None
    record = {"benchmark": "serve", "checkpoint": args.checkpoint or "tiny preset (random weights)",
              "device": args.device, "server_threads": args.threads or None, "max_tokens": args.max_tokens, "max_batch": args.max_batch, "greedy": True,
              "python": platform.python_version(), "cpu_count": os.cpu_count(),
              "load_average_1m_after": round(os.getloadavg()[0], 2), "http_stack": http_stack(), "levels": rows}
    output = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"serve_{args.device}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print("| clients | requests | tokens/s (aggregate) | speed-up | p50 latency | p95 latency |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['clients']} | {row['requests']} | {row['tokens_per_s']:.1f} | {row['speedup_vs_first']:.2f}x | "
              f"{row['p50_latency_s']:.2f} s | {row['p95_latency_s']:.2f} s |")
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
