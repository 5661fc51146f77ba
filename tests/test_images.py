"""Image decoding (every odd format and failure) and processing (fixed / tiles / aspect)."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nanovlm_cli.config import ImageConfig, LanguageConfig, ProjectorConfig, VisionConfig, VLMConfig
from nanovlm_cli.data.images import (
    aspect_size,
    idefics3_resize_size,
    idefics3_tiles_size,
    load_image,
    process_image,
    tiles_size,
)
from nanovlm_cli.errors import ImageError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _cfg(**image) -> VLMConfig:
    vision = VisionConfig(image_size=64, patch_size=8, hidden_dim=32, intermediate_dim=64, n_layers=1, n_heads=2)
    language = LanguageConfig(vocab_size=64, hidden_dim=32, intermediate_dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                              extra_vocab_size=2 + 64)  # image + global image + 8x8 tile markers
    return VLMConfig(vision=vision, language=language, projector=ProjectorConfig(pixel_shuffle_factor=2),
                     image=ImageConfig(**image))


# -- load_image ----------------------------------------------------------------------------------------------------


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = load_image(_png_bytes(img))
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_la_and_palette_transparency_are_composited_on_white():
    la = Image.new("LA", (3, 3), (0, 0))
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    out = load_image(_png_bytes(pal, transparency=0))
    assert out.getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    assert img.mode.startswith("I;16")
    out = load_image(_png_bytes(img))
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    as_int = Image.fromarray(arr.astype(np.int32))  # mode I
    assert load_image(as_int).getpixel((1, 0)) == (100, 100, 100)


def test_greyscale_and_cmyk_become_rgb():
    assert load_image(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert load_image(_png_bytes(cmyk, "JPEG", quality=100)).getpixel((0, 0))[0] > 200


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(_png_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (2, 4)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    r, _, b = out.getpixel((0, 0))
    assert r > 200 and b < 50


def test_dict_path_and_tiny_and_thin_images(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    assert load_image({"bytes": None, "path": str(path)}).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(str(path)).size == (1, 1)
    assert load_image(_png_bytes(Image.new("RGB", (4000, 40)))).size == (4000, 40)


@pytest.mark.parametrize("data", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_corrupt_bytes_raise_image_error_naming_the_source(data):
    with pytest.raises(ImageError, match="corrupt"):
        load_image(data, name="row-7.png")
    with pytest.raises(ImageError, match="row-7.png"):
        load_image(data, name="row-7.png")


def test_truncated_file_raises_image_error(tmp_path):
    data = _png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(str(path))


def test_missing_file_and_wrong_type_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(ImageError, match="unsupported type"):
        load_image(12345)


def test_decompression_bomb_is_refused(monkeypatch):
    data = _png_bytes(Image.new("L", (200, 200)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 px is > 2x: DecompressionBombError
    with pytest.raises(ImageError, match="too large"):
        load_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # between 1x and 2x: only a warning in PIL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageError, match="too large"):
            load_image(data)


# -- process_image -------------------------------------------------------------------------------------------------


def test_fixed_mode_resizes_to_one_tile_and_normalises():
    cfg = _cfg(mode="fixed", tile_size=64)
    out = process_image(Image.new("RGB", (100, 30), (255, 255, 255)), cfg)
    assert [tuple(v.shape) for v in out.views] == [(3, 64, 64)]
    assert out.grid == (1, 1) and not out.has_global and out.tokens_per_view == [16]
    assert torch.allclose(out.views[0], torch.ones(3, 64, 64))  # (1 - 0.5) / 0.5


def test_no_mean_std_means_to_tensor_only():
    cfg = _cfg(mode="fixed", tile_size=64, mean=None, std=None)
    out = process_image(Image.new("RGB", (8, 8), (255, 0, 0)), cfg)
    assert out.views[0][0].min().item() == 1.0 and out.views[0][1].max().item() == 0.0


def test_tiles_mode_puts_global_view_first_then_row_major_tiles():
    cfg = _cfg(mode="tiles", tile_size=64, max_side=256, max_grid=4, mean=None, std=None)
    img = Image.new("RGB", (128, 128))  # w x h; quadrants with distinct colours
    colours = {(0, 0): (255, 0, 0), (1, 0): (0, 255, 0), (0, 1): (0, 0, 255), (1, 1): (255, 255, 0)}
    for (cx, cy), colour in colours.items():
        img.paste(colour, (cx * 64, cy * 64, cx * 64 + 64, cy * 64 + 64))
    out = process_image(img, cfg)
    assert out.grid == (2, 2) and out.has_global and len(out.views) == 5
    assert all(tuple(v.shape) == (3, 64, 64) for v in out.views)
    expected = [colours[(0, 0)], colours[(1, 0)], colours[(0, 1)], colours[(1, 1)]]  # r1c1, r1c2, r2c1, r2c2
    for view, colour in zip(out.views[1:], expected):
        assert torch.allclose(view[:, 32, 32], torch.tensor(colour, dtype=torch.float32) / 255)
    assert out.tokens_per_view == [16] * 5


def test_tiles_mode_small_image_is_only_its_global_view():
    cfg = _cfg(mode="tiles", tile_size=64, max_side=256, max_grid=4)
    out = process_image(Image.new("RGB", (1, 1)), cfg)
    assert out.grid == (1, 1) and out.has_global and len(out.views) == 1


def test_tiles_size_respects_max_side_and_max_grid():
    assert tiles_size(1000, 600, 512, 2048, 8) == (1024, 1024)
    assert tiles_size(4000, 40, 512, 2048, 8) == (2048, 512)
    assert tiles_size(40, 4000, 64, 2048, 3) == (64, 192)  # max_grid caps the long side at 3 tiles


def test_aspect_mode_keeps_aspect_with_rectangular_grid():
    cfg = _cfg(mode="aspect", max_side=256, multiple_of=64, mean=None, std=None)
    out = process_image(Image.new("RGB", (400, 200)), cfg)  # w x h -> scale 0.64 -> 128 x 256 (h x w)
    assert [tuple(v.shape) for v in out.views] == [(3, 128, 256)]
    assert out.tokens_per_view == [(128 // 16) * (256 // 16)]
    assert aspect_size(10, 10, 1024, 64) == (64, 64)
    assert aspect_size(1000, 600, 1024, 64) == (1024, 576)


def test_idefics3_sizes_follow_transformers_arithmetic():
    assert idefics3_resize_size(300, 500, 128) == (76, 128)  # int(128 / (500/300)) = 76, already even
    assert idefics3_resize_size(7, 5, 128) == (128, 92)  # small images are enlarged; int(91.4) = 91 -> even 92
    assert idefics3_resize_size(10, 9000, 5000) == (4, 4096)  # 6 x 5000, then below 4096: int(4096 / (5000/6))
    assert idefics3_tiles_size(76, 128, 32) == (96, 128)
    assert idefics3_tiles_size(128, 92, 32) == (128, 96)


def test_idefics3_mode_puts_the_global_view_last_and_can_skip_splitting():
    cfg = _cfg(mode="idefics3", tile_size=64, max_side=256, resample="lanczos")
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (150, 0, 300, 100))  # right half blue
    out = process_image(img, cfg)
    assert out.grid == (2, 4) and out.has_global and len(out.views) == 9  # 128 x 256 after both resizes
    assert out.views[0][0].mean() > 0.9 and out.views[3][2].mean() > 0.9  # first tile red, last of row 1 blue
    assert out.views[-1].shape == (3, 64, 64) and out.views[-1][0, :, :20].mean() > 0.9  # global: red left
    single = process_image(img, cfg.replace(image=cfg.image.replace(split=False)))
    assert single.grid == (1, 1) and len(single.views) == 1 and single.views[0].shape == (3, 64, 64)
