"""Configuration dataclasses: vision, language, projector, image processing and the VLM (training: train_config.py).

A config is the single description of what a model computes (`TrainConfig`, of how it is trained, lives in
`train_config.py` and is re-exported here). Each class validates itself in `__post_init__`, first every field
against its type (`field_types`: a config file's "false" is not False) and then its range (so an impossible config
fails before any weight is loaded, naming the field), round-trips through `to_dict` / `from_dict` (JSON-safe), and
exposes derived sizes as properties rather than stored copies.
Nothing here imports torch: the CLI builds and prints configs without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from nanovlm_cli.config_base import (  # noqa: F401 (DEVICE_NAMES ... load_json_config: re-exported, their old home)
    DEVICE_NAMES,
    _Config,
    _require,
    check_device_name,
    is_device_name,
    load_json_config,
)
from nanovlm_cli.field_types import check_field_types  # noqa: F401 (re-exported: run_config, validation)
from nanovlm_cli.train_config import TrainConfig  # noqa: F401 (re-exported: TrainConfig's old home)

VisionKind = Literal["siglip", "dinov2", "dinov3"]
ResizeMode = Literal["fixed", "tiles", "aspect", "idefics3"]

# Normalisation constants of the backbone families (recorded in every config that uses them).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionConfig(_Config):
    """A ViT image encoder: SigLIP/SigLIP2 (fixed resolution), DINOv2, or DINOv3.

    `hub_id` names pretrained weights (a Hub id or a local directory); None means random initialisation. When
    weights are loaded, the architecture fields are read from the backbone's own `config.json`, so the values
    here matter only for from-scratch models and for display.
    """

    _label = "vision"

    kind: VisionKind = "siglip"
    hub_id: str | None = None
    image_size: int = 224  # resolution the position embeddings were trained at
    patch_size: int = 16
    hidden_dim: int = 768
    intermediate_dim: int = 3072
    n_layers: int = 12
    n_heads: int = 12
    layer_norm_eps: float = 1e-6
    act: Literal["gelu_tanh", "gelu", "silu"] = "gelu_tanh"  # "silu" with gated_mlp is SwiGLU
    gated_mlp: bool = False  # gated MLP down(act(gate(x)) * up(x)) (DINOv3 "plus" sizes)
    use_cls: bool = False  # a CLS token is prepended (DINOv2, DINOv3)
    n_registers: int = 0  # register tokens after CLS (DINOv3: 4)
    layer_scale: bool = False  # per-channel LayerScale on both residual branches (DINO)
    rope_theta: float | None = None  # 2-D RoPE base (DINOv3); None means learned absolute positions
    qkv_bias: tuple[bool, bool, bool] = (True, True, True)  # DINOv3 has no key bias
    mlp_bias: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.kind in ("siglip", "dinov2", "dinov3"),
                 f"vision.kind={self.kind!r} is not one of siglip, dinov2, dinov3")
        for name in ("image_size", "patch_size", "hidden_dim", "intermediate_dim", "n_layers", "n_heads"):
            _require(getattr(self, name) > 0, f"vision.{name}={getattr(self, name)} must be positive")
        _require(self.hidden_dim % self.n_heads == 0,
                 f"vision.n_heads={self.n_heads} does not divide vision.hidden_dim={self.hidden_dim}; "
                 "choose a head count that divides the hidden size")
        _require(self.image_size % self.patch_size == 0,
                 f"vision.image_size={self.image_size} is not a multiple of vision.patch_size={self.patch_size}")
        _require(len(self.qkv_bias) == 3, f"vision.qkv_bias={self.qkv_bias} must have three booleans (q, k, v)")
        _require(self.act in ("gelu_tanh", "gelu", "silu"),
                 f"vision.act={self.act!r} is not one of gelu_tanh, gelu, silu")
        _require(self.n_registers >= 0, f"vision.n_registers={self.n_registers} must be >= 0")
        if self.rope_theta is not None:
            _require((self.hidden_dim // self.n_heads) % 4 == 0,
                     f"vision head_dim={self.hidden_dim // self.n_heads} must be a multiple of 4 for 2-D RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def n_prefix_tokens(self) -> int:
        """CLS and register tokens that precede the patch tokens (dropped before the projector)."""
        return int(self.use_cls) + self.n_registers

    @property
    def grid_size(self) -> int:
        """Patches per side at the training resolution."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class LanguageConfig(_Config):
    """A decoder LM. One class serves Llama/SmolLM2 and Gemma-3 through feature flags, never through names.

    Gemma-3 = embed_scale + norm_unit_offset + qk_norm + post_norms + act="gelu_tanh" + sliding-window local layers
    (`layer_types`) with their own RoPE base (`rope_local_theta`) + `query_pre_attn_scalar`.
    """

    _label = "language"

    hub_id: str | None = None
    tokenizer: str | None = None  # Hub id, local directory or "builtin:tiny"; None means hub_id
    vocab_size: int = 49152  # the backbone's own vocabulary (rows of its embedding)
    extra_vocab_size: int = 0  # rows added for the VLM's extra tokens
    hidden_dim: int = 576
    intermediate_dim: int = 1536
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim_override: int | None = None  # Gemma: 256 whatever hidden_dim is
    max_position_embeddings: int = 8192
    rope_theta: float = 100000.0
    rope_local_theta: float | None = None  # RoPE base of sliding-window layers (Gemma-3: 10000)
    rope_scaling_factor: float = 1.0  # linear position scaling of global layers
    rms_norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # RMSNorm multiplies by (1 + w) (Gemma)
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Gemma-3)
    post_norms: bool = False  # norms after attention and after the MLP too (Gemma-3: four per layer)
    embed_scale: bool = False  # token embeddings multiplied by sqrt(hidden_dim) (Gemma)
    act: Literal["silu", "gelu_tanh"] = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" | "sliding_attention"; None = all full
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5; None means head_dim
    tie_embeddings: bool = True
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("vocab_size", "hidden_dim", "intermediate_dim", "n_layers", "n_heads", "n_kv_heads"):
            _require(getattr(self, name) > 0, f"language.{name}={getattr(self, name)} must be positive")
        _require(self.extra_vocab_size >= 0, f"language.extra_vocab_size={self.extra_vocab_size} must be >= 0")
        if self.head_dim_override is None:
            _require(self.hidden_dim % self.n_heads == 0,
                     f"language.n_heads={self.n_heads} does not divide language.hidden_dim={self.hidden_dim}; "
                     "choose a head count that divides the hidden size or set head_dim_override")
        _require(self.n_heads % self.n_kv_heads == 0,
                 f"language.n_kv_heads={self.n_kv_heads} does not divide language.n_heads={self.n_heads}")
        _require(self.head_dim % 2 == 0, f"language head_dim={self.head_dim} must be even for RoPE")
        if self.layer_types is not None:
            _require(len(self.layer_types) == self.n_layers,
                     f"language.layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            _require(not bad, f"language.layer_types has unknown type(s) {bad}; "
                              "use 'full_attention' or 'sliding_attention'")
            if "sliding_attention" in self.layer_types:
                _require(self.sliding_window is not None and self.sliding_window > 0,
                         "language.layer_types has sliding layers but language.sliding_window is not set")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_dim // self.n_heads

    @property
    def total_vocab_size(self) -> int:
        return self.vocab_size + self.extra_vocab_size

    @property
    def tokenizer_source(self) -> str | None:
        return self.tokenizer or self.hub_id

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"


@dataclass(frozen=True)
class ProjectorConfig(_Config):
    """Pixel shuffle (space-to-depth by `pixel_shuffle_factor`) followed by one linear layer."""

    _label = "projector"

    pixel_shuffle_factor: int = 4

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.pixel_shuffle_factor >= 1,
                 f"projector.pixel_shuffle_factor={self.pixel_shuffle_factor} must be >= 1")


@dataclass(frozen=True)
class ImageConfig(_Config):
    """How an image becomes pixel tensors; saved with the model because it changes what the model computes.

    - "fixed": resize to tile_size x tile_size (SigLIP, DINOv2, upstream nanoVLM).
    - "tiles": aspect-aware resize to a multiple of tile_size (longest side <= max_side), split into up to
      max_grid x max_grid tiles, plus a global view resized to tile_size (SmolVLM style).
    - "aspect": aspect-preserving resize with the longest side <= max_side and both sides multiples of
      `multiple_of`, encoded as one rectangular patch grid (DINOv3).
    `mean`/`std` None means `ToTensor()` only (pixels in [0, 1]), as in upstream nanoVLM checkpoints.
    `resample` is the filter of the main resize ("bilinear" for upstream nanoVLM's fixed-size `Resize`);
    `fill_max_side` resizes the longest side to max_side even when that enlarges the image (upstream's
    `resize_to_max_side_len`); `global_view` False drops the global view (upstream's tiles before it had one).
    - "idefics3": transformers' Idefics3/SmolVLM image processor exactly: the longest edge to max_side
      (`size.longest_edge`), both sides rounded up to tiles of tile_size (`max_image_size.longest_edge`), tiles
      row-major then the global view last; `split` False (`do_image_splitting`) gives the global view only. The
      resizes run on uint8 tensors with `resample` ("lanczos" in the published models), as its torchvision backend.
    """

    _label = "image"

    mode: ResizeMode = "fixed"
    tile_size: int = 224
    max_side: int = 2048
    max_grid: int = 8
    global_view: bool = True
    multiple_of: int = 64
    resample: Literal["bicubic", "bilinear", "lanczos"] = "bicubic"
    fill_max_side: bool = False
    split: bool = True  # "idefics3" only: do_image_splitting
    mean: tuple[float, float, float] | None = SIGLIP_MEAN
    std: tuple[float, float, float] | None = SIGLIP_STD

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.mode in ("fixed", "tiles", "aspect", "idefics3"),
                 f"image.mode={self.mode!r} is not one of fixed, tiles, aspect, idefics3")
        _require(self.tile_size > 0 and self.max_side > 0 and self.max_grid > 0 and self.multiple_of > 0,
                 "image.tile_size, image.max_side, image.max_grid and image.multiple_of must be positive")
        _require((self.mean is None) == (self.std is None), "image.mean and image.std must both be set or both None")
        _require(self.resample in ("bicubic", "bilinear", "lanczos"), f"image.resample={self.resample!r} is not one "
                 "of bicubic, bilinear, lanczos")
        if self.std is not None:
            _require(all(s > 0 for s in self.std), f"image.std={self.std} must be positive")


@dataclass(frozen=True)
class VLMConfig(_Config):
    """The whole model: vision encoder -> projector -> decoder, the image processing and the chat template.

    `chat_template` "jinja" renders `jinja_template` (a checkpoint's own Jinja source, e.g. SmolVLM's), whose assistant
    turns end with `end_of_turn`; `fake_image_token` wraps image-token runs in the "idefics3" image layout. `hub_id`
    names pretrained weights of the whole model (a Hub id or directory of a VLM checkpoint, e.g. SmolVLM's): a new
    model starts from them, with their architecture, instead of from the backbones' `hub_id`s.
    """

    hub_id: str | None = None
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    chat_template: Literal["chatml", "gemma", "plain", "jinja"] = "chatml"
    jinja_template: str | None = None
    end_of_turn: str | None = None
    image_token: str = "<|image|>"
    global_image_token: str = "<|global_image|>"
    fake_image_token: str = "<fake_token_around_image>"
    max_images_per_sample: int = 8
    image_token_id: int | None = None  # set from the tokenizer when the model is built; saved with the model
    source_format: Literal["nanovlm", "upstream"] = "nanovlm"

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.chat_template in ("chatml", "gemma", "plain", "jinja"),
                 f"chat_template={self.chat_template!r} is not one of chatml, gemma, plain, jinja")
        if self.chat_template == "jinja":
            _require(bool(self.jinja_template) and bool(self.end_of_turn),
                     "chat_template='jinja' needs jinja_template (the Jinja source) and end_of_turn (the token that "
                     "closes an assistant turn); set both or use chatml, gemma or plain")
        factor = self.projector.pixel_shuffle_factor
        if self.image.mode in ("fixed", "tiles", "idefics3"):
            grid = self.image.tile_size // self.vision.patch_size
            _require(self.image.tile_size % self.vision.patch_size == 0,
                     f"image.tile_size={self.image.tile_size} is not a multiple of "
                     f"vision.patch_size={self.vision.patch_size}")
            _require(grid % factor == 0,
                     f"projector.pixel_shuffle_factor={factor} does not divide the {grid}x{grid} patch grid of a "
                     f"{self.image.tile_size}px tile with patch {self.vision.patch_size}; pick a factor dividing {grid}")
        else:
            unit = self.vision.patch_size * factor
            _require(self.image.multiple_of % unit == 0,
                     f"image.multiple_of={self.image.multiple_of} must be a multiple of patch_size*pixel_shuffle="
                     f"{unit} so every grid divides by the pixel-shuffle factor")
        # "idefics3": the checkpoint's tokenizer may hold these tokens already (SmolVLM's does); load_tokenizer checks
        # that every one of them fits the embedding
        _require(self.image.mode == "idefics3" or self.language.extra_vocab_size >= len(self.extra_tokens),
                 f"language.extra_vocab_size={self.language.extra_vocab_size} is smaller than the "
                 f"{len(self.extra_tokens)} extra image tokens; set it to at least {len(self.extra_tokens)}")
        _require(self.max_images_per_sample > 0, "max_images_per_sample must be positive")

    @property
    def image_tokens_per_tile(self) -> int:
        """Projected tokens for one tile (fixed/tiles modes)."""
        grid = self.image.tile_size // self.vision.patch_size
        return (grid // self.projector.pixel_shuffle_factor) ** 2

    @property
    def tile_tokens(self) -> list[str]:
        """`<row_i_col_j>` markers for every tile position, 1-based as in nanoVLM/SmolVLM."""
        if self.image.mode == "idefics3":  # as many as the longest edge can make
            n = math.ceil(min(self.image.max_side, 4096) / self.image.tile_size) if self.image.split else 0
        elif self.image.mode != "tiles":
            return []
        else:
            n = self.image.max_grid
        return [f"<row_{i}_col_{j}>" for i in range(1, n + 1) for j in range(1, n + 1)]

    @property
    def extra_tokens(self) -> list[str]:
        """Tokens added to the tokenizer (once), in id order; no global-image token for tiles without a global view
        (upstream nanoVLM's first tiles checkpoints: `<|image|>` then the `<row_i_col_j>` markers)."""
        no_global = self.image.mode == "tiles" and not self.image.global_view
        if self.image.mode == "idefics3":  # (never the end-of-turn token: generation blocks these ids)
            return [self.fake_image_token, self.image_token, self.global_image_token, *self.tile_tokens]
        return [self.image_token, *([] if no_global else [self.global_image_token]), *self.tile_tokens]

    def n_params_estimate(self) -> int:
        """Approximate parameter count from the config alone (for `--dry-run`; ignores biases, norms, CLS/registers)."""
        v, l = self.vision, self.language
        mlp_v = (3 if v.gated_mlp else 2) * v.hidden_dim * v.intermediate_dim
        vision = v.n_layers * (4 * v.hidden_dim * v.hidden_dim + mlp_v) + 3 * v.patch_size**2 * v.hidden_dim
        if v.rope_theta is None:
            vision += v.grid_size**2 * v.hidden_dim
        proj = v.hidden_dim * self.projector.pixel_shuffle_factor**2 * l.hidden_dim
        attn = l.hidden_dim * l.head_dim * (2 * l.n_heads + 2 * l.n_kv_heads)
        language = l.n_layers * (attn + 3 * l.hidden_dim * l.intermediate_dim)
        language += l.total_vocab_size * l.hidden_dim * (1 if l.tie_embeddings else 2)
        return vision + proj + language
