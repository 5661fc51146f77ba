"""The built-in shapes dataset: determinism, split disjointness, correct answers, MMStar format, tokenizer fit."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from nanovlm_cli.data import shapes
from nanovlm_cli.data.shapes import mmstar_prompt, render_example, shapes_mmstar_rows, shapes_records
from nanovlm_cli.data.tokenizer import load_tokenizer
from nanovlm_cli.errors import DataError
from nanovlm_cli.presets import get_preset


def _hash(img: Image.Image) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


def _user_text(record) -> str:
    return next(p["text"] for p in record.messages[0]["content"] if p["type"] == "text")


def _reply(record) -> str:
    return record.messages[1]["content"][0]["text"]


def test_records_are_lazy_indexable_and_deterministic():
    a, b = shapes_records(50, seed=3), shapes_records(50, seed=3)
    assert len(a) == 50
    for i in (0, 17, 49):
        assert _hash(a[i].images[0]) == _hash(b[i].images[0]) and a[i].messages == b[i].messages
    assert a[-1].source_index == 49 and len(a[10:13]) == 3
    assert _hash(shapes_records(5, seed=4)[0].images[0]) != _hash(a[0].images[0])
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(DataError):
        shapes_records(5, multiple_choice=1.5)


def test_train_and_eval_never_share_an_image():
    train = {_hash(r.images[0]) for r in shapes_records(1500, seed=0, split="train")}
    evals = [_hash(r.images[0]) for r in shapes_records(300, seed=0, split="eval")]
    evals += [_hash(row["image"]) for row in shapes_mmstar_rows(300, seed=0)]
    assert len(train) > 1000  # a varied dataset, not a handful of repeated images
    assert not train.intersection(evals)


def test_colour_and_position_answers_match_the_pixels():
    records = [r for r in shapes_records(300, seed=1, multiple_choice=0.0) if r.meta["category"] in
               ("colour", "position")]
    assert len(records) > 60
    for r in records:
        arr = np.asarray(r.images[0]).astype(int)  # (64, 64, 3)
        fg = np.abs(arr - arr[0, 0]).sum(-1) > 60  # shape pixels (the corner is always background)
        ys, xs = fg.nonzero()
        if r.meta["category"] == "colour":
            colour = np.median(arr[fg], axis=0)
            nearest = min(shapes.COLOURS, key=lambda c: np.abs(np.array(shapes.COLOURS[c]) - colour).sum())
            assert nearest == _reply(r)
        else:
            cx, cy = xs.mean(), ys.mean()
            expected = {"left": cx < 24, "right": cx > 40, "top": cy < 24, "bottom": cy > 40,
                        "centre": 24 <= cx <= 40 and 24 <= cy <= 40}
            assert expected[_reply(r)], (_reply(r), cx, cy)


def test_multiple_choice_records_use_the_mmstar_prompt_and_answer_with_the_letter():
    records = shapes_records(40, seed=2, multiple_choice=1.0)
    for r in records:
        text, reply = _user_text(r), _reply(r)
        assert reply in "ABCD" and len(reply) == 1
        question = text.removesuffix("\n" + shapes.MMSTAR_INSTRUCTION)
        assert text == mmstar_prompt(question)
        options = dict(line.split(". ", 1) for line in question.splitlines()[1:])
        assert list(options) == ["A", "B", "C", "D"] and options[reply] == r.meta["word"]
    assert all(len(r.messages[0]["content"]) == 2 for r in shapes_records(10, multiple_choice=0.0))
    assert all(_reply(r) not in "ABCD" for r in shapes_records(30, multiple_choice=0.0))


def test_mmstar_rows_have_the_benchmark_fields_and_cycle_categories():
    rows = shapes_mmstar_rows(10, seed=0)
    assert [r["index"] for r in rows] == list(range(10))
    assert [r["category"] for r in rows[:5]] == list(shapes.CATEGORIES)
    for row in rows:
        assert set(row) == {"index", "question", "image", "answer", "category"}
        assert row["answer"] in "ABCD" and row["image"].size == (64, 64)
        assert "\nA. " in row["question"] and "\nD. " in row["question"]
    assert [r["question"] for r in shapes_mmstar_rows(10, seed=0)] == [r["question"] for r in rows]


def test_count_answers_match_the_number_of_shapes():
    for i, r in enumerate(shapes_records(200, seed=5, multiple_choice=0.0)):
        if r.meta["category"] == "count":
            item = shapes_records(200, seed=5, multiple_choice=0.0).item(i)
            assert _reply(r) == shapes.COUNT_WORDS[len(item.scene.shapes)] and 1 <= len(item.scene.shapes) <= 3


def test_builtin_tokenizer_makes_every_answer_one_token():
    tok = load_tokenizer(get_preset("tiny").model)
    words = [*shapes.COLOURS, *shapes.SHAPES, *shapes.POSITIONS, *shapes.SIZES, *shapes.COUNT_WORDS[1:4], *"ABCD"]
    for word in words:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    prompt = mmstar_prompt("What colour is the shape?\nA. red\nB. blue\nC. green\nD. pink")
    assert len(tok(prompt, add_special_tokens=False)["input_ids"]) <= 40
    assert len(tok) == 514 and tok.decode(tok("héllo ✓", add_special_tokens=False)["input_ids"]) == "héllo ✓"


def test_render_example_writes_a_png(tmp_path):
    path = render_example(tmp_path / "demo" / "shapes.png", seed=1)
    img = Image.open(path)
    assert img.size == (64, 64) and img.format == "PNG"
