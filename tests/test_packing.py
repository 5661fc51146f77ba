"""Packing: first-fit-decreasing rows, block-causal collation, image order, skips and efficiency."""

import torch

from nanovlm_cli.data.packing import balance_rows, block_causal_mask, collate, pack, packing_efficiency
from nanovlm_cli.data.sample import Sample
from nanovlm_cli.data.sources import SkipCounter


def make_sample(index: int, length: int, n_views: int = 0) -> Sample:
    ids = torch.arange(length) + 1000 * index  # every token names its sample
    labels = ids.clone()
    labels[: length // 2] = -100  # a prompt half, unsupervised
    views = [torch.full((3, 4, 4), float(index * 10 + v)) for v in range(n_views)]
    return Sample(ids, labels, views, source_index=index)


def test_first_fit_decreasing_matches_the_docstring_example():
    samples = [make_sample(i, n) for i, n in enumerate([5, 3, 4, 2])]
    assert pack(samples, max_seq_len=8, max_images_per_row=4) == [[0, 1], [2, 3]]


def test_every_sample_is_recoverable_from_a_packed_batch():
    samples = [make_sample(i, n, n_views=i % 3) for i, n in enumerate([7, 3, 5, 2, 6, 4, 1])]
    rows = pack(samples, max_seq_len=10, max_images_per_row=8)
    batch = collate([[samples[i] for i in row] for row in rows])
    assert sorted(i for row in rows for i in row) == list(range(len(samples)))
    assert batch.n_samples == len(samples)
    expected_images = []
    for b, row in enumerate(rows):
        offset = 0
        for k, i in enumerate(row):
            s = samples[i]
            span = slice(offset, offset + len(s))
            assert torch.equal(batch.input_ids[b, span], s.input_ids)
            assert torch.equal(batch.labels[b, span][1:], s.labels[1:])
            assert batch.labels[b, offset] == -100  # first token of a segment never supervised
            assert torch.equal(batch.position_ids[b, span], torch.arange(len(s)))
            assert torch.all(batch.segment_ids[b, span] == k + 1)
            offset += len(s)
            expected_images.extend(s.images)
        assert torch.all(batch.segment_ids[b, offset:] == 0)
        assert torch.all(batch.labels[b, offset:] == -100)
    assert len(batch.images) == len(expected_images)
    assert all(torch.equal(a, e) for a, e in zip(batch.images, expected_images))


def test_image_cap_is_respected_per_row():
    samples = [make_sample(i, 2, n_views=2) for i in range(5)]
    rows = pack(samples, max_seq_len=100, max_images_per_row=3)
    assert len(rows) == 5  # two samples of 2 views would exceed 3 views
    rows = pack(samples, max_seq_len=100, max_images_per_row=4)
    assert [len(r) for r in rows] == [2, 2, 1]
    assert all(sum(len(samples[i].images) for i in row) <= 4 for row in rows)


def test_too_long_and_too_many_images_are_skipped_and_counted():
    skips = SkipCounter()
    samples = [make_sample(0, 11), make_sample(1, 4, n_views=5), make_sample(2, 10)]
    rows = pack(samples, max_seq_len=10, max_images_per_row=4, skips=skips)
    assert rows == [[2]]
    assert skips.as_dict() == {"too_long": 1, "too_many_images": 1}


def test_min_rows_splits_rows_so_each_batch_gets_one():
    samples = [make_sample(i, 2) for i in range(4)]
    assert len(pack(samples, max_seq_len=100, max_images_per_row=0)) == 1
    rows = pack(samples, max_seq_len=100, max_images_per_row=0, min_rows=3)
    assert len(rows) == 3 and sorted(i for r in rows for i in r) == [0, 1, 2, 3]


def test_max_samples_per_row_one_turns_packing_off():
    samples = [make_sample(i, n) for i, n in enumerate([5, 3, 4, 2])]
    assert pack(samples, max_seq_len=8, max_images_per_row=4, max_samples_per_row=1) == [[0], [2], [1], [3]]


def test_balance_rows_matches_the_docstring_example():
    assert balance_rows([8, 7, 6, 2], 2) == [[0, 3], [1, 2]]


def test_block_causal_mask_of_the_six_token_example():
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0]])
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(block_causal_mask(segment_ids)[0], expected)


def test_packing_efficiency_is_real_tokens_over_slots():
    batch = collate([[make_sample(0, 5), make_sample(1, 3)], [make_sample(2, 4)]])
    assert batch.input_ids.shape == (2, 8)
    assert packing_efficiency([batch]) == 12 / 16
    padded = collate([[make_sample(0, 5)]], pad_to=10)
    assert packing_efficiency([batch, padded]) == (12 + 5) / (16 + 10)
    assert packing_efficiency([]) == 0.0
