"""Knapsack packing of Samples into fixed-capacity rows, and collation of rows into a block-causal `Batch`.

Main design choice: packing works on indices and lengths only (first-fit-decreasing over a window of samples, with
a token budget and an image-view budget per row), so the loader can record *which* samples form a row and rebuild
it exactly on resume; `collate` is the only place that touches tensors.

Packed rows are attended block-causally: a token sees only earlier tokens of its own sample, and positions restart
at 0 for each sample (torchtune style). Two samples `a` (3 tokens) and `b` (2 tokens) in a row of 6:

    tokens        a0 a1 a2 b0 b1 pad
    segment_ids    1  1  1  2  2  0
    position_ids   0  1  2  0  1  0
    labels (a0, b0 forced to -100: nothing earlier in their segment predicts them)

    mask (query row i may attend key column j)  = segment[i] == segment[j] and j <= i
          a0 a1 a2 b0 b1 pad
    a0  [  1  0  0  0  0  0 ]
    a1  [  1  1  0  0  0  0 ]
    a2  [  1  1  1  0  0  0 ]
    b0  [  0  0  0  1  0  0 ]
    b1  [  0  0  0  1  1  0 ]
    pad [  0  0  0  0  0  1 ]   padding attends to itself only, so no query row is fully masked (no NaN in SDPA)

Labels stay aligned with `input_ids` (unshifted). Because the first label of every segment is -100, a loss that
shifts by one inside the row (`logits[:, :-1]` vs `labels[:, 1:]`) never asks a sample to predict its neighbour.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from nanovlm_cli.data.sample import Batch, Sample
from nanovlm_cli.data.sources import SkipCounter
from nanovlm_cli.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def pack(samples: Sequence[Sample], *, max_seq_len: int, max_images_per_row: int, min_rows: int = 1,
         max_samples_per_row: int | None = None, skips: SkipCounter | None = None) -> list[list[int]]:
    """Group sample indices into rows of at most `max_seq_len` tokens and `max_images_per_row` image views.

    First-fit-decreasing: visit samples longest first (ties: earlier first) and put each into the first row with
    room for both its tokens and its views, opening a new row when none has room. Samples that can never fit (more
    tokens than `max_seq_len`: "too_long"; more views than `max_images_per_row`: "too_many_images") are skipped
    and counted. If fewer than `min_rows` rows result, the fullest rows give their last-placed sample to a new row
    until there are `min_rows` (or every row holds one sample), so a window of samples always fills its batches.
    `max_samples_per_row=1` turns packing off (one sample per row, same skips). Each row lists its samples in
    input order.

    Example, capacity 8 tokens, lengths [5, 3, 4, 2]: visit 5, 4, 3, 2 -> 5 opens row A, 4 opens row B (5+4 > 8),
    3 fits A (8), 2 fits B (6) -> rows [[0, 1], [2, 3]], 14 of 16 slots used.
    """
    if max_seq_len <= 0 or max_images_per_row < 0:
        raise DataError(f"max_seq_len={max_seq_len} and max_images_per_row={max_images_per_row} must be positive")
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]), i))
    rows: list[list[int]] = []
    room_tokens: list[int] = []
    room_views: list[int] = []
    for i in order:
        n_tokens, n_views = len(samples[i]), len(samples[i].images)
        if n_tokens > max_seq_len or n_views > max_images_per_row:
            reason = "too_long" if n_tokens > max_seq_len else "too_many_images"
            logger.debug("skipping sample %d (%d tokens, %d views): %s", samples[i].source_index, n_tokens,
                         n_views, reason)
            if skips is not None:
                skips.add(reason)
            continue
        target = next((r for r in range(len(rows)) if room_tokens[r] >= n_tokens and room_views[r] >= n_views
                       and (max_samples_per_row is None or len(rows[r]) < max_samples_per_row)), None)
        if target is None:
            rows.append([])
            room_tokens.append(max_seq_len)
            room_views.append(max_images_per_row)
            target = len(rows) - 1
        rows[target].append(i)
        room_tokens[target] -= n_tokens
        room_views[target] -= n_views
    while len(rows) < min_rows:
        donor = max(range(len(rows)), key=lambda r: (len(rows[r]), -r), default=None)
        if donor is None or len(rows[donor]) < 2:
            break
        rows.append([rows[donor].pop()])
    return [sorted(row) for row in rows]


def balance_rows(row_tokens: Sequence[int], n_groups: int) -> list[list[int]]:
    """Deal rows into `n_groups` batches with nearly equal token counts (longest-processing-time first).

    Rows are visited by decreasing tokens (ties: earlier first) and each goes to the group with the fewest tokens
    so far (ties: fewer rows, then lower group). Every group gets a row while rows remain. Example: tokens
    [8, 7, 6, 2] into 2 groups -> 8 -> g0, 7 -> g1, 6 -> g1 (7 < 8), 2 -> g0 -> [[0, 3], [1, 2]] (10 and 13).
    Returned groups list their row indices in increasing order.
    """
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    load = [0] * n_groups
    for r in sorted(range(len(row_tokens)), key=lambda r: (-row_tokens[r], r)):
        g = min(range(n_groups), key=lambda g: (load[g], len(groups[g]), g))
        groups[g].append(r)
        load[g] += row_tokens[r]
    return [sorted(group) for group in groups]


def collate(rows: Sequence[Sequence[Sample]], *, pad_to: int | None = None, pad_token_id: int = 0) -> Batch:
    """Concatenate each row's samples, right-pad to the longest row (or `pad_to`), number the segments from 1.

    Images are the rows' views in row-major order of appearance (row 0's samples first, each sample's views in
    order), which is the order their image-token runs appear in the flattened `input_ids`.
    """
    if not rows or any(not row for row in rows):
        raise DataError("collate needs at least one row and no empty row; pack samples with pack() first")
    lengths = [sum(len(s) for s in row) for row in rows]
    width = max(lengths) if pad_to is None else pad_to
    if width < max(lengths):
        raise DataError(f"pad_to={pad_to} is shorter than the longest packed row ({max(lengths)} tokens)")
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)  # (B, L)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)  # (B, L)
    segment_ids = torch.zeros((n_rows, width), dtype=torch.long)  # (B, L), 0 = padding
    images: list[torch.Tensor] = []
    n_samples = 0
    for b, row in enumerate(rows):
        ids = torch.cat([s.input_ids for s in row])  # (T_row,)
        lab = torch.cat([s.labels for s in row])  # (T_row,)
        seg = torch.cat([torch.full((len(s),), k + 1, dtype=torch.long) for k, s in enumerate(row)])  # (T_row,)
        pos = torch.cat([torch.arange(len(s), dtype=torch.long) for s in row])  # (T_row,) restarts at 0
        lab[pos == 0] = IGNORE_INDEX  # a segment's first token has no predecessor in its own segment
        n = lengths[b]
        input_ids[b, :n], labels[b, :n], position_ids[b, :n], segment_ids[b, :n] = ids, lab, pos, seg
        for s in row:
            images.extend(s.images)
        n_samples += len(row)
    return Batch(input_ids, labels, position_ids, segment_ids, images, n_samples)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids -> (B, L, L) bool mask, True where query i may attend key j (see the module example)."""
    length = segment_ids.shape[-1]
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)  # (B, L, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()  # (L, L)
    return same & causal


def packing_efficiency(batches: Iterable[Batch]) -> float:
    """Real tokens over token slots (rows x width) across `batches`; 1.0 means no padding at all."""
    real = slots = 0
    for batch in batches:
        real += batch.n_tokens
        slots += batch.segment_ids.numel()
    return real / slots if slots else 0.0
