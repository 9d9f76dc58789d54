"""Weight conversion: official 3DSAM-adapter training snapshots into this package's layout.

Every conversion returns a [`ConversionReport`] that accounts for each source tensor: copied as is, transformed
(axis permutation, channel sum, reshape), newly initialised in the target, or ignored (with the reason).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch

from .configuration_sam3d import Sam3DConfig
from .modeling_sam3d import Sam3DForPromptableSegmentation

logger = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """What a conversion did with every tensor. Keys are `source -> target` for copied/transformed ones."""

    copied: list[str] = field(default_factory=list)
    transformed: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"copied: {len(self.copied)} tensors",
            f"transformed (permuted / summed / reshaped / inflated): {len(self.transformed)} tensors",
            f"newly initialised: {len(self.initialized)} tensors",
            f"ignored from the source: {len(self.ignored)} tensors",
        ]
        lines += [f"  ignored {key}: {why}" for key, why in sorted(self.ignored.items())]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "copied": self.copied,
            "transformed": self.transformed,
            "initialized": self.initialized,
            "ignored": self.ignored,
        }


def _kernel_dhw(kernel: torch.Tensor) -> torch.Tensor:
    """Official 3D kernels are `(out, in, kH, kW, kD)`; this package's are `(out, in, kD, kH, kW)`."""
    return kernel.permute(0, 1, 4, 2, 3).contiguous()


# (official key pattern, target key template, transform name); patterns are matched in full.
_ENCODER_RULES = [
    (r"pos_embed", "vision_encoder.pos_embed", None),
    (r"depth_embed", "vision_encoder.depth_embed", None),
    (r"patch_embed\.proj\.weight", "vision_encoder.patch_embed.projection_weight", "sum_rgb"),
    (r"patch_embed\.proj\.bias", "vision_encoder.patch_embed.projection_bias", None),
    (r"slice_embed\.weight", "vision_encoder.patch_embed.depth_weight", "depth_taps"),
    (r"slice_embed\.bias", "vision_encoder.patch_embed.depth_bias", None),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision_encoder.layers.\1.layer_norm\2.\3", None),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"vision_encoder.layers.\1.attn.\2.\3", None),
    (r"blocks\.(\d+)\.attn\.(rel_pos_[dhw])", r"vision_encoder.layers.\1.attn.\2", None),
    (r"blocks\.(\d+)\.attn\.lr", r"vision_encoder.layers.\1.attn.rel_pos_scale", None),
    (r"blocks\.(\d+)\.mlp\.(lin[12])\.(weight|bias)", r"vision_encoder.layers.\1.mlp.\2.\3", None),
    (r"blocks\.(\d+)\.adapter\.(linear[12])\.(weight|bias)", r"vision_encoder.layers.\1.adapter.\2.\3", None),
    (r"blocks\.(\d+)\.adapter\.conv\.weight", r"vision_encoder.layers.\1.adapter.conv.weight", "kernel"),
    (r"blocks\.(\d+)\.adapter\.conv\.bias", r"vision_encoder.layers.\1.adapter.conv.bias", None),
    (r"neck_3d\.(\d)\.0\.weight", r"vision_encoder.necks.\1.conv1.weight", "kernel"),
    (r"neck_3d\.(\d)\.1\.(weight|bias)", r"vision_encoder.necks.\1.layer_norm1.\2", None),
    (r"neck_3d\.(\d)\.2\.weight", r"vision_encoder.necks.\1.conv2.weight", "kernel"),
    (r"neck_3d\.(\d)\.3\.(weight|bias)", r"vision_encoder.necks.\1.layer_norm2.\2", None),
]
_PROMPT_RULES = [
    (r"transformer\.layers\.(\d+)\.global_query", r"prompt_encoder.layers.\1.global_query", None),
    (
        r"transformer\.layers\.(\d+)\.(self_attn|cross_attn_image_to_token)\.([qkv]_proj|out_proj)\.(weight|bias)",
        r"prompt_encoder.layers.\1.\2.\3.\4",
        None,
    ),
    (r"transformer\.layers\.(\d+)\.norm([1-4])\.(weight|bias)", r"prompt_encoder.layers.\1.layer_norm\2.\3", None),
    (r"transformer\.layers\.(\d+)\.mlp\.(lin[12])\.(weight|bias)", r"prompt_encoder.layers.\1.mlp.\2.\3", None),
]
_DECODER_RULES = [
    (r"mlahead\.head2\.([03])\.weight", r"mask_decoder.heads.0.\1.weight", "kernel"),
    (r"mlahead\.head3\.([03])\.weight", r"mask_decoder.heads.1.\1.weight", "kernel"),
    (r"mlahead\.head4\.([03])\.weight", r"mask_decoder.heads.2.\1.weight", "kernel"),
    (r"mlahead\.head5\.([03])\.weight", r"mask_decoder.heads.3.\1.weight", "kernel"),
    (r"cls\.([03])\.weight", r"mask_decoder.fuse.\1.weight", "kernel"),
]
# Tensors the official forward never uses, or buffers this package recomputes.
_OFFICIAL_UNUSED = [
    (r"blocks\.\d+\.attn_mask", "shift-window mask buffer, recomputed from the grid"),
    (r".*cross_attn_token_to_image\..*", "the official prompt module builds this block but its forward never uses it"),
    (r".*positional_encoding_gaussian_matrix", "Fourier positional matrix the official forward never uses"),
]
_TRANSFORMS = {
    None: lambda t: t,
    "kernel": _kernel_dhw,
    "sum_rgb": lambda t: t.sum(dim=1, keepdim=True),  # 3 identical input channels == the summed kernel on 1 channel
    "depth_taps": lambda t: t.reshape(t.shape[0], -1),  # (C, 1, 1, 1, 16) -> (C, 16)
}


def _map_section(section: str, tensors: dict, rules, report: ConversionReport, out: dict) -> None:
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{section}[{key!r}] is a {type(tensor).__name__}, expected a tensor")
        for pattern, template, transform in rules:
            match = re.fullmatch(pattern, key)
            if match:
                target = match.expand(template)
                out[target] = _TRANSFORMS[transform](tensor.detach().float())
                (report.transformed if transform else report.copied).append(f"{section}.{key} -> {target}")
                break
        else:
            why = next((why for pattern, why in _OFFICIAL_UNUSED if re.fullmatch(pattern, key)), None)
            if why is None:
                raise ValueError(
                    f"{section} has a tensor {key!r} {tuple(tensor.shape)} that is not part of the official "
                    "3DSAM-adapter layout (see ARCHITECTURE.md 'Official checkpoint layout'); is this the right file?"
                )
            report.ignored[f"{section}.{key}"] = why


def config_from_official(encoder_dict: dict, prompt_dict: dict, decoder_dict: dict, **overrides) -> Sam3DConfig:
    """Infer the sizes of an official snapshot from its tensors (heads are not stored: 64-wide heads, 8 prompt
    heads, as in the official code; override through `vision_config={...}` etc. if yours differ)."""
    hidden = encoder_dict["pos_embed"].shape[-1]
    blocks = sorted({int(k.split(".")[1]) for k in encoder_dict if k.startswith("blocks.")})
    rows = {i: encoder_dict[f"blocks.{i}.attn.rel_pos_h"].shape[0] for i in blocks}
    head_dim = encoder_dict["blocks.0.attn.rel_pos_h"].shape[1]
    pos_size = encoder_dict["pos_embed"].shape[1]
    windowed = [r for r in rows.values() if r != 2 * pos_size - 1]
    vision = {
        "hidden_size": hidden,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": hidden // head_dim,
        "mlp_dim": encoder_dict["blocks.0.mlp.lin1.weight"].shape[0],
        "patch_size": encoder_dict["patch_embed.proj.weight"].shape[-1],
        "sam_image_size": pos_size * encoder_dict["patch_embed.proj.weight"].shape[-1],
        "depth_embed_size": encoder_dict["depth_embed"].shape[1],
        "sam_window_size": (windowed[0] + 1) // 2 if windowed else 14,
        "global_attn_indexes": [i for i, r in rows.items() if r == 2 * pos_size - 1],
        "adapter_dim": encoder_dict["blocks.0.adapter.linear1.weight"].shape[0],
        "output_channels": encoder_dict["neck_3d.0.0.weight"].shape[0],
    }
    layers = sorted({int(k.split(".")[2]) for k in prompt_dict if k.startswith("transformer.layers.")})
    query = prompt_dict["transformer.layers.0.global_query"]
    prompt = {
        "hidden_size": query.shape[-1],
        "num_hidden_layers": len(layers),
        "num_global_queries": query.shape[1],
        "mlp_dim": prompt_dict["transformer.layers.0.mlp.lin1.weight"].shape[0],
        "attention_downsample_rate": query.shape[-1]
        // prompt_dict["transformer.layers.0.cross_attn_image_to_token.q_proj.weight"].shape[0],
    }
    decoder = {"hidden_size": decoder_dict["mlahead.head2.0.weight"].shape[0]}
    for name, values in (
        ("vision_config", vision),
        ("prompt_encoder_config", prompt),
        ("mask_decoder_config", decoder),
    ):
        values.update(overrides.pop(name, {}))
    return Sam3DConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, **overrides)


def convert_official_state_dicts(
    encoder_dict: dict, prompt_dict: dict, decoder_dict: dict, config: Sam3DConfig | None = None
) -> tuple[Sam3DForPromptableSegmentation, ConversionReport]:
    """Build a model from the three state dicts of an official snapshot (`encoder_dict`, `feature_dict[3]`,
    `decoder_dict`), in float32. Raises if a model tensor has no source or a source tensor is unknown."""
    report = ConversionReport()
    state_dict: dict[str, torch.Tensor] = {}
    _map_section("encoder_dict", encoder_dict, _ENCODER_RULES, report, state_dict)
    _map_section("feature_dict[3]", prompt_dict, _PROMPT_RULES, report, state_dict)
    _map_section("decoder_dict", decoder_dict, _DECODER_RULES, report, state_dict)
    config = config or config_from_official(encoder_dict, prompt_dict, decoder_dict)
    model = Sam3DForPromptableSegmentation(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(f"the official snapshot lacks {len(missing)} tensors of the model, e.g. {missing[:5]}")
    wrong = [
        (k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items() if v.shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(f"shape mismatch (key, official, expected): {wrong[:5]}")
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), report


def load_official_checkpoint(
    path: str | os.PathLike, **config_overrides
) -> tuple[Sam3DForPromptableSegmentation, ConversionReport]:
    """Read an official `*.pth.tar` training snapshot (safely: `weights_only=True`) and convert it."""
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler refuses anything but tensors and plain containers
        raise ValueError(f"could not read {path} as a tensor-only PyTorch checkpoint: {error}") from error
    needed = ("encoder_dict", "feature_dict", "decoder_dict")
    if not isinstance(snapshot, dict) or any(k not in snapshot for k in needed):
        found = sorted(snapshot) if isinstance(snapshot, dict) else type(snapshot).__name__
        raise ValueError(f"{path} is not an official 3DSAM-adapter snapshot: expected keys {needed}, found {found}")
    features = snapshot["feature_dict"]
    if not isinstance(features, (list, tuple)) or len(features) != 4:
        raise ValueError(f"feature_dict must be a list of 4 prompt-module state dicts, got {type(features).__name__}")
    config = None
    if config_overrides:
        config = config_from_official(
            snapshot["encoder_dict"], features[3], snapshot["decoder_dict"], **config_overrides
        )
    model, report = convert_official_state_dicts(
        snapshot["encoder_dict"], features[3], snapshot["decoder_dict"], config
    )
    for index in range(3):
        report.ignored[f"feature_dict[{index}]"] = "prompt modules 0-2 are never used by the official forward"
    for key in sorted(set(snapshot) - set(needed)):
        report.ignored[key] = "training state (optimiser, epoch, ...), not weights"
    return model, report


__all__ = ["ConversionReport", "config_from_official", "convert_official_state_dicts", "load_official_checkpoint"]
