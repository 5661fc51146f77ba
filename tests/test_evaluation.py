"""Evaluation: option parsing, letter extraction, scoring, benchmark files, ledgers, comparison and `nanovlm eval`."""

from __future__ import annotations

import json

import pytest
import torch

from nanovlm_cli.checkpoint.io import build_model, save_model
from nanovlm_cli.cli.app import run
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.data.shapes import CATEGORIES, shapes_mmstar_rows
from nanovlm_cli.errors import ConfigError, DataError
from nanovlm_cli.evaluation import (
    compare_results,
    evaluate,
    evaluate_checkpoint,
    evaluate_ranked,
    evaluate_shapes,
    evaluate_shapes_ranked,
    extract_choice,
    parse_options,
    question_stem,
    read_results,
    summarise,
    write_results,
)
from nanovlm_cli.evaluation.datasets import load_benchmark
from nanovlm_cli.presets import get_preset
from tests.helpers import solid_image

COLOURS_Q = "What colour is the shape?\nA. red\nB. blue\nC. dark red\nD. pink"
MMSTAR_Q = ("Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase is on "
            "the book., B: The suitcase is beneath the cat., C: The suitcase is beneath the bed., D: The suitcase is "
            "beneath the book.")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(get_preset("tiny").model, load_backbones=False)


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    return save_model(tiny.model, tmp_path_factory.mktemp("eval") / "ckpt", tokenizer=tiny.tokenizer)


def test_parse_options_reads_one_per_line_and_mmstar_inline_formats():
    assert parse_options(COLOURS_Q) == {"A": "red", "B": "blue", "C": "dark red", "D": "pink"}
    assert parse_options(MMSTAR_Q) == {"A": "The suitcase is on the book.", "B": "The suitcase is beneath the cat.",
                                       "C": "The suitcase is beneath the bed.", "D": "The suitcase is beneath the book."}
    assert parse_options("Pick one:\n(A) cat\n(B) dog\n(C) cow") == {"A": "cat", "B": "dog", "C": "cow"}
    assert parse_options("What is shown? A. is not an option list") == {}


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("[C]", "C"), ("**D**", "D"), (" c \n", "C"),
    ("B. blue", "B"), ("(B) blue", "B"), ("b) blue", "B"), ("D: pink", "D"),
    ("Answer: B", "B"), ("answer:b", "B"), ("The answer is (c).", "C"), ("the answer is b", "B"),
    ("The correct option is D", "D"), ("I choose option A.", "A"), ("The correct answer is D: pink", "D"),
    ("I think (D) is right", "D"),
    ("blue", "B"), ("It is dark red.", "C"), ("Pink", "D"), ("red", "A"),
    ("", None), ("B and C", None), ("the answer is a circle", None), ("I am not sure", None),
])
def test_extract_choice_reads_the_letter_from_many_reply_styles(reply, letter):
    assert extract_choice(reply, parse_options(COLOURS_Q)) == letter


def test_extract_choice_without_options_knows_only_letters():
    assert extract_choice("The answer is C") == "C"
    assert extract_choice("blue") is None
    assert extract_choice("A dog runs") is None  # the article, not option A


def test_extract_choice_matches_long_mmstar_option_text():
    assert extract_choice("The suitcase is beneath the bed.", parse_options(MMSTAR_Q)) == "C"


def test_summarise_computes_overall_and_per_category_accuracy():
    records = [{"index": i, "correct": c, "category": cat, "extracted": "A" if c else None}
               for i, (c, cat) in enumerate([(True, "x"), (False, "x"), (True, "y"), (True, "y")])]
    result = summarise("demo", records)
    assert result.n == 4 and result.accuracy == 0.75
    assert result.by_category == {"x": 0.5, "y": 1.0} and result.n_by_category == {"x": 2, "y": 2}
    assert result.unanswered == 1
    assert "records" not in result.to_dict()


def test_evaluate_scores_every_row_restores_training_mode_and_reports_progress(tiny):
    processor = Processor(tiny.cfg, tiny.tokenizer)
    rows = shapes_mmstar_rows(7, seed=1)
    seen = []
    tiny.model.train()
    result = evaluate(tiny.model, processor, rows, batch_size=3, on_progress=lambda done, total: seen.append((done, total)))
    assert tiny.model.training
    assert seen == [(3, 7), (6, 7), (7, 7)]
    assert result.n == 7 and [r["index"] for r in result.records] == list(range(7))
    for record, row in zip(result.records, rows):
        assert record["answer"] == row["answer"] and record["category"] == row["category"]
        assert record["correct"] == (record["extracted"] == row["answer"])
    assert result.accuracy == sum(r["correct"] for r in result.records) / 7


def test_evaluate_shapes_covers_every_category_and_batches_like_one_by_one(tiny):
    processor = Processor(tiny.cfg, tiny.tokenizer)
    batched = evaluate_shapes(tiny.model, processor, n=10, batch_size=10)
    single = evaluate_shapes(tiny.model, processor, n=10, batch_size=1)
    assert set(batched.by_category) == set(CATEGORIES)
    assert [r["prediction"] for r in batched.records] == [r["prediction"] for r in single.records]
    assert set(batched.to_dict()) >= {"benchmark", "n", "accuracy", "by_category"}


def _write_jsonl_benchmark(directory, n=4):
    rows = shapes_mmstar_rows(n, seed=3)
    (directory / "images").mkdir(parents=True)
    lines = []
    for row in rows:
        name = f"images/{row['index']}.png"
        row["image"].save(directory / name)
        lines.append(json.dumps({"index": 100 + row["index"], "question": row["question"], "image": name,
                                 "answer": row["answer"], "category": row["category"]}))
    (directory / "bench.jsonl").write_text("\n".join(lines) + "\n")
    return rows


def test_local_benchmarks_load_from_jsonl_parquet_and_save_to_disk(tmp_path):
    import datasets

    rows = _write_jsonl_benchmark(tmp_path / "jsonl")
    from_jsonl = load_benchmark(str(tmp_path / "jsonl"), limit=3)
    assert len(from_jsonl.rows) == 3
    assert from_jsonl.rows[1]["image"] == str(tmp_path / "jsonl" / "images" / "1.png")  # made absolute
    table = datasets.Dataset.from_list([dict(r) for r in rows]).cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "bench.parquet"))
    table.save_to_disk(str(tmp_path / "disk"))
    for source in (tmp_path / "bench.parquet", tmp_path / "disk"):
        loaded = load_benchmark(str(source))
        assert [r["question"] for r in loaded.rows] == [r["question"] for r in rows]
        assert loaded.rows[0]["image"].size == rows[0]["image"].size


def test_load_benchmark_names_missing_columns_and_unknown_names(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q?", "answer": "A"}) + "\n")
    with pytest.raises(DataError, match="no column.*image"):
        load_benchmark(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="unknown benchmark 'nope'"):
        load_benchmark("nope")


def test_mmstar_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load benchmark Lin-Chen/MMStar") as info:
        load_benchmark("mmstar", limit=2)
    assert "\n" not in str(info.value)


def test_evaluate_checkpoint_writes_results_and_ledger_for_a_local_benchmark(checkpoint, tmp_path):
    _write_jsonl_benchmark(tmp_path / "data")
    result = evaluate_checkpoint(str(checkpoint), benchmark=str(tmp_path / "data" / "bench.jsonl"), batch_size=2,
                                 output_dir=str(tmp_path / "out"), device="cpu")
    results, ledger = read_results(tmp_path / "out" / "results.json")
    assert results["n"] == result.n == 4 and results["accuracy"] == result.accuracy
    assert [r["index"] for r in ledger] == [100, 101, 102, 103]
    assert set(ledger[0]) == {"index", "question", "prediction", "extracted", "answer", "correct", "category"}


def test_compare_results_reports_accuracy_change_and_flipped_indices(tmp_path):
    def records(correct):
        return [{"index": i, "correct": c, "category": "x", "extracted": "A"} for i, c in enumerate(correct)]

    write_results(summarise("demo", records([True, False, False, True])), tmp_path / "before")
    now = compare_results(summarise("demo", records([True, True, False, False])), tmp_path / "before" / "results.json")
    assert now.comparison.fixed == [1] and now.comparison.broken == [3]
    assert now.comparison.delta == 0.0 and now.comparison.n_common == 4
    (tmp_path / "before" / "ledger.jsonl").unlink()
    with pytest.raises(DataError, match="no per-sample ledger"):
        compare_results(now, tmp_path / "before" / "results.json")


def test_lmms_backend_without_lmms_eval_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # an import of it raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'nanovlm-cli\[lmms-eval\]'"):
        evaluate_checkpoint("unused", backend="lmms-eval", tasks=["mmstar"])


def test_eval_command_prints_json_and_compares_with_an_earlier_run(checkpoint, tmp_path, capsys):
    args = ["eval", str(checkpoint), "--benchmark", "shapes", "--limit", "6", "--device", "cpu"]
    assert run([*args, "--output", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert run([*args, "--json", "--compare", str(tmp_path / "a" / "results.json")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["benchmark"] == "shapes" and data["n"] == 6 and isinstance(data["accuracy"], float)
    assert set(data["by_category"]) == set(CATEGORIES)
    assert data["comparison"]["delta"] == 0.0 and data["comparison"]["fixed"] == []  # same model, same answers


def test_eval_command_renders_a_table(checkpoint, capsys):
    assert run(["eval", str(checkpoint), "--benchmark", "shapes", "--limit", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "colour" in out


def test_open_shapes_eval_scores_exact_short_answers(monkeypatch):
    from nanovlm_cli import generation
    from nanovlm_cli.data.shapes import shapes_records
    from nanovlm_cli.evaluation import evaluate_shapes_open
    from tests.helpers import tiny_model

    loaded = tiny_model()
    from nanovlm_cli.data.processor import Processor

    processor = Processor(loaded.cfg, loaded.tokenizer)
    truth = [r.meta["answer"] for r in shapes_records(12, split="eval", multiple_choice=0.0)]
    calls = iter(range(100))

    def fake_generate(self, prompts, sampling, on_text=None):
        start = 4 * next(calls)  # batches of 4
        texts = [f" {truth[start + i].upper()}." if (start + i) % 2 == 0 else "no idea" for i in range(len(prompts))]
        return generation.GenerationResult(texts, [[] for _ in texts], [1] * len(texts), [0] * len(texts),
                                           0.0, 0.0, 0.0, ["eos"] * len(texts))

    monkeypatch.setattr(generation.Engine, "generate", fake_generate)
    result = evaluate_shapes_open(loaded.model, processor, n=12, batch_size=4)
    assert result.benchmark == "shapes-open" and result.n == 12
    assert result.accuracy == 0.5  # case and punctuation do not matter; wrong answers are wrong
    assert [r["correct"] for r in result.records] == [i % 2 == 0 for i in range(12)]


# ------------------------------------------------------------------------------------------------------------------
# Rank scoring: each option's text scored as the reply, the most likely one chosen


def test_question_stem_drops_the_option_list_and_its_label():
    assert question_stem(COLOURS_Q) == "What colour is the shape?"
    assert question_stem(MMSTAR_Q) == ("Which option describe the object relationship in the image correctly?")
    assert question_stem("Which animal?\nChoices:\n(A) cat\n(B) dog") == "Which animal?"
    assert question_stem("Is A. the first letter?\nA. yes\nB. no") == "Is A. the first letter?"
    assert question_stem("What is shown?") == "What is shown?"


def _ranked_rows():
    """Shapes rows plus an MMStar-style inline row with long, multi-token options."""
    rows = shapes_mmstar_rows(6, seed=2)
    rows.append({"index": 6, "question": MMSTAR_Q, "image": solid_image(), "answer": "C", "category": "relation"})
    return rows


def _reference_scores(model, processor, row):
    """{letter: summed log-prob} one option at a time: a full-logits forward over prompt + reply + end of turn."""
    eot = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = processor.encode_prompt(question_stem(row["question"]), [row["image"]])
    scores = {}
    for letter, text in parse_options(row["question"]).items():
        reply = processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [eot]
        ids = torch.cat([prompt.input_ids, torch.tensor(reply)])
        with torch.no_grad():
            logp = model.logits(model(ids[None], prompt.images))[0].log_softmax(-1)  # (T, V)
        start = len(prompt.input_ids)
        scores[letter] = sum(logp[start - 1 + j, token].item() for j, token in enumerate(reply))
    return scores


def test_ranked_scores_match_full_forward_one_option_at_a_time(tiny):
    processor = Processor(tiny.cfg, tiny.tokenizer)
    rows = _ranked_rows()
    result = evaluate_ranked(tiny.model, processor, rows, batch_size=3)
    assert result.scoring == "rank" and result.to_dict()["scoring"] == "rank"
    for record, row in zip(result.records, rows):
        reference = _reference_scores(tiny.model, processor, row)
        assert set(record["scores"]) == set(reference)
        for letter, score in reference.items():
            assert record["scores"][letter] == pytest.approx(score, abs=1e-4)
        best = max(reference, key=reference.__getitem__)
        assert record["extracted"] == best and record["prediction"] == parse_options(row["question"])[best]
        assert record["correct"] == (best == row["answer"])


def test_ranked_choices_do_not_depend_on_batch_size_and_training_mode_is_restored(tiny):
    processor = Processor(tiny.cfg, tiny.tokenizer)
    rows = _ranked_rows()
    seen = []
    tiny.model.train()
    one = evaluate_ranked(tiny.model, processor, rows, batch_size=1)
    seven = evaluate_ranked(tiny.model, processor, rows, batch_size=7, on_progress=lambda *a: seen.append(a))
    assert tiny.model.training and seen == [(7, 7)]
    assert [r["extracted"] for r in one.records] == [r["extracted"] for r in seven.records]
    for a, b in zip(one.records, seven.records):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    assert one.by_category.keys() == set(CATEGORIES) | {"relation"}


def test_ranked_evaluation_picks_the_option_the_model_makes_most_likely(monkeypatch):
    from tests.helpers import tiny_model

    loaded = tiny_model(seed=3)
    processor = Processor(loaded.cfg, loaded.tokenizer)
    blue = loaded.tokenizer("blue", add_special_tokens=False)["input_ids"][0]
    logits = loaded.model.logits

    def favour_blue(hidden):
        out = logits(hidden)
        out[..., blue] += 30.0
        return out

    monkeypatch.setattr(loaded.model, "logits", favour_blue)
    options = ["red", "blue", "dark red", "pink"]
    rows = []
    for k in range(4):  # "blue" at every letter in turn
        shown = options[k:] + options[:k]
        listed = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", shown))
        rows.append({"question": f"What colour is the shape?\n{listed}", "image": solid_image(),
                     "answer": "ABCD"[shown.index("blue")], "category": "colour"})
    result = evaluate_ranked(loaded.model, processor, rows, batch_size=3)
    assert [r["prediction"] for r in result.records] == ["blue"] * 4
    assert result.accuracy == 1.0 and result.by_category == {"colour": 1.0}


def test_ranked_evaluation_names_a_row_without_options(tiny):
    processor = Processor(tiny.cfg, tiny.tokenizer)
    rows = [{"question": "What colour is the shape?", "image": solid_image(), "answer": "A"}]
    with pytest.raises(DataError, match="benchmark row 0 lists no options.*--scoring generate"):
        evaluate_ranked(tiny.model, processor, rows)


def test_evaluate_shapes_ranked_asks_the_generate_questions(tiny):
    processor = Processor(tiny.cfg, tiny.tokenizer)
    ranked = evaluate_shapes_ranked(tiny.model, processor, n=5, batch_size=5)
    asked = evaluate_shapes(tiny.model, processor, n=5, batch_size=5)
    assert ranked.benchmark == "shapes-rank" and set(ranked.by_category) == set(CATEGORIES)
    assert [r["question"] for r in ranked.records] == [r["question"] for r in asked.records]
    assert [r["answer"] for r in ranked.records] == [r["answer"] for r in asked.records]


def test_eval_command_rank_scoring_writes_results_saying_rank(checkpoint, tmp_path):
    args = ["eval", str(checkpoint), "--benchmark", "shapes", "--limit", "5", "--device", "cpu"]
    assert run([*args, "--scoring", "rank", "--output", str(tmp_path / "rank")]) == 0
    results, ledger = read_results(tmp_path / "rank")
    assert results["scoring"] == "rank" and results["n"] == 5 and set(results["by_category"]) == set(CATEGORIES)
    assert all(set(r["scores"]) == {"A", "B", "C", "D"} for r in ledger)
    assert all(r["prediction"] == parse_options(r["question"])[r["extracted"]] for r in ledger)
    assert run([*args, "--output", str(tmp_path / "generate")]) == 0
    assert read_results(tmp_path / "generate")[0]["scoring"] == "generate"


@pytest.mark.parametrize("extra, message", [
    (["--backend", "lmms-eval", "--tasks", "mmstar"], "--scoring rank works with the native backend only"),
    (["--benchmark", "shapes-open"], "shapes-open has none"),
])
def test_eval_command_rank_scoring_refuses_what_it_cannot_score(checkpoint, capsys, extra, message):
    capsys.readouterr()
    assert run(["eval", str(checkpoint), "--scoring", "rank", "--device", "cpu", *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_eval_command_refuses_compile_with_lmms_eval(checkpoint, capsys):
    capsys.readouterr()
    assert run(["eval", str(checkpoint), "--backend", "lmms-eval", "--tasks", "mmstar", "--compile"]) == 1
    err = capsys.readouterr().err
    assert "--compile works with the native backend only" in err and len(err.strip().splitlines()) == 1


def test_every_public_evaluation_name_resolves_even_when_the_shapes_data_is_imported_first():
    """`data/shapes.py` imports `evaluation.prompt`; the package must not re-enter it half-initialised."""
    import subprocess
    import sys

    from nanovlm_cli import evaluation

    code = ("import nanovlm_cli.data.shapes as s; import nanovlm_cli.evaluation as e; "
            "assert s.mmstar_prompt is e.mmstar_prompt; "
            "print(sorted(n for n in e.__all__ if getattr(e, n, None) is None))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert {"evaluate_checkpoint", "load_benchmark", "run_lmms_eval", "mmstar_prompt"} <= set(evaluation.__all__)
    with pytest.raises(AttributeError, match="no attribute 'evaluate_everything'"):
        evaluation.evaluate_everything  # noqa: B018


def test_eval_mode_restores_the_training_mode_after_an_error():
    from nanovlm_cli.models.vlm import eval_mode

    model = torch.nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not torch.is_grad_enabled()
        raise RuntimeError("mid-evaluation")
    assert model.training and torch.is_grad_enabled()
    with eval_mode(model.eval()):
        pass
    assert not model.training  # a model found in eval mode stays there
