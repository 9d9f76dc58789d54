"""Weight conversion into this package's layout, from two sources:

- Meta's SAM 2D checkpoints (the paper's initialisation): the original `segment_anything` `.pth` (`image_encoder.*`
  keys) or a transformers `SamModel` folder / Hub id / `.safetensors` file (`vision_encoder.*` keys), inflated to 3D
  as docs/design.md "Initialisation from SAM and what is trained" says: [`load_sam_checkpoint`],
  [`convert_sam_state_dict`];
- official 3DSAM-adapter training snapshots (`*.pth.tar`): [`load_official_checkpoint`],
  [`convert_official_state_dicts`].

Every conversion returns a [`ConversionReport`] that accounts for each tensor: every target tensor is copied,
transformed (axis permutation, channel sum, reshape, inflation) or newly initialised, and every source tensor is
either used by a copied/transformed target or ignored with the reason. Nothing is dropped silently. Pickles are only
ever read with `torch.load(..., weights_only=True)`; [`save_converted`] writes safetensors + JSON, atomically
(`sam3d_hf.files`). The official layout and its axis permutations: docs/design.md "Official checkpoint layout".

The models are built from their config through transformers' registry (`AutoModel.from_config`, where `sam3d_hf`
registers `Sam3DForPromptableSegmentation` for `Sam3DConfig`), so this module does not import the modeling module,
which reaches it for `Sam3DForPromptableSegmentation.from_sam_pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from transformers import AutoModel, PreTrainedModel

from .configuration_sam3d import SAM_PRESETS, Sam3DConfig
from .files import staged_folder, write_json

logger = logging.getLogger(__name__)

# Where error messages send the user: docs/design.md is in the source repository and installed with the package.
_LAYOUT_DOC = "docs/design.md 'Official checkpoint layout' (installed with the package as sam3d_hf/docs/design.md)"


@dataclass
class ConversionReport:
    """What a conversion did with every tensor.

    `copied` and `transformed` hold `"source -> target"` lines (a derived target names all its sources, e.g.
    `"0.5 * (a + b) -> rel_pos_d"`), `initialized` holds target keys that got the model's fresh initialisation, and
    `ignored` maps each unused source tensor (or source section) to the reason. `sources` maps every copied or
    transformed target key to the source keys it was computed from, so that the accounting can be checked: every
    target key is in exactly one of `copied` / `transformed` / `initialized`, and every source key is either used (in
    `sources`) or `ignored`, never both. `details` records what was detected (format, size).
    """

    copied: list[str] = field(default_factory=list)
    transformed: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    _how: dict[str, int] = field(default_factory=dict, repr=False)  # transformation template -> count, for summary

    def add(self, sources: list[str], target: str, how: str | None = None, kind: str | None = None) -> None:
        """Record `target` as computed from `sources`: copied as is if `how` is None, else transformed by `how` (a
        template formatted with the sources); `kind` names the transformation in the summary (default: `how`)."""
        assert target not in self.sources, f"{target} converted twice"
        self.sources[target] = list(sources)
        if how is None:
            self.copied.append(f"{sources[0]} -> {target}")
        else:
            self.transformed.append(f"{how.format(*sources)} -> {target}")
            kind = kind or how.replace(" of {0}", "")
            self._how[kind] = self._how.get(kind, 0) + 1

    def used_sources(self) -> set[str]:
        return {source for sources in self.sources.values() for source in sources}

    def summary(self) -> str:
        lines = [f"{key}: {value}" for key, value in self.details.items()]
        lines += [
            f"copied: {len(self.copied)} tensors",
            f"transformed (permuted / summed / reshaped / inflated): {len(self.transformed)} tensors",
            f"newly initialised: {len(self.initialized)} tensors",
            f"ignored from the source: {len(self.ignored)} entries",
        ]
        lines += [f"  {count} x {kind}" for kind, count in self._how.items()]
        reasons: dict[str, list[str]] = {}
        for key, why in sorted(self.ignored.items()):
            reasons.setdefault(why, []).append(key)
        for why, keys in reasons.items():
            example = keys[0] if len(keys) == 1 else f"{len(keys)} entries, e.g. {keys[0]}"
            lines.append(f"  ignored {example}: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "details": self.details,
            "copied": self.copied,
            "transformed": self.transformed,
            "initialized": self.initialized,
            "ignored": self.ignored,
            "sources": self.sources,
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
_DESCRIPTIONS = {
    None: None,
    "kernel": "permute (H, W, D) -> (D, H, W) of {0}",
    "sum_rgb": "sum over RGB of {0}",
    "depth_taps": "reshape (C, 1, 1, 1, 16) -> (C, 16) of {0}",
}
_TRANSFORMS = {
    None: lambda t: t,
    "kernel": _kernel_dhw,
    "sum_rgb": lambda t: t.sum(dim=1, keepdim=True),  # 3 identical input channels == the summed kernel on 1 channel
    "depth_taps": lambda t: t.reshape(t.shape[0], -1),  # (C, 1, 1, 1, 16) -> (C, 16)
}


def _require_state_dict(section: str, value: object) -> None:
    if not isinstance(value, dict):
        raise ValueError(
            f"{section} is a {type(value).__name__}, expected a state dict (names -> tensors); is this an official "
            f"3DSAM-adapter snapshot? (see {_LAYOUT_DOC})"
        )


def _map_section(section: str, tensors: dict, rules, report: ConversionReport, out: dict) -> None:
    _require_state_dict(section, tensors)
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{section}[{key!r}] is a {type(tensor).__name__}, expected a tensor")
        for pattern, template, transform in rules:
            match = re.fullmatch(pattern, key)
            if match:
                target = match.expand(template)
                out[target] = _TRANSFORMS[transform](tensor.detach().float())
                report.add([f"{section}.{key}"], target, _DESCRIPTIONS[transform])
                break
        else:
            why = next((why for pattern, why in _OFFICIAL_UNUSED if re.fullmatch(pattern, key)), None)
            if why is None:
                raise ValueError(
                    f"{section} has a tensor {key!r} {tuple(tensor.shape)} that is not part of the official "
                    f"3DSAM-adapter layout (see {_LAYOUT_DOC}); is this the right file?"
                )
            report.ignored[f"{section}.{key}"] = why


def _official_sizes(encoder_dict: dict, prompt_dict: dict | None, decoder_dict: dict) -> tuple[dict, dict, dict]:
    """The sub-config values an official snapshot's tensors determine (raises KeyError & co. on a malformed one).
    A size that several tensors carry (one per block, layer, neck or head) is their most common value, so that one
    damaged or missing tensor is reported as such rather than making all the others look wrong. `prompt_dict` is
    None for a prompt-free (`train_auto.py`) snapshot, whose prompt sub-config is then the default."""
    blocks = sorted({int(k.split(".")[1]) for k in encoder_dict if k.startswith("blocks.")})
    layers = sorted({int(k.split(".")[2]) for k in prompt_dict or {} if k.startswith("transformer.layers.")})

    def size(section: dict, keys: list[str], axis: int) -> int:
        return Counter(section[key].shape[axis] for key in keys if key in section).most_common(1)[0][0]

    def per_block(name: str) -> list[str]:
        return [f"blocks.{i}.{name}" for i in blocks]

    def per_layer(name: str) -> list[str]:
        return [f"transformer.layers.{i}.{name}" for i in layers]

    hidden = size(encoder_dict, ["pos_embed", *per_block("norm1.weight")], -1)
    rows = {i: encoder_dict[f"blocks.{i}.attn.rel_pos_h"].shape[0] for i in blocks}
    head_dim = size(encoder_dict, per_block("attn.rel_pos_h"), 1)
    pos_size = encoder_dict["pos_embed"].shape[1]
    patch_size = encoder_dict["patch_embed.proj.weight"].shape[-1]
    windowed = [r for r in rows.values() if r != 2 * pos_size - 1]
    vision = {
        "hidden_size": hidden,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": hidden // head_dim,
        "mlp_dim": size(encoder_dict, per_block("mlp.lin1.weight"), 0),
        "patch_size": patch_size,
        "sam_image_size": pos_size * patch_size,
        "depth_embed_size": encoder_dict["depth_embed"].shape[1],
        "sam_window_size": (windowed[0] + 1) // 2 if windowed else 14,
        "global_attn_indexes": [i for i, r in rows.items() if r == 2 * pos_size - 1],
        "adapter_dim": size(encoder_dict, per_block("adapter.linear1.weight"), 0),
        "output_channels": size(encoder_dict, [f"neck_3d.{k}.0.weight" for k in range(4)], 0),
    }
    decoder = {"hidden_size": size(decoder_dict, [f"mlahead.head{k}.0.weight" for k in range(2, 6)], 0)}
    if prompt_dict is None:
        return vision, {"hidden_size": vision["output_channels"]}, decoder
    prompt_hidden = size(prompt_dict, per_layer("global_query"), -1)
    prompt = {
        "hidden_size": prompt_hidden,
        "num_hidden_layers": len(layers),
        "num_global_queries": size(prompt_dict, per_layer("global_query"), 1),
        "mlp_dim": size(prompt_dict, per_layer("mlp.lin1.weight"), 0),
        "attention_downsample_rate": prompt_hidden
        // size(prompt_dict, per_layer("cross_attn_image_to_token.q_proj.weight"), 0),
    }
    return vision, prompt, decoder


# train_auto.py trains the prompt-free model on 256³ crops, upsampled x2 (not x4) so that the encoder sees 32³ tokens.
AUTOMATIC_SNAPSHOT_DEFAULTS = {"use_prompt_encoder": False, "vision_config": {"image_size": 256, "token_stride": 8}}


def config_from_official(encoder_dict: dict, prompt_dict: dict | None, decoder_dict: dict, **overrides) -> Sam3DConfig:
    """Infer the sizes of an official snapshot from its tensors (heads are not stored: 64-wide heads, 8 prompt
    heads, as in the official code; override through `vision_config={...}` etc. if yours differ). A prompt-free
    snapshot (`prompt_dict=None`, `train_auto.py`) gives `use_prompt_encoder=False` at that script's 256³ crops and
    token stride 8 ([`AUTOMATIC_SNAPSHOT_DEFAULTS`]), unless `overrides` say otherwise (e.g. `vision_config=
    {"image_size": 128, "token_stride": 4}` for one trained with `--rand_crop_size 128`)."""
    try:
        vision, prompt, decoder = _official_sizes(encoder_dict, prompt_dict, decoder_dict)
    except (KeyError, IndexError, AttributeError, TypeError) as error:
        raise ValueError(
            f"the official snapshot lacks or mis-stores an entry its sizes are read from ({type(error).__name__}: "
            f"{error}); expected the layout of {_LAYOUT_DOC} (is this file complete?)"
        ) from error
    if prompt_dict is None:
        vision.update(AUTOMATIC_SNAPSHOT_DEFAULTS["vision_config"])
        overrides = {"use_prompt_encoder": AUTOMATIC_SNAPSHOT_DEFAULTS["use_prompt_encoder"], **overrides}
    for name, values in (
        ("vision_config", vision),
        ("prompt_encoder_config", prompt),
        ("mask_decoder_config", decoder),
    ):
        values.update(overrides.pop(name, {}))
    return Sam3DConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, **overrides)


def _build_model(config: Sam3DConfig) -> PreTrainedModel:
    """A freshly initialised `Sam3DForPromptableSegmentation` for `config` (see the module docstring for why through
    the registry)."""
    return AutoModel.from_config(config)


def convert_official_state_dicts(
    encoder_dict: dict, prompt_dict: dict | None, decoder_dict: dict, config: Sam3DConfig | None = None
) -> tuple[PreTrainedModel, ConversionReport]:
    """Build a model from the state dicts of an official snapshot (`encoder_dict`, `feature_dict[3]`, `decoder_dict`;
    `prompt_dict=None` for a prompt-free `train_auto.py` snapshot), in float32. Raises if a model tensor has no source
    or a source tensor is unknown."""
    kind = "official 3DSAM-adapter snapshot" + (" (prompt-free, train_auto.py)" if prompt_dict is None else "")
    report = ConversionReport(details={"source format": kind})
    state_dict: dict[str, torch.Tensor] = {}
    _map_section("encoder_dict", encoder_dict, _ENCODER_RULES, report, state_dict)
    if prompt_dict is not None:
        _map_section("feature_dict[3]", prompt_dict, _PROMPT_RULES, report, state_dict)
    _map_section("decoder_dict", decoder_dict, _DECODER_RULES, report, state_dict)
    config = config or config_from_official(encoder_dict, prompt_dict, decoder_dict)
    model = _build_model(config)
    expected = model.state_dict()
    missing = [_official_key(key) for key in expected if key not in state_dict]
    if missing:
        names = [f"{section}.{name}" if section else name for section, name, _ in missing]
        raise ValueError(f"the official snapshot lacks {len(names)} tensors the model needs, e.g. {names[:5]}")
    sections = {"encoder_dict": encoder_dict, "feature_dict[3]": prompt_dict, "decoder_dict": decoder_dict}
    wrong = []
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            section, name, transform = _official_key(key)  # every tensor here came from an official one
            official_shape = _EXPORT_TRANSFORMS[transform](torch.empty(expected[key].shape, device="meta")).shape
            wrong.append((f"{section}.{name}", tuple(sections[section][name].shape), tuple(official_shape)))
    if wrong:
        raise ValueError(
            f"{len(wrong)} tensors of the official snapshot do not have the shape the model needs (official key, "
            f"shape in the file, shape expected): {wrong[:5]}; is the file damaged, or does --config / "
            "vision_config={...} describe another model?"
        )
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), report


# Inverse of the importer's rules (this package's key pattern -> official key template, inverse transform).
_EXPORT_RULES = {
    "encoder_dict": [
        (r"vision_encoder\.(pos_embed|depth_embed)", r"\1", None),
        (r"vision_encoder\.patch_embed\.projection_weight", "patch_embed.proj.weight", "rgb"),
        (r"vision_encoder\.patch_embed\.projection_bias", "patch_embed.proj.bias", None),
        (r"vision_encoder\.patch_embed\.depth_weight", "slice_embed.weight", "depth_taps"),
        (r"vision_encoder\.patch_embed\.depth_bias", "slice_embed.bias", None),
        (r"vision_encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3", None),
        (r"vision_encoder\.layers\.(\d+)\.attn\.rel_pos_scale", r"blocks.\1.attn.lr", None),
        (r"vision_encoder\.layers\.(\d+)\.adapter\.conv\.weight", r"blocks.\1.adapter.conv.weight", "kernel"),
        (r"vision_encoder\.layers\.(\d+)\.(.*)", r"blocks.\1.\2", None),
        (r"vision_encoder\.necks\.(\d)\.conv1\.weight", r"neck_3d.\1.0.weight", "kernel"),
        (r"vision_encoder\.necks\.(\d)\.layer_norm1\.(weight|bias)", r"neck_3d.\1.1.\2", None),
        (r"vision_encoder\.necks\.(\d)\.conv2\.weight", r"neck_3d.\1.2.weight", "kernel"),
        (r"vision_encoder\.necks\.(\d)\.layer_norm2\.(weight|bias)", r"neck_3d.\1.3.\2", None),
    ],
    "feature_dict[3]": [
        (r"prompt_encoder\.layers\.(\d+)\.layer_norm([1-4])\.(weight|bias)", r"transformer.layers.\1.norm\2.\3", None),
        (r"prompt_encoder\.layers\.(\d+)\.(.*)", r"transformer.layers.\1.\2", None),
    ],
    "decoder_dict": [
        (r"mask_decoder\.heads\.0\.([03])\.weight", r"mlahead.head2.\1.weight", "kernel"),
        (r"mask_decoder\.heads\.1\.([03])\.weight", r"mlahead.head3.\1.weight", "kernel"),
        (r"mask_decoder\.heads\.2\.([03])\.weight", r"mlahead.head4.\1.weight", "kernel"),
        (r"mask_decoder\.heads\.3\.([03])\.weight", r"mlahead.head5.\1.weight", "kernel"),
        (r"mask_decoder\.fuse\.([03])\.weight", r"cls.\1.weight", "kernel"),
    ],
}
_EXPORT_TRANSFORMS = {
    None: lambda t: t,
    "kernel": lambda t: t.permute(0, 1, 3, 4, 2).contiguous(),  # (out, in, kD, kH, kW) -> (out, in, kH, kW, kD)
    # The official model feeds 3 identical channels: [w, 0, 0] acts as w does, and sums back to w bit for bit.
    "rgb": lambda t: torch.cat([t, torch.zeros_like(t), torch.zeros_like(t)], dim=1),
    "depth_taps": lambda t: t.reshape(t.shape[0], 1, 1, 1, -1),  # (C, 16) -> (C, 1, 1, 1, 16)
}


def _official_key(key: str) -> tuple[str | None, str, str | None]:
    """`(section, official key, export transform)` of this package's state-dict `key`; `(None, key, None)` for a
    tensor the official layout does not have (a non-official architecture)."""
    for section, rules in _EXPORT_RULES.items():
        for pattern, template, transform in rules:
            match = re.fullmatch(pattern, key)
            if match:
                return section, match.expand(template), transform
    return None, key, None


def to_official_state_dicts(model: PreTrainedModel) -> tuple[dict, dict | None, dict]:
    """The inverse of [`convert_official_state_dicts`]: `(encoder_dict, feature_dict[3], decoder_dict)` (the middle
    one None for a prompt-free model, as `train_auto.py` saves none) in the
    official layout (`(H, W, D)` kernel axes), with exactly the tensors the official forward uses. The official
    modules also hold tensors their forward never reads (the prompt module's `cross_attn_token_to_image` and Fourier
    matrix, the shift-mask buffers); they are not produced. Only the paper's architecture can be exported: one input
    channel, an adapter in every block, no point-label embedding."""
    config = model.config
    if config.vision_config.num_channels != 1 or config.vision_config.adapter_layers is not None:
        raise ValueError(
            "only the official architecture exports: num_channels=1 and adapter_layers=None (an adapter in every "
            f"block); got num_channels={config.vision_config.num_channels}, "
            f"adapter_layers={config.vision_config.adapter_layers}"
        )
    if config.use_prompt_encoder and config.prompt_encoder_config.use_point_labels:
        raise ValueError("use_point_labels=True adds a label embedding the official model does not have")
    if config.mask_decoder_config.use_mask_prompt:
        raise ValueError("use_mask_prompt=True adds a mask-prompt convolution the official model does not have")
    sections: dict[str, dict[str, torch.Tensor]] = {name: {} for name in _EXPORT_RULES}
    for key, tensor in model.state_dict().items():
        section, target, transform = _official_key(key)
        assert section is not None, f"no export rule for {key}"
        sections[section][target] = _EXPORT_TRANSFORMS[transform](tensor.detach().float().cpu()).clone()
    prompt = sections["feature_dict[3]"] if config.use_prompt_encoder else None  # train_auto.py has none
    return sections["encoder_dict"], prompt, sections["decoder_dict"]


def _torch_load(path: str | os.PathLike) -> object:
    """`torch.load(path, weights_only=True)`: tensors, plain containers and numbers only (plus numpy scalars, which
    training scripts store as `best_val_loss` and which are plain numbers too). Raises `ValueError` otherwise."""
    # numpy >= 2 pickles numpy scalars as numpy._core.multiarray.scalar, numpy 1.x as numpy.core.multiarray.scalar.
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x (setup.py allows >= 1.26)
        from numpy.core.multiarray import scalar
    allowed = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *{type(np.dtype(t)) for t in "?bhilqefdg"}]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's text advises weights_only=False, which this package never does: not shown
        text = str(error)
        blocked = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if blocked:
            raise ValueError(
                f"could not read {os.fspath(path)!r} as a tensor-only PyTorch checkpoint: it holds pickled Python "
                f"objects (e.g. {blocked.group(1)}), which sam3d-hf never unpickles since they can run arbitrary code "
                "(it reads with weights_only=True). Save the state dicts as dicts of tensors, lists and numbers only"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # torch's own reason, without its advice
        reason = reason.group(1) if reason else text.split(". ")[0].strip()
        raise ValueError(
            f"could not read {os.fspath(path)!r} as a tensor-only PyTorch checkpoint: it is not a file torch.save "
            f"wrote (zip or pickle of tensors), or it is truncated ({type(error).__name__}"
            + (f": {reason}" if reason else "")
            + "); is this the right file, and is it complete?"
        ) from None


def load_official_checkpoint(path: str | os.PathLike, **config_overrides) -> tuple[PreTrainedModel, ConversionReport]:
    """Read an official 3DSAM-adapter `*.pth.tar` training snapshot (safely: `weights_only=True`) and convert it.

    The snapshot is a dict with `encoder_dict`, `feature_dict` (a list of 4 prompt-module state dicts; only index 3
    is used, as in the official inference code) and `decoder_dict`; a `train_auto.py` snapshot of the prompt-free
    model has no `feature_dict` and gives a `use_prompt_encoder=False` model (256³, token stride 8 by default, see
    [`config_from_official`]); anything else (optimiser states, epoch, best loss) is reported as ignored. Sizes are
    inferred from the tensors ([`config_from_official`]); `config_overrides` (`vision_config={...}` etc.) change what
    cannot be inferred, such as the training `image_size`.
    """
    snapshot = _torch_load(path)
    needed = ("encoder_dict", "decoder_dict")  # and feature_dict, except for train_auto.py's prompt-free snapshots
    if not isinstance(snapshot, dict) or any(k not in snapshot for k in needed):
        found = sorted(snapshot) if isinstance(snapshot, dict) else type(snapshot).__name__
        hint = ""
        if isinstance(snapshot, dict) and any(
            str(k).startswith(("image_encoder.", "vision_encoder.")) for k in snapshot
        ):
            hint = " It looks like a SAM 2D checkpoint: use `sam3d convert sam` / load_sam_checkpoint instead."
        raise ValueError(
            f"{os.fspath(path)!r} is not an official 3DSAM-adapter snapshot: expected keys "
            f"('encoder_dict', 'feature_dict', 'decoder_dict') (train.py) or ('encoder_dict', 'decoder_dict') "
            f"(train_auto.py), found {found}." + hint
        )
    prompt_dict = None
    if "feature_dict" in snapshot:
        features = snapshot["feature_dict"]
        if not isinstance(features, (list, tuple)) or len(features) != 4:
            raise ValueError(
                f"feature_dict must be a list of 4 prompt-module state dicts, got {type(features).__name__}"
                + (f" of length {len(features)}" if isinstance(features, (list, tuple)) else "")
            )
        _require_state_dict("feature_dict[3]", features[3])
        prompt_dict = features[3]
    _require_state_dict("encoder_dict", snapshot["encoder_dict"])
    _require_state_dict("decoder_dict", snapshot["decoder_dict"])
    config = None
    if config_overrides:
        config = config_from_official(
            snapshot["encoder_dict"], prompt_dict, snapshot["decoder_dict"], **config_overrides
        )
    model, report = convert_official_state_dicts(
        snapshot["encoder_dict"], prompt_dict, snapshot["decoder_dict"], config
    )
    if prompt_dict is not None:
        for index in range(3):
            report.ignored[f"feature_dict[{index}]"] = "prompt modules 0-2 are never used by the official forward"
    for key in sorted(set(snapshot) - {*needed, "feature_dict"}):
        report.ignored[str(key)] = "training state (optimiser, epoch, ...), not weights"
    report.details = {"source": os.fspath(path), **report.details}
    return model, report


# ----------------------------------------------------------------------------------------------------------------------
# SAM 2D checkpoints -> the paper's initialisation
# ----------------------------------------------------------------------------------------------------------------------

# (source key pattern, target key template, transform) per source format; patterns are matched in full. `rel_pos_d`
# has no source of its own: it is derived from each block's rel_pos_h and rel_pos_w after these rules ran.
_SAM_RULES = {
    "segment_anything": [
        (r"image_encoder\.pos_embed", "vision_encoder.pos_embed", None),
        (r"image_encoder\.patch_embed\.proj\.weight", "vision_encoder.patch_embed.projection_weight", "sum_rgb"),
        (r"image_encoder\.patch_embed\.proj\.bias", "vision_encoder.patch_embed.projection_bias", None),
        (r"image_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision_encoder.layers.\1.layer_norm\2.\3", None),
        (
            r"image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)",
            r"vision_encoder.layers.\1.attn.\2.\3",
            None,
        ),
        (r"image_encoder\.blocks\.(\d+)\.attn\.(rel_pos_[hw])", r"vision_encoder.layers.\1.attn.\2", None),
        (r"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])\.(weight|bias)", r"vision_encoder.layers.\1.mlp.\2.\3", None),
    ],
    "transformers": [
        (r"vision_encoder\.pos_embed", "vision_encoder.pos_embed", None),
        (r"vision_encoder\.patch_embed\.projection\.weight", "vision_encoder.patch_embed.projection_weight", "sum_rgb"),
        (r"vision_encoder\.patch_embed\.projection\.bias", "vision_encoder.patch_embed.projection_bias", None),
        (
            r"vision_encoder\.layers\.(\d+)\.(layer_norm[12]|attn\.qkv|attn\.proj|mlp\.lin[12])\.(weight|bias)",
            r"vision_encoder.layers.\1.\2.\3",
            None,
        ),
        (r"vision_encoder\.layers\.(\d+)\.attn\.(rel_pos_[hw])", r"vision_encoder.layers.\1.attn.\2", None),
    ],
}
_SAM_UNUSED = [
    (r"(image_encoder|vision_encoder)\.neck\..*", "SAM's 2D neck is not used; the four 3D necks are new"),
    (r"prompt_encoder\..*", "SAM's 2D prompt encoder is replaced by the 3D visual sampler (new)"),
    (r"mask_decoder\..*", "SAM's 2D mask decoder is replaced by the multi-level 3D decoder (new)"),
    (r"shared_image_embedding\..*", "Fourier features of SAM's prompt encoder, not used"),
    (r"pixel_(mean|std)", "SAM's RGB normalisation; CT patches are normalised by the image processor"),
]
# What SAM's vision tensors determine, as Sam3DVisionConfig attributes.
_SAM_ARCHITECTURE = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_dim",
    "patch_size",
    "sam_image_size",
    "sam_window_size",
    "global_attn_indexes",
    "qkv_bias",
)


def _sam_format(state_dict: dict) -> str:
    """`"segment_anything"` or `"transformers"` from the key names; a clear error for anything else."""
    keys = [k for k in state_dict if isinstance(k, str)]
    if any(k.startswith("image_encoder.blocks.") for k in keys):
        return "segment_anything"
    if "vision_encoder.patch_embed.projection.weight" in state_dict:
        return "transformers"
    if "vision_encoder.patch_embed.projection_weight" in state_dict:
        hint = "it is already a sam3d checkpoint: load it with Sam3DForPromptableSegmentation.from_pretrained"
    elif {"encoder_dict", "decoder_dict"} <= set(keys):
        hint = "it is an official 3DSAM-adapter snapshot: use `sam3d convert official` / load_official_checkpoint"
    else:
        hint = (
            "expected the image encoder of SAM: `image_encoder.blocks.*` keys (segment_anything .pth) or "
            "`vision_encoder.patch_embed.projection.weight` and `vision_encoder.layers.*` (transformers SamModel)"
        )
    sample = sorted(map(str, state_dict))[:6]
    raise ValueError(f"this does not look like a SAM checkpoint ({len(state_dict)} entries, e.g. {sample}): {hint}")


def _sam_architecture(tensors: dict[str, torch.Tensor]) -> dict:
    """Sam3DVisionConfig values determined by SAM's vision tensors (target key names)."""
    prefix = "vision_encoder."
    try:
        pos, kernel = tensors[prefix + "pos_embed"], tensors[prefix + "patch_embed.projection_weight"]
        blocks = sorted({int(k.split(".")[2]) for k in tensors if k.startswith(prefix + "layers.")})
        if pos.ndim != 4 or pos.shape[1] != pos.shape[2] or kernel.ndim != 4 or blocks != list(range(len(blocks))):
            raise ValueError(f"pos_embed {tuple(pos.shape)}, patch kernel {tuple(kernel.shape)}, blocks {blocks}")
        rows = {i: tensors[f"{prefix}layers.{i}.attn.rel_pos_h"].shape[0] for i in blocks}
        head_dim = tensors[f"{prefix}layers.0.attn.rel_pos_h"].shape[1]
        windowed = {r for r in rows.values() if r != 2 * pos.shape[1] - 1}
        if len(windowed) > 1 or pos.shape[-1] % head_dim:
            raise ValueError(f"relative-position tables {rows} with head dim {head_dim}")
        return {
            "hidden_size": pos.shape[-1],
            "num_hidden_layers": len(blocks),
            "num_attention_heads": pos.shape[-1] // head_dim,
            "mlp_dim": tensors[f"{prefix}layers.0.mlp.lin1.weight"].shape[0],
            "patch_size": kernel.shape[-1],
            "sam_image_size": pos.shape[1] * kernel.shape[-1],
            "sam_window_size": (windowed.pop() + 1) // 2 if windowed else 14,
            "global_attn_indexes": [i for i, r in rows.items() if r == 2 * pos.shape[1] - 1],
            "qkv_bias": f"{prefix}layers.0.attn.qkv.bias" in tensors,
        }
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"the checkpoint's image encoder is not shaped like SAM's ViT ({type(error).__name__}: {error}); found "
            f"{len(tensors)} image-encoder tensors, e.g. {sorted(tensors)[:6]}"
        ) from error


def _sam_preset(architecture: dict) -> str | None:
    """The SAM preset (`vit_b`, `vit_l`, `vit_h`) whose sizes these are, if any."""
    for name in SAM_PRESETS:
        vision = Sam3DConfig.from_sam_preset(name).vision_config
        if all(getattr(vision, key) == value for key, value in architecture.items()):
            return name
    return None


def convert_sam_state_dict(
    state_dict: dict[str, torch.Tensor], config: Sam3DConfig | None = None, **config_kwargs
) -> tuple[PreTrainedModel, ConversionReport]:
    """Initialise a model from a SAM 2D state dict, as the paper does (docs/design.md "Initialisation from SAM and
    what is trained").

    Args:
        state_dict (`dict[str, torch.Tensor]`): SAM's weights with either key style: the original `segment_anything`
            one (`image_encoder.blocks.{i}.norm1.weight`, ...) or transformers' `SamModel` one
            (`vision_encoder.layers.{i}.layer_norm1.weight`, ...). The format and the size are read from the tensors.
        config ([`Sam3DConfig`], *optional*): the model to build. It must agree with the checkpoint on what the
            checkpoint determines (width, depth, heads, MLP width, patch size, SAM image and window sizes, global
            blocks); it is required for sizes other than SAM ViT-B/L/H. By default the matching
            `Sam3DConfig.from_sam_preset(...)`.
        **config_kwargs: passed to `Sam3DConfig.from_sam_preset` when `config` is not given, e.g.
            `vision_config={"image_size": (64, 128, 128)}` or `prompt_encoder_config={...}`.

    What is done (float32): SAM's patch kernel `(C, 3, 16, 16)` is summed over RGB to `(C, 1, 16, 16)` (exactly
    feeding 3 identical channels); `pos_embed (1, 64, 64, C)`, the patch bias, the block norms, qkv, proj, the MLPs
    and `rel_pos_h`/`rel_pos_w` are copied; each block's `rel_pos_d = 0.5 * (rel_pos_h + rel_pos_w)`. Everything
    else (depth taps, depth table = zeros, adapters, necks, prompt encoder, mask decoder) keeps the model's fresh
    initialisation (seed with `torch.manual_seed` for reproducibility). SAM's neck, prompt encoder and mask decoder
    are ignored.

    Returns:
        `(model, report)`: the model in eval mode and a [`ConversionReport`] accounting for every tensor.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if config is not None and config_kwargs:
        raise ValueError(
            f"pass either a config or config overrides {sorted(config_kwargs)}, not both: put the overrides into the "
            "config"
        )
    if config is not None and not isinstance(config, Sam3DConfig):
        raise TypeError(f"config must be a Sam3DConfig, got {type(config).__name__}")
    source_format = _sam_format(state_dict)
    report = ConversionReport(details={"source format": source_format})
    tensors: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(tensor).__name__}, expected a tensor")
        for pattern, template, transform in _SAM_RULES[source_format]:
            match = re.fullmatch(pattern, key)
            if match:
                target = match.expand(template)
                tensors[target] = _TRANSFORMS[transform](tensor.detach().to("cpu", torch.float32))
                report.add([key], target, _DESCRIPTIONS[transform])
                break
        else:
            why = next((why for pattern, why in _SAM_UNUSED if re.fullmatch(pattern, key)), None)
            if why is None:
                unknown.append(f"{key} {tuple(tensor.shape)}")
            else:
                report.ignored[key] = why
    if unknown:
        raise ValueError(
            f"the {source_format} checkpoint has {len(unknown)} tensors that are not part of SAM, e.g. {unknown[:5]}; "
            "refusing to drop them silently (is this a modified SAM?)"
        )
    architecture = _sam_architecture(tensors)
    preset = _sam_preset(architecture)
    report.details["detected size"] = preset or f"non-standard SAM {architecture}"
    if config is None:
        if preset is None:
            raise ValueError(
                f"the checkpoint is not SAM ViT-B/L/H (found {architecture}); pass a Sam3DConfig whose vision_config "
                "has these values (config=... in Python, --config in the CLI)"
            )
        config = Sam3DConfig.from_sam_preset(preset, **config_kwargs)
    mismatches = {
        key: (getattr(config.vision_config, key), value)
        for key, value in architecture.items()
        if getattr(config.vision_config, key) != value
    }
    if mismatches:
        lines = ", ".join(
            f"{key}: config {mine!r} vs checkpoint {theirs!r}" for key, (mine, theirs) in mismatches.items()
        )
        fix = f"use Sam3DConfig.from_sam_preset({preset!r}) or " if preset else ""
        raise ValueError(f"the config does not match the SAM checkpoint ({lines}); {fix}set these in vision_config")

    for index in range(architecture["num_hidden_layers"]):
        attn = f"vision_encoder.layers.{index}.attn."
        tensors[attn + "rel_pos_d"] = 0.5 * (tensors[attn + "rel_pos_h"] + tensors[attn + "rel_pos_w"])
        report.add(
            report.sources[attn + "rel_pos_h"] + report.sources[attn + "rel_pos_w"],
            attn + "rel_pos_d",
            "0.5 * ({0} + {1})",
            "rel_pos_d = 0.5 * (rel_pos_h + rel_pos_w)",
        )
    if config.vision_config.num_channels != 1:
        raise ValueError(
            f"vision_config.num_channels is {config.vision_config.num_channels}; SAM's RGB kernel is summed for 1 "
            "channel (CT), set num_channels=1"
        )

    model = _build_model(config)
    expected = model.state_dict()
    wrong = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k].shape
    ]
    absent = sorted(set(tensors) - set(expected))
    if wrong or absent:
        raise ValueError(
            f"SAM tensors do not fit the model: shape (key, SAM, model) {wrong[:5]}, no such key {absent[:5]}"
        )
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected, unexpected
    report.initialized = sorted(missing)
    report.details["config"] = f"{preset or 'custom'}, image_size {config.vision_config.image_size}"
    logger.info("Converted SAM (%s) to Sam3DForPromptableSegmentation:\n%s", source_format, report.summary())
    return model.eval(), report


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as error:
        raise ValueError(f"could not read {os.fspath(path)!r} as safetensors: {error}") from error


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A transformers model folder: `model.safetensors`, or the shards listed in `model.safetensors.index.json`."""
    if (folder / "model.safetensors").is_file():
        return _read_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {key: value for shard in shards for key, value in _read_safetensors(folder / shard).items()}
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise ValueError(
        f"{os.fspath(folder)!r} holds no model.safetensors (or model.safetensors.index.json); found {found}. Pass "
        "the checkpoint file itself for a segment_anything .pth"
    )


def read_sam_state_dict(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Read SAM weights from a `segment_anything` `.pth` (with `weights_only=True`), a `.safetensors` file, a
    transformers model folder, or a Hub repo id such as `facebook/sam-vit-base` (downloads only its safetensors and
    JSON files). Checkpoints wrapped as `{"model": state_dict}` or `{"state_dict": ...}` are unwrapped."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        loaded = _torch_load(path)
        if isinstance(loaded, dict) and len(loaded) == 1 and next(iter(loaded)) in ("model", "state_dict"):
            loaded = next(iter(loaded.values()))
        if not isinstance(loaded, dict):
            raise ValueError(f"{os.fspath(path)!r} holds a {type(loaded).__name__}, expected a state dict of tensors")
        return loaded
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            os.fspath(path_or_repo_id),
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=["*.safetensors", "*.json"],
        )
    except Exception as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(
            f"{os.fspath(path_or_repo_id)!r} is neither a local file or folder nor a Hub repo id that could be "
            f"downloaded ({type(error).__name__}: {first_line})"
        ) from error
    return _read_folder(Path(folder))


def load_sam_checkpoint(
    path_or_repo_id: str | os.PathLike,
    config: Sam3DConfig | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **config_kwargs,
) -> tuple[PreTrainedModel, ConversionReport]:
    """Build a model initialised from SAM 2D weights the way the paper does; see [`convert_sam_state_dict`].

    Args:
        path_or_repo_id: a `segment_anything` checkpoint (`sam_vit_b_01ec64.pth`, read with `weights_only=True`), a
            `.safetensors` file of either key style, a transformers `SamModel` folder, or a Hub id
            (`facebook/sam-vit-base`; needs the network).
        config ([`Sam3DConfig`], *optional*): the model to build; must match the checkpoint's size. Needed for
            sizes other than SAM ViT-B/L/H.
        revision, cache_dir: for Hub downloads.
        **config_kwargs: `Sam3DConfig.from_sam_preset` overrides when `config` is not given, e.g.
            `vision_config={"image_size": (64, 128, 128)}`.

    Returns:
        `(model, report)`; the report's summary is also logged at INFO level.
    """
    state_dict = read_sam_state_dict(path_or_repo_id, revision=revision, cache_dir=cache_dir)
    model, report = convert_sam_state_dict(state_dict, config=config, **config_kwargs)
    report.details = {"source": os.fspath(path_or_repo_id), **report.details}
    return model, report


# ----------------------------------------------------------------------------------------------------------------------
# Writing converted models
# ----------------------------------------------------------------------------------------------------------------------


def _check_output(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """`output_dir` as an absolute path, after checking that a converted model can be written there."""
    output = Path(output_dir).absolute()
    if output.exists() and not output.is_dir():
        raise ValueError(f"{os.fspath(output)!r} is an existing file, not a folder; choose a folder to write into")
    blocking = next((parent for parent in output.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ValueError(
            f"cannot create {os.fspath(output)!r}: {os.fspath(blocking)!r} is a file, not a folder; choose another "
            "output folder"
        )
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(
            f"{os.fspath(output)!r} already exists and is not an empty folder; choose another output folder or pass "
            "overwrite=True (--overwrite)"
        )
    return output


def save_converted(
    model: PreTrainedModel,
    report: ConversionReport,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    processor=None,
) -> Path:
    """Write `model.save_pretrained` (config.json + model.safetensors), `conversion_report.json` and, when given,
    the `processor` (`processor_config.json`) into `output_dir`, atomically: everything is written to a temporary
    sibling folder that is then renamed. An existing non-empty `output_dir` is only replaced with `overwrite=True`; an
    existing file is never replaced."""
    output = _check_output(output_dir, overwrite)
    with staged_folder(output) as staging:
        model.save_pretrained(staging)
        write_json(staging / "conversion_report.json", report.to_dict(), default=str)
        if processor is not None:
            processor.save_pretrained(staging)
    return output


def convert_sam_checkpoint(
    path_or_repo_id: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: Sam3DConfig | None = None,
    *,
    overwrite: bool = False,
    **kwargs,
) -> ConversionReport:
    """`sam3d convert sam`: [`load_sam_checkpoint`] then [`save_converted`]; returns the report. `output_dir` is
    checked before the checkpoint is read, so that a taken output folder fails at once."""
    _check_output(output_dir, overwrite)
    model, report = load_sam_checkpoint(path_or_repo_id, config=config, **kwargs)
    save_converted(model, report, output_dir, overwrite=overwrite)
    return report


def convert_official_checkpoint(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    processor_factory=None,
    **config_overrides,
) -> ConversionReport:
    """`sam3d convert official`: [`load_official_checkpoint`] then [`save_converted`]; returns the report. The
    folder loads with `Sam3DForPromptableSegmentation.from_pretrained(output_dir)`. `output_dir` is checked before the
    checkpoint is read. `processor_factory(model)`, when given, builds the processor saved with it (the CLI's
    `--dataset`: the official preset, so the model sees the input it was trained on)."""
    _check_output(output_dir, overwrite)
    model, report = load_official_checkpoint(path, **config_overrides)
    processor = None if processor_factory is None else processor_factory(model)
    save_converted(model, report, output_dir, overwrite=overwrite, processor=processor)
    return report


__all__ = [
    "ConversionReport",
    "config_from_official",
    "convert_official_checkpoint",
    "convert_official_state_dicts",
    "convert_sam_checkpoint",
    "convert_sam_state_dict",
    "load_official_checkpoint",
    "load_sam_checkpoint",
    "read_sam_state_dict",
    "save_converted",
    "to_official_state_dicts",
]
