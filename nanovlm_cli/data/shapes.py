"""The built-in offline VQA dataset: procedural images of coloured shapes, with short answers and MMStar-style MCQs.

It is what the `tiny` preset trains on and what `nanovlm eval --benchmark shapes` scores, so it is designed to be
learnable by a ~1M-parameter model from scratch in minutes: 64x64 images on a plain light background, one big
centred shape for colour / shape questions (a from-scratch ViT picks colour up in ~75 steps this way, and stays at
chance far longer when the shape is small), one small or large shape in a named slot for position / size
questions, 1-3 small shapes in distinct slots for count questions, single-word answers, and a multiple-choice prompt (`mmstar_prompt`) identical in training and evaluation.

Everything is a pure function of (seed, split, index): item i is drawn from `random.Random("shapes:{split}:{seed}:{i}")`
(string seeds hash with SHA-512, stable across runs and machines). Train and eval never share an image by
construction: every shape centre of a "train" image sits on an even x coordinate, of any other split on an odd one,
so no image can appear in both (tests check it by hashing the pixels).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from PIL import Image, ImageDraw

from nanovlm_cli.data.sample import Record
from nanovlm_cli.errors import DataError
from nanovlm_cli.evaluation.prompt import MMSTAR_INSTRUCTION, mmstar_prompt  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "orange": (245, 130, 10),
    "purple": (130, 40, 180),
    "pink": (245, 105, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 7, "large": 13}  # radius in pixels at 64x64
DOMINANT_RADIUS = 22  # the one big shape of colour / shape questions
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "centre": (32, 32)}
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")
BACKGROUNDS = ((255, 255, 255), (238, 238, 238), (250, 245, 230))
CATEGORIES = ("colour", "shape", "count", "position", "size")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What is the colour of the shape?"),
    "shape": ("What shape is in the image?", "Which shape is shown?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "position": ("Where is the shape?", "Where is the shape in the image?"),
    "size": ("Is the shape small or large?", "What size is the shape?"),
}
# Options offered in multiple-choice questions; the correct answer is always among them.
CHOICES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": ("one", "two", "three", "four"),
    "position": tuple(POSITIONS),
    "size": ("small", "large", "medium", "tiny"),
}
LETTERS = "ABCD"


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    centre: tuple[int, int]
    radius: int


@dataclass(frozen=True)
class Scene:
    """One generated image and the facts questions are asked about."""

    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    position: str | None  # named slot of a single-shape scene
    size: str | None

    def render(self, size: int = IMAGE_SIZE) -> Image.Image:
        """Draw the scene at 4x and downsample (antialiased edges, still crisp at 64x64)."""
        scale = 4 * size / IMAGE_SIZE
        canvas = Image.new("RGB", (round(size * 4), round(size * 4)), self.background)
        draw = ImageDraw.Draw(canvas)
        for s in self.shapes:
            cx, cy, r = (s.centre[0] + 0.5) * scale, (s.centre[1] + 0.5) * scale, s.radius * scale
            _draw_shape(draw, s.kind, cx, cy, r, COLOURS[s.colour])
        return canvas.resize((size, size), Image.LANCZOS)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        a = r * 0.85
        draw.rectangle((cx - a, cy - a, cx + a, cy + a), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif kind == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise DataError(f"unknown shape kind {kind!r}; use one of {', '.join(SHAPES)}")


def _jitter_x(rng: random.Random, split: str) -> int:
    """An x offset in [-3, 3] whose parity marks the split (train even, others odd); see the module docstring."""
    return rng.choice((-2, 0, 2) if split == "train" else (-3, -1, 1, 3))


def _single_scene(rng: random.Random, split: str, dominant: bool = False) -> Scene:
    """One shape; `dominant` (colour / shape questions) makes it one big shape near the centre, easy to see."""
    position, size = rng.choice(tuple(POSITIONS)), rng.choice(tuple(SIZES))
    if dominant:
        position, size = "centre", "large"
    x, y = POSITIONS[position]
    radius = (DOMINANT_RADIUS if dominant else SIZES[size]) + rng.randint(-1, 1)
    shape = Shape(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), (x + _jitter_x(rng, split), y + rng.randint(-2, 2)),
                  radius)
    return Scene((shape,), rng.choice(BACKGROUNDS), position, size)


def _count_scene(rng: random.Random, split: str) -> Scene:
    n = rng.randint(1, 3)
    slots = rng.sample(tuple(POSITIONS), n)
    shapes = tuple(
        Shape(rng.choice(SHAPES), rng.choice(tuple(COLOURS)),
              (POSITIONS[p][0] + _jitter_x(rng, split), POSITIONS[p][1] + rng.randint(-1, 1)), SIZES["small"])
        for p in slots
    )
    return Scene(shapes, rng.choice(BACKGROUNDS), None, "small")


@dataclass(frozen=True)
class ShapesItem:
    """One question about one scene; `choices` and `letter` are set for multiple-choice items."""

    scene: Scene
    category: str
    question: str  # the question text (with the listed options when multiple-choice)
    answer: str  # the short answer word
    choices: tuple[str, ...] = ()
    letter: str | None = None


def _answer(scene: Scene, category: str) -> str:
    first = scene.shapes[0]
    return {
        "colour": first.colour,
        "shape": first.kind,
        "count": COUNT_WORDS[len(scene.shapes)],
        "position": scene.position or "centre",
        "size": scene.size or "small",
    }[category]


def make_item(rng: random.Random, split: str, multiple_choice: bool, category: str | None = None) -> ShapesItem:
    """Draw one item; the category is uniform over CATEGORIES unless given."""
    category = category or rng.choice(CATEGORIES)
    if category == "count":
        scene = _count_scene(rng, split)
    else:
        scene = _single_scene(rng, split, dominant=category in ("colour", "shape"))
    return make_question(rng, scene, category, multiple_choice)


def make_question(rng: random.Random, scene: Scene, category: str, multiple_choice: bool) -> ShapesItem:
    """One question of `category` about `scene` (open, or multiple-choice with the answer at a random letter)."""
    answer = _answer(scene, category)
    question = rng.choice(QUESTIONS[category])
    if not multiple_choice:
        return ShapesItem(scene, category, question, answer)
    distractors = rng.sample([c for c in CHOICES[category] if c != answer], len(LETTERS) - 1)
    correct = rng.randrange(len(LETTERS))
    choices = tuple(distractors[:correct] + [answer] + distractors[correct:])
    listed = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    return ShapesItem(scene, category, f"{question}\n{listed}", answer, choices, LETTERS[correct])


def item_rng(index: int, *, seed: int, split: str) -> random.Random:
    return random.Random(f"shapes:{split}:{seed}:{index}")


# Categories that are well defined for the scene a first question was drawn for (count scenes hold several shapes,
# so "the shape" of a colour or shape question would be ambiguous there).
FOLLOW_UPS = {"count": ("count",), "colour": ("colour", "shape"), "shape": ("colour", "shape"),
              "position": ("position", "size", "colour", "shape"), "size": ("position", "size", "colour", "shape")}


def _turn(item: ShapesItem) -> tuple[str, str]:
    mc = item.letter is not None
    return (mmstar_prompt(item.question) if mc else item.question), (item.letter if mc else item.answer)


def _record(items: list[ShapesItem], index: int, image: Image.Image) -> Record:
    """A conversation about one image: the first question carries the image, follow-ups are text only."""
    messages: list[dict[str, Any]] = []
    for k, item in enumerate(items):
        prompt, reply = _turn(item)
        content: list[dict[str, Any]] = [{"type": "image"}] if k == 0 else []
        content.append({"type": "text", "text": prompt})
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
    first = items[0]
    meta: dict[str, Any] = {"category": first.category, "answer": _turn(first)[1], "word": first.answer}
    if first.letter is not None:
        meta["choices"] = list(first.choices)
    return Record(messages=messages, images=[image], source_index=index, meta=meta)


class ShapesRecords(Sequence[Record]):
    """A lazy, indexable view of `n` shapes records: item i is generated on access, identically every time."""

    def __init__(self, n: int, *, seed: int = 0, split: str = "train", multiple_choice: float = 0.5,
                 turns: int = 1) -> None:
        if turns < 1:
            raise DataError(f"shapes turns={turns} must be >= 1 (questions per image)")
        self.turns = turns
        if n < 0:
            raise DataError(f"shapes dataset size {n} is negative; pass a size >= 0")
        if not 0.0 <= multiple_choice <= 1.0:
            raise DataError(f"multiple_choice={multiple_choice} must be a fraction in [0, 1]")
        self.n, self.seed, self.split, self.multiple_choice = n, seed, split, multiple_choice

    def __len__(self) -> int:
        return self.n

    def item(self, index: int) -> ShapesItem:
        rng = item_rng(index, seed=self.seed, split=self.split)
        mc = rng.random() < self.multiple_choice
        return make_item(rng, self.split, mc)

    def items(self, index: int) -> list[ShapesItem]:
        """The first question (exactly `item(index)`) and `turns - 1` follow-ups about the same image."""
        first = self.item(index)
        if self.turns == 1:
            return [first]
        rng = random.Random(f"shapes-turns:{self.split}:{self.seed}:{index}")
        follow = [make_question(rng, first.scene, rng.choice(FOLLOW_UPS[first.category]),
                                rng.random() < self.multiple_choice) for _ in range(self.turns - 1)]
        return [first, *follow]

    @overload
    def __getitem__(self, index: int) -> Record: ...
    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...

    def __getitem__(self, index: int | slice) -> Record | list[Record]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"shapes index {index} out of range for {self.n} records")
        items = self.items(index)
        return _record(items, index, items[0].scene.render())


def shapes_records(n: int, *, seed: int = 0, split: str = "train", multiple_choice: float = 0.5,
                   turns: int = 1) -> Sequence[Record]:
    """`n` shapes records (lazy, indexable, `len()`); a fraction `multiple_choice` of the questions are
    MMStar-format MCQs; `turns` questions per image (follow-ups are further turns of the same conversation, which
    multiplies the supervised answers per image at little extra compute)."""
    return ShapesRecords(n, seed=seed, split=split, multiple_choice=multiple_choice, turns=turns)


def shapes_mmstar_rows(n: int, *, seed: int = 0, split: str = "eval") -> list[dict[str, Any]]:
    """`n` multiple-choice rows in MMStar format: {"index", "question", "image" (PIL), "answer" (letter), "category"}.

    Categories cycle (colour, shape, count, position, size) so every category is scored on n >= 5.
    """
    rows = []
    for i in range(n):
        rng = item_rng(i, seed=seed, split=f"{split}-mmstar")
        item = make_item(rng, split, True, CATEGORIES[i % len(CATEGORIES)])
        rows.append({"index": i, "question": item.question, "image": item.scene.render(), "answer": item.letter,
                     "category": item.category})
    return rows


def render_example(path: str | Path, *, seed: int = 0, size: int = IMAGE_SIZE) -> Path:
    """Write a demo PNG of one large shape (for the README's `nanovlm generate ... shapes.png`); returns the path."""
    rng = item_rng(0, seed=seed, split="example")
    scene = _single_scene(rng, "example")
    scene = Scene(scene.shapes[:1], scene.background, scene.position, scene.size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene.render(size).save(path)
    logger.info("wrote a %s %s %s example to %s", scene.size, scene.shapes[0].colour, scene.shapes[0].kind, path)
    return path
