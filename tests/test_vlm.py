import pytest
import torch
import torch.nn.functional as F

from nanovlm_cli.data.sample import Batch
from nanovlm_cli.errors import DataError
from nanovlm_cli.models.projector import pixel_shuffle
from nanovlm_cli.models.vlm import chunked_cross_entropy
from tests.helpers import tiny_model


def test_pixel_shuffle_matches_the_docstring_example():
    x = torch.arange(8, dtype=torch.float32).view(1, 8, 1)  # a 2x4 grid, one channel
    out = pixel_shuffle(x, 2, 4, 2)
    assert out.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7]]]


def test_pixel_shuffle_works_on_rectangular_grids_and_rejects_bad_factors():
    x = torch.randn(3, 4 * 6, 5)
    assert pixel_shuffle(x, 4, 6, 2).shape == (3, 6, 20)
    with pytest.raises(Exception, match="does not divide"):
        pixel_shuffle(torch.randn(1, 15, 2), 3, 5, 2)


def _ids(model, n_text: int, n_images: int) -> torch.Tensor:
    image = model.cfg.image_token_id
    parts = [torch.randint(5, 100, (n_text,))]
    for _ in range(n_images):
        parts += [torch.full((model.cfg.image_tokens_per_tile,), image), torch.randint(5, 100, (3,))]
    return torch.cat(parts)


def test_image_features_land_in_image_token_positions_in_order():
    loaded = tiny_model()
    model = loaded.model.eval()
    ids = _ids(model, 4, 2)[None]
    views = [torch.randn(3, 64, 64), torch.randn(3, 64, 64)]
    embeds = model.embed(ids, views)
    features = model.encode_images(views)
    mask = ids[0] == model.cfg.image_token_id
    assert torch.equal(embeds[0][mask], features)
    assert torch.equal(embeds[0][~mask], model.language.embed(ids)[0][~mask])
    # views of different sizes are encoded per size and still come back in order
    mixed = [torch.randn(3, 64, 64), torch.randn(3, 32, 64), torch.randn(3, 64, 64)]
    out = model.encode_images(mixed)
    assert out.shape[0] == 16 + 8 + 16
    assert torch.allclose(out[16:24], model.encode_images([mixed[1]]), atol=1e-6)


def test_image_count_mismatch_is_a_clear_error():
    model = tiny_model().model
    ids = _ids(model, 4, 2)[None]
    with pytest.raises(DataError, match="image-token positions"):
        model.embed(ids, [torch.randn(3, 64, 64)])
    with pytest.raises(DataError, match="no images"):
        model.embed(ids, [])


def test_chunked_cross_entropy_equals_full_logits_loss_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    full = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    g_full = torch.autograd.grad(full, (hidden, weight))
    chunked = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=8)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    assert torch.allclose(full, chunked, atol=1e-4)
    for a, b in zip(g_full, g_chunked):
        assert torch.allclose(a, b, atol=1e-5)


@torch.no_grad()
def test_packed_loss_equals_token_weighted_loss_of_separate_samples():
    model = tiny_model().model.eval()
    samples = []
    for n_text, n_img in ((5, 1), (7, 0), (3, 2)):
        ids = _ids(model, n_text, n_img)
        labels = ids.clone()
        labels[: len(ids) // 2] = -100
        labels[ids == model.cfg.image_token_id] = -100
        samples.append((ids, labels, [torch.randn(3, 64, 64) for _ in range(n_img)]))
    sums, counts = [], []
    for ids, labels, views in samples:
        t = len(ids)
        out = model.loss(Batch(ids[None], labels[None], torch.arange(t)[None], torch.ones(1, t, dtype=torch.long),
                               views, 1))
        sums.append(float(out.loss_sum))
        counts.append(out.n_tokens)
    pad = 4
    ids = torch.cat([s[0] for s in samples] + [torch.zeros(pad, dtype=torch.long)])
    labels = torch.cat([s[1] for s in samples] + [torch.full((pad,), -100)])
    positions = torch.cat([torch.arange(len(s[0])) for s in samples] + [torch.zeros(pad, dtype=torch.long)])
    segments = torch.cat([torch.full((len(s[0]),), i + 1) for i, s in enumerate(samples)] +
                         [torch.zeros(pad, dtype=torch.long)])
    packed = model.loss(Batch(ids[None], labels[None], positions[None], segments[None],
                              [v for s in samples for v in s[2]], 3))
    assert packed.n_tokens == sum(counts)
    assert abs(float(packed.loss_sum) - sum(sums)) < 1e-3
    assert abs(float(packed.loss) - sum(sums) / sum(counts)) < 1e-5
