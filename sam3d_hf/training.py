"""Fine-tune 3DSAM-adapter on your own CT scans with point prompts, on one CPU, one GPU, several GPUs or machines.

The training loop of the package, in the anatomy of the Accelerate / diffusers training scripts: arguments
([`parse_args`]) -> `Accelerator` -> data -> model -> `prepare` -> loop (accumulation, clipping, logging, validation,
checkpoints) -> resume -> saved model folders. `sam3d train` and `examples/train.py` run this module; launch it with
Accelerate (configs in the repository's `examples/accelerate_configs/`):

    accelerate launch -m sam3d_hf.training \
        --data_dir my_msd_task --output_dir runs/kits --model_config vit_b --sam_checkpoint sam_vit_b_01ec64.pth

Data: an MSD-style folder (`dataset.json`, `imagesTr/`, `labelsTr/`) or anything `sam3d_hf.data.index_dataset` reads;
the split is written to `<output_dir>/split.json` once and reused. Outputs in `<output_dir>`:
`checkpoints/checkpoint_<i>/` (`save_state`, only complete ones are resumed; a save killed midway is moved to
`incomplete_checkpoints/` at the next start), `logs/metrics.jsonl` (and TensorBoard when installed), `best_model/` and
`final_model/` (`save_pretrained` model + processor, `adapter/` with the adapter files, `training_info.json`).

Conventions: model tensors `(batch, channel, depth, height, width)`; training clicks are patch voxels `(z, y, x)`;
validation clicks are voxel indices of the stored label volume (NIfTI `(i, j, k)`), given to `Sam3DProcessor`.
"""

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from scipy import ndimage
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .configuration_sam3d import CONFIG_PRESETS, Sam3DConfig
from .data import PRESET_DATASETS, PreprocessedCache, _has_folds, index_dataset, resolve_split, validate_dataset
from .files import atomic_write_text, staged_folder, write_json
from .metrics import correction_click
from .modeling_sam3d import Sam3DForPromptableSegmentation
from .peft_sam3d import Sam3DAdapterConfig, enable_full_finetuning, get_adapter_model, lora_config
from .pipeline import write_remote_code
from .processing_sam3d import Sam3DProcessor
from .recipes import AUGMENTATIONS, CLICK_SCHEMES, RECIPES, SAMPLERS, SCHEDULES, VALIDATIONS
from .sampling import AUGMENTATION_BRANCHES, Sam3DTrainingDataset, sam3d_collate, validation_patch

logger = get_logger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
TRAINING_STATE = "training_state.json"


# Training flags that override a field of the recipe (flag -> recipe field); each defaults to the recipe's value.
RECIPE_FLAGS = {
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "lr_schedule": "schedule",
    "end_factor": "end_factor",
    "lr_warmup_steps": "lr_warmup_steps",
    "num_train_epochs": "num_train_epochs",
    "max_grad_norm": "max_grad_norm",
    "clip_per_part": "clip_per_part",
    "train_batch_size": "train_batch_size",
    "patch_size": "patch_size",
    "clicks": "clicks",
    "num_positive_points": "num_positive_points",
    "num_patch_points": "num_patch_points",
    "num_negative_points": "num_negative_points",
    "sampler": "sampler",
    "augmentation": "augmentation",
    "validation": "validation",
    "mask_prompt": "use_mask_prompt",
    "correction_rounds": "correction_rounds",
}


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module docstring as written, and every option's default."""

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=Formatter)
    recipe = parser.add_argument_group("recipe (docs/recipes.md; each option below marked 'recipe' overrides it)")
    recipe.add_argument(
        "--recipe", choices=list(RECIPES), default="official",
        help="The training method: " + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()),
    )  # fmt: skip
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data_dir", required=True, help="Dataset folder (MSD layout: dataset.json, imagesTr, labelsTr)."
    )
    data.add_argument(
        "--split_file", help="JSON split (train/validation/test case ids), 'official' (the official code's split.pkl "
        "of the dataset, shipped with the package) or an official-format JSON (with 'folds'); default "
        "<output_dir>/split.json, made from --seed if missing.",
    )  # fmt: skip
    data.add_argument("--fold", type=int, default=0, help="Fold of an official split (the official code uses 0).")
    data.add_argument(
        "--preset", help="Processor preset (window, statistics, tumour label, resampling); default: official_kits for "
        "the official recipes, kits21 for legacy. The official_* presets read scans as the official code.",
    )  # fmt: skip
    data.add_argument("--processor", help="A saved Sam3DProcessor folder instead of --preset.")
    data.add_argument(
        "--patch_size", type=int, nargs=3, metavar=("D", "H", "W"),
        help="recipe: training patch (voxels of the processor's resampled grid), multiples of the token stride.",
    )  # fmt: skip
    data.add_argument("--clicks", choices=CLICK_SCHEMES, help="recipe: the click scheme (sam3d_hf.recipes).")
    data.add_argument("--num_positive_points", type=int, help="recipe: clicks in the patch's tumour.")
    data.add_argument(
        "--num_patch_points", "--num_background_points", dest="num_patch_points", type=int,
        help="recipe: clicks anywhere in the patch (official: always added; legacy: only without tumour).",
    )  # fmt: skip
    data.add_argument("--num_negative_points", type=int, help="recipe: labelled negative clicks next to the lesion.")
    data.add_argument("--sampler", choices=SAMPLERS, help="recipe: the crop sampler (official or legacy).")
    data.add_argument(
        "--mask_prompt",
        action=argparse.BooleanOptionalAction,
        help="recipe: the model takes its previous prediction as a prompt.",
    )
    data.add_argument("--correction_rounds", type=int, help="recipe: correction rounds per step, 0 .. N at random.")
    data.add_argument("--augmentation", choices=AUGMENTATIONS, help="recipe: the augmentations.")
    data.add_argument(
        "--augmentation_branch", choices=AUGMENTATION_BRANCHES,
        help="The official augmentation branch (default: the preset's: rotate_zoom for pancreas and colon, zoom else).",
    )  # fmt: skip
    data.add_argument("--no_augment", action="store_true", help="Disable training augmentation (--augmentation none).")
    data.add_argument("--samples_per_volume", type=int, default=1, help="Random patches per training scan per epoch.")
    data.add_argument("--cache_dir", help="Preprocessed-volume cache (default ~/.cache/sam3d-hf/preprocessed).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    data.add_argument("--max_validation_cases", type=int, help="Validate on the first N validation cases only.")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_config", default="vit_b", help=f"A preset ({', '.join(CONFIG_PRESETS)}) or a config JSON file."
    )
    init = model.add_mutually_exclusive_group()
    init.add_argument(
        "--sam_checkpoint", help="SAM 2D weights (.pth, SamModel folder or Hub id), converted on the fly."
    )
    init.add_argument("--init_from", help="A sam3d-hf model folder or Hub id to start from.")
    model.add_argument(
        "--finetune", choices=["adapter", "lora", "full"], default="adapter",
        help="The paper's spatial adapters, or the LoRA / full fine-tuning baselines.",
    )  # fmt: skip
    model.add_argument("--adapter_dim", type=int, help="Spatial adapter width (default: the model config's).")
    model.add_argument("--lora_rank", type=int, default=16, help="LoRA rank (--finetune lora).")
    model.add_argument("--gradient_checkpointing", action="store_true", help="Recompute ViT blocks in backward.")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, help="recipe: patches per device per step.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimiser step.")
    optim.add_argument("--learning_rate", type=float, help="recipe: AdamW learning rate (the peak, or the start).")
    optim.add_argument("--adam_beta1", type=float, help="recipe: AdamW beta1.")
    optim.add_argument("--adam_beta2", type=float, help="recipe: AdamW beta2.")
    optim.add_argument("--weight_decay", type=float, help="recipe: AdamW weight decay.")
    optim.add_argument("--lr_schedule", choices=SCHEDULES, help="recipe: linear per epoch, or per step with warm-up.")
    optim.add_argument("--end_factor", type=float, help="recipe: the last epoch's learning-rate factor (per epoch).")
    optim.add_argument("--lr_warmup_steps", type=int, help="recipe: warm-up steps of the per-step schedule.")
    optim.add_argument("--max_grad_norm", type=float, help="recipe: gradient clipping threshold (L2 norm).")
    optim.add_argument(
        "--clip_per_part", action=argparse.BooleanOptionalAction,
        help="recipe: clip the encoder, prompt encoder and decoder each (the official code), or all together.",
    )  # fmt: skip
    optim.add_argument("--max_train_steps", type=int, help="Optimiser steps; overrides --num_train_epochs.")
    optim.add_argument("--num_train_epochs", type=int, help="recipe: epochs, unless --max_train_steps is given.")
    optim.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], help="Default: the accelerate config's.")
    optim.add_argument("--seed", type=int, default=0, help="Seeds the split, crops, augmentation, clicks and init.")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True, help="Run folder: split, logs, checkpoints, best/final model.")
    run.add_argument("--checkpointing_steps", type=int, default=500, help="save_state every N optimiser steps.")
    run.add_argument(
        "--checkpoints_total_limit", type=int, default=3,
        help="Complete checkpoints kept (older ones go only once a newer one is complete).",
    )  # fmt: skip
    run.add_argument("--resume_from_checkpoint", help="'latest' (newest complete checkpoint) or a checkpoint folder.")
    run.add_argument(
        "--validation", choices=VALIDATIONS,
        help="recipe: tumour-centred patches by Dice loss (official) or whole scans by Dice.",
    )  # fmt: skip
    run.add_argument(
        "--validation_steps", type=int,
        help="Validate every N optimiser steps (0: never); default: every epoch for patch validation, 500 for scans.",
    )  # fmt: skip
    run.add_argument(
        "--report_to", choices=["jsonl", "tensorboard", "all"], default="all",
        help="Trackers: logs/metrics.jsonl, TensorBoard (when installed), or both.",
    )  # fmt: skip
    run.add_argument("--find_unused_parameters", action="store_true", help="DDP option, for custom trainable sets.")
    run.add_argument("--save_rank_checksums", action="store_true", help="Write each rank's weight hashes at the end.")
    args = parser.parse_args(argv)
    if args.no_augment:
        if args.augmentation not in (None, "none"):
            parser.error("--no_augment contradicts --augmentation " + args.augmentation)
        args.augmentation = "none"

    # The recipe, with what the flags override; recorded by the run.
    base = RECIPES[args.recipe]
    args.overridden = {
        flag: list(value) if isinstance(value, (list, tuple)) else value
        for flag, field in RECIPE_FLAGS.items()
        if (value := getattr(args, flag)) is not None and value != getattr(base, field)
        and not (field == "patch_size" and tuple(value) == base.patch_size)
    }  # fmt: skip
    changes = {RECIPE_FLAGS[flag]: tuple(v) if flag == "patch_size" else v for flag, v in args.overridden.items()}
    try:
        args.recipe_values = base.replace(**changes)
    except ValueError as error:
        parser.error(str(error))
    recipe_values = args.recipe_values
    for flag, field in RECIPE_FLAGS.items():  # every recipe value reaches the run through its flag's name too
        setattr(args, flag, getattr(recipe_values, field))
    args.patch_size = list(recipe_values.patch_size)
    if args.validation_steps is None:
        args.validation_steps = -1 if recipe_values.validation == "patches" else 500  # -1: every epoch
    if args.preset is None and args.processor is None:
        args.preset = "kits21" if recipe_values.resampling == "nnunet" else "official_kits"

    # Sanity checks: fail before anything is loaded.
    stride = recipe_values.token_stride
    if any(p <= 0 or p % stride for p in args.patch_size):
        parser.error(
            f"--patch_size must be three positive multiples of {stride} (the token stride), got {args.patch_size}"
        )
    if args.model_config not in CONFIG_PRESETS and not Path(args.model_config).is_file():
        parser.error(f"--model_config must be one of {list(CONFIG_PRESETS)} or a JSON file, got {args.model_config!r}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "samples_per_volume"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if args.learning_rate <= 0 or args.max_grad_norm <= 0 or args.num_train_epochs < 1:
        parser.error("--learning_rate and --max_grad_norm must be > 0, --num_train_epochs >= 1")
    if args.validation_steps < -1:
        parser.error(f"--validation_steps must be >= 0, got {args.validation_steps}")
    if not recipe_values.use_prompt_encoder and args.validation == "scans":
        parser.error("--validation scans places clicks: the prompt-free model validates on patches")
    if args.finetune != "adapter" and args.adapter_dim is not None:
        parser.error("--adapter_dim only applies to --finetune adapter")
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir} is not a folder")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Trackers and checkpoints
# ----------------------------------------------------------------------------------------------------------------------
class JSONLinesTracker(GeneralTracker):
    """Appends one JSON object per `accelerator.log` call to `<logging_dir>/metrics.jsonl` (no extra dependency), with
    its wall time (`time`, seconds since the epoch). A resumed run appends again from its checkpoint's step: the last
    line for a step is the valid one."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, logging_dir: str | os.PathLike):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        """`logs/config.json`: the arguments of the run's first start (a resumed run keeps it; see `main`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.with_name("config.json").exists():
            atomic_write_text(self.path.with_name("config.json"), json.dumps(values, indent=2, default=str))

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:  # with the wall time, to plot curves against it
            file.write(json.dumps({"step": step, **values, "time": round(time.time(), 3)}) + "\n")


def note_changed_arguments(logging_dir: Path, config: dict, step: int, accelerator: Accelerator) -> None:
    """A resumed run whose arguments differ from the first start's (`logs/config.json`, which is kept): warn, naming
    each change, and record the new arguments in `logs/config_resumed_at_step_<step>.json`."""
    try:
        first = json.loads((logging_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    now = json.loads(json.dumps(config, default=str))  # as JSON writes it: tuples are lists
    ignored = {"resume_from_checkpoint"}
    changed = {k: (first.get(k), now.get(k)) for k in sorted({*first, *now} - ignored) if first.get(k) != now.get(k)}
    if not changed:
        return
    text = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
    logger.warning(
        f"Resumed at step {step} with arguments that differ from the run's first start: {text}. The run goes on with "
        f"the new values; logs/config.json keeps the first start's, logs/config_resumed_at_step_{step}.json these."
    )
    if accelerator.is_main_process:
        write_json(logging_dir / f"config_resumed_at_step_{step}.json", now)


def tensorboard_hparams(config: dict) -> dict:
    """The arguments as TensorBoard hyperparameters: `add_hparams` takes only int, float, str and bool, so lists
    (`patch_size`) and dicts (`overridden`) become strings, as the diffusers examples do."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


def checkpoint_index(folder: Path) -> int:
    """The optimiser step a checkpoint was saved at (`checkpoint_<step>`)."""
    return int(folder.name.rsplit("_", 1)[1])


def is_complete(folder: Path) -> bool:
    """A checkpoint is complete when its marker (written last) lists files that all exist with their sizes: a kill
    during `save_state`, or during Accelerate's deletion of an old checkpoint, leaves a folder that fails this."""
    marker = folder / COMPLETE_MARKER
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return False
    if not isinstance(files, dict) or not files:  # a marker must list the checkpoint's files
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    return sorted(folders, key=checkpoint_index)


def set_aside_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Move the checkpoint folders that are not complete (a save, or the deletion of an old checkpoint, killed
    midway) to `<output_dir>/incomplete_checkpoints/`: Accelerate would refuse to save over them, and resuming
    ignores them anyway. Complete checkpoints are never touched. Returns the new locations."""
    moved = []
    for folder in list_checkpoints(output_dir):
        if is_complete(folder):
            continue
        aside = output_dir / "incomplete_checkpoints"
        aside.mkdir(exist_ok=True)
        target, n = aside / folder.name, 1
        while target.exists():
            target, n = aside / f"{folder.name}.{n}", n + 1
        os.replace(folder, target)
        moved.append(target)
    return moved


def mark_complete(folder: Path, training_state: dict) -> None:
    atomic_write_text(folder / TRAINING_STATE, json.dumps(training_state, indent=2))
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != COMPLETE_MARKER}
    atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"files": files}, indent=2))


def remove_old_checkpoints(output_dir: Path, limit: int) -> None:
    """Keep the newest `limit` complete checkpoints. Called once the new checkpoint's marker is written (Accelerate's
    own `total_limit` deletes the oldest one *before* writing the new one, so a kill during the save of a run with a
    limit of 1 would leave nothing to resume from). The marker goes first: a deletion killed midway leaves an
    incomplete folder, set aside at the next start."""
    for folder in [p for p in list_checkpoints(output_dir) if is_complete(p)][:-limit]:
        (folder / COMPLETE_MARKER).unlink()
        shutil.rmtree(folder)


def rng_fingerprint() -> str:
    """A short hash of the global random states that `save_state` stores and `load_state` restores (Python, NumPy,
    torch CPU and CUDA): recorded with each checkpoint and logged after a resume, so the two can be compared."""
    digest = hashlib.sha256(repr(random.getstate()).encode())
    name, keys, position, has_gauss, cached = np.random.get_state()
    digest.update(keys.tobytes() + repr((name, position, has_gauss, cached)).encode())
    digest.update(torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available():
        for state in torch.cuda.get_rng_state_all():
            digest.update(state.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_model_folder(trainee, processor: Sam3DProcessor, finetune: str, target: Path, info: dict) -> None:
    """Write a loadable model folder (`save_pretrained` model + processor, `adapter/` files for adapter/LoRA runs)
    under a temporary name next to `target`, then swap it into place: readers never see a half-written folder."""
    with staged_folder(target) as staging:
        if finetune == "adapter":
            trainee.save_pretrained(staging / "adapter")
            trainee.model.save_pretrained(staging)  # the plain model with its adapters; needs no adapter files
        elif finetune == "lora":
            trainee.save_pretrained(staging / "adapter")
            copy.deepcopy(trainee).merge_and_unload().save_pretrained(staging)
        else:
            trainee.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_remote_code(staging)  # serves pipeline("sam3d-segmentation", ..., trust_remote_code=True) anywhere
        write_json(staging / "training_info.json", info)


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------
def build_config(args) -> Sam3DConfig:
    """The model the recipe trains: its patch and token stride, prompted or prompt-free, with or without click labels
    (the official model has none)."""
    recipe = args.recipe_values
    vision = {"image_size": tuple(args.patch_size), "token_stride": recipe.token_stride}
    if args.finetune == "lora":
        vision["adapter_layers"] = []  # LoRA baseline: no spatial adapters
    prompt = {"use_point_labels": recipe.use_point_labels}
    decoder = {"use_mask_prompt": recipe.use_mask_prompt}
    top = {"use_prompt_encoder": recipe.use_prompt_encoder}
    if args.model_config in CONFIG_PRESETS:
        return Sam3DConfig.from_preset(
            args.model_config, vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, **top
        )
    values = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
    values.setdefault("vision_config", {}).update(vision)
    values.setdefault("prompt_encoder_config", {}).update(prompt)
    values.setdefault("mask_decoder_config", {}).update(decoder)
    return Sam3DConfig(**{**values, **top})


def build_model(args):
    """The trainee (what the optimiser sees) and its plain `Sam3DForPromptableSegmentation` inside."""
    if args.init_from:
        config = Sam3DConfig.from_pretrained(args.init_from)
        if args.recipe_values.use_mask_prompt:  # a new input, zero-initialised: the model computes what it computed
            config.mask_decoder_config.use_mask_prompt = True
        model = Sam3DForPromptableSegmentation.from_pretrained(args.init_from, config=config, dtype=torch.float32)
        if args.finetune == "lora" and model.config.vision_config.adapter_layers != []:
            raise ValueError(
                f"--finetune lora needs a base without spatial adapters, but {args.init_from} has adapter_layers="
                f"{model.config.vision_config.adapter_layers}; use --finetune adapter or full, or a SAM-only base"
            )
        recipe = args.recipe_values
        if model.config.use_prompt_encoder != recipe.use_prompt_encoder:
            kind = "prompted" if model.config.use_prompt_encoder else "prompt-free"
            raise ValueError(
                f"--init_from {args.init_from} is a {kind} model; the recipe {recipe.name!r} trains the other kind"
            )
        if recipe.use_point_labels and not model.config.prompt_encoder_config.use_point_labels:
            raise ValueError(
                f"the recipe {recipe.name!r} gives labelled clicks, but --init_from {args.init_from} has no label "
                "embedding (use_point_labels=False, as official models); start from SAM, or choose --clicks official"
            )
    else:
        config = build_config(args)
        if args.sam_checkpoint:
            model = Sam3DForPromptableSegmentation.from_sam_pretrained(args.sam_checkpoint, config=config)
        else:
            model = Sam3DForPromptableSegmentation(config)
            message = (
                "NO PRETRAINED WEIGHTS: the model starts from random initialisation (no --sam_checkpoint or "
                "--init_from). Fine for tests and smoke runs; real fine-tuning starts from SAM."
            )
            logger.warning("!" * 20 + " " + message + " " + "!" * 20, main_process_only=True)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if args.finetune == "adapter":
        adapter_dim = args.adapter_dim or model.config.vision_config.adapter_dim
        base_name = args.init_from or args.sam_checkpoint
        trainee = get_adapter_model(
            model, Sam3DAdapterConfig(adapter_dim=adapter_dim, base_model_name_or_path=base_name)
        )
    elif args.finetune == "lora":
        import peft

        trainee = peft.get_peft_model(model, lora_config(r=args.lora_rank))
    else:
        enable_full_finetuning(model)
        trainee = model
    return trainee, model


def _public_name(name: str | None) -> str | None:
    """A checkpoint's name as a card may show it: a Hub id as it is, a local path by its last part only."""
    if name is None:
        return None
    return Path(name).name if Path(name).expanduser().exists() else name


def run_facts(args, trainee, processor, accelerator, updates_per_epoch: int, max_train_steps: int) -> dict:
    """What this run does, as recorded facts: written into each saved model folder's `training_info.json` (with the
    `selection`: which step was saved and why), from which the model card's training section is written."""
    from .version import __version__

    recipe = args.recipe_values
    if args.init_from:
        initialisation = {"kind": "sam3d-hf model", "source": _public_name(args.init_from)}
    elif args.sam_checkpoint:
        initialisation = {"kind": "SAM", "source": _public_name(args.sam_checkpoint)}
    else:
        initialisation = {"kind": "random", "source": None}
    parameters = list(trainee.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    if recipe.schedule == "linear_per_epoch":
        schedule = (
            f"linear from 1 to {recipe.end_factor:g} x the learning rate over "
            f"{math.ceil(max_train_steps / updates_per_epoch)} epochs, stepped once per epoch, no warm-up"
        )
    else:
        schedule = (
            f"linear warm-up over {recipe.lr_warmup_steps} steps, then linear decay to 0, stepped per optimiser step"
        )
    clipping = "per part (encoder, prompt encoder, decoder)" if recipe.clip_per_part else "all parameters together"
    return {
        "format": "sam3d-hf-training-v1",
        "sam3d_hf_version": __version__,
        "recipe": {"name": recipe.name, "overridden": args.overridden, "values": recipe.to_dict()},
        "initialisation": initialisation,
        "finetune": args.finetune,
        "parameters": {"trainable": trainable, "total": sum(p.numel() for p in parameters)},
        "optimisation": {
            "optimizer": "AdamW",
            "learning_rate": recipe.learning_rate,
            "betas": [recipe.adam_beta1, recipe.adam_beta2],
            "weight_decay": recipe.weight_decay,
            "schedule": schedule,
            "gradient_clipping": f"L2 norm {recipe.max_grad_norm:g}, {clipping}",
            "loss": "DiceCE (0.5 Dice + 0.5 cross-entropy)",
            "mixed_precision": accelerator.mixed_precision,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "steps": max_train_steps,
        "updates_per_epoch": updates_per_epoch,
        "epochs": math.ceil(max_train_steps / updates_per_epoch),
        "batch": {
            "per_device": recipe.train_batch_size,
            "processes": accelerator.num_processes,
            "accumulation": args.gradient_accumulation_steps,
            "effective": recipe.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        },
        "data": {
            "patch_size": list(recipe.patch_size),
            "processor_preset": processor.image_processor.preset,
            "resampling": processor.image_processor.resampling,
            "patches_per_scan_per_epoch": args.samples_per_volume,
            "sampler": recipe.sampler,
            "augmentation": recipe.augmentation,
            "clicks": {
                "scheme": recipe.clicks if recipe.use_prompt_encoder else "none (prompt-free model)",
                "positive": recipe.num_positive_points,
                "patch": recipe.num_patch_points,
                "negative": recipe.num_negative_points,
            },
            "validation": recipe.validation,
            "split": args.split_description,
        },
        "seed": args.seed,
    }


PARTS = {"encoder": "vision_encoder.", "prompt_encoder": "prompt_encoder.", "mask_decoder": "mask_decoder."}


def parameter_parts(trainee: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The trainable parameters by part (the official code's three optimisers and clipping groups): the image
    encoder's, the prompt encoder's and the mask decoder's; parts without a trainable parameter are left out."""
    parts: dict[str, list[torch.nn.Parameter]] = {name: [] for name in PARTS}
    for name, parameter in trainee.named_parameters():
        if parameter.requires_grad:
            part = next((p for p, prefix in PARTS.items() if prefix in name), None)
            assert part is not None, f"trainable parameter {name} belongs to no part"
            parts[part].append(parameter)
    return {name: group for name, group in parts.items() if group}


def clip_gradients(accelerator: Accelerator, parts: dict[str, list[torch.nn.Parameter]], args) -> torch.Tensor:
    """Clip at `max_grad_norm`: each part on its own (`clip_per_part`, the official code) or all together. Returns
    the norm of all gradients before clipping (what is logged)."""
    if not args.clip_per_part:
        return accelerator.clip_grad_norm_([p for group in parts.values() for p in group], args.max_grad_norm)
    accelerator.unscale_gradients()  # once per step (mixed precision); each part is then clipped by torch
    norms = [torch.nn.utils.clip_grad_norm_(group, args.max_grad_norm) for group in parts.values()]
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


@torch.no_grad()
def validation_patch_scores(model, processor: Sam3DProcessor, rows, args, epoch: int, accelerator: Accelerator):
    """`(case_id, Dice loss)` of each of `rows`' `(position, row)` scans on its official validation patch
    ([`sam3d_hf.sampling.validation_patch`], drawn from `(seed, epoch, position)`): MONAI `DiceLoss(
    include_background=False, softmax=True, to_onehot_y=True)`, the official validation metric (lower is better)."""
    from monai.losses import DiceLoss

    criterion = DiceLoss(include_background=False, softmax=True, to_onehot_y=True)
    cache = PreprocessedCache(processor, args.cache_dir)
    prompted = model.config.use_prompt_encoder
    scores = []
    was_training = model.training
    model.eval()
    for position, row in rows:
        rng = np.random.default_rng(np.random.SeedSequence([args.seed, epoch, position]))
        patch = validation_patch(cache.get(row), processor.image_processor, args.patch_size, rng,
                                 num_points=args.num_positive_points if prompted else 0)  # fmt: skip
        inputs = {"pixel_values": patch["pixel_values"].to(accelerator.device)}
        if prompted:
            inputs.update(input_points=patch["input_points"].to(accelerator.device),
                          input_labels=patch["input_labels"].to(accelerator.device))  # fmt: skip
        with accelerator.autocast():
            logits = model(**inputs).logits.float()
        scores.append((row["case_id"], float(criterion(logits, patch["labels"][:, None].to(logits.device)))))
    model.train(was_training)
    return scores


def simulate_corrections(model: Sam3DForPromptableSegmentation, batch: dict, rounds: int) -> dict:
    """The batch after `rounds` simulated correction rounds, as interactive segmenters are trained (SAM's iterative
    point sampling, SAM-Med3D, nnInteractive): each round predicts without gradient from the clicks so far and the
    previous prediction, then adds one labelled click per patch at the centre of the largest error region of that
    prediction against the patch's label (`correction_click`: positive in a miss, negative in a false positive;
    padding `-1` where the prediction is already perfect) and keeps its foreground probabilities as the next mask
    prompt. The encoder runs once for all rounds; the returned batch (`input_points`, `input_labels` extended by
    `rounds` clicks, `input_masks` the last round's probabilities) is then trained on as any batch, so only the last
    prediction gets a gradient and the rounds change no weight.

    Args:
        model: the plain model (not a DDP or peft wrapper), with `mask_decoder_config.use_mask_prompt=True`.
        batch: a training batch of `sam3d_collate` (`labels (B, D, H, W)`, clicks in patch voxels `(z, y, x)`).
        rounds: the number of rounds (0 returns the batch unchanged).
    """
    if rounds == 0:
        return batch
    truth = batch["labels"].reshape(batch["labels"].shape[0], *batch["pixel_values"].shape[2:]).bool().cpu().numpy()
    points, labels, masks = batch["input_points"], batch["input_labels"], None
    with torch.no_grad():
        embeddings = model.get_image_embeddings(batch["pixel_values"])
        for _ in range(rounds):
            logits = model(image_embeddings=embeddings, input_points=points, input_labels=labels, input_masks=masks)
            masks = logits.logits.float().softmax(1)[:, 1:]
            predicted = (masks[:, 0] >= 0.5).cpu().numpy()
            new_points, new_labels = torch.zeros(len(truth), 1, 3), torch.full((len(truth), 1), -1)
            for row, (label, prediction) in enumerate(zip(truth, predicted, strict=True)):
                click = correction_click(label, prediction, (1.0, 1.0, 1.0))  # patch voxels are isotropic
                if click is not None:
                    new_points[row, 0], new_labels[row, 0] = torch.from_numpy(click[0]), click[1]
            points = torch.cat([points, new_points.to(points)], dim=1)
            labels = torch.cat([labels, new_labels.to(labels)], dim=1)
    return {**batch, "input_points": points, "input_labels": labels, "input_masks": masks}


def correction_rounds(seed: int, step: int, process: int, most: int) -> int:
    """The step's number of correction rounds, uniform in `0 .. most`, from (seed, step, process) alone: a resumed
    run draws what the uninterrupted run drew."""
    return int(np.random.default_rng([seed, step, process]).integers(0, most + 1)) if most else 0


def weight_checksums(model: torch.nn.Module) -> dict[str, str]:
    return {
        name: hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        for name, tensor in model.state_dict().items()
    }


# ----------------------------------------------------------------------------------------------------------------------
# Validation: whole scans through the processor, one click per lesion, Dice in the original geometry
# ----------------------------------------------------------------------------------------------------------------------
def lesion_clicks(truth: np.ndarray) -> list[list[int]]:
    """One click per connected lesion, at its deepest voxel (largest inscribed sphere, Euclidean distance transform);
    voxel indices `(i, j, k)` of the stored volume."""
    components, _ = ndimage.label(truth)
    clicks = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        lesion = np.pad(components[box] == index, 1)  # pad so that lesions touching the border have an edge there
        depth = ndimage.distance_transform_edt(lesion)
        deepest = np.unravel_index(np.argmax(depth), depth.shape)
        clicks.append([int(d - 1 + s.start) for d, s in zip(deepest, box)])
    return clicks


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(prediction, truth).sum() / total)


@torch.no_grad()
def validation_scores(model, processor: Sam3DProcessor, rows, accelerator: Accelerator) -> list[tuple[str, float]]:
    """`(case_id, Dice)` of each of `rows`' scans that contains the target structure (the others are skipped)."""
    target_label = processor.image_processor.target_label
    scores = []
    was_training = model.training
    model.eval()
    for row in rows:
        stored = np.asanyarray(nib.load(row["label"]).dataobj)
        truth = stored == target_label if target_label is not None else stored > 0
        clicks = lesion_clicks(truth)
        if not clicks:
            continue
        inputs = processor(images=row["image"], input_points=clicks)
        logits = []
        for b in range(len(inputs["pixel_values"])):  # one patch at a time: bounded memory at ViT-B
            with accelerator.autocast():
                out = model(
                    pixel_values=inputs["pixel_values"][b : b + 1].to(accelerator.device),
                    input_points=inputs["input_points"][b : b + 1].to(accelerator.device),
                    input_labels=inputs["input_labels"][b : b + 1].to(accelerator.device),
                )
            logits.append(out.logits.float().cpu())
        mask = processor.post_process_masks(torch.cat(logits), inputs).numpy().astype(bool)
        scores.append((row["case_id"], dice(mask, truth)))
    model.train(was_training)
    return scores


# ----------------------------------------------------------------------------------------------------------------------
def check_output_dir(output_dir: Path) -> None:
    """Create `output_dir` (and its parents) or stop with one line saying why it cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SystemExit(f"error: --output_dir {output_dir}: a file is in the way, not a folder") from None
    except OSError as error:
        raise SystemExit(f"error: --output_dir {output_dir} cannot be created ({error.strerror})") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --output_dir {output_dir} is not writable by this user; choose another folder")


def main(argv=None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir)
    logging_dir = output_dir / "logs"
    trackers = [JSONLinesTracker(logging_dir)]
    if args.report_to in ("tensorboard", "all"):
        try:
            import tensorboard  # noqa: F401

            trackers.append("tensorboard")
        except ImportError:
            if args.report_to == "tensorboard":
                raise SystemExit(
                    'error: --report_to tensorboard needs TensorBoard: pip install "sam3d-hf[train]"'
                ) from None
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers,
        # Checkpoints are named by their step (`checkpoint()` below); no total_limit: remove_old_checkpoints keeps the
        # newest complete ones.
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
        # The sampler's order depends only on (seed, epoch): a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if not accelerator.is_local_main_process:
        for name in ("transformers", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
    set_seed(args.seed)

    existing = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    if existing and not args.resume_from_checkpoint:
        raise SystemExit(
            f"error: {output_dir}/checkpoints already holds {len(existing)} checkpoint(s); pass "
            "--resume_from_checkpoint latest to continue that run, or choose another --output_dir"
        )

    # Data: index, split once, check every case before the first step.
    if args.processor:
        processor = Sam3DProcessor.from_pretrained(args.processor)
        if tuple(processor.patch_size) != tuple(args.patch_size):
            processor.patch_size = tuple(args.patch_size)
    else:
        # 16 voxels of context around click clusters at 128³, as the processor's default; scaled for small patches.
        margin = min(args.patch_size) // 8
        processor = Sam3DProcessor.from_preset(args.preset, patch_size=tuple(args.patch_size), cluster_margin=margin)
    recipe = args.recipe_values
    if processor.image_processor.resampling != recipe.resampling:
        logger.warning(
            f"The recipe {recipe.name!r} reads scans with resampling={recipe.resampling!r} (the "
            f"{'official_* presets' if recipe.resampling == 'official' else 'paper presets such as kits21'}); this "
            f"processor resamples {processor.image_processor.resampling!r}. Training goes on with the processor's."
        )
    # The split: --split_file (a JSON split, 'official' or an official-format JSON), else <output_dir>/split.json
    # (made from --seed once); an official fold is also written there, for evaluate.
    official = args.split_file is not None and (args.split_file == "official" or _has_folds(Path(args.split_file)))
    split_file = output_dir / "split.json" if official or not args.split_file else Path(args.split_file)
    try:  # every data error ends here, as one line, before the model is built
        dataset = index_dataset(args.data_dir, labelled_only=True)  # evaluate.py splits the same labelled cases
        with accelerator.main_process_first():  # the main process writes the split, the others read it
            preset_dataset = PRESET_DATASETS.get(processor.image_processor.preset or "")
            source = args.split_file if official else split_file
            split, args.split_description = resolve_split(dataset["case_id"], source, args.seed, args.fold,
                                                          preset_dataset)  # fmt: skip
            if official and accelerator.is_main_process:
                write_json(split_file, {**split, "source": args.split_description}, make_parents=True)
        validate_dataset(dataset, processor)  # every case, test included: a broken file is reported now
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: the dataset in {args.data_dir} is not usable: {err}") from None
    by_id = {row["case_id"]: row for row in dataset}
    train_rows = [by_id[c] for c in split["train"]]
    validation_rows = [by_id[c] for c in split["validation"]][: args.max_validation_cases]
    if not train_rows:
        raise SystemExit(f"error: the split {split_file} has no training cases")
    # Every scan of the split, test included (as validate_dataset checks them all), is decoded and preprocessed into
    # the cache now, each process its share: a damaged file stops the run here, naming the case, instead of at the
    # first batch, validation or evaluation that reads it. A later run finds them cached.
    split_rows = [by_id[c] for part in ("train", "validation", "test") for c in split[part]]
    with accelerator.split_between_processes(split_rows) as own_rows:
        problems = PreprocessedCache(processor, args.cache_dir).prepare(own_rows)
    problems = gather_object(problems)
    if problems:
        listed = "; ".join(f"{case_id}: {reason}" for case_id, reason in problems[:3])
        raise SystemExit(
            f"error: the dataset in {args.data_dir} is not usable: {len(problems)} scan(s) cannot be read: {listed}"
        )

    try:
        trainee, model = build_model(args)
    except (OSError, ValueError) as err:  # a damaged or missing --init_from / --sam_checkpoint: one line
        raise SystemExit(f"error: the model could not be built: {' '.join(str(err).split())}") from None
    if accelerator.is_main_process and hasattr(trainee, "print_trainable_parameters"):
        trainee.print_trainable_parameters()
    train_dataset = Sam3DTrainingDataset(
        train_rows,
        processor,
        recipe=recipe,
        augmentation_branch=args.augmentation_branch,
        cache_dir=args.cache_dir,
        seed=args.seed,
        samples_per_volume=args.samples_per_volume,
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=sam3d_collate,
        num_workers=args.dataloader_num_workers,
        drop_last=True,  # every step sees full batches: equal work on every rank
    )
    if len(train_dataloader) == 0:
        raise SystemExit(
            f"error: {len(train_dataset)} training patches per epoch is fewer than --train_batch_size "
            f"{args.train_batch_size}; lower the batch size or raise --samples_per_volume"
        )

    # One AdamW, a parameter group per part (the official code's three optimisers, which see the same settings);
    # clipping per part when the recipe says so.
    parts = parameter_parts(trainee)
    optimizer = torch.optim.AdamW(
        [{"params": group, "name": name} for name, group in parts.items()],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay,
    )  # fmt: skip
    updates_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    # The prepared scheduler steps once per process at each call (it is saved with the checkpoints), hence the factor
    # of the process count in both schedules; the per-epoch one is called once per epoch, as the official code does.
    processes = accelerator.num_processes
    if args.lr_schedule == "linear_per_epoch":
        schedule_epochs = math.ceil(max_train_steps / updates_per_epoch)  # the recipe's epochs, or the steps' ones
        lr_scheduler = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0, end_factor=args.end_factor, total_iters=schedule_epochs * processes
        )
    else:
        lr_scheduler = get_linear_schedule_with_warmup(
            optimizer,
            num_warmup_steps=args.lr_warmup_steps * processes,
            num_training_steps=max_train_steps * processes,
        )
    trainee, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        trainee, optimizer, train_dataloader, lr_scheduler
    )
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    facts = run_facts(args, trainee, processor, accelerator, updates_per_epoch, max_train_steps)
    facts["data"].update(training_cases=len(train_rows), validation_cases=len(validation_rows))
    accelerator.init_trackers("sam3d-train")
    # The arguments as given, with each recipe value they resolved to (the recipe object itself is in the record).
    config = {k: v for k, v in vars(args).items() if v is not None and k != "recipe_values"}
    for tracker in accelerator.trackers:  # logs/config.json keeps the lists (the model card reads it)
        tracker.store_init_configuration(config if tracker.name == "jsonl" else tensorboard_hparams(config))

    # Checkpoints a killed save left incomplete are set aside, so that the next save can take their name.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for folder in set_aside_incomplete_checkpoints(output_dir):
            logger.warning(f"Moved the incomplete checkpoint (a save killed midway) to {folder}; delete it at will.")
    accelerator.wait_for_everyone()
    checkpoints = list_checkpoints(output_dir)  # all complete now

    # Resume: weights, optimiser, scheduler, RNG from the newest *complete* checkpoint; epoch and batch position from
    # its step count (the sampler order depends only on seed and epoch).
    global_step, best_dice = 0, -1.0
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":
            path = checkpoints[-1] if checkpoints else None
        else:
            path = Path(args.resume_from_checkpoint)
            if not is_complete(path):
                raise SystemExit(f"error: {path} is not a complete checkpoint (no valid {COMPLETE_MARKER})")
        if path is None:
            logger.warning(f"No complete checkpoint in {output_dir}/checkpoints: starting from scratch.")
        else:
            logger.info(f"Resuming from {path}")
            accelerator.load_state(str(path))
            state = json.loads((path / TRAINING_STATE).read_text(encoding="utf-8"))
            global_step, best_dice = state["global_step"], state["best_dice"]
            note_changed_arguments(logging_dir, config, global_step, accelerator)
            # the random states just restored: equal to the ones this checkpoint's save recorded
            accelerator.log({"resumed_rng_fingerprint": rng_fingerprint()}, step=global_step)
    batches_done = global_step * args.gradient_accumulation_steps
    first_epoch, skip_batches = divmod(batches_done, len(train_dataloader))

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Training *****  {len(train_rows)} training / {len(validation_rows)} validation scans, "
        f"{len(train_dataset)} patches per epoch, batch {args.train_batch_size} per device x "
        f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation = {total_batch}; "
        f"{max_train_steps} optimiser steps ({num_epochs} epochs), starting at step {global_step}"
    )
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )

    def checkpoint() -> None:
        location = Path(accelerator.save_state(str(output_dir / "checkpoints" / f"checkpoint_{global_step}")))
        state = {"global_step": global_step, "best_dice": best_dice, "rng_fingerprint": rng_fingerprint()}
        accelerator.wait_for_everyone()  # every rank's files are written before the marker
        if accelerator.is_main_process:
            mark_complete(location, state)
            remove_old_checkpoints(output_dir, args.checkpoints_total_limit)
        accelerator.wait_for_everyone()

    patches = args.validation == "patches"
    per_step_schedule = args.lr_schedule == "linear_per_step"

    def validate(epoch: int) -> None:
        """Score the validation scans; keep the best weights in best_model/ (highest Dice; lowest Dice loss)."""
        nonlocal best_dice
        if not validation_rows:
            return
        # Each process scores its share of the scans (no rank idles through a whole validation waiting for another);
        # every rank then holds all the scores, in case order, so `best_dice` agrees.
        indexed = list(enumerate(validation_rows))
        with accelerator.split_between_processes(indexed) as rows:
            model_now = accelerator.unwrap_model(trainee)
            if patches:
                scores = validation_patch_scores(model_now, processor, rows, args, epoch, accelerator)
            else:
                scores = validation_scores(model_now, processor, [row for _, row in rows], accelerator)
        scores = dict(gather_object(scores))  # every rank's (case_id, score) pairs, in case order
        score = float(np.mean(list(scores.values()))) if scores else float("nan")
        if accelerator.is_main_process:
            name = "validation_dice_loss" if patches else "validation_dice"
            per_case = {f"{name}/{case_id}": value for case_id, value in scores.items()}
            accelerator.log({name: score, **per_case}, step=global_step)
            best = 1 - best_dice if patches else best_dice
            best = "none yet" if best_dice < 0 else f"{best:.4f}"
            logger.info(f"step {global_step}: {name.replace('_', ' ')} {score:.4f} (best {best})")
        quality = 1 - score if patches else score  # higher is better
        if quality > best_dice:
            best_dice = quality
            if accelerator.is_main_process:
                selection = {"saved": "best validation Dice", "step": global_step, "validation_dice": score}
                if patches:
                    selection = {"saved": "lowest validation Dice loss (tumour-centred patches)",
                                 "step": global_step, "validation_dice_loss": score}  # fmt: skip
                info = {**facts, "selection": selection}
                save_model_folder(
                    accelerator.unwrap_model(trainee), processor, args.finetune, output_dir / "best_model", info
                )

    if global_step == 0 and args.validation_steps:
        validate(0)  # the curve starts at the initial weights
    trainee.train()
    running_loss = torch.zeros((), device=accelerator.device)
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:  # resumed from the last step's checkpoint: nothing left to do
            break
        train_dataset.set_epoch(epoch)  # augmentation and point sampling depend on (seed, epoch, index)
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in batches:
            with accelerator.accumulate(trainee):
                rounds = correction_rounds(args.seed, global_step, accelerator.process_index, args.correction_rounds)
                with accelerator.autocast():
                    batch = simulate_corrections(model, batch, rounds)
                outputs = trainee(**batch)  # `labels` in the batch: the model's DiceCE loss
                loss = outputs.loss
                running_loss += loss.detach() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = clip_gradients(accelerator, parts, args)
                optimizer.step()
                if per_step_schedule:
                    lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            step_loss = accelerator.reduce(running_loss, reduction="mean").item()
            running_loss.zero_()
            logs = {"train_loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            accelerator.log(logs, step=global_step)
            progress.set_postfix(loss=f"{step_loss:.4f}")
            # An epoch ends with this step: its schedule step and (per-epoch) validation come before the checkpoint,
            # so that a run resumed from it starts the next epoch as the uninterrupted run did.
            end_of_epoch = global_step % updates_per_epoch == 0
            if end_of_epoch and not per_step_schedule:
                lr_scheduler.step()
            if args.validation_steps == -1 and end_of_epoch:
                validate(epoch + 1)
            elif args.validation_steps > 0 and global_step % args.validation_steps == 0:
                validate(epoch + 1)
            if global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
                checkpoint()
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(trainee)
    if accelerator.is_main_process:
        validated = best_dice >= 0
        selection = {"saved": "last step", "step": global_step}
        if validated and patches:
            selection["lowest_validation_dice_loss"] = 1 - best_dice  # that model is in best_model/
        elif validated:
            selection["best_validation_dice"] = best_dice
        info = {**facts, "selection": selection}
        save_model_folder(final, processor, args.finetune, output_dir / "final_model", info)
        if validated:
            best = (
                f"lowest validation Dice loss {1 - best_dice:.4f}"
                if patches
                else f"best validation Dice {best_dice:.4f}"
            )
            logger.info(f"Saved {output_dir / 'final_model'} (the best, {best}, in best_model/)")
        else:
            logger.info(
                f"Saved {output_dir / 'final_model'}; no validation score was recorded (--validation_steps 0, no "
                "validation case, or no lesion in the validation cases), so there is no best_model/"
            )
    if args.save_rank_checksums:  # lets a test check that every rank holds the same weights
        path = output_dir / f"weights_rank{accelerator.process_index}.json"
        write_json(path, weight_checksums(model), sort_keys=True)
    accelerator.end_training()


# `accelerate launch` options for one process on the CPU, as examples/accelerate_configs/cpu.yaml (which a wheel does
# not install): what the demo launches with.
CPU_LAUNCH_OPTIONS = ("--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no")  # fmt: skip


# glibc's malloc keeps freed heap blocks resident and raises its mmap threshold to the largest block freed (up to
# 32 MB); with a fixed 1 MB threshold large activations are unmapped when freed. A ViT-B/128³ step with checkpointing
# peaked at 5.16 GB of resident memory with it against 7.37 GB without (benchmarks/README.md). Other C libraries
# ignore the variable.
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def launch_environment(environment: dict | None = None) -> dict:
    """The environment `sam3d train` and the demo launch training with: `environment` (default `os.environ`) with
    [`MALLOC_ENVIRONMENT`] added where the user has not set those variables."""
    return {**MALLOC_ENVIRONMENT, **(os.environ if environment is None else environment)}


def launch_command(argv: list[str], launch_options: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`accelerate launch LAUNCH_OPTIONS -m sam3d_hf.training ARGV` for this Python: how `sam3d train` and the demo
    start training in a subprocess (e.g. `launch_options=["--config_file", "my.yaml"]`, or `CPU_LAUNCH_OPTIONS`)."""
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_options, "-m", "sam3d_hf.training", *argv]


if __name__ == "__main__":
    main()
