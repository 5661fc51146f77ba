"""Decoder LM: parity with transformers (Llama, Gemma-3), KV cache, packing, padding, loader errors, checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from nanovlm_cli.checkpoint.hf_language import (
    convert_language_state_dict,
    language_config_from_hf,
    load_language_backbone,
)
from nanovlm_cli.config import LanguageConfig
from nanovlm_cli.errors import CheckpointError, GenerationError
from nanovlm_cli.models.kv_cache import KVCache, StaticKVCache
from nanovlm_cli.models.language import LanguageModel

VOCAB = 128
SEQ = 24  # longer than the Gemma sliding window (8)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _randomise_norms(model: torch.nn.Module) -> None:
    """HF inits norms to 1 (Llama) or 0 (Gemma), which would hide a missing (1 + w) or a swapped norm."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _llama_hf(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.1)  # large logits: strict test
    model = LlamaForCausalLM(cfg).eval()
    _randomise_norms(model)
    return model


def _gemma_hf() -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=8, max_position_embeddings=64,
        initializer_range=0.1, layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_theta=100_000.0,
        rope_local_base_freq=1_000.0, pad_token_id=0,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    _randomise_norms(model)
    return model


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).expand(ids.shape[0], -1)


def _logits(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(model.embed(ids), _positions(ids)))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _llama_hf().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma")
    _gemma_hf().save_pretrained(path)
    return path


@pytest.mark.parametrize("tie", [True, False])
def test_llama_logits_match_transformers(tmp_path, tie):
    hf = _llama_hf(tie)
    hf.save_pretrained(tmp_path)
    ours = load_language_backbone(str(tmp_path))
    assert ours.cfg.tie_embeddings is tie and (ours.lm_head is None) is tie
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    assert (_logits(ours, ids) - ref).abs().max().item() <= 1e-4


def test_tied_model_has_no_duplicate_head_tensor(llama_dir):
    model = load_language_backbone(str(llama_dir))
    assert "lm_head.weight" not in model.state_dict()
    assert model.output_weight is model.embed_tokens.weight


def test_gemma3_logits_match_transformers(gemma_dir):
    hf = Gemma3ForCausalLM.from_pretrained(gemma_dir).eval()
    ours = load_language_backbone(str(gemma_dir))
    assert ours.cfg.norm_unit_offset and ours.cfg.qk_norm and ours.cfg.post_norms and ours.cfg.embed_scale
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    assert (_logits(ours, ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("change", [
    {"norm_unit_offset": False},  # plain w * x RMSNorm
    {"act": "silu"},
    {"embed_scale": False},
    {"layer_types": None},  # no sliding window
    {"rope_local_theta": None},  # global RoPE base on local layers
    {"query_pre_attn_scalar": None},  # 1/sqrt(head_dim)
])
def test_gemma3_parity_fails_without_each_gemma_feature(gemma_dir, change):
    hf = Gemma3ForCausalLM.from_pretrained(gemma_dir).eval()
    good = load_language_backbone(str(gemma_dir))
    wrong = LanguageModel(good.cfg.replace(**change))
    wrong.load_state_dict(good.state_dict())
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    assert (_logits(wrong, ids) - ref).abs().max().item() > 1e-2


def test_gemma3_checkpoint_does_not_load_into_a_llama_block(gemma_dir):
    hf_config = json.loads((gemma_dir / "config.json").read_text())
    gemma = language_config_from_hf(hf_config)
    llama_like = gemma.replace(norm_unit_offset=False, qk_norm=False, post_norms=False, embed_scale=False,
                               act="silu", layer_types=None, rope_local_theta=None)
    with pytest.raises(CheckpointError, match="q_norm|pre_feedforward_layernorm|post_feedforward_layernorm"):
        convert_language_state_dict(load_file(gemma_dir / "model.safetensors"), llama_like)


def test_config_reads_transformers_4_and_5_spellings(gemma_dir):
    v5 = json.loads((gemma_dir / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    v4.update(rope_theta=100_000.0, rope_local_base_freq=1_000.0, sliding_window_pattern=2, num_hidden_layers=3,
              rope_scaling={"rope_type": "linear", "factor": 4.0})
    a, b = language_config_from_hf(v5), language_config_from_hf({"model_type": "gemma3", "text_config": v4})
    assert (a.rope_theta, a.rope_local_theta, a.rope_scaling_factor) == (100_000.0, 1_000.0, 1.0)
    assert (b.rope_theta, b.rope_local_theta, b.rope_scaling_factor) == (100_000.0, 1_000.0, 4.0)
    assert a.layer_types == b.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert a.head_dim == 24 and a.query_pre_attn_scalar == 20 and a.sliding_window == 8
    llama = language_config_from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                                     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "rope_theta": 7.0, "tie_word_embeddings": True})
    assert llama.rope_theta == 7.0 and llama.n_kv_heads == 2 and llama.head_dim_override is None


def test_unknown_key_raises_naming_it(llama_dir):
    state = load_file(llama_dir / "model.safetensors")
    state["model.layers.0.self_attn.rotary.weight"] = torch.zeros(1)
    cfg = language_config_from_hf(json.loads((llama_dir / "config.json").read_text()))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.rotary\.weight"):
        convert_language_state_dict(state, cfg)


def test_missing_key_raises_naming_it(llama_dir, tmp_path):
    state = load_file(llama_dir / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_language_backbone(str(tmp_path))


def test_extra_vocab_rows_are_the_mean_and_keep_base_logits(llama_dir):
    base = load_language_backbone(str(llama_dir))
    extended = load_language_backbone(str(llama_dir), extra_vocab_size=3)
    weight = extended.embed_tokens.weight
    assert weight.shape == (VOCAB + 3, 64) and extended.cfg.total_vocab_size == VOCAB + 3
    torch.testing.assert_close(weight[VOCAB:], weight[:VOCAB].mean(0, keepdim=True).expand(3, -1))
    ids = _ids()
    torch.testing.assert_close(_logits(extended, ids)[..., :VOCAB], _logits(base, ids), atol=0, rtol=0)


def test_multimodal_gemma3_text_weights_load_with_vision_keys_skipped(gemma_dir):
    state = load_file(gemma_dir / "model.safetensors")
    mm = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
    mm["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2)
    cfg = language_config_from_hf(json.loads((gemma_dir / "config.json").read_text()))
    out = convert_language_state_dict(mm, cfg)
    assert set(out) == set(LanguageModel(cfg).state_dict())


# --- Cache, packing, padding on from-scratch models (random norms so every path is exercised) ---

def _scratch(family: str) -> LanguageModel:
    common = {"vocab_size": VOCAB, "hidden_dim": 64, "intermediate_dim": 96, "n_heads": 4, "n_kv_heads": 2,
                  "max_position_embeddings": 64}
    if family == "llama":
        cfg = LanguageConfig(n_layers=2, rope_theta=5000.0, **common)
    else:
        cfg = LanguageConfig(
            n_layers=3, head_dim_override=24, rope_theta=100_000.0, rope_local_theta=1_000.0, rms_norm_eps=1e-6,
            norm_unit_offset=True, qk_norm=True, post_norms=True, embed_scale=True, act="gelu_tanh",
            sliding_window=8, query_pre_attn_scalar=20,
            layer_types=("sliding_attention", "full_attention", "sliding_attention"), **common,
        )
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    _randomise_norms(model)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_decode_through_cache_matches_full_forward(family):
    model = _scratch(family)
    ids = _ids()
    x, pos = model.embed(ids), _positions(ids)
    with torch.no_grad():
        full = model(x, pos)
        cache = KVCache.for_model(model.cfg, 2, SEQ, device="cpu", dtype=torch.float32)
        steps = [model(x[:, :6], pos[:, :6], kv_cache=cache), model(x[:, 6:11], pos[:, 6:11], kv_cache=cache)]
        steps += [model(x[:, t:t + 1], pos[:, t:t + 1], kv_cache=cache) for t in range(11, SEQ)]
    assert cache.pos == SEQ
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_packed_samples_equal_each_sample_alone(family):
    model = _scratch(family)
    a, b = _ids(1, 7, seed=1), _ids(1, 11, seed=2)
    packed = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], dim=1)  # two pad slots at the end
    segments = torch.tensor([[1] * 7 + [2] * 11 + [0] * 2])
    positions = torch.tensor([list(range(7)) + list(range(11)) + [0, 0]])
    with torch.no_grad():
        out = model(model.embed(packed), positions, segment_ids=segments)
        alone_a = model(model.embed(a), _positions(a))
        alone_b = model(model.embed(b), _positions(b))
    assert torch.isfinite(out).all()
    assert (out[:, :7] - alone_a).abs().max().item() <= 1e-5
    assert (out[:, 7:18] - alone_b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_left_padded_row_with_cache_equals_unpadded_sequence(family):
    model = _scratch(family)
    n_pad, prompt, total = 3, 10, 14
    seq = _ids(1, total, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, n_pad, dtype=torch.long), seq], dim=1),
                       _ids(1, total + n_pad, seed=4)])
    segments = torch.ones(2, total + n_pad, dtype=torch.long)
    segments[0, :n_pad] = 0
    positions = torch.stack([torch.cat([torch.zeros(n_pad, dtype=torch.long), torch.arange(total)]),
                             torch.arange(total + n_pad)])
    x = model.embed(batch)
    with torch.no_grad():
        ref = model(model.embed(seq), _positions(seq))
        cache = KVCache.for_model(model.cfg, 2, total + n_pad, device="cpu", dtype=torch.float32)
        end = n_pad + prompt
        outs = [model(x[:, :end], positions[:, :end], segment_ids=segments[:, :end], kv_cache=cache)]
        for t in range(end, total + n_pad):
            outs.append(model(x[:, t:t + 1], positions[:, t:t + 1], segment_ids=segments[:, :t + 1], kv_cache=cache))
    out = torch.cat(outs, dim=1)
    assert torch.isfinite(out).all()
    assert (out[0, n_pad:] - ref[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_static_decode_step_equals_the_growing_cache(family):
    """`decode_step` over a `StaticKVCache` (all slots, masked) computes what `forward` with a `KVCache` computes:
    a left-padded row, a full one, and more decode steps than Gemma's sliding window (8)."""
    model = _scratch(family)
    n_pad, prompt, steps = 3, 6, 12
    ids = _ids(2, n_pad + prompt + steps, seed=5)
    segments = torch.ones_like(ids)
    segments[0, :n_pad] = 0
    positions = torch.stack([(torch.arange(ids.shape[1]) - n_pad).clamp(min=0), torch.arange(ids.shape[1])])
    x = model.embed(ids)
    end = n_pad + prompt
    with torch.no_grad():
        growing = KVCache.for_model(model.cfg, 2, ids.shape[1], device="cpu", dtype=torch.float32)
        model(x[:, :end], positions[:, :end], segment_ids=segments[:, :end], kv_cache=growing)
        prefilled = KVCache.for_model(model.cfg, 2, end, device="cpu", dtype=torch.float32)
        model(x[:, :end], positions[:, :end], segment_ids=segments[:, :end], kv_cache=prefilled)
        static = StaticKVCache.for_model(model.cfg, 2, 32, device="cpu", dtype=torch.float32)
        static.k.fill_(1e4)  # stale slots from an earlier call must not leak in: the mask keeps them out
        static.load(prefilled, segments[:, :end])
        for t in range(end, ids.shape[1]):
            want = model(x[:, t:t + 1], positions[:, t:t + 1], segment_ids=segments[:, :t + 1], kv_cache=growing)
            got = model.decode_step(x[:, t:t + 1], positions[:, t:t + 1], static)
            assert (got - want).abs().max().item() <= 1e-5, t
    assert int(static.slot) == ids.shape[1] and bool(static.filled[1, :ids.shape[1]].all())
    assert not static.filled[0, :n_pad].any() and not static.filled[:, ids.shape[1]:].any()


def test_static_cache_refuses_a_cache_it_cannot_hold():
    model = _scratch("llama")
    cache = KVCache.for_model(model.cfg, 2, 8, device="cpu", dtype=torch.float32)
    cache.advance(8)
    with pytest.raises(GenerationError, match="2 rows x 8 slots"):
        StaticKVCache.for_model(model.cfg, 2, 4, device="cpu", dtype=torch.float32).load(cache, None)


def test_cache_overflow_raises_and_repeat_batch_repeats_rows():
    model = _scratch("llama")
    ids = _ids(1, 6)
    cache = KVCache.for_model(model.cfg, 1, 6, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model(model.embed(ids), _positions(ids), kv_cache=cache)
        wide = cache.repeat_batch(3)
        assert wide.k.shape[1] == 3 and wide.pos == 6 and torch.equal(wide.k[:, 2], cache.k[:, 0])
        with pytest.raises(GenerationError, match="max_len=6"):
            model(model.embed(ids[:, :1]), _positions(ids[:, :1]), kv_cache=cache)
    assert cache.pos == 6


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    model = _scratch(family).train()
    ids = _ids()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        hidden = model(model.embed(ids), _positions(ids))
        torch.nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    block_forward = model.blocks[0].forward

    def counted_forward(*args):
        calls.append(1)
        return block_forward(*args)

    model.blocks[0].forward = counted_forward
    plain = grads()
    assert len(calls) == 1
    model.gradient_checkpointing = True
    checkpointed = grads()
    assert len(calls) == 3  # forward, then recomputed during backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def _packed_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows over 40 slots: samples of 9, 17 and 10 tokens + 4 pad slots; one sample of 25 + one of 15."""
    lengths = ([9, 17, 10, 4], [25, 15])
    segments = torch.tensor([[i + 1 if i < 3 else 0 for i, n in enumerate(lengths[0]) for _ in range(n)],
                             [i + 1 for i, n in enumerate(lengths[1]) for _ in range(n)]])
    positions = torch.stack([torch.cat([torch.arange(n) if i < 3 or r else torch.zeros(n, dtype=torch.long)
                                        for i, n in enumerate(row)]) for r, row in enumerate(lengths)])
    return _ids(2, 40, seed=3), positions, segments


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_flex_attention_block_masks_equal_the_dense_masks(family):
    model = _scratch(family)  # gemma: sliding window 8 < sample lengths, so the sliding block mask matters
    ids, positions, segments = _packed_rows()
    with torch.no_grad():
        dense = model(model.embed(ids), positions, segment_ids=segments)
        model.attention = "flex"
        flex = model(model.embed(ids), positions, segment_ids=segments)
    assert torch.isfinite(flex).all()
    assert (flex - dense).abs().max().item() <= 1e-5
    # a wrong window would show: the check above is sensitive to the sliding mask
    if family == "gemma":
        model.cfg = model.cfg.replace(sliding_window=4)
        with torch.no_grad():
            narrower = model(model.embed(ids), positions, segment_ids=segments)
        assert (narrower - dense).abs().max().item() > 1e-3


def test_flex_attention_under_bf16_autocast_matches_sdpa():
    """RoPE leaves q and k in fp32 under autocast; the flex path must cast them like SDPA's autocast does."""
    model = _scratch("llama")
    ids, positions, segments = _packed_rows()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model(model.embed(ids), positions, segment_ids=segments).float()
        model.attention = "flex"
        flex = model(model.embed(ids), positions, segment_ids=segments).float()
    assert (flex - dense).abs().max().item() <= 0.05 * dense.abs().max().item()


def test_flex_attention_is_not_used_with_a_cache():
    model = _scratch("llama")
    model.attention = "flex"
    ids = _ids()
    x, pos = model.embed(ids), _positions(ids)
    with torch.no_grad():
        full = model(x, pos)
        cache = KVCache.for_model(model.cfg, 2, SEQ, device="cpu", dtype=torch.float32)
        seg = torch.ones(2, SEQ, dtype=torch.long)  # segment ids with a cache: the dense path must serve them
        first = model(x[:, :6], pos[:, :6], segment_ids=seg[:, :6], kv_cache=cache)
        rest = model(x[:, 6:], pos[:, 6:], segment_ids=seg, kv_cache=cache)
    assert (torch.cat([first, rest], dim=1) - full).abs().max().item() <= 1e-5
