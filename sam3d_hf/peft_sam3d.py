"""Parameter-efficient fine-tuning: the paper's spatial-adapter scheme, and LoRA / full fine-tuning baselines via peft.

The paper trains, from SAM's weights, only the spatial adapters, the block norms, the new 3D parts (depth taps and
bias, depth table, `rel_pos_d`, the four necks), the prompt encoder and the decoder: 25,198,976 of 113,652,352
parameters at ViT-B (image encoder 15,209,984, prompt encoder 2,900,736, decoder 7,088,256). Saved in float32 that is
an adapter file of 100.8 MB per dataset, on one shared SAM base (the base's 88.5 M frozen SAM tensors are not in it).

peft 0.21's method registry is a closed enum, so the spatial-adapter scheme is this package's own API with
peft-shaped files (`adapter_config.json` + `adapter_model.safetensors`) and peft-like method names. The baselines of
the paper's Table 2 use real peft: [`lora_config`] and [`enable_full_finetuning`].
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .convert_sam3d import _read_safetensors
from .files import atomic_write, write_json
from .modeling_sam3d import ADAPTER_CONFIG_NAME, PEFT_TYPE, Sam3DForPromptableSegmentation, Sam3DSpatialAdapter

logger = logging.getLogger(__name__)

_ADAPTER_PARAMETER = re.compile(r"vision_encoder\.layers\.(\d+)\.adapter\.")
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# What makes a folder a model folder for transformers (the config, or weights of any of its layouts).
_MODEL_FILES = ("config.json", SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)

# Parameter groups of the paper's scheme, as regular expressions matched at the start of a parameter name. Anything
# not in a group is SAM's inherited, frozen part (patch kernel and bias, position table, qkv, proj, MLP, rel_pos_h/w).
PARAMETER_GROUPS = {
    "adapters": r"vision_encoder\.layers\.\d+\.adapter\.",
    "norms": r"vision_encoder\.layers\.\d+\.layer_norm[12]\.",
    "new_3d": (
        r"vision_encoder\.(patch_embed\.depth_(weight|bias)$|depth_embed$|layers\.\d+\.attn\.rel_pos_d$|necks\.)"
    ),
    "prompt_encoder": r"prompt_encoder\.",
    "mask_decoder": r"mask_decoder\.",
}

# LoRA baseline: low-rank updates of every ViT block's attention projections (a full-match regex, so the prompt
# encoder's q_proj / out_proj are not caught by a bare "proj" suffix).
DEFAULT_LORA_TARGET_MODULES = r"vision_encoder\.layers\.\d+\.attn\.(qkv|proj)"
# Trained in full next to LoRA, as in the paper's baselines: prompt encoder, decoder, the 3D necks and the patch
# embedding (it holds the new depth taps; peft cannot save bare parameters, so SAM's 16x16 kernel trains with them).
# (peft wraps modules, not ModuleLists: the four necks are named one by one.)
DEFAULT_LORA_MODULES_TO_SAVE = ["prompt_encoder", "mask_decoder", "patch_embed", *(f"necks.{k}" for k in range(4))]


def parameter_group(name: str) -> str | None:
    """The group of parameter `name` in the paper's scheme, or `None` for SAM's inherited (frozen) tensors."""
    return next((group for group, pattern in PARAMETER_GROUPS.items() if re.match(pattern, name)), None)


@dataclass
class Sam3DAdapterConfig:
    """Configuration of the paper's spatial-adapter fine-tuning, saved as `adapter_config.json`.

    Example:
    ```python
    >>> config = Sam3DAdapterConfig(adapter_dim=192, trainable_groups=["adapters", "prompt_encoder", "mask_decoder"])
    >>> config.save_pretrained("kits21-adapter")
    ```
    What is trained and why: docs/design.md "Initialisation from SAM and what is trained".
    """

    peft_type: str = field(default=PEFT_TYPE, metadata={"help": "Always 'SAM3D_SPATIAL_ADAPTER' (this scheme)."})
    adapter_dim: int | None = field(
        default=None,
        metadata={
            "help": "Bottleneck width of each spatial adapter (paper: 384); None = the base model's "
            "vision_config.adapter_dim, so that its adapters are kept. A saved config records the width used."
        },
    )
    adapter_layers: list[int] | None = field(
        default=None, metadata={"help": "Blocks that get an adapter; None = every block, [] = none."}
    )
    trainable_groups: list[str] = field(
        default_factory=lambda: list(PARAMETER_GROUPS),
        metadata={"help": f"Parameter groups to train, among {list(PARAMETER_GROUPS)}; the rest is frozen."},
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The SAM-initialised base these tensors go on (folder or Hub id)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model on the Hub."})
    inference_mode: bool = field(default=False, metadata={"help": "Freeze everything after loading."})
    sam3d_hf_version: str | None = field(
        default=None, metadata={"help": "Version of sam3d-hf that wrote the file (set by save_pretrained)."}
    )

    def __post_init__(self):
        if self.peft_type != PEFT_TYPE:
            raise ValueError(
                f"peft_type must be {PEFT_TYPE!r}, got {self.peft_type!r} (a peft LoRA / other method folder loads "
                "with peft.PeftModel.from_pretrained instead)"
            )
        if self.adapter_dim is not None and (
            not isinstance(self.adapter_dim, int) or isinstance(self.adapter_dim, bool) or self.adapter_dim <= 0
        ):
            raise ValueError(
                f"adapter_dim must be a positive int or None (the base model's width), got {self.adapter_dim!r}"
            )
        if self.adapter_layers is not None:
            if not isinstance(self.adapter_layers, (list, tuple)):
                raise TypeError(
                    f"adapter_layers must be a list of block indices or None, got {self.adapter_layers!r} "
                    "(for one block write [i])"
                )
            layers = list(self.adapter_layers)
            if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise ValueError(f"adapter_layers must be non-negative block indices, got {self.adapter_layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"adapter_layers has repeated block indices: {self.adapter_layers!r}")
            self.adapter_layers = sorted(layers)
        if not isinstance(self.trainable_groups, (list, tuple)):
            raise TypeError(
                f"trainable_groups must be a list of group names, got {self.trainable_groups!r} "
                f"(for one group write [{self.trainable_groups!r}])"
            )
        groups = list(self.trainable_groups)
        unknown = [g for g in groups if g not in PARAMETER_GROUPS]
        if unknown:
            raise ValueError(f"unknown trainable_groups {unknown}; expected names among {list(PARAMETER_GROUPS)}")
        if not groups or len(set(groups)) != len(groups):
            raise ValueError(f"trainable_groups must be non-empty and without repeats, got {self.trainable_groups!r}")
        if "adapters" not in groups and self.adapter_layers != []:
            raise ValueError(
                "adapters are newly initialised, so frozen ones would only add noise: put 'adapters' in "
                f"trainable_groups or set adapter_layers=[] (got trainable_groups={groups!r})"
            )
        self.trainable_groups = groups
        for name in ("base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, got {value!r}")
        if not isinstance(self.inference_mode, bool):
            raise TypeError(f"inference_mode must be True or False, got {self.inference_mode!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` in `save_directory` (created if needed), atomically; nothing else there is
        touched. A folder that holds a model is refused (see `Sam3DAdapterModel.save_pretrained`)."""
        directory = _adapter_folder(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / ADAPTER_CONFIG_NAME, self.to_dict(), sort_keys=True)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, revision: str | None = None, **download_kwargs
    ) -> Sam3DAdapterConfig:
        """Read `adapter_config.json` from a folder or a Hub repo id (downloaded with `revision` and the Hub cache,
        `download_kwargs` go to `huggingface_hub.snapshot_download`); unknown keys are an error (a different scheme
        or version)."""
        directory = resolve_adapter_folder(directory, revision, **download_kwargs)
        path = Path(directory) / ADAPTER_CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"no {ADAPTER_CONFIG_NAME} in {directory}; is this a Sam3D adapter folder?")
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
        if values.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
            raise ValueError(
                f"{path} is a peft {values['peft_type']!r} adapter, not {PEFT_TYPE!r}: load it with "
                "peft.PeftModel.from_pretrained(base_model, directory)"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; expected keys among {sorted(known)}")
        return cls(**values)


def _adapter_folder(save_directory: str | os.PathLike) -> Path:
    """`save_directory` as a Path, refused (before anything is written) if it is a file or holds a model: transformers
    reads any folder with an adapter_config.json as a peft adapter, so a model saved there would no longer load."""
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory {os.fspath(target)!r} is an existing file, not a folder")
    found = [name for name in _MODEL_FILES if (target / name).is_file()]
    if found:
        raise ValueError(
            f"save_directory {os.fspath(target)!r} holds a model ({', '.join(found)}); an adapter saved there would "
            f"make transformers read the folder as a peft adapter, and the model would no longer load. Save the "
            f"adapter in a folder of its own, e.g. {os.fspath(target / 'adapter')!r}. Nothing was written."
        )
    return target


def resolve_adapter_folder(name_or_path: str | os.PathLike, revision: str | None = None, **download_kwargs) -> Path:
    """A local adapter folder as it is, or a Hub repo id downloaded (only the two adapter files) into the Hub cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith("."):
        raise ValueError(
            f"{name!r} is neither an adapter folder nor a Hub repo id ('org/name'); give the folder that holds "
            f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            name, revision=revision, allow_patterns=[ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME], **download_kwargs
        )
    except Exception as error:  # offline, missing repo, no access: each library raises its own type
        raise ValueError(
            f"could not download the adapter {name!r} (revision {revision or 'main'}) from the Hub: "
            f"{type(error).__name__}: {error}. Check the id and your network, or pass a local folder"
        ) from error
    return Path(folder)


def _adapter_plan(model: Sam3DForPromptableSegmentation, config: Sam3DAdapterConfig) -> list[str]:
    """What each block's adapter becomes, without changing the model: `"keep"` (an adapter of this width is there),
    `"build"` (a new one, at `config.adapter_dim`) or `"none"` (no adapter)."""
    layers = config.adapter_layers
    blocks = len(model.vision_encoder.layers)
    bad = [i for i in layers or [] if i >= blocks]
    if bad:
        raise ValueError(f"adapter_layers {layers} has block indices {bad} outside [0, {blocks}) of this model")
    plan = []
    for index, layer in enumerate(model.vision_encoder.layers):
        if layers is not None and index not in layers:
            plan.append("none")
        elif layer.adapter is not None and layer.adapter.linear1.out_features == config.adapter_dim:
            plan.append("keep")
        else:
            plan.append("build")
    return plan


def _adapter_vision_config(model: Sam3DForPromptableSegmentation, config: Sam3DAdapterConfig):
    """A copy of the model's vision config with the adapter width and blocks of `config` (the model's is untouched)."""
    vision = copy.deepcopy(model.config.vision_config)
    vision.adapter_dim, vision.adapter_layers = config.adapter_dim, config.adapter_layers
    return vision


def _planned_shapes(
    model: Sam3DForPromptableSegmentation, config: Sam3DAdapterConfig, plan: list[str]
) -> dict[str, torch.Size]:
    """Every parameter's shape as the model will be once `plan` is applied (new adapters are sized on the meta
    device: no memory, no random numbers drawn)."""
    shapes = {}
    for name, parameter in model.named_parameters():
        match = _ADAPTER_PARAMETER.match(name)
        if match is None or plan[int(match.group(1))] == "keep":
            shapes[name] = parameter.shape
    with torch.device("meta"):
        adapter = Sam3DSpatialAdapter(_adapter_vision_config(model, config))
    for index, action in enumerate(plan):
        if action == "build":
            prefix = f"vision_encoder.layers.{index}.adapter."
            shapes.update({prefix + name: parameter.shape for name, parameter in adapter.named_parameters()})
    return shapes


def _check_adapter_tensors(
    tensors: dict[str, torch.Tensor], shapes: dict[str, torch.Size], config: Sam3DAdapterConfig
) -> None:
    """Raise unless `tensors` are exactly the trained parameters (`config.trainable_groups`) with the shapes the
    model will have."""
    not_tensors = sorted(name for name, tensor in tensors.items() if not isinstance(tensor, torch.Tensor))
    if not_tensors:
        raise TypeError(f"adapter_state_dict values must be tensors; {not_tensors[:5]} are not")
    groups = set(config.trainable_groups)
    wanted = {name for name in shapes if parameter_group(name) in groups}
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        raise ValueError(
            f"the adapter tensors do not match their config on this model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    wrong = [(n, tuple(t.shape), tuple(shapes[n])) for n, t in tensors.items() if t.shape != shapes[n]]
    if wrong:
        raise ValueError(
            f"the adapter tensors do not fit this model: shape mismatch (name, file, model) {wrong[:5]} ({len(wrong)} "
            "in all); they were written for another base size or adapter width than their config and model say"
        )


class Sam3DAdapterModel(nn.Module):
    """A [`Sam3DForPromptableSegmentation`] prepared for the paper's fine-tuning, changed in place like peft does:
    adapters (re)built where the config says (`config.vision_config.adapter_dim` / `adapter_layers` updated to match;
    existing adapters of the right width are kept, new ones get the model's initialisation and a logged warning says
    which blocks changed), every parameter outside `trainable_groups` frozen (all of them with
    `inference_mode=True`). `adapter_config.adapter_dim=None` takes the base's width. Calls and
    `get_image_embeddings` go to the wrapped model, with its conventions (`pixel_values (B, 1, D, H, W)`,
    `input_points (B, N, 3)` patch voxels `(z, y, x)`, `input_labels (B, N)` with -1 for padding).

    Args:
        model ([`Sam3DForPromptableSegmentation`]): the base, changed in place.
        adapter_config ([`Sam3DAdapterConfig`]): the scheme.
        adapter_state_dict (`dict[str, torch.Tensor]`, *optional*): trained tensors to put in, exactly those of
            `trainable_parameter_names()` with the model's shapes (what `adapter_state_dict()` returns and the
            adapter file holds). They are checked before anything is changed: on an error the model is left as it
            was.
    """

    def __init__(
        self,
        model: Sam3DForPromptableSegmentation,
        adapter_config: Sam3DAdapterConfig,
        adapter_state_dict: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        if not isinstance(model, Sam3DForPromptableSegmentation):
            raise TypeError(f"model must be a Sam3DForPromptableSegmentation, got {type(model).__name__}")
        if not isinstance(adapter_config, Sam3DAdapterConfig):
            raise TypeError(f"adapter_config must be a Sam3DAdapterConfig, got {type(adapter_config).__name__}")
        if adapter_state_dict is not None and not isinstance(adapter_state_dict, dict):
            raise TypeError(f"adapter_state_dict must be a dict of tensors, got {type(adapter_state_dict).__name__}")
        if adapter_config.adapter_dim is None:
            adapter_config = dataclasses.replace(adapter_config, adapter_dim=model.config.vision_config.adapter_dim)
        # Everything that can fail is checked first; the model is only changed once all checks passed.
        plan = _adapter_plan(model, adapter_config)
        if adapter_state_dict is not None:
            _check_adapter_tensors(adapter_state_dict, _planned_shapes(model, adapter_config, plan), adapter_config)
        self.model = model
        self.adapter_config = adapter_config
        self._build_adapters(plan, warn=adapter_state_dict is None)
        self._set_trainable(not adapter_config.inference_mode)
        if adapter_state_dict is not None:
            parameters = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in adapter_state_dict.items():
                    parameters[name].copy_(tensor)

    def _build_adapters(self, plan: list[str], warn: bool) -> None:
        layers = self.model.vision_encoder.layers
        if warn:
            widths = {i: layer.adapter.linear1.out_features for i, layer in enumerate(layers) if layer.adapter}
            rebuilt = [i for i, action in enumerate(plan) if action == "build" and i in widths]
            added = [i for i, action in enumerate(plan) if action == "build" and i not in widths]
            removed = [i for i, action in enumerate(plan) if action == "none" and i in widths]
            if rebuilt or added or removed:
                changes = (
                    [
                        f"blocks {rebuilt} rebuilt at width {self.adapter_config.adapter_dim} (they had widths "
                        f"{sorted({widths[i] for i in rebuilt})})"
                    ]
                    if rebuilt
                    else []
                )
                changes += [f"blocks {added} get a new adapter"] if added else []
                changes += [f"blocks {removed} lose their adapter"] if removed else []
                logger.warning(
                    "Sam3DAdapterConfig changes the base model's spatial adapters: %s; new adapters start from fresh "
                    "random weights. To keep the base's adapters, leave adapter_dim=None and give the base's "
                    "adapter_layers (%s).",
                    "; ".join(changes),
                    self.model.config.vision_config.adapter_layers,
                )
        vision = _adapter_vision_config(self.model, self.adapter_config)
        self.model.config.vision_config.adapter_dim = self.adapter_config.adapter_dim
        self.model.config.vision_config.adapter_layers = self.adapter_config.adapter_layers
        for layer, action in zip(layers, plan, strict=True):
            if action == "none":
                layer.adapter = None
            elif action == "build":
                layer.adapter = Sam3DSpatialAdapter(vision).to(layer.layer_norm1.weight.device)
                for module in layer.adapter.modules():
                    self.model._init_weights(module)

    def _set_trainable(self, trainable: bool) -> None:
        groups = set(self.adapter_config.trainable_groups)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(trainable and parameter_group(name) in groups)

    @property
    def config(self):
        return self.model.config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def get_image_embeddings(self, pixel_values: torch.Tensor):
        return self.model.get_image_embeddings(pixel_values)

    def trainable_parameter_names(self) -> list[str]:
        """Names of the tensors the adapter file holds: every parameter of the configured groups."""
        groups = set(self.adapter_config.trainable_groups)
        return [name for name, _ in self.model.named_parameters() if parameter_group(name) in groups]

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per group (`frozen` = SAM's inherited tensors and groups not trained)."""
        groups = set(self.adapter_config.trainable_groups)
        counts = dict.fromkeys([*self.adapter_config.trainable_groups, "frozen"], 0)
        for name, parameter in self.model.named_parameters():
            group = parameter_group(name)
            counts[group if group in groups else "frozen"] += parameter.numel()
        return counts

    def print_trainable_parameters(self) -> None:
        counts = self.parameter_counts()
        frozen = counts.pop("frozen")
        for group, count in counts.items():
            print(f"{group:16s} {count:>12,d}")
        trainable = sum(counts.values())
        total = trainable + frozen
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        parameters = dict(self.model.named_parameters())
        return {name: parameters[name].detach().contiguous() for name in self.trainable_parameter_names()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_model.safetensors` (the trained tensors only) and `adapter_config.json` into
        `save_directory` (created if needed). Only these two files are replaced, each atomically; anything else in
        the folder (notes, a processor config, other runs) is left alone.

        The weights are written first and the config last: the config is what marks a folder as an adapter, so a
        folder whose first save was interrupted holds no config and cannot be loaded half-written, and a reader of
        a re-save sees either the old config or the new one next to complete weights (a config that does not fit
        the weights is refused by `from_pretrained`, which checks every name and shape).

        A folder that holds a model (`config.json` or model weights) is refused with a `ValueError` before anything
        is written: transformers reads any folder with an `adapter_config.json` as a peft adapter, so the model there
        would no longer load. Save the adapter in a folder of its own, e.g. `<model folder>/adapter`."""
        target = _adapter_folder(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        from .version import __version__

        config = dataclasses.replace(self.adapter_config, sam3d_hf_version=__version__)  # as peft records its own
        if config.base_model_name_or_path is None and self.model.config._name_or_path:
            config = dataclasses.replace(config, base_model_name_or_path=self.model.config._name_or_path)
        tensors = self.adapter_state_dict()
        atomic_write(target / ADAPTER_WEIGHTS_NAME, lambda temporary: save_file(tensors, temporary, {"format": "pt"}))
        config.save_pretrained(target)

    @classmethod
    def from_pretrained(
        cls,
        model: Sam3DForPromptableSegmentation,
        adapter_directory: str | os.PathLike,
        is_trainable: bool = False,
        revision: str | None = None,
        **download_kwargs,
    ) -> Sam3DAdapterModel:
        """Put a saved adapter on a base model (e.g. a fresh `from_sam_pretrained` conversion). `adapter_directory`
        is a local folder or a Hub repo id (`"org/sam3d-kits21-adapter"`, at `revision`, through the Hub cache;
        `download_kwargs` such as `cache_dir` or `token` go to `huggingface_hub.snapshot_download`). Every tensor the
        config says is trained must be in the file with the model's shape; anything else is an error, raised before
        the model is changed (a failed load leaves it exactly as it was)."""
        adapter_directory = resolve_adapter_folder(adapter_directory, revision, **download_kwargs)
        config = Sam3DAdapterConfig.from_pretrained(adapter_directory)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        path = Path(adapter_directory) / ADAPTER_WEIGHTS_NAME
        if not path.is_file():
            raise ValueError(f"no {ADAPTER_WEIGHTS_NAME} in {adapter_directory}")
        tensors = _read_safetensors(path)
        try:
            return cls(model, config, adapter_state_dict=tensors)
        except ValueError as error:
            raise ValueError(f"{os.fspath(path)}: {error}") from None

    def merge_and_unload(self) -> Sam3DForPromptableSegmentation:
        """The plain model, adapters included in its architecture (recorded in its config), every parameter trainable
        again. Its `save_pretrained` folder is a normal model folder that needs no adapter files. (Spatial adapters are
        non-linear, so there is nothing to fold into SAM's weights: merging is unwrapping.)"""
        for parameter in self.model.parameters():
            parameter.requires_grad_(True)
        return self.model


def get_adapter_model(model: Sam3DForPromptableSegmentation, adapter_config: Sam3DAdapterConfig) -> Sam3DAdapterModel:
    """Apply the paper's scheme to `model` (built with `from_sam_pretrained`): see [`Sam3DAdapterModel`]."""
    return Sam3DAdapterModel(model, adapter_config)


def lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = DEFAULT_LORA_TARGET_MODULES,
    modules_to_save: list[str] | None = None,
    **kwargs,
) -> LoraConfig:
    """A `peft.LoraConfig` for the paper's LoRA baseline on this model.

    Build the base without spatial adapters (`Sam3DConfig(vision_config={"adapter_layers": []})` or
    `from_sam_pretrained(..., vision_config={"adapter_layers": []})`), then `peft.get_peft_model(model, lora_config())`.
    Targets: every ViT block's `attn.qkv` and `attn.proj` (`DEFAULT_LORA_TARGET_MODULES`); trained in full:
    `DEFAULT_LORA_MODULES_TO_SAVE` (prompt encoder, decoder, necks, patch embedding with its depth taps). At ViT-B with
    `r=16`: 884,736 LoRA parameters + 18,067,840 trained in full = 18,952,576.

    Limits of peft 0.21 here: `modules_to_save` holds modules, not bare parameters, so
    - the depth taps train through the whole patch embedding, SAM's 16x16 kernel and bias included (196,608 + 768
      parameters at ViT-B that the paper's scheme keeps frozen);
    - the depth table `depth_embed` and every block's `rel_pos_d` keep their SAM initialisation (zeros and
      `(rel_pos_h + rel_pos_w) / 2`): training them would mean wrapping the whole vision encoder or attention.
      `target_parameters=["rel_pos_d"]` gives `rel_pos_d` a low-rank (not full) update and works; targeting
      `depth_embed` wraps the vision encoder itself, after which peft cannot reach its children (AttributeError).
    `merge_and_unload()` returns a plain `Sam3DForPromptableSegmentation`.
    """
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        modules_to_save=list(DEFAULT_LORA_MODULES_TO_SAVE if modules_to_save is None else modules_to_save),
        **kwargs,
    )


def enable_full_finetuning(model: Sam3DForPromptableSegmentation) -> int:
    """The full fine-tuning baseline: every parameter trainable (the official `lr` scale stays a frozen buffer).
    Returns the number of trainable parameters."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_LORA_MODULES_TO_SAVE",
    "DEFAULT_LORA_TARGET_MODULES",
    "PARAMETER_GROUPS",
    "PEFT_TYPE",
    "Sam3DAdapterConfig",
    "Sam3DAdapterModel",
    "enable_full_finetuning",
    "get_adapter_model",
    "lora_config",
    "parameter_group",
    "resolve_adapter_folder",
]
