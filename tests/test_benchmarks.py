"""The benchmark suite runs end to end in --quick mode and writes the documented JSON (no timing assertions);
the attention speed-up it measures (query chunks over the keys their mask reaches) computes exactly full attention."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanovlm_cli.config import LanguageConfig
from nanovlm_cli.models.attention import dense_masks, query_spans
from nanovlm_cli.models.language import LanguageModel

ROOT = Path(__file__).resolve().parent.parent


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_range(r: dict) -> None:
    assert set(r) == {"median", "min", "max"}
    assert all(_positive(v) for v in r.values())
    assert r["min"] <= r["median"] <= r["max"]


@pytest.mark.slow
def test_quick_suite_writes_every_case_with_the_documented_schema(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train/tiny" in proc.stdout and "target" in proc.stdout  # the table goes to stdout
    result = json.loads(out.read_text())
    assert result["schema_version"] == 1 and result["suite"] == "cpu" and result["quick"] is True
    assert {"torch", "transformers", "device", "threads"} <= set(result["environment"])
    kinds = [c["kind"] for c in result["cases"]]
    assert kinds == ["train", "pipeline", "generate", "generate"]
    train, pipeline, *generate = result["cases"]

    assert train["params"] > 100_000 and train["memory_kind"] == "peak_rss"
    for side in (train["ours"], train["reference"]):
        _check_range(side["step_s"])
        assert _positive(side["tokens_per_s"]) and _positive(side["samples_per_s"]) and _positive(side["peak_memory_mb"])
    _check_range(train["speedup"])
    assert train["parity"]["abs_diff"] < 1e-4  # same weights, same batch: the reference computes the same loss

    assert _positive(pipeline["compute_samples_per_s"]) and _positive(pipeline["pipeline_samples_per_s"])
    gaps = pipeline["gap_range"]  # a gap can be negative (the pipeline round ran faster)
    assert set(gaps) == {"median", "min", "max"} and gaps["min"] <= gaps["median"] <= gaps["max"] < 1
    assert pipeline["gap"] == pipeline["gap_range"]["median"] and pipeline["workload"]["rounds"] >= 1

    assert [g["workload"]["batch"] for g in generate] == [1, 2]
    for g in generate:
        assert g["workload"]["views"] == 5  # 2x2 tiles + the global view
        for side in (g["ours"], g["reference"]):
            assert _positive(side["prefill_tokens_per_s"]) and _positive(side["decode_tokens_per_s"])
        _check_range(g["prefill_speedup"])
        _check_range(g["decode_speedup"])
        assert g["same_tokens_rows"] == g["rows"]  # greedy on the same weights: the same answer tokens

    metrics = {(t["case"], t["metric"]) for t in result["targets"]}
    assert ("train/tiny", "train_speedup") in metrics and ("pipeline/tiny", "pipeline_gap") in metrics
    assert all(isinstance(t["met"], bool) for t in result["targets"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_gpu_suite_without_cuda_says_so():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--suite", "gpu", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr


def test_query_spans_cover_exactly_the_reachable_keys():
    # Two samples of 3 and 5 tokens (the docstring example).
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 2]])
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # (1, 1, 8, 8)
    assert query_spans(mask, chunk=4) == [(0, 4, 0, 4), (4, 8, 3, 8)]
    assert query_spans(mask, chunk=2) == [(0, 2, 0, 2), (2, 4, 0, 4), (4, 6, 3, 6), (6, 8, 3, 8)]
    assert query_spans(mask, chunk=8) is None  # fewer than two chunks: one call
    assert query_spans(torch.ones(1, 1, 8, 8, dtype=torch.bool), chunk=2) is None  # nothing to skip: one call


@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_attention_on_packed_rows_matches_one_full_call(monkeypatch, checkpointing):
    """Values and gradients (inputs and weights) of the per-chunk path equal one dense masked call."""
    from nanovlm_cli.models import attention

    torch.manual_seed(0)
    cfg = LanguageConfig(vocab_size=64, hidden_dim=32, intermediate_dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_position_embeddings=512)
    model = LanguageModel(cfg).train()
    model.gradient_checkpointing = checkpointing
    lengths = [[90, 150, 40, 120], [200, 60, 110, 30]]  # two rows of 400 packed tokens, 10 in padding
    seg = torch.zeros(2, 410, dtype=torch.long)
    pos = torch.zeros(2, 410, dtype=torch.long)
    for row, lens in enumerate(lengths):
        seg[row, :400] = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(lens)])
        pos[row, :400] = torch.cat([torch.arange(n) for n in lens])
    embeds = torch.randn(2, 410, 32)

    def run() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        x = embeds.clone().requires_grad_(True)
        out = model(x, pos, segment_ids=seg)
        out.square().sum().backward()
        return out.detach(), x.grad, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full_mask, _ = dense_masks(410, 0, seg, embeds.device, cfg.sliding_window, model.has_sliding)
    assert query_spans(full_mask) is not None  # the chunked path is the one under test
    chunked, chunked_grad, chunked_weights = run()
    monkeypatch.setattr(attention, "ATTENTION_CHUNK", 10_000)  # one SDPA call over every key
    full, full_grad, full_weights = run()
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_grad, full_grad, atol=1e-5, rtol=1e-5)
    assert len(chunked_weights) == len(full_weights) == len(list(model.parameters())) - 1  # all but the unused head
    for a, b in zip(chunked_weights, full_weights):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mfu_counts_only_the_attention_a_packed_row_needs():
    """benchmarks/mfu.py: rows of equal samples restart positions, and attention FLOPs follow the segments."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.mfu import packed_batch, unpacked, useful_attention_flops
    from nanovlm_cli.presets import get_preset

    cfg = get_preset("tiny").model
    batch = packed_batch(cfg, batch_size=2, seq_len=256, samples_per_row=2)
    assert batch.input_ids.shape == (2, 256) and batch.n_samples == 4
    assert batch.segment_ids[0].tolist() == [1] * 128 + [2] * 128
    assert batch.position_ids[0, 126:130].tolist() == [126, 127, 0, 1]
    lang, vis = cfg.language, cfg.vision
    n_views = len(batch.images)
    patches = (cfg.image.tile_size // vis.patch_size) ** 2
    vision = 3 * 4 * vis.hidden_dim * patches**2 * vis.n_layers * n_views
    per_row = 2 * (128 * 129 // 2)  # two causal samples of 128
    packed = useful_attention_flops(cfg, batch, n_views)
    assert packed == vision + 3 * 4 * lang.n_heads * lang.head_dim * 2 * per_row * lang.n_layers
    whole = useful_attention_flops(cfg, unpacked(batch), n_views)  # one causal sample of 256 per row
    assert whole - vision == (packed - vision) * (256 * 257 // 2) / per_row
