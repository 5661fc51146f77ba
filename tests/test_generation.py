"""The generation engine: cache vs recomputation, left-padded batches, sampling, stopping, shared prefill, errors,
and the `nanovlm generate` command on a tiny saved checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from nanovlm_cli.checkpoint.io import build_model, save_model
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.data.sample import Sample
from nanovlm_cli.errors import GenerationError
from nanovlm_cli.generation import Engine, SamplingConfig, filter_logits, generate_text, user_message
from nanovlm_cli.presets import get_preset

MAX_NEW = 10


@pytest.fixture(scope="module")
def loaded():
    """A tiny random VLM whose weights are scaled up so greedy answers vary from token to token."""
    torch.manual_seed(0)
    out = build_model(get_preset("tiny").model, load_backbones=False)
    with torch.no_grad():
        for p in out.model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    out.model.eval()
    return out


@pytest.fixture
def processor(loaded):
    return Processor(loaded.cfg, loaded.tokenizer)


def image(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def encode(processor: Processor, prompt: str, images: list) -> Sample:
    return processor.encode_prompt(user_message(prompt, len(images)), images)


def three_prompts(processor: Processor) -> list[Sample]:
    """1 image, 2 images, text only: three different lengths."""
    return [
        encode(processor, "What colour is this?", [image((200, 30, 30))]),
        encode(processor, "Compare", [image((20, 200, 30)), image((0, 0, 250), (96, 64))]),
        encode(processor, "Say something long about nothing in particular", []),
    ]


def greedy(**kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=kw.pop("max_new_tokens", MAX_NEW), greedy=True, **kw)


def test_generate_with_cache_matches_full_recomputation(loaded, processor):
    processor.stop_token_ids = []
    prompt = encode(processor, "Describe", [image((10, 120, 240))])
    cached = Engine(loaded.model, processor).generate([prompt], greedy()).token_ids[0]

    ids = prompt.input_ids.clone()
    expected = []
    with torch.no_grad():
        for _ in range(MAX_NEW):  # the whole sequence again at every step, no cache
            logits = loaded.model.logits(loaded.model(ids[None], prompt.images)[:, -1])
            token = int(logits.argmax(-1))
            expected.append(token)
            ids = torch.cat([ids, torch.tensor([token])])
    assert cached == expected
    assert len(set(expected)) > 1  # the model really varies, so the comparison means something


def test_batch_of_different_lengths_matches_each_prompt_alone(loaded, processor):
    processor.stop_token_ids = []
    prompts = three_prompts(processor)
    assert len({len(p) for p in prompts}) == 3
    engine = Engine(loaded.model, processor)
    batched = engine.generate(prompts, greedy())
    alone = [engine.generate([p], greedy()).token_ids[0] for p in prompts]
    assert batched.token_ids == alone
    assert batched.prompt_tokens == [len(p) for p in prompts]
    assert batched.finish_reasons == ["length"] * 3
    assert batched.new_tokens == [MAX_NEW] * 3


def test_fixed_seed_reproduces_sampling_and_another_seed_differs(loaded, processor):
    processor.stop_token_ids = []
    prompts = three_prompts(processor)[:2]
    engine = Engine(loaded.model, processor)
    sample = lambda seed: engine.generate(
        prompts, SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_k=50, top_p=0.95, seed=seed)).token_ids
    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first


def test_temperature_is_applied_before_top_p_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    kept = lambda t: torch.isfinite(filter_logits(logits, t, top_p=0.9)).sum().item()
    # softmax(l / T) masses: T=1 -> .64 .24 .09 .03 (3 tokens reach 0.9); T=0.25 -> .98 (1 token); T=4 -> 4 tokens.
    assert (kept(0.25), kept(1.0), kept(4.0)) == (1, 3, 4)
    filtered = filter_logits(logits, 2.0, top_k=2)
    assert torch.equal(filtered[0, :2], logits[0, :2] / 2.0)
    assert torch.isinf(filtered[0, 2:]).all()


def test_stop_token_ends_its_row_while_the_others_continue(loaded, processor):
    processor.stop_token_ids = []
    prompts = three_prompts(processor)[:2]
    engine = Engine(loaded.model, processor)
    free = engine.generate(prompts, greedy()).token_ids
    # A token row 0 emits (for the first time at step k) that row 1 never emits.
    k = next(i for i, t in enumerate(free[0]) if i > 0 and t not in free[1] and t not in free[0][:i])
    processor.stop_token_ids = [free[0][k]]
    result = engine.generate(prompts, greedy())
    assert result.token_ids[0] == free[0][:k]
    assert result.finish_reasons == ["eos", "length"]
    assert result.token_ids[1] == free[1]


def test_stop_string_cuts_the_answer_and_streaming_rebuilds_every_text(loaded, processor):
    processor.stop_token_ids = []
    prompts = three_prompts(processor)
    engine = Engine(loaded.model, processor)
    free = engine.generate(prompts, greedy())
    stop = next(text[4:6] for text in free.texts if len(text) > 6 and text[4:6].isprintable())

    streamed: dict[int, str] = {}
    result = engine.generate(prompts, greedy(stop_strings=(stop,)),
                             on_text=lambda row, piece: streamed.__setitem__(row, streamed.get(row, "") + piece))
    for row, text in enumerate(free.texts):
        if stop in text:
            assert result.texts[row] == text[: text.index(stop)]
            assert result.finish_reasons[row] == "stop_string"
        else:
            assert result.texts[row] == text
        assert streamed.get(row, "") == result.texts[row]
    assert "stop_string" in result.finish_reasons


def test_num_generations_share_one_prefill(loaded, processor):
    calls = []
    handle = loaded.model.vision.register_forward_hook(lambda *args: calls.append(1))
    try:
        prompt = encode(processor, "What is it?", [image((90, 90, 20))])
        engine = Engine(loaded.model, processor)
        result = engine.generate([prompt], SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, num_generations=4,
                                                          seed=0))
        assert len(calls) == 1
        assert len(result.texts) == len(result.token_ids) == 4
        assert len({tuple(ids) for ids in result.token_ids}) > 1  # independent samples
        same = engine.generate([prompt], greedy(num_generations=3)).token_ids
        assert same == [engine.generate([prompt], greedy()).token_ids[0]] * 3
    finally:
        handle.remove()


def test_image_placeholder_tokens_are_never_generated(loaded, processor, monkeypatch):
    model = loaded.model
    original = model.logits
    placeholders = [processor.tokenizer.convert_tokens_to_ids(t) for t in model.cfg.extra_tokens]

    def favour_placeholders(hidden):
        logits = original(hidden).clone()
        logits[..., placeholders] += 1e4
        return logits

    monkeypatch.setattr(model, "logits", favour_placeholders)
    prompt = encode(processor, "Hi", [image((1, 2, 3))])
    result = Engine(model, processor).generate([prompt], greedy(max_new_tokens=3))
    assert len(result.token_ids[0]) == 3
    assert not set(result.token_ids[0]) & set(placeholders)


def test_empty_prompt_is_an_error(loaded, processor):
    empty = Sample(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        Engine(loaded.model, processor).generate([empty], greedy())
    with pytest.raises(GenerationError, match="prompt is empty"):
        generate_text(loaded.model, processor, [image((1, 2, 3))], "  ")


def test_prompt_longer_than_the_context_is_an_error(loaded, processor):
    prompt = encode(processor, "Describe", [image((10, 10, 10))])
    limit = loaded.cfg.language.max_position_embeddings
    with pytest.raises(GenerationError, match=rf"{len(prompt)} tokens .*max_new_tokens={limit}.*{limit} positions"):
        Engine(loaded.model, processor).generate([prompt], greedy(max_new_tokens=limit))


def test_model_generate_answers_like_the_engine(loaded, processor):
    picture = image((5, 100, 5))
    expected = Engine(loaded.model, processor).generate([encode(processor, "Hi", [picture])], greedy()).texts[0]
    answer = loaded.model.generate(picture, "Hi", tokenizer=loaded.tokenizer, max_new_tokens=MAX_NEW, greedy=True)
    assert answer == expected


# --- the command ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(loaded, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(loaded.model, directory, tokenizer=loaded.tokenizer)
    picture = directory.parent / "red.png"
    image((220, 20, 20), (80, 60)).save(picture)
    return directory, picture


def test_generate_command_prints_the_answer(checkpoint, loaded, processor, capsys):
    from nanovlm_cli.cli.app import run

    directory, picture = checkpoint
    code = run(["generate", str(picture), "What is it?", "-c", str(directory), "--greedy",
                "--max-new-tokens", "6", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    sample = encode(processor, "What is it?", [Image.open(picture).convert("RGB")])
    expected = Engine(loaded.model, processor).generate([sample], greedy(max_new_tokens=6)).texts[0]
    assert captured.out.strip() == expected.strip()


def test_generate_command_compiled_gives_the_eager_answer(checkpoint, capsys):
    from nanovlm_cli.cli.app import run

    directory, picture = checkpoint
    args = ["generate", str(picture), "What is it?", "-c", str(directory), "--greedy", "--max-new-tokens", "6",
            "--device", "cpu", "--json"]
    answers = []
    for extra in ([], ["--compile"]):
        assert run([*args, *extra]) == 0
        answers.append(json.loads(capsys.readouterr().out)["answers"])
    assert answers[0] == answers[1] and answers[0][0]


def test_generate_command_json_output(checkpoint, capsys):
    from nanovlm_cli.cli.app import run

    directory, picture = checkpoint
    code = run(["generate", str(picture), "What is it?", "-c", str(directory), "--max-new-tokens", "5",
                "--num-generations", "2", "--seed", "3", "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert len(data["answers"]) == 2 and all(isinstance(a, str) for a in data["answers"])
    assert data["prompt_tokens"] > 16  # text + the image's 16 tokens
    assert len(data["new_tokens"]) == 2 and all(0 <= n <= 5 for n in data["new_tokens"])
    assert data["prefill_s"] > 0 and data["decode_tokens_per_s"] >= 0


def test_generate_command_rejects_a_corrupt_image(checkpoint, tmp_path, capsys):
    from nanovlm_cli.cli.app import run

    directory, _ = checkpoint
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    code = run(["generate", str(bad), "What is it?", "-c", str(directory), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "broken.png" in lines[0] and "error" in lines[0]
    assert captured.out == ""


def test_static_decode_gives_the_same_tokens_as_the_growing_cache(loaded, processor):
    """The fixed-shape decode (`StaticKVCache`, what `compile=True` compiles) run eagerly: same greedy tokens for
    left-padded prompts of three lengths, same seeded samples with num_generations, and the engine keeps its cache."""
    prompts = three_prompts(processor)
    dynamic = Engine(loaded.model, processor)
    static = Engine(loaded.model, processor)
    static.static_decode = True
    assert static.generate(prompts, greedy()).token_ids == dynamic.generate(prompts, greedy()).token_ids
    kept = static._static
    assert static.generate(prompts, greedy(max_new_tokens=4)).token_ids == \
        dynamic.generate(prompts, greedy(max_new_tokens=4)).token_ids
    assert static._static is kept is not None  # same rows, fewer slots: the cache (and a compiled graph) is reused
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, num_generations=2, seed=7)
    assert static.generate(prompts[:1], sampling).token_ids == dynamic.generate(prompts[:1], sampling).token_ids


def test_cuda_graph_decode_settings_trace_on_the_cpu(loaded, processor):
    """What CUDA runs (mode "reduce-overhead", cache buffers marked static), traced here: no graph break, the same
    tokens, and a second call reuses the kept cache (its static addresses) without recompiling."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    prompts = three_prompts(processor)
    eager = Engine(loaded.model, processor).generate(prompts, greedy(max_new_tokens=5))
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(copy.deepcopy(loaded.model), processor)
    engine.static_decode = True
    engine._compile_decode(cuda_graphs=True)
    assert engine.generate(prompts, greedy(max_new_tokens=5)).token_ids == eager.token_ids
    graphs = counters["stats"]["unique_graphs"]
    assert engine.generate(prompts, greedy(max_new_tokens=5)).token_ids == eager.token_ids
    assert graphs == 1 and counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    torch._dynamo.reset()


def test_compiled_engine_generates_the_same_tokens_and_compiles_the_decode_step_once(loaded, processor):
    """`Engine(compile=True)`: same greedy tokens as eager; the blocks compile once per kind (prefill) and the
    whole decode step once, not once per step, per layer or per prompt length."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    prompts = three_prompts(processor)
    eager = Engine(loaded.model, processor).generate(prompts, greedy(max_new_tokens=6))
    shorter = [encode(processor, "What colour?", [image((200, 30, 30))]), prompts[1],
               encode(processor, "Say something about nothing", [])]
    eager_shorter = Engine(loaded.model, processor).generate(shorter, greedy(max_new_tokens=6))
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(copy.deepcopy(loaded.model), processor, compile=True)
    first = engine.generate(prompts, greedy(max_new_tokens=6))
    graphs = counters["stats"]["unique_graphs"]
    again = engine.generate(shorter, greedy(max_new_tokens=6))
    assert first.token_ids == eager.token_ids and again.token_ids == eager_shorter.token_ids
    # vision block, decoder block at prefill, the decode step; the prefill of another prompt length may add its own
    # block graph, the decode step must not recompile
    assert graphs <= 4, dict(counters["stats"])
    assert counters["stats"]["unique_graphs"] - graphs <= 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_pad_id_is_the_tokenizers_pad_but_never_the_avoided_image_token():
    from types import SimpleNamespace

    from nanovlm_cli.data.tokenizer import resolve_pad_id

    assert resolve_pad_id(SimpleNamespace(pad_token_id=7)) == 7
    assert resolve_pad_id(SimpleNamespace(pad_token_id=None)) == 0
    assert resolve_pad_id(None) == 0
    assert resolve_pad_id(SimpleNamespace(pad_token_id=7), avoid=7) == 0
    assert resolve_pad_id(SimpleNamespace(pad_token_id=None), avoid=0) == 1


def test_engine_pads_with_the_tokenizers_pad_id(loaded, processor):
    from nanovlm_cli.data.tokenizer import resolve_pad_id

    engine = Engine(loaded.model, processor)
    assert engine._pad_id() == resolve_pad_id(processor.tokenizer, avoid=loaded.model.image_token_id)
    assert engine._pad_id() != loaded.model.image_token_id
