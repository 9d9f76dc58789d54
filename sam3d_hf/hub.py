"""Model cards and Hub uploads for trained Sam3D folders.

Where the card files live: one copy, the repository's top-level `hub_cards/` folder (the Jinja template
`modelcard_template.md` and one YAML file of dataset facts per dataset). setup.py installs that same folder as the
package data `sam3d_hf/hub_cards/` (a `package_dir` mapping), so an installed wheel finds it next to this module and a
source checkout one level up. Dataset files hold only what the processor does not know (name, labels, data licence,
links, citation): every preprocessing number in a card is read from the processor pushed with the weights.

The user's folder is never written to: the rendered `README.md`, a full model's `config.json` with the transformers
pipeline under `custom_pipelines` (its code comes from the installed package) and, for `adapter_only`, the
`adapter_config.json` that names the base on the Hub are uploaded from memory; every other file is uploaded from the
folder as it is. Write a local copy of the card with `render_model_card(folder, ...).save(path)` if you want one.

Evaluation summary (read only by [`load_evaluation_summary`]), a JSON file or dict: what `sam3d evaluate` writes as
`summary.json` (`{"format": "sam3d-hf-evaluation-v1", "dataset", "split", "settings": {"tolerance_mm", ...},
"summary": <sam3d_hf.metrics.summarize output>, ...}`: its rows ("3DSAM-adapter, 1 click (per_lesion)") become the
protocols, the card's dataset picks the column), or the explicit format

```
{"dataset": "kits21", "split": "test",            # split optional
 "protocols": {"1 click": {"dice": {"mean": 0.71, "std": 0.22}, "nsd": {"mean": 0.66, "std": 0.23},
                           "n": 30, "tolerance_mm": 5.0}, ...}}
```

Every value the card states comes from a record: the NSD tolerance from the summary (one that does not record it is
refused, never given a default), the training section from the run's `training_info.json` ([`load_training_record`],
written by `sam3d train` into every saved model folder), the parameter count from the model's config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id
from safetensors import safe_open

from .peft_sam3d import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, Sam3DAdapterConfig
from .pipeline import remote_code_files
from .processing_sam3d import Sam3DProcessor

__all__ = [
    "UPLOAD_IGNORE_PATTERNS",
    "check_model_reference",
    "load_dataset_card_data",
    "load_evaluation_summary",
    "load_training_record",
    "looks_like_hub_id",
    "push_to_hub",
    "render_model_card",
    "upload_plan",
]

TEMPLATE_NAME = "modelcard_template.md"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# Where adapter files may be: the folder itself, or the `adapter/` subfolder that examples/train.py writes next to the
# merged model and the processor.
ADAPTER_SUBFOLDERS = (".", "adapter")
# Never uploaded from a full model folder: training checkpoints and logs (accelerate's `checkpoint_*`, `step_*`,
# `epoch_*` folders), hidden files (half-written `.name.*` temporaries, `.git`), the user's own README (replaced by the
# rendered card) and medical images (predicted masks or scans next to the weights are patient data).
UPLOAD_IGNORE_PATTERNS = [
    *(
        p
        for name in ("checkpoint_*", "checkpoints", "step_*", "epoch_*", "logs", "runs", "__pycache__", ".*")
        for p in (f"{name}", f"{name}/*", f"*/{name}", f"*/{name}/*")
    ),
    "*.log",
    "*.nii",
    "*.nii.gz",
    "*.nrrd",
    "*.nhdr",
    "*.dcm",
    "README.md",
]
TRAINING_RECORD = "training_info.json"
TRAINING_FORMAT = "sam3d-hf-training-v1"
DATASET_KEYS = (
    "key", "name", "full_name", "presets", "modality", "structure", "labels", "limits", "data_license", "links",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Inputs of the card
# ----------------------------------------------------------------------------------------------------------------------
def cards_dir() -> Path:
    """The `hub_cards` folder: installed next to this module, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "hub_cards", here.parent / "hub_cards"):
        if (candidate / TEMPLATE_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"no hub_cards/{TEMPLATE_NAME} next to {here} or in {here.parent}; reinstall sam3d-hf")


def _dataset_files() -> dict[str, Path]:
    return {path.stem: path for path in sorted(cards_dir().glob("*.yaml"))}


def load_dataset_card_data(dataset: str | os.PathLike) -> dict[str, Any]:
    """Dataset facts for a card: a key of `hub_cards/` (`kits21`, `msd_pancreas`, `lits17`, `msd_colon`, `synthetic`,
    `generic`) or the path of your own YAML file in the same format (copy `hub_cards/generic.yaml`)."""
    files = _dataset_files()
    if isinstance(dataset, str) and dataset in files:
        path = files[dataset]
    elif isinstance(dataset, (str, os.PathLike)) and str(dataset).endswith((".yaml", ".yml")):
        path = Path(dataset)
        if not path.is_file():
            raise ValueError(f"dataset file {path} does not exist")
    else:
        raise ValueError(
            f"unknown dataset {dataset!r}; expected one of {sorted(files)} or the path of a .yaml file written like "
            f"{files['generic']}"
        )
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = [key for key in DATASET_KEYS if not isinstance(values, dict) or key not in values]
    if missing:
        raise ValueError(f"dataset file {path} lacks the keys {missing}; see {files['generic']} for the format")
    values.setdefault("citation", None)
    return values


def _dataset_for_preset(preset: str | None) -> str:
    """The `hub_cards` dataset named by the processor's preset or listing it in its `presets` (a `synthetic` processor
    gets the `synthetic` card); `generic` for custom processors."""
    for key, path in _dataset_files().items():
        if preset == key or preset in (yaml.safe_load(path.read_text(encoding="utf-8")).get("presets") or []):
            return key
    return "generic"


def _load_json(source: str | os.PathLike | Mapping, what: str) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path to a JSON file or a dict, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{what} file {path} does not exist")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} file {path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} file {path} must hold a JSON object, got {type(values).__name__}")
    return values


def _number(value: Any, where: str, undefined_ok: bool = False) -> float:
    """A number of the summary; `undefined_ok`: `null` (how evaluate.py writes the NaN std of a single case) is NaN."""
    if value is None and undefined_ok:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"evaluation summary: {where} must be a number, got {value!r}")
    return float(value)


def _from_metrics_summary(data: Mapping[str, Any], dataset: str | None) -> dict[str, Any]:
    """The `protocols` format from `sam3d_hf.metrics.summarize(records)` output (`{row: {dataset: stats}}`), bare or
    wrapped as `{"summary": ..., "tolerance_mm": ..., "split": ...}`. The column named like the card's dataset is
    used, else the only column (evaluate.py names it by `--dataset_name`) unless that one names another card's dataset
    (its key or preset)."""
    summary = data.get("summary", data)
    columns = sorted({column for row in summary.values() for column in row})
    other_cards = set()  # names that say the column is another card's dataset: its key or one of its presets
    for key, path in _dataset_files().items():
        if dataset is not None and key != dataset:
            other_cards |= {key, *(yaml.safe_load(path.read_text(encoding="utf-8")).get("presets") or [])}
    if dataset in columns:
        column = dataset
    elif len(columns) == 1 and columns[0] not in other_cards:
        column = columns[0]
    else:
        if dataset is None:
            raise ValueError(f"the evaluation summary has results for datasets {columns}: pass the dataset to read")
        raise ValueError(
            f"the evaluation summary has results for datasets {columns}, the card is for {dataset!r}: "
            f"evaluate with --dataset_name {dataset} (the summary's column name), or give the card the evaluated "
            "dataset (--dataset)"
        )
    tolerance = (data.get("settings") or {}).get("tolerance_mm", data.get("tolerance_mm"))
    if tolerance is None:  # a bare `summarize` output: its NSD could be at any tolerance
        raise ValueError(
            "the evaluation summary does not record the NSD tolerance it was computed with; give the summary.json "
            "that sam3d evaluate writes (it records its settings), or wrap the rows as {'summary': ..., "
            "'tolerance_mm': ...}"
        )
    protocols = {
        row: {
            "dice": {"mean": stats.get("dice_mean"), "std": stats.get("dice_std")},
            "nsd": {"mean": stats.get("nsd_mean"), "std": stats.get("nsd_std")},
            "n": stats.get("n"),
            "tolerance_mm": tolerance,
        }
        for row, per_dataset in summary.items()
        if isinstance(stats := per_dataset.get(column), dict)
    }
    return {
        "dataset": column if column in _dataset_files() else None,
        "split": data.get("split"),
        "protocols": protocols,
        "settings": data.get("settings"),
        "sam3d_hf_version": data.get("sam3d_hf_version"),
        # sam3d evaluate's interactive curves are for its own dataset: kept when that is the column read
        "interactive": interactive
        if (interactive := data.get("interactive")) and column == data.get("dataset")
        else None,
    }


def load_evaluation_summary(source: str | os.PathLike | Mapping, dataset: str | None = None) -> dict[str, Any]:
    """Read and check an evaluation summary: the `protocols` format of the module docstring, or the output of
    `sam3d_hf.metrics.summarize(records)` (bare or as `{"summary": ..., "tolerance_mm": ..., "split": ...}`; its rows
    become the protocols and `dataset` picks its column, or the only one). Returns `{"dataset", "split", "protocols":
    {name: {"dice": {"mean", "std"}, "nsd": {"mean", "std"}, "n", "tolerance_mm"}}}` with floats; a std may be
    `null` (NaN: one case) and is then left out of the card."""
    summary = _load_json(source, "evaluation summary")
    inner = summary.get("summary", summary)
    if "protocols" not in summary and isinstance(inner, dict) and inner:
        if all(isinstance(row, dict) and all(isinstance(v, dict) for v in row.values()) for row in inner.values()):
            summary = _from_metrics_summary(summary, dataset)
    protocols = summary.get("protocols")
    if not isinstance(protocols, dict) or not protocols:
        raise ValueError(
            "evaluation summary needs a non-empty 'protocols' object, e.g. {'1 click': {'dice': {'mean': 0.7, "
            f"'std': 0.2}}, 'nsd': {{...}}, 'n': 30, 'tolerance_mm': 5.0}} (or give sam3d_hf.metrics.summarize's "
            f"output); got {protocols!r}"
        )
    checked = {}
    for name, values in protocols.items():
        if not isinstance(values, dict):
            raise ValueError(f"evaluation summary: protocol {name!r} must be an object, got {values!r}")
        entry = {}
        for metric in ("dice", "nsd"):
            stats = values.get(metric)
            if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
                raise ValueError(
                    f"evaluation summary: protocol {name!r} needs '{metric}': {{'mean': ..., 'std': ...}}, "
                    f"got {stats!r}"
                )
            entry[metric] = {
                "mean": _number(stats["mean"], f"{name}.{metric}.mean"),
                "std": _number(stats["std"], f"{name}.{metric}.std", undefined_ok=True),
            }
        n = values.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"evaluation summary: protocol {name!r} needs 'n', the number of cases (>0), got {n!r}")
        entry["n"] = n
        entry["tolerance_mm"] = _number(values.get("tolerance_mm"), f"{name}.tolerance_mm")
        checked[str(name)] = entry
    return {
        "dataset": summary.get("dataset"),
        "split": summary.get("split"),
        "protocols": checked,
        "settings": summary.get("settings"),
        "sam3d_hf_version": summary.get("sam3d_hf_version"),
        "interactive": None if summary.get("interactive") is None else _interactive(summary["interactive"]),
    }


INTERACTIVE_METRICS = ("dice", "nsd", "nsd_2mm")


def _interactive(block: Any) -> dict[str, Any]:
    """The `interactive` block of sam3d evaluate's summary.json (`sam3d_hf.metrics.summarize_interactive`), checked:
    the per-round curves, areas under them, NSD tolerances and counts the card states."""
    if not isinstance(block, Mapping):
        raise ValueError(f"evaluation summary: 'interactive' must be an object (summarize_interactive), got {block!r}")
    rounds = block.get("rounds")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"evaluation summary: interactive.rounds must be an int >= 1, got {rounds!r}")
    checked: dict[str, Any] = {"rounds": rounds}
    for metric in INTERACTIVE_METRICS:
        curve = block.get(f"{metric}_per_round")
        if not isinstance(curve, list) or len(curve) != rounds + 1:
            raise ValueError(
                f"evaluation summary: interactive.{metric}_per_round must list {rounds + 1} means (rounds "
                f"0..{rounds}), got {curve!r}"
            )
        checked[f"{metric}_per_round"] = [_number(v, f"interactive.{metric}_per_round") for v in curve]
        for stat in ("auc_mean", "auc_std", "final_mean"):
            key = f"{metric}_{stat}"
            checked[key] = _number(block.get(key), f"interactive.{key}", undefined_ok=stat.endswith("std"))
    for key in ("auc_max", "n_cases", "corrections", "repeated_corrections"):
        value = block.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"evaluation summary: interactive.{key} must be an int >= 0, got {value!r}")
        checked[key] = value
    for key in ("nsd_tolerance_mm", "nsd_2mm_tolerance_mm"):
        checked[key] = _number(block.get(key), f"interactive.{key}")
    return checked


def _interactive_card(block: Mapping[str, Any]) -> dict[str, Any]:
    """What the card's interactive section shows, every number from the summary's block (4 decimals)."""
    labels = ["first click", *(f"correction {r}" for r in range(1, block["rounds"] + 1))]
    rows = [
        {"after": label, **{m: f"{block[f'{m}_per_round'][r]:.4f}" for m in INTERACTIVE_METRICS}}
        for r, label in enumerate(labels)
    ]
    auc = {
        m: _mean_std_text({"mean": block[f"{m}_auc_mean"], "std": block[f"{m}_auc_std"]}) for m in INTERACTIVE_METRICS
    }
    return {**block, "rows": rows, "auc": auc}


def load_training_record(source: str | os.PathLike | Mapping) -> dict[str, Any]:
    """Read a training record: the `training_info.json` that `sam3d train` writes into each saved model folder (what
    the run did: initialisation, scheme, optimisation, steps, batch, data, seed, and which step was saved)."""
    record = _load_json(source, "training record")
    if record.get("format") != TRAINING_FORMAT:
        raise ValueError(
            f"the training record must be a {TRAINING_RECORD} written by sam3d train (format {TRAINING_FORMAT!r}), got "
            f"format {record.get('format')!r}; the run's command-line arguments (logs/config.json) are not a record of "
            "what it did"
        )
    return record


def _mean_std_text(stats: Mapping[str, float]) -> str:
    """`mean ± std` with 4 decimals; the mean alone when the std is undefined (one case)."""
    text = f"{stats['mean']:.4f}"
    return text if math.isnan(stats["std"]) else f"{text} ± {stats['std']:.4f}"


_SCHEMES = {"adapter": "spatial adapters (the paper's scheme)", "lora": "LoRA (baseline)", "full": "full fine-tuning"}


def _corrections_text(values: Mapping[str, Any]) -> str:
    """The card's line on the mask prompt and the simulated correction rounds (recipe values of the record)."""
    rounds = values.get("correction_rounds", 0)
    prompt = "the previous mask and the clicks as decoder maps" if values.get("use_mask_prompt") else "no mask prompt"
    if not rounds:
        return f"none simulated; {prompt}"
    return (f"0 to {rounds} simulated rounds per step (a click at the centre of the largest error of the model's own "
            f"prediction, without gradient), loss on the last; {prompt}")  # fmt: skip


def _training_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The card's training table, every row from the record."""
    init, optim, batch, data = record["initialisation"], record["optimisation"], record["batch"], record["data"]
    started = {
        "random": "random weights (no pretrained SAM weights)",
        "SAM": f"SAM's 2D weights `{init['source']}`, inflated to 3D",
        "sam3d-hf model": f"the sam3d-hf model `{init['source']}`",
    }[init["kind"]]
    selection = record["selection"]
    saved = f"{selection['saved']} (step {selection['step']:,}"
    if "validation_dice" in selection:
        saved += f", validation Dice {selection['validation_dice']:.4f}"
    if "validation_dice_loss" in selection:
        saved += f", validation Dice loss {selection['validation_dice_loss']:.4f}"
    saved += ")"
    clicks = data["clicks"]
    recipe = record["recipe"]
    overridden = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(recipe["overridden"].items())) or "none"

    def voxels(count: int, what: str) -> str:
        return f"{count} {what} voxel{'' if count == 1 else 's'}"

    if clicks["scheme"] == "official":
        click_text = (f"{voxels(clicks['positive'], 'tumour')} and {voxels(clicks['patch'], 'patch')}, "
                      "unlabelled (the official scheme)")  # fmt: skip
    elif clicks["scheme"] == "labelled":
        click_text = (f"{voxels(clicks['positive'], 'tumour')} and {voxels(clicks['patch'], 'patch')} with their "
                      f"labels, and {clicks['negative']} negatives next to the lesion")  # fmt: skip
    elif clicks["scheme"] == "legacy":
        click_text = (f"{clicks['positive']} positive, {clicks['negative']} negative; {clicks['patch']} when the "
                      "patch holds no tumour")  # fmt: skip
    else:
        click_text = clicks["scheme"]
    rows = [
        ("recipe", f"`{recipe['name']}` (docs/recipes.md); overridden: {overridden}"),
        ("initialisation", started),
        ("fine-tuning", _SCHEMES.get(record["finetune"], record["finetune"])),
        ("trainable parameters", f"{record['parameters']['trainable']:,} of {record['parameters']['total']:,}"),
        ("optimiser", f"{optim['optimizer']}, learning rate {optim['learning_rate']:g}, betas "
                      f"{' / '.join(f'{b:g}' for b in optim['betas'])}, weight decay {optim['weight_decay']:g}"),
        ("schedule", optim["schedule"]),
        ("gradient clipping", optim["gradient_clipping"]),
        ("loss", optim["loss"]),
        ("optimiser steps", f"{record['steps']:,}"),
        ("epochs", f"{record['epochs']:,} ({record['updates_per_epoch']:,} optimiser steps each; the steps decide)"),
        ("batch", f"{batch['per_device']} per device × {batch['processes']} process(es) × {batch['accumulation']} "
                  f"accumulation = {batch['effective']}"),
        ("training patch", " × ".join(str(v) for v in data["patch_size"]) + " voxels (D, H, W)"),
        ("crop sampler", data["sampler"]),
        ("clicks per patch", click_text),
        ("corrections", _corrections_text(recipe["values"])),
        ("augmentation", data["augmentation"]),
        ("scans", f"{data['training_cases']} training, {data['validation_cases']} validation ({data['split']})"),
        ("validation", "tumour-centred patches, Dice loss" if data["validation"] == "patches" else
                       "whole scans, one click per lesion, Dice"),
        ("mixed precision", optim["mixed_precision"]),
        ("seed", str(record["seed"])),
        ("weights saved at", saved),
        ("trained with", f"sam3d-hf {record['sam3d_hf_version']}"),
    ]  # fmt: skip
    return rows


def _preprocessing(processor: Sam3DProcessor) -> dict[str, Any]:
    """Every preprocessing value the card shows, taken from the processor object (nothing typed by hand)."""
    image = processor.image_processor
    return {
        "preset": image.preset,
        "window": list(image.window),
        "intensity_mean": image.intensity_mean,
        "intensity_std": image.intensity_std,
        "target_spacing": list(image.target_spacing),
        "anisotropy_threshold": image.anisotropy_threshold,
        "axis_order": image.axis_order,
        "stored_axes": None if image.stored_axes is None else list(image.stored_axes),
        "resampling": image.resampling,
        "padding": image.padding,
        "target_label": image.target_label,
        "patch_size": list(processor.patch_size),
        "cluster_margin": processor.cluster_margin,
    }


def _parameter_count(folder: Path, adapter_dir: Path | None) -> int:
    """Parameters of the published weights: an adapter's tensors (from the file's header), or the model's
    `parameters()` as its config builds them (on the meta device: nothing is allocated; buffers such as the frozen
    relative-position scales, stored in the weights file too, are not parameters)."""
    if adapter_dir is not None:
        with safe_open(adapter_dir / ADAPTER_WEIGHTS_NAME, framework="pt") as handle:
            return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    import torch

    from .configuration_sam3d import Sam3DConfig
    from .modeling_sam3d import Sam3DForPromptableSegmentation

    with torch.device("meta"):
        model = Sam3DForPromptableSegmentation(Sam3DConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def _folder_kind(folder: Path) -> tuple[list[Path], Path | None]:
    """(model weight files, the folder holding the adapter files or None) of a trained folder."""
    model_files = sorted(folder.glob("model*.safetensors")) if (folder / "config.json").is_file() else []
    adapter_dirs = [folder / sub for sub in ADAPTER_SUBFOLDERS]
    adapter_dir = next(
        (d for d in adapter_dirs if (d / ADAPTER_CONFIG_NAME).is_file() and (d / ADAPTER_WEIGHTS_NAME).is_file()), None
    )
    return model_files, adapter_dir


def _evaluation_settings(summary: Mapping[str, Any]) -> str | None:
    """The evaluation's recorded settings in one line (what `sam3d evaluate` writes into summary.json)."""
    settings = summary.get("settings")
    if not settings:
        return None
    parts = [f"{settings['cases']} cases" if "cases" in settings else None]
    if settings.get("protocols"):
        parts.append("protocols " + ", ".join(str(p) for p in settings["protocols"]))
    if settings.get("click_placement"):
        parts.append(f"clicks placed `{settings['click_placement']}`")
    if {"correction", "interactive"} & set(settings.get("protocols") or []):
        parts.append(f"{settings['rounds']} correction rounds")
    if "seed" in settings:
        parts.append(f"click seed {settings['seed']}")
    parts.append(f"NSD tolerance {settings['tolerance_mm']:g} mm")
    if settings.get("bf16"):
        parts.append("bf16 autocast")
    if summary.get("sam3d_hf_version"):
        parts.append(f"sam3d-hf {summary['sam3d_hf_version']}")
    return "; ".join(p for p in parts if p)


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` as the Hub spells ids, whose `owner` is not a local folder; anything else (`./x`, `x`, `a/b/c`,
    `~/x`, `x.json`, or `sam3d-demo/modle` next to a folder `sam3d-demo`) is a local path, so that a missing local
    path is an error at once instead of Hub look-ups and their retries."""
    if name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") != 1:
        return False
    if Path(name.split("/")[0]).is_dir():  # a mistyped folder inside an existing one
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_model_reference(name: str | os.PathLike, what: str = "--model", kind: str = "folder", hint: str = "") -> None:
    """Raise a one-line `ValueError` when `name` can be neither a local `kind` ("folder", "file or folder") nor a Hub
    id to try: a missing local path (see [`looks_like_hub_id`]), or a Hub id while `HF_HUB_OFFLINE` is set. Checked
    before anything is loaded; `hint` ends the message (what to give instead)."""
    from huggingface_hub import constants

    name = os.fspath(name)
    if Path(name).expanduser().exists():
        return
    hint = f"; {hint}" if hint else ""
    if not looks_like_hub_id(name):
        near = Path(name).expanduser().parent
        where = f" ({near} exists: is the last part mistyped?)" if str(near) not in ("", ".") and near.is_dir() else ""
        raise ValueError(f"{what} {name!r}: no such {kind}{where}{hint}")
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{what} {name!r}: no such {kind} (HF_HUB_OFFLINE is set, so it cannot be a Hub id){hint}")


def _check_repo_id(repo_id: Any, what: str) -> str:
    if not isinstance(repo_id, str):
        raise TypeError(f"{what} must be a string 'owner/name', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{what} {repo_id!r} is not a valid Hub repo id: {error}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"{what} must be 'owner/name' (e.g. 'my-lab/sam3d-kits21'), got {repo_id!r}")
    return repo_id


def _usage(repo_id: str, base_model: str | None, adapter: bool) -> str:
    if adapter:
        return "\n".join(
            [
                "import torch",
                "from huggingface_hub import snapshot_download",
                "from sam3d_hf import Sam3DAdapterModel, Sam3DForPromptableSegmentation, Sam3DProcessor, "
                "save_mask_nifti",
                "",
                f'adapter = snapshot_download("{repo_id}")',
                f'base = Sam3DForPromptableSegmentation.from_pretrained("{base_model}", dtype=torch.float32)',
                "model = Sam3DAdapterModel.from_pretrained(base, adapter).merge_and_unload().eval()",
                "processor = Sam3DProcessor.from_pretrained(adapter)",
                "",
                "# One click inside the lesion, as the voxel index (i, j, k) ITK-SNAP / 3D Slicer show for ct.nii.gz",
                'inputs = processor(images="ct.nii.gz", input_points=[[120, 85, 40]])',
                "with torch.inference_mode():",
                "    logits = model(**inputs).logits",
                'save_mask_nifti(processor.post_process_masks(logits, inputs), "ct.nii.gz", "ct_mask.nii.gz")',
            ]
        )
    return "\n".join(
        [
            "import torch",
            "from sam3d_hf import Sam3DForPromptableSegmentation, Sam3DProcessor, save_mask_nifti",
            "",
            f'model = Sam3DForPromptableSegmentation.from_pretrained("{repo_id}", dtype=torch.float32).eval()',
            f'processor = Sam3DProcessor.from_pretrained("{repo_id}")',
            "",
            "# One click inside the lesion, as the voxel index (i, j, k) ITK-SNAP / 3D Slicer show for ct.nii.gz",
            'inputs = processor(images="ct.nii.gz", input_points=[[120, 85, 40]])',
            "with torch.inference_mode():",
            "    logits = model(**inputs).logits",
            'save_mask_nifti(processor.post_process_masks(logits, inputs), "ct.nii.gz", "ct_mask.nii.gz")',
        ]
    )


# ----------------------------------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------------------------------
def render_model_card(
    source: str | os.PathLike | Sam3DProcessor,
    *,
    dataset: str | os.PathLike | None = None,
    evaluation: str | os.PathLike | Mapping | None = None,
    training: str | os.PathLike | Mapping | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    adapter: bool | None = None,
    license: str = "apache-2.0",
    model_name: str | None = None,
) -> ModelCard:
    """Render the model card (a `huggingface_hub.ModelCard`; `str(card)` is the README.md) of a trained checkpoint.

    Args:
        source: a saved folder (model files `config.json` + `model*.safetensors`, or adapter files
            `adapter_config.json` + `adapter_model.safetensors`; and the processor's `processor_config.json`), or a
            [`Sam3DProcessor`] object. The preprocessing section is read from the processor, never typed by hand.
        dataset: a `hub_cards` key (`kits21`, `msd_pancreas`, `lits17`, `msd_colon`, `synthetic`, `generic`) or the path
            of your own YAML file; default: the dataset whose file lists the processor's preset (`generic` if none).
        evaluation: evaluation summary, path or dict (format in the module docstring); fills the table and the
            `model-index` metadata (Dice and NSD per click protocol).
        training: the training record, path or dict (`training_info.json`, see [`load_training_record`]); default:
            the folder's own `training_info.json` when it has one. Fills the training table; without a record the
            card says that none was given.
        repo_id: `owner/name` the card is written for (used in the usage snippet and the default `model_name`).
        base_model: Hub id of the base model; required for an adapter (default: the adapter config's
            `base_model_name_or_path` when that is a Hub id), recorded as `base_model` in the metadata.
        adapter: describe an adapter repository; default: `True` for a folder with adapter files and no model files.
        license: licence of the weights (default `apache-2.0`, inherited from SAM's weights); the code's licence
            (Apache-2.0) and the training data's are recorded separately under `licenses`.
        model_name: name in the title and `model-index` (default: the repo name, else `sam3d-<dataset>`).
    """
    adapter_config, weights_parameters = None, None
    if isinstance(source, Sam3DProcessor):
        processor, adapter = source, bool(adapter)
    elif isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder; give the folder written by save_pretrained")
        model_files, adapter_dir = _folder_kind(folder)
        if adapter is None:
            adapter = adapter_dir is not None and not model_files
        if adapter and adapter_dir is None:
            raise ValueError(
                f"adapter card asked for, but {folder} has no {ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME}"
            )
        if not adapter and not model_files:
            raise ValueError(
                f"{folder} has no model files (config.json + model.safetensors); save the model with "
                "model.save_pretrained(folder), or describe an adapter folder with adapter=True"
            )
        if not any((folder / name).is_file() for name in PROCESSOR_FILES):
            raise ValueError(
                f"{folder} has no processor_config.json: the card reads the preprocessing from it; save the processor "
                "used in training with processor.save_pretrained(folder)"
            )
        processor = Sam3DProcessor.from_pretrained(folder)
        if adapter:
            adapter_config = Sam3DAdapterConfig.from_pretrained(adapter_dir)
        weights_parameters = _parameter_count(folder, adapter_dir if adapter else None)
        if training is None and (folder / TRAINING_RECORD).is_file():
            training = folder / TRAINING_RECORD
    else:
        raise TypeError(f"source must be a folder path or a Sam3DProcessor, got {type(source).__name__}")

    preprocessing = _preprocessing(processor)
    if dataset is None:
        dataset = _dataset_for_preset(preprocessing["preset"])
    facts = load_dataset_card_data(dataset)
    if facts["presets"] and preprocessing["preset"] not in facts["presets"]:
        raise ValueError(
            f"the processor was built with preset {preprocessing['preset']!r} but dataset {facts['key']!r} expects "
            f"one of {facts['presets']}; pass the dataset the model was trained on, or save the right processor "
            f"(Sam3DProcessor.from_preset({facts['presets'][0]!r}))"
        )

    if repo_id is not None:
        _check_repo_id(repo_id, "repo_id")
    if adapter and base_model is None and adapter_config is not None:
        candidate = adapter_config.base_model_name_or_path
        if candidate and not Path(candidate).exists() and candidate.count("/") == 1:
            base_model = candidate
    if adapter and base_model is None:
        raise ValueError(
            "an adapter card needs base_model, the Hub id of the model the adapter goes on (e.g. "
            "'my-lab/sam3d-vit-b'); the adapter config names none (or only a local folder)"
        )
    if base_model is not None:
        _check_repo_id(base_model, "base_model")
    if not isinstance(license, str) or not license:
        raise ValueError(f"license must be a Hub licence id such as 'apache-2.0', got {license!r}")

    model_name = model_name or (repo_id.split("/")[1] if repo_id else f"sam3d-{facts['key']}")
    record = None if training is None else load_training_record(training)
    initialisation = None if record is None else record["initialisation"]["kind"]
    summary = None if evaluation is None else load_evaluation_summary(evaluation, facts["key"])
    if summary is not None and summary["dataset"] not in (None, facts["key"]):
        raise ValueError(
            f"the evaluation summary is for dataset {summary['dataset']!r}, the card for {facts['key']!r}; pass the "
            "summary of this model's evaluation or the matching dataset"
        )
    eval_results, table = [], None
    if summary is not None:
        rows = []
        for protocol, values in summary["protocols"].items():
            common = {
                "task_type": "image-segmentation",
                "task_name": f"promptable {facts['structure']} segmentation",
                "dataset_type": facts["key"],
                "dataset_name": facts["name"],
                "dataset_split": summary["split"],
                "metric_config": protocol,
            }
            eval_results.append(
                EvalResult(
                    metric_type="dice", metric_value=values["dice"]["mean"], metric_name=f"Dice ({protocol})", **common
                )
            )
            eval_results.append(
                EvalResult(
                    metric_type="nsd",
                    metric_value=values["nsd"]["mean"],
                    metric_name=f"NSD ({protocol}, {values['tolerance_mm']:g} mm)",
                    metric_args={"tolerance_mm": values["tolerance_mm"]},
                    **common,
                )
            )
            rows.append(
                {
                    "protocol": protocol,
                    "dice": _mean_std_text(values["dice"]),
                    "nsd": _mean_std_text(values["nsd"]),
                    "tolerance_mm": values["tolerance_mm"],
                    "n": values["n"],
                }
            )
        table = {"rows": rows, "dataset_name": facts["name"], "split": summary["split"]}

    licenses = {
        "code": "apache-2.0",
        "weights": license,
        "training_data": facts["data_license"]["id"] or facts["data_license"]["name"],
        "training_data_confirmed": bool(facts["data_license"]["verified"]),
    }
    card_data = ModelCardData(
        model_name=model_name,
        eval_results=eval_results or None,
        license=license,
        base_model=base_model,
        library_name=None if adapter else "transformers",
        pipeline_tag="image-segmentation",
        tags=["sam3d-hf", "3dsam-adapter", "medical-imaging", "ct", "tumor-segmentation", "3d", facts["key"]],
        licenses=licenses,
    )
    # huggingface_hub folds model_name / eval_results into `model-index`: pass them again so the body sees them.
    return ModelCard.from_template(
        card_data,
        template_path=str(cards_dir() / TEMPLATE_NAME),
        model_name=model_name,
        eval_results=eval_results,
        dataset=facts,
        preprocessing=preprocessing,
        training=None if record is None else _training_rows(record),
        evaluation=table,
        adapter_mode=bool(adapter),
        adapter_config=None if adapter_config is None else adapter_config.to_dict(),
        base_model=base_model,
        weights_parameters=weights_parameters,
        licenses={**licenses, "weights_inherited": license == "apache-2.0" and initialisation == "SAM"},
        evaluation_settings=None if summary is None else _evaluation_settings(summary),
        interactive=None
        if summary is None or summary["interactive"] is None
        else _interactive_card(summary["interactive"]),
        usage=_usage(repo_id or f"your-name/{model_name}", base_model, bool(adapter)),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------------------------------
def upload_plan(folder: str | os.PathLike, adapter_only: bool = False) -> dict[str, Path | bytes]:
    """`{path in the repo: local file, or content made here}` of what [`push_to_hub`] uploads; the card `README.md`
    (and, with `adapter_only`, the `adapter_config.json` naming the base) come on top.

    Full model: every file of the folder but `UPLOAD_IGNORE_PATTERNS`, with `config.json` naming the
    `sam3d-segmentation` pipeline under `custom_pipelines` and this package's code next to it (`remote_code_files`;
    the installed code replaces any copies in the folder), so the repo serves `pipeline("sam3d-segmentation",
    model=repo_id, trust_remote_code=True)` without sam3d-hf. `adapter_only`: the adapter weights (from the folder or
    its `adapter/` subfolder) and the processor config, both at the top of the repo.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give the folder written by save_pretrained")
    if adapter_only:
        plan = {name: folder / name for name in PROCESSOR_FILES if (folder / name).is_file()}
        adapter_dir = _folder_kind(folder)[1]
        if adapter_dir is not None:
            plan[ADAPTER_WEIGHTS_NAME] = adapter_dir / ADAPTER_WEIGHTS_NAME
        return dict(sorted(plan.items()))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    plan = {name: folder / name for name in filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE_PATTERNS)}
    if (folder / "config.json").is_file():
        plan.update(remote_code_files(_load_json(folder / "config.json", "model config")))
    return dict(sorted(plan.items()))


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    adapter_only: bool = False,
    base_model_id: str | None = None,
    dataset: str | os.PathLike | None = None,
    evaluation: str | os.PathLike | Mapping | None = None,
    training: str | os.PathLike | Mapping | None = None,
    license: str = "apache-2.0",
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload Sam3D checkpoint with sam3d-hf",
):
    """Publish a trained folder to the Hub in one commit, with a rendered model card. Returns the `CommitInfo`.

    Full model (default): every file of the folder except checkpoints, logs, hidden files, medical images and the
    folder's own README (`UPLOAD_IGNORE_PATTERNS`), with `config.json` naming the transformers pipeline under
    `custom_pipelines` and the package's code next to it (the repo then serves `pipeline("sam3d-segmentation", ...,
    trust_remote_code=True)`; see [`upload_plan`]). `adapter_only=True`: only `adapter_config.json` (its
    `base_model_name_or_path` set to `base_model_id`), `adapter_model.safetensors` (from the folder or its `adapter/`
    subfolder, as examples/train.py writes it) and the processor config, at the top of the repo, against the named base
    model (also the card's `base_model`). The folder is not modified.

    Args:
        folder: folder written by `save_pretrained` of the model (or adapter, also in an `adapter/` subfolder) and of
            the [`Sam3DProcessor`].
        repo_id: target repository `owner/name`, created (as a model repo) if missing.
        adapter_only: publish the adapter files only; needs `base_model_id` and adapter files in `folder`.
        base_model_id: Hub id of the base model (required with `adapter_only`; else optional), recorded in the card.
        dataset, evaluation, training, license: passed to [`render_model_card`].
        private: create the repository private (an existing repository keeps its visibility).
        revision: branch to commit to (created from the default branch if missing).
        token: Hub token; default: the logged-in user's.
        commit_message: message of the commit.
    """
    folder = Path(folder) if isinstance(folder, (str, os.PathLike)) else folder
    if not isinstance(folder, Path):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}")
    if not folder.is_dir():
        raise ValueError(
            f"folder {folder} does not exist or is not a folder; give the folder written by save_pretrained"
        )
    _check_repo_id(repo_id, "repo_id")
    model_files, adapter_dir = _folder_kind(folder)
    if adapter_only:
        if base_model_id is None:
            raise ValueError(
                "adapter_only=True needs base_model_id, the Hub id of the model the adapter goes on (e.g. "
                "'my-lab/sam3d-vit-b'), so that users can rebuild the model"
            )
        if adapter_dir is None:
            raise ValueError(
                f"adapter_only=True but {folder} has no {ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME}; save the "
                "adapter with Sam3DAdapterModel.save_pretrained(folder)"
            )
    elif not model_files:
        hint = (
            "it holds adapter files: pass adapter_only=True with base_model_id"
            if adapter_dir is not None
            else "save the model with model.save_pretrained(folder)"
        )
        raise ValueError(f"{folder} has no model files (config.json + model.safetensors); {hint}")
    if base_model_id is not None:
        _check_repo_id(base_model_id, "base_model_id")

    card = render_model_card(
        folder,
        dataset=dataset,
        evaluation=evaluation,
        training=training,
        repo_id=repo_id,
        base_model=base_model_id,
        adapter=adapter_only,
        license=license,
    )
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=source if isinstance(source, bytes) else str(source))
        for name, source in upload_plan(folder, adapter_only).items()
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    if adapter_only:
        config = Sam3DAdapterConfig.from_pretrained(adapter_dir)
        config = dataclasses.replace(config, base_model_name_or_path=base_model_id)
        text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
        operations.append(CommitOperationAdd(path_in_repo=ADAPTER_CONFIG_NAME, path_or_fileobj=text.encode("utf-8")))

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision, repo_type="model")
