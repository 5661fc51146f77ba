"""Dataset adapters: LLaVA JSON, jsonl, parquet, save_to_disk (cauldron schema), ratings, multi-image, text-only."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from nanovlm_cli.data.schemas import RecordError, row_to_record
from nanovlm_cli.data.sources import SkipCounter, StreamRecords, open_source
from nanovlm_cli.errors import DataError


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_parts(message: dict) -> int:
    return sum(part["type"] == "image" for part in message["content"])


def texts(message: dict) -> list[str]:
    return [part["text"] for part in message["content"] if part["type"] == "text"]


def collect(source) -> list:
    """Every row of a map-style source: a Record or the RecordError it raises."""
    out = []
    for i in range(len(source)):
        try:
            out.append(source[i])
        except RecordError as exc:
            out.append(exc)
    return out


def test_llava_json_resolves_images_against_image_root(tmp_path: Path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for name in ("a/one.png", "two.png"):
        (root / name).write_bytes(png_bytes((255, 0, 0)))
    rows = [
        {"id": "x", "image": "a/one.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"image": ["a/one.png", "two.png"], "conversations": [
            {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "Same."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},  # text-only
        {"image": "two.png", "conversations": [{"from": "human", "value": "No placeholder"},
                                               {"from": "gpt", "value": "ok"}]},
        {"image": "two.png"},  # missing conversations
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    source = open_source(str(path), image_root=str(root))
    assert len(source) == 5
    one, two, text_only, unplaced, missing = collect(source)
    assert one.images == [str(root / "a/one.png")] and Path(one.images[0]).is_file()
    assert one.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What colour?"}]
    assert one.messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}
    assert one.meta == {"id": "x"}
    assert len(two.images) == 2 and [p["type"] for p in two.messages[0]["content"]] == [
        "text", "image", "text", "image", "text"]
    assert text_only.images == [] and [m["role"] for m in text_only.messages] == ["user", "assistant"]
    assert image_parts(unplaced.messages[0]) == 1 and unplaced.messages[0]["content"][0] == {"type": "image"}
    assert isinstance(missing, RecordError) and missing.reason == "missing_field"


def test_iterating_a_source_skips_and_counts_bad_rows(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text("\n".join(json.dumps(r) for r in [good, {"foo": 1}, good, {"messages": [{"role": "user"}]}]))
    skips = SkipCounter()
    source = open_source(str(path), skips=skips)
    assert [r.source_index for r in source] == [0, 2]
    assert skips.as_dict() == {"missing_field": 2}


def test_jsonl_chat_rows_with_multiple_and_inline_images(tmp_path: Path):
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]},
                      {"role": "assistant", "content": "A"}], "images": ["p1.png", "p2.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "p3.png"}, {"type": "text", "text": "Q"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                      {"role": "assistant", "content": "A"}], "images": ["p1.png"]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    two, inline, mismatch = collect(open_source(str(path)))
    assert two.images == [str(tmp_path / "p1.png"), str(tmp_path / "p2.png")]  # image_root defaults to the file's dir
    assert image_parts(two.messages[0]) == 2 and texts(two.messages[1]) == ["A"]
    assert inline.images == [str(tmp_path / "p3.png")] and image_parts(inline.messages[0]) == 1
    assert isinstance(mismatch, RecordError) and mismatch.reason == "image_count_mismatch"
    streamed = open_source(str(path), stream=True)
    assert isinstance(streamed, StreamRecords) and not hasattr(streamed, "__len__")
    assert [r.source_index for r in streamed] == [0, 1]


def cauldron_dataset():
    import datasets

    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")}),
        "relevance_ratings": datasets.List(datasets.Value("int64")),
        "formatting_ratings": datasets.List(datasets.Value("int64")),
    })
    data = {
        "images": [[{"bytes": png_bytes((1, 2, 3)), "path": None}],
                   [{"bytes": png_bytes((4, 5, 6)), "path": None}, {"bytes": png_bytes((7, 8, 9)), "path": None}],
                   [], [], []],
        "texts": [[{"user": "u0", "assistant": "a0"}, {"user": "u1", "assistant": "a1"}],
                  [{"user": "two images", "assistant": "yes"}],
                  [{"user": "text only", "assistant": "fine"}],
                  [{"user": "low", "assistant": "rated"}],
                  []],
        "relevance_ratings": [[5, 2], [4], [3], [1], []],
        "formatting_ratings": [[5, 5], [5], [5], [5], []],
    }
    return datasets.Dataset.from_dict(data, features=features)


def test_save_to_disk_cauldron_rows_stay_lazy_and_min_rating_filters_turns(tmp_path: Path):
    cauldron_dataset().save_to_disk(str(tmp_path / "ds"))
    first, two_images, text_only, low, empty = collect(open_source(str(tmp_path / "ds"), min_rating=3))
    assert [texts(m) for m in first.messages] == [["u0"], ["a0"]]  # turn 1 has relevance 2 < 3
    assert image_parts(first.messages[0]) == 1
    assert isinstance(first.images[0], dict) and first.images[0]["bytes"] == png_bytes((1, 2, 3))  # not decoded
    assert len(two_images.images) == 2 and image_parts(two_images.messages[0]) == 2
    assert text_only.images == [] and texts(text_only.messages[0]) == ["text only"]
    assert isinstance(low, RecordError) and low.reason == "low_rating"
    assert isinstance(empty, RecordError) and empty.reason == "missing_field"
    unfiltered = open_source(str(tmp_path / "ds"))
    assert len(unfiltered[0].messages) == 4 and len(unfiltered[3].messages) == 2


def test_parquet_files_and_streaming_read_the_same_rows(tmp_path: Path):
    cauldron_dataset().to_parquet(str(tmp_path / "part.parquet"))
    source = open_source(str(tmp_path / "part.parquet"))
    assert len(source) == 5 and texts(source[1].messages[0]) == ["two images"]
    streamed = list(open_source(str(tmp_path), stream=True))
    assert [r.source_index for r in streamed] == [0, 1, 2, 3]  # row 4 (no turns) skipped
    assert isinstance(streamed[0].images[0], dict) and streamed[0].images[0]["bytes"] == png_bytes((1, 2, 3))


def test_size_keeps_the_first_rows(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text("\n".join(json.dumps(good) for _ in range(10)))
    assert len(open_source(str(path), size=3)) == 3
    assert len(list(open_source(str(path), size=4, stream=True))) == 4


def test_row_schema_detection_and_unknown_rows():
    record = row_to_record({"texts": [{"user": "u", "assistant": "a"}], "images": None}, 7)
    assert record.source_index == 7 and record.images == []
    with pytest.raises(RecordError) as info:
        row_to_record({"question": "?", "answer": "!"}, 3)
    assert info.value.reason == "missing_field" and "question" in str(info.value)


def test_missing_paths_and_unknown_files_raise_data_errors(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nope" / "x.jsonl"))
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(DataError, match="csv"):
        open_source(str(tmp_path / "a.csv"))


def test_skip_counter_merges_and_round_trips():
    a, b = SkipCounter({"too_long": 2}), SkipCounter()
    b.add("missing_field")
    b.add("too_long", 3)
    a.merge(b)
    assert a.as_dict() == {"missing_field": 1, "too_long": 5} and a.total == 6 and a["absent"] == 0
    c = SkipCounter()
    c.load_state_dict(a.state_dict())
    assert c.as_dict() == a.as_dict() and c.all_reduced().as_dict() == a.as_dict()


def test_a_directory_of_jsonl_files_concatenates_with_global_indices(tmp_path: Path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    for name, n in (("a.jsonl", 2), ("b.jsonl", 3)):
        (tmp_path / name).write_text("\n".join(json.dumps(good) for _ in range(n)))
    source = open_source(str(tmp_path))
    assert len(source) == 5 and [source[i].source_index for i in range(5)] == [0, 1, 2, 3, 4]


def test_builtin_shapes_and_unreachable_hub_ids():
    shapes = open_source("shapes", size=5, split="train")
    assert len(shapes) == 5 and len(shapes[0].images) == 1
    with pytest.raises(DataError, match="could not load dataset 'someone/not-a-dataset'"):
        open_source("someone/not-a-dataset", config="a,b")


def test_skip_counter_lives_with_the_loader_and_keeps_its_old_import_path():
    from nanovlm_cli.data import loader, skips, sources

    assert sources.SkipCounter is loader.SkipCounter is skips.SkipCounter
    assert "SkipCounter" in sources.__all__ and "SkipCounter" in loader.__all__


def test_builtin_datasets_open_through_the_registry_with_their_own_options():
    from nanovlm_cli.data.sources import BUILTIN_SOURCES

    assert set(BUILTIN_SOURCES) == {"shapes"}
    mc = open_source("shapes", size=4, split="val", shapes_multiple_choice=1.0)
    free = open_source("shapes", size=4, split="val", shapes_multiple_choice=0.0)
    assert len(mc) == len(free) == 4
    def user_text(record):
        return "".join(part.get("text", "") for part in record.messages[0]["content"])

    assert all("\nA. " in user_text(r) for r in mc) and not any("\nA. " in user_text(r) for r in free)
