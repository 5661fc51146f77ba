"""Images: decode any image source into clean RGB, then turn it into the pixel views the vision encoder reads.

Two steps, kept apart so each is testable: `load_image` turns a path / bytes / PIL image / `datasets` dict into an
RGB `PIL.Image` (alpha composited on white, 16-bit scaled to 8-bit, EXIF rotation applied, first frame of an
animation) or raises `ImageError` naming the file; `process_image` resizes, splits and normalises according to
`cfg.image`. The main resize is done by PIL in C (bicubic, as upstream nanoVLM's `DynamicResize`, unless
`image.resample` says bilinear); the tile-size global view is resized from the float pixels by torch (bilinear,
antialiased, as upstream's tensor `resize`); otherwise the only tensor work is one uint8 -> float conversion per
image, because this runs per sample in the training loop.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from nanovlm_cli.config import VLMConfig
from nanovlm_cli.data.sample import ImageSource
from nanovlm_cli.errors import ImageError

logger = logging.getLogger(__name__)

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}
_ORIENTATION = 0x0112  # EXIF tag


@dataclass
class ProcessedImage:
    """The views of one image, in the order their image-token runs appear in the text.

    `grid` is rows x cols of tiles ((1, 1) when the image is not split); with `has_global` the first view is the
    whole image at tile size (a 1x1 "tiles" image is just that global view), except in the "idefics3" layout, where
    the global view is the last one.
    """

    views: list[torch.Tensor]  # each (3, h, w) float
    grid: tuple[int, int]
    has_global: bool
    tokens_per_view: list[int]

    @property
    def n_tokens(self) -> int:
        return sum(self.tokens_per_view)


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def _describe(src: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, dict) and src.get("path"):
        return str(src["path"])
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


IMAGE_FILES = "an image file (PNG, JPEG, WebP, GIF, BMP, TIFF...)"
_URL_SCHEMES = ("http://", "https://", "ftp://", "s3://", "gs://", "hf://", "file://", "data:")


def check_image_path(src: str | Path, missing_hint: str = "check the path") -> Path:
    """The local file `src` names, or an `ImageError` that says what is accepted (URLs and directories are not)."""
    text = str(src)
    if text.lower().startswith(_URL_SCHEMES):
        raise ImageError(f"image {text} is a URL; images are read from local files only: download it first "
                         f"(e.g. curl -LO '{text}') and pass the file")
    path = Path(text).expanduser()
    if path.is_dir():
        raise ImageError(f"image {text} is a directory; pass {IMAGE_FILES} (one per --image)")
    if not path.exists():
        raise ImageError(f"image file {text} does not exist; {missing_hint}")
    if not path.is_file():
        raise ImageError(f"image {text} is not a regular file; pass {IMAGE_FILES}")
    return path


def _open(src: Any, label: str) -> Image.Image:
    """Open `src` lazily (no pixel decoding yet); missing files and unsupported types raise ImageError."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, dict):
        data, path = src.get("bytes"), src.get("path")
        if data is not None:
            return _open(bytes(data), label)
        if path:
            return _open(str(path), label)
        raise ImageError(f"image {label} is a dict without 'bytes' or 'path'; pass {{'bytes': ...}} or {{'path': ...}}")
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError(f"image {label} is empty (0 bytes); the file or dataset row has no image data")
        return Image.open(io.BytesIO(bytes(src)))
    if isinstance(src, (str, Path)):
        return Image.open(check_image_path(src, "check the path (or --image-root for relative paths)"))
    raise ImageError(f"image {label} has unsupported type {type(src).__name__}; pass a path, bytes or a PIL image")


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """'I;16*' / 'I' / 'F' greyscale -> 8-bit RGB by scaling, never by clipping (65535 -> 255).

    'I' (32-bit int) holds 16-bit PNG/TIFF data, or 8-bit data someone converted: values above 255 mean 16-bit.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        arr = arr * 255.0 if peak <= 1.0 else arr
    else:
        arr = arr.astype(np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16") or peak > 255:
            arr = arr / (257.0 if peak <= 65535 else peak / 255.0)
    grey = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)  # (H, W)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        mode, img = "RGBA", img.convert("RGBA")
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _sixteen_bit_to_rgb(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(src: ImageSource, *, name: str | None = None) -> Image.Image:
    """Decode `src` (path, bytes, PIL image or {"bytes", "path"} dict) into an RGB PIL image.

    Every failure (missing, corrupt, truncated, decompression bomb, not an image) is an `ImageError` naming the
    file (or `name`), never a hang: decompression bombs are refused from the header, before any pixel is decoded.
    """
    label = _describe(src, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open(src, label)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF / WebP / APNG: the first frame
            img.load()
            try:
                if img.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even when there is nothing to do
                    img = ImageOps.exif_transpose(img) or img
            except Exception as exc:  # noqa: BLE001 - a broken EXIF block is not a broken image
                logger.debug("ignoring unreadable EXIF orientation of %s: %s", label, exc)
            if img.width < 1 or img.height < 1:
                raise ImageError(f"image {label} has size {img.width}x{img.height}; it has no pixels")
            return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image {label} is too large to decode safely ({exc}); resize it below "
                         f"{Image.MAX_IMAGE_PIXELS} pixels") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on corrupt data
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"image {label} cannot be decoded ({detail}); the file is corrupt, truncated or "
                         "not an image") from exc


# ----------------------------------------------------------------------------------------------------------------
# Resizing and splitting


def _round_up(x: float, unit: int) -> int:
    return max(unit, math.ceil(x / unit) * unit)


def tiles_size(height: int, width: int, tile: int, max_side: int, max_grid: int,
               fill_max_side: bool = False) -> tuple[int, int]:
    """(h, w) for "tiles" mode: aspect-aware, both sides multiples of `tile`, at most max_grid tiles per side.

    The longest side goes to the smallest multiple of `tile` that holds it (capped by max_side and max_grid; with
    `fill_max_side`, to the cap itself, enlarging small images), the other side scales with it and is rounded up
    (never undershoots), as upstream nanoVLM's DynamicResize.
    Example: 1000x600 (h x w), tile 512, max_side 2048 -> long 1024, scale 1.024, short 614.4 -> 1024x1024;
    4000x40 -> long 2048, short 20.5 -> 512: 2048x512 (4x1 tiles).
    """
    cap = max(tile, min(max_side, max_grid * tile) // tile * tile)
    long, short = max(height, width), min(height, width)
    target_long = cap if fill_max_side else min(cap, _round_up(long, tile))
    target_short = min(target_long, _round_up(short * target_long / long, tile))
    return (target_long, target_short) if height >= width else (target_short, target_long)


def aspect_size(height: int, width: int, max_side: int, multiple_of: int) -> tuple[int, int]:
    """(h, w) for "aspect" mode: aspect kept, longest side <= max_side, each side the nearest multiple (>= 1).

    Example: 1000x600, max_side 1024, multiple 64 -> scale 1.0 -> 1024x576 (round(15.6)=16, round(9.4)=9 multiples).
    An image smaller than the unit is enlarged to one multiple: 10x10 -> 64x64.
    """
    cap = max(multiple_of, max_side // multiple_of * multiple_of)
    scale = min(1.0, max_side / max(height, width))
    fit = lambda side: min(cap, max(multiple_of, round(side * scale / multiple_of) * multiple_of))
    return fit(height), fit(width)


def _to_tensor(img: Image.Image, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # (H, W, 3) uint8
    x = pixels.permute(2, 0, 1).float().div_(255.0)  # (3, H, W) in [0, 1]
    if mean is not None and std is not None:
        x.sub_(mean).div_(std)
    return x


def _normalise(x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    return x if mean is None or std is None else (x - mean) / std


def _norm_stats(cfg: VLMConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if cfg.image.mean is None or cfg.image.std is None:
        return None, None
    return (torch.tensor(cfg.image.mean).view(3, 1, 1), torch.tensor(cfg.image.std).view(3, 1, 1))


# ----------------------------------------------------------------------------------------------------------------
# The "idefics3" layout: transformers' Idefics3/SmolVLM image processor (its torchvision backend, AutoProcessor's
# default), reproduced step by step with the same float arithmetic, so sizes and pixels come out the same.

IDEFICS3_MAX_SIDE = 4096  # transformers' absolute cap on the resized longest edge (MAX_IMAGE_SIZE)


def idefics3_resize_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(h, w) of the first resize: the longest edge becomes `longest_edge` (enlarging small images too), the other
    side keeps the aspect ratio, truncated then made even; then scaled below 4096.

    Example: 300x500 (h x w), longest 128 -> w 128, h int(128 / (500/300)) = 76 -> 76x128.
    """
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > IDEFICS3_MAX_SIDE:
        width, height = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE / aspect)
    elif height > width and height > IDEFICS3_MAX_SIDE:
        height, width = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


def idefics3_tiles_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(h, w) of the second resize (`resize_for_vision_encoder`): both sides up to multiples of `tile`, the short one
    recomputed from the aspect ratio first. Example: 76x128, tile 32 -> w 128, h int(128 / (128/76)) = 76 -> 96x128."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def _resize_uint8(x: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """torchvision's tensor `resize` on the CPU, (1, 3, H, W) uint8 -> (1, 3, h, w) uint8, antialiased."""
    if tuple(x.shape[-2:]) == size:
        return x
    native = resample != "bilinear" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    y = torch.nn.functional.interpolate(x if native else x.float(), size=list(size), mode=resample,
                                        align_corners=False, antialias=True)
    return y if native else y.round_().to(torch.uint8)


def _process_idefics3(img: Image.Image, cfg: VLMConfig) -> ProcessedImage:
    """Views in Idefics3's order: tiles row-major, then the global view (alone when the image is not split)."""
    ic, t = cfg.image, cfg.image.tile_size
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()[None]  # (1,3,H,W)
    x = _resize_uint8(x, idefics3_resize_size(x.shape[2], x.shape[3], ic.max_side), ic.resample)
    if not ic.split:
        views = _resize_uint8(x, (t, t), ic.resample)  # (1, 3, t, t)
        rows = cols = 1
    else:
        x = _resize_uint8(x, idefics3_tiles_size(x.shape[2], x.shape[3], t), ic.resample)
        h, w = x.shape[2], x.shape[3]
        if h > t or w > t:
            rows, cols = math.ceil(h / t), math.ceil(w / t)
            tiles = x.unfold(2, t, t).unfold(3, t, t).contiguous().view(1, 3, -1, t, t).permute(0, 2, 1, 3, 4)[0]
            views = torch.cat([tiles, _resize_uint8(x, (t, t), ic.resample)])  # (rows*cols + 1, 3, t, t)
        else:
            views, rows, cols = x, 1, 1
    if ic.mean is not None and ic.std is not None:  # transformers' fused rescale + normalise
        mean = torch.tensor(ic.mean) * (1.0 / (1 / 255))
        std = torch.tensor(ic.std) * (1.0 / (1 / 255))
        pixels = (views.float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    else:
        pixels = views * (1 / 255)
    return ProcessedImage(list(pixels.unbind(0)), (rows, cols), True, [cfg.image_tokens_per_tile] * len(views))


def process_image(img: Image.Image, cfg: VLMConfig) -> ProcessedImage:
    """Resize / split / normalise one RGB image as `cfg.image` says (see ImageConfig).

    "tiles" example: a 1000x600 (h x w) image with tile 512 resizes to 1024x1024, a 2x2 grid: views are
    [global 512x512, r1c1, r1c2, r2c1, r2c2], has_global=True, each worth `cfg.image_tokens_per_tile` tokens.
    """
    if img.mode != "RGB":
        img = _to_rgb(img)
    if cfg.image.mode == "idefics3":
        return _process_idefics3(img, cfg)
    ic, mean, std = cfg.image, *_norm_stats(cfg)
    unit = cfg.vision.patch_size * cfg.projector.pixel_shuffle_factor
    width, height = img.size

    resample = Image.BILINEAR if ic.resample == "bilinear" else Image.BICUBIC
    if ic.mode == "fixed":
        view = _to_tensor(img.resize((ic.tile_size, ic.tile_size), resample), mean, std)  # (3, t, t)
        return ProcessedImage([view], (1, 1), False, [cfg.image_tokens_per_tile])

    if ic.mode == "aspect":
        h, w = aspect_size(height, width, ic.max_side, ic.multiple_of)
        view = _to_tensor(img.resize((w, h), resample), mean, std)  # (3, h, w)
        return ProcessedImage([view], (1, 1), False, [(h // unit) * (w // unit)])

    t = ic.tile_size
    h, w = tiles_size(height, width, t, ic.max_side, ic.max_grid, ic.fill_max_side)
    rows, cols = h // t, w // t
    resized = img.resize((w, h), resample) if (w, h) != (width, height) else img
    full = _to_tensor(resized, None, None)  # (3, rows*t, cols*t) in [0, 1]
    views: list[torch.Tensor] = []
    has_global = ic.global_view
    if has_global and (rows, cols) != (1, 1):
        # on the float pixels, as upstream's tensor `resize` (bilinear, antialiased): no second uint8 rounding
        small = torch.nn.functional.interpolate(full[None], size=(t, t), mode="bilinear", antialias=True,
                                                align_corners=False)[0]  # (3, t, t)
        views.append(_normalise(small, mean, std))
    tiles = full.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)  # row-major
    views.extend(_normalise(tiles, mean, std).unbind(0))
    return ProcessedImage(views, (rows, cols), has_global, [cfg.image_tokens_per_tile] * len(views))
