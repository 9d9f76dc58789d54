"""Configuration of the 3DSAM-adapter model (Gong et al.), in transformers style.

Every spatial size is a `(depth, height, width)` tuple from here on; an int given to a config is expanded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from transformers import PretrainedConfig


def _as_3tuple(name: str, value: int | Sequence[int]) -> tuple[int, int, int]:
    """Normalise an int or a 3-sequence to a `(depth, height, width)` tuple of positive ints."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a (depth, height, width) sequence, got {value!r}")
    if isinstance(value, int):
        value = (value, value, value)
    try:
        values = tuple(int(v) for v in value)
    except TypeError as error:
        raise TypeError(f"{name} must be an int or a (depth, height, width) sequence, got {value!r}") from error
    if len(values) != 3 or any(v <= 0 for v in values) or any(int(v) != v for v in value):
        raise ValueError(f"{name} must be 3 positive ints (depth, height, width), got {value!r}")
    return values


class Sam3DVisionConfig(PretrainedConfig):
    r"""Configuration of the 3D image encoder: SAM's 2D ViT with spatial adapters, 3D windows and multi-level necks.

    Args:
        hidden_size (`int`, defaults to 768): token width (ViT-B 768, ViT-L 1024, ViT-H 1280).
        num_hidden_layers (`int`, defaults to 12): number of transformer blocks.
        num_attention_heads (`int`, defaults to 12): attention heads per block.
        mlp_dim (`int`, defaults to 3072): hidden width of each block's MLP (4 x hidden_size in SAM).
        num_channels (`int`, defaults to 1): input channels; SAM's RGB kernel is summed to one channel (exact).
        patch_size (`int`, defaults to 16): SAM's 2D patch kernel size (stored at 16 taps, folded at run time).
        token_stride (`int`, defaults to 4): voxels per token along each axis: the official model upsamples a patch by
            `patch_size / token_stride` and runs SAM's stride-16 kernel, always giving a 32³ token grid at its
            training size (x4 at 128³, the prompted model; x2 at 256³, the prompt-free model of `train_auto.py`,
            `token_stride=8`). An even divisor of `patch_size`; the decoder upsamples by `token_stride / 2` at its end.
        image_size (`int` or `(D, H, W)`, defaults to 128): the patch size the model is trained at.
        sam_image_size (`int`, defaults to 1024): SAM's input size; its position table has `sam_image_size /
            patch_size` rows and columns (64 for SAM).
        depth_embed_size (`int`, defaults to 32): rows of the learned depth position table.
        window_size (`int` or `(D, H, W)`, defaults to 8): 3D attention window, in tokens.
        shift_size (`int` or `(D, H, W)`, defaults to 4): cyclic shift of the even blocks, in tokens.
        sam_window_size (`int`, defaults to 14): SAM's 2D window, which sets the relative-position table length
            `2 * sam_window_size - 1` of SAM's windowed blocks.
        global_attn_indexes (`list[int]`, defaults to `[2, 5, 8, 11]`): SAM's global-attention blocks; here they only
            differ by their relative-position table length `2 * sam_image_size / patch_size - 1`.
        feature_indexes (`list[int]`, *optional*): the 4 blocks, strictly increasing, after which a neck taps a level;
            defaults to the last block of every quarter (`[2, 5, 8, 11]` at 12 blocks).
        adapter_dim (`int`, defaults to 384): bottleneck width of the spatial adapters.
        adapter_layers (`list[int]`, *optional*): blocks that have a spatial adapter; `None` (default) means every
            block, `[]` none (e.g. for LoRA or full fine-tuning baselines).
        output_channels (`int`, defaults to 256): channels of each neck output.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of the block and neck LayerNorms.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact erf GELU).
        qkv_bias (`bool`, defaults to `True`): bias on the qkv projection.
        attention_chunk_size (`int`, defaults to 16): windows per attention call of the `"eager"` implementation;
            bounds its dense bias memory (`chunk * heads * 512 * 512` floats) without changing results. The default
            implementation builds no dense bias and sizes its chunks itself.
        initializer_range (`float`, defaults to 0.02): std of the normal initialisation of new weights.
    """

    model_type = "sam3d_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_dim: int = 3072,
        num_channels: int = 1,
        patch_size: int = 16,
        token_stride: int = 4,
        image_size: int | Sequence[int] = 128,
        sam_image_size: int = 1024,
        depth_embed_size: int = 32,
        window_size: int | Sequence[int] = 8,
        shift_size: int | Sequence[int] = 4,
        sam_window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        feature_indexes: Sequence[int] | None = None,
        adapter_dim: int = 384,
        adapter_layers: Sequence[int] | None = None,
        output_channels: int = 256,
        layer_norm_eps: float = 1e-6,
        hidden_act: str = "gelu",
        qkv_bias: bool = True,
        attention_chunk_size: int = 16,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_dim = mlp_dim
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.token_stride = token_stride
        self.image_size = _as_3tuple("image_size", image_size)
        self.sam_image_size = sam_image_size
        self.depth_embed_size = depth_embed_size
        self.window_size = _as_3tuple("window_size", window_size)
        self.shift_size = _as_3tuple("shift_size", shift_size)
        self.sam_window_size = sam_window_size
        self.global_attn_indexes = [int(i) for i in global_attn_indexes]
        if feature_indexes is None:
            # One level after every quarter of the blocks: (2, 5, 8, 11) at ViT-B.
            quarter = num_hidden_layers // 4
            feature_indexes = [quarter * (k + 1) - 1 for k in range(4)]
        self.feature_indexes = [int(i) for i in feature_indexes]
        self.adapter_dim = adapter_dim
        self.adapter_layers = None if adapter_layers is None else sorted(int(i) for i in adapter_layers)
        self.output_channels = output_channels
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.qkv_bias = qkv_bias
        self.attention_chunk_size = attention_chunk_size
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self._validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pos_embed_size(self) -> int:
        """Rows/columns of SAM's in-plane position table (64 for SAM)."""
        return self.sam_image_size // self.patch_size

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Token grid `(D', H', W')` of a patch of `image_size`."""
        return tuple(s // self.token_stride for s in self.image_size)

    def has_adapter(self, layer_index: int) -> bool:
        return self.adapter_layers is None or layer_index in self.adapter_layers

    def rel_pos_size(self, layer_index: int) -> int:
        """Length `2R - 1` of block `layer_index`'s relative-position tables, as stored in SAM."""
        size = self.pos_embed_size if layer_index in self.global_attn_indexes else self.sam_window_size
        return 2 * size - 1

    def _validate(self) -> None:
        positive = {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "mlp_dim": self.mlp_dim,
            "num_channels": self.num_channels,
            "patch_size": self.patch_size,
            "token_stride": self.token_stride,
            "sam_image_size": self.sam_image_size,
            "depth_embed_size": self.depth_embed_size,
            "sam_window_size": self.sam_window_size,
            "adapter_dim": self.adapter_dim,
            "output_channels": self.output_channels,
            "attention_chunk_size": self.attention_chunk_size,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Sam3DVisionConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.patch_size % self.token_stride or self.token_stride % 2:
            raise ValueError(
                f"token_stride ({self.token_stride}) must be an even divisor of patch_size ({self.patch_size}): the x"
                f"(patch_size / token_stride) upsampling followed by a stride-{self.patch_size} kernel must give one "
                f"token per token_stride voxels, and the decoder upsamples by token_stride / 2"
            )
        if any(s % self.token_stride for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be divisible by token_stride {self.token_stride}")
        if any(not 0 <= s < w for s, w in zip(self.shift_size, self.window_size, strict=True)):
            raise ValueError(f"shift_size {self.shift_size} must lie in [0, window_size) for window {self.window_size}")
        for name in ("global_attn_indexes", "feature_indexes", "adapter_layers"):
            bad = [i for i in getattr(self, name) or [] if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(
                    f"{name} {getattr(self, name)} has block indices {bad} outside [0, {self.num_hidden_layers})"
                )
        levels = self.feature_indexes
        if len(levels) != 4 or any(low >= high for low, high in pairwise(levels)):
            raise ValueError(
                f"feature_indexes must be 4 strictly increasing block indices (one block per level), got {levels}; "
                f"e.g. {[3 * (k + 1) - 1 for k in range(4)]} for 12 blocks"
            )


class Sam3DPromptEncoderConfig(PretrainedConfig):
    r"""Configuration of the prompt encoder (visual sampler + learned global queries).

    Args:
        hidden_size (`int`, defaults to 256): channels of the image map it refines (the vision `output_channels`).
        num_hidden_layers (`int`, defaults to 2): prompt-encoder layers, each with its own global queries.
        num_attention_heads (`int`, defaults to 8): heads of the self- and image-to-token attention.
        num_global_queries (`int`, defaults to 10): learned queries per layer.
        mlp_dim (`int`, defaults to 2048): hidden width of the query MLP.
        attention_downsample_rate (`int`, defaults to 2): the image-to-token attention projects to
            `hidden_size / attention_downsample_rate` channels.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of its LayerNorms.
        use_point_labels (`bool`, defaults to `False`): add a learned embedding for positive (1) / negative (0)
            clicks. The official model has no labels (every click is alike); keep `False` for parity with it.
    """

    model_type = "sam3d_prompt_encoder"
    base_config_key = "prompt_encoder_config"

    def __init__(
        self,
        hidden_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 8,
        num_global_queries: int = 10,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        layer_norm_eps: float = 1e-5,
        use_point_labels: bool = False,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_global_queries = num_global_queries
        self.mlp_dim = mlp_dim
        self.attention_downsample_rate = attention_downsample_rate
        self.layer_norm_eps = layer_norm_eps
        self.use_point_labels = use_point_labels
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_global_queries", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Sam3DPromptEncoderConfig.{name} must be a positive int, got {value!r}")
        inner = hidden_size // max(attention_downsample_rate, 1)
        if attention_downsample_rate <= 0 or hidden_size % attention_downsample_rate or inner % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) / attention_downsample_rate ({attention_downsample_rate}) must be a "
                f"positive int divisible by num_attention_heads ({num_attention_heads})"
            )


class Sam3DMaskDecoderConfig(PretrainedConfig):
    r"""Configuration of the multi-level aggregation decoder.

    Args:
        hidden_size (`int`, defaults to 128): channels of each level head and of the fused convolution.
        num_labels (`int`, defaults to 2): output classes (background, foreground).
        use_mask_prompt (`bool`, defaults to `False`): the decoder also takes the previous prediction of the patch
            (`input_masks`, foreground probabilities) through a zero-initialised convolution into its fused
            convolution, so that corrections build on what was predicted. Not in the official model; a model with it
            and no mask given computes what the same weights compute without it.
        click_sigma (`float`, defaults to 3.0): with the mask prompt, the clicks also reach the decoder as Gaussian
            maps of this standard deviation, in patch voxels.
    """

    model_type = "sam3d_mask_decoder"
    base_config_key = "mask_decoder_config"

    def __init__(
        self,
        hidden_size: int = 128,
        num_labels: int = 2,
        initializer_range: float = 0.02,
        use_mask_prompt: bool = False,
        click_sigma: float = 3.0,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.initializer_range = initializer_range
        if not isinstance(use_mask_prompt, bool):
            raise ValueError(f"Sam3DMaskDecoderConfig.use_mask_prompt must be a bool, got {use_mask_prompt!r}")
        self.use_mask_prompt = use_mask_prompt
        if isinstance(click_sigma, bool) or not isinstance(click_sigma, (int, float)) or not click_sigma > 0:
            raise ValueError(f"Sam3DMaskDecoderConfig.click_sigma must be a positive number, got {click_sigma!r}")
        self.click_sigma = float(click_sigma)
        super().__init__(num_labels=num_labels, **kwargs)
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"Sam3DMaskDecoderConfig.hidden_size must be a positive int, got {hidden_size!r}")
        if self.num_labels != 2:
            raise ValueError(
                f"Sam3DMaskDecoderConfig.num_labels must be 2 (background, foreground), got {self.num_labels}"
            )


# SAM's sizes (segment_anything/build_sam.py): width, depth, heads, global-attention blocks.
SAM_PRESETS = {
    "vit_b": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
    "vit_l": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "global_attn_indexes": [5, 11, 17, 23],
    },
    "vit_h": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
    },
}
# A model small enough to train on a CPU in minutes (the demo, the tests, the benchmarks' small case) that still runs
# every code path: 4 blocks, 0 and 2 shifted, 1 and 3 with SAM's long ("global") relative-position tables, all four
# levels tapped; the 16x16 position table is pooled and the 8-row depth table resized for most patch sizes, and the
# 8^3 windows are padded unless the token grid is a multiple of 8. Its weights are random: there is no tiny SAM.
TINY_PRESET = {
    "vision_config": {
        "hidden_size": 48,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "mlp_dim": 96,
        "adapter_dim": 16,
        "output_channels": 32,
        "sam_image_size": 256,
        "sam_window_size": 4,
        "global_attn_indexes": [1, 3],
        "depth_embed_size": 8,
    },
    "prompt_encoder_config": {"hidden_size": 32, "num_attention_heads": 2, "mlp_dim": 64},
    "mask_decoder_config": {"hidden_size": 16},
}
CONFIG_PRESETS = ("tiny", *SAM_PRESETS)


class Sam3DConfig(PretrainedConfig):
    r"""Configuration of [`Sam3DForPromptableSegmentation`]; the default is the paper's SAM ViT-B model at 128³.

    Args:
        vision_config (`dict` or [`Sam3DVisionConfig`], *optional*): the 3D image encoder.
        prompt_encoder_config (`dict` or [`Sam3DPromptEncoderConfig`], *optional*): the point prompt encoder.
        mask_decoder_config (`dict` or [`Sam3DMaskDecoderConfig`], *optional*): the mask decoder.
        use_prompt_encoder (`bool`, defaults to `True`): `False` builds the prompt-free model of the paper's Table 3
            (the official `train_auto.py`): no prompt encoder, the decoder takes the last level unchanged, the model
            takes no clicks and segments each window by itself (sliding-window inference).

    Example:
    ```python
    >>> from sam3d_hf import Sam3DConfig
    >>> config = Sam3DConfig.from_sam_preset("vit_l", vision_config={"image_size": (64, 128, 128)})
    >>> config.vision_config.image_size
    (64, 128, 128)
    ```
    """

    model_type = "sam3d"
    sub_configs = {
        "vision_config": Sam3DVisionConfig,
        "prompt_encoder_config": Sam3DPromptEncoderConfig,
        "mask_decoder_config": Sam3DMaskDecoderConfig,
    }

    def __init__(
        self,
        vision_config: dict | Sam3DVisionConfig | None = None,
        prompt_encoder_config: dict | Sam3DPromptEncoderConfig | None = None,
        mask_decoder_config: dict | Sam3DMaskDecoderConfig | None = None,
        initializer_range: float = 0.02,
        use_prompt_encoder: bool = True,
        **kwargs,
    ):
        if not isinstance(use_prompt_encoder, bool):
            raise TypeError(f"use_prompt_encoder must be True or False, got {use_prompt_encoder!r}")
        self.use_prompt_encoder = use_prompt_encoder
        self.vision_config = self._sub_config("vision_config", vision_config)
        self.prompt_encoder_config = self._sub_config("prompt_encoder_config", prompt_encoder_config)
        self.mask_decoder_config = self._sub_config("mask_decoder_config", mask_decoder_config)
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        if self.vision_config.output_channels != self.prompt_encoder_config.hidden_size:
            raise ValueError(
                f"vision_config.output_channels ({self.vision_config.output_channels}) must equal "
                f"prompt_encoder_config.hidden_size ({self.prompt_encoder_config.hidden_size}): the prompt encoder "
                "refines the last encoder level in place"
            )

    def _sub_config(self, name: str, value):
        cls = self.sub_configs[name]
        if value is None:
            return cls()
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, cls):
            return value
        raise TypeError(f"{name} must be a dict or a {cls.__name__}, got {type(value).__name__}")

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> Sam3DConfig:
        """A named configuration: SAM's `vit_b` (the paper's model), `vit_l`, `vit_h`, or `tiny` (`TINY_PRESET`, for
        CPU runs and tests). A sub-config dict in `kwargs` (`vision_config={"image_size": (64, 128, 128)}`) updates
        the preset's entries of that sub-config; other keywords are `Sam3DConfig` arguments."""
        if name == "tiny":
            values = {key: dict(value) for key, value in TINY_PRESET.items()}
        elif name in SAM_PRESETS:
            vision = dict(SAM_PRESETS[name])
            vision["mlp_dim"] = 4 * vision["hidden_size"]
            values = {"vision_config": vision}
        else:
            raise ValueError(f"Unknown preset {name!r}; expected one of {list(CONFIG_PRESETS)}")
        for key in cls.sub_configs:
            override = kwargs.pop(key, None) or {}
            if not isinstance(override, dict):
                raise TypeError(f"{key} override must be a dict, got {type(override).__name__}")
            values[key] = {**values.get(key, {}), **override}
        return cls(**values, **kwargs)

    @classmethod
    def from_sam_preset(cls, name: str, **kwargs) -> Sam3DConfig:
        """[`from_preset`] for SAM's sizes `vit_b`, `vit_l`, `vit_h` only (what a SAM checkpoint can initialise)."""
        if name not in SAM_PRESETS:
            raise ValueError(f"Unknown SAM preset {name!r}; expected one of {sorted(SAM_PRESETS)}")
        return cls.from_preset(name, **kwargs)


# Saved folders carry the code and an `auto_map`, so they also load with `trust_remote_code=True` without this package.
Sam3DConfig.register_for_auto_class()

__all__ = [
    "CONFIG_PRESETS",
    "SAM_PRESETS",
    "TINY_PRESET",
    "Sam3DConfig",
    "Sam3DMaskDecoderConfig",
    "Sam3DPromptEncoderConfig",
    "Sam3DVisionConfig",
]
