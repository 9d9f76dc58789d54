"""Training recipes as data: every value of a training run that is a choice of method (optimisation, schedule,
clipping, epochs, batch, patch, clicks, crop sampler, augmentations, validation, model selection, the prompted or
prompt-free model), one frozen definition per recipe.

* `official`: what the official 3DSAM-adapter code does (`train.py`, `dataset/`; the numbers of the paper's tables
  were made by it), value for value from ../shared/OFFICIAL_RECIPE.md.
* `paper`: the paper's text where it differs from the code (learning rate, weight decay, schedule end, epochs, Table
  4 augmentations); everything else as `official`.
* `interactive`: `official`'s schedule, crops and augmentations with clicks that carry labels (positive / negative),
  for models meant for correction clicks (`prompt_encoder_config.use_point_labels=True`).
* `official_auto`: the prompt-free model of the paper's Table 3 (`train_auto.py`): no prompt encoder, 256³ crops
  upsampled x2 (token stride 8), clipping at 12.
* `legacy`: what sam3d-hf trained before the recipes (one AdamW at 1e-4 with a per-step linear decay, 40 + 3 labelled
  clicks, 1:1 crops, one zoom for all datasets): kept to compare with.

`sam3d_hf.training` takes a recipe by name (`--recipe`); each field can be overridden by the training flag of the
same name, and the run records the recipe and what was overridden (`training_info.json`, the model card).
`docs/recipes.md` is the table of all of them, checked against these definitions by a test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["RECIPES", "Sam3DRecipe", "get_recipe", "official_learning_rate_factor"]

SCHEDULES = ("linear_per_epoch", "linear_per_step")
CLICK_SCHEMES = ("official", "labelled", "legacy")
SAMPLERS = ("official", "legacy")
AUGMENTATIONS = ("official", "table4", "none")
VALIDATIONS = ("patches", "scans")


@dataclass(frozen=True)
class Sam3DRecipe:
    """One training recipe. Units: learning rates per optimiser step; epochs of one random patch per training scan.

    Attributes:
        name, description: the recipe's key and one line on where it comes from.
        learning_rate, weight_decay, adam_beta1, adam_beta2: AdamW, the same for the three parameter groups (the
            image encoder's trainable tensors, the prompt encoder, the mask decoder).
        schedule: `"linear_per_epoch"` (torch `LinearLR` from 1 to `end_factor` over `num_train_epochs`, stepped
            once per epoch, no warm-up: the official code) or `"linear_per_step"` (warm-up over `lr_warmup_steps`,
            then linear decay to 0, stepped per optimiser step).
        end_factor: the last epoch's learning-rate factor (`linear_per_epoch`).
        lr_warmup_steps: warm-up steps (`linear_per_step`).
        num_train_epochs: epochs (`--max_train_steps` overrides: steps decide, epochs are derived).
        max_grad_norm: the clipping threshold (L2 norm).
        clip_per_part: clip the encoder, the prompt encoder and the decoder each at `max_grad_norm` (the official
            code) instead of all parameters together.
        train_batch_size: patches per device per step.
        patch_size: the training crop `(D, H, W)`.
        token_stride: voxels per token of the model built for this recipe (8 for the 256³ prompt-free model).
        use_prompt_encoder: the prompted model (`False`: the prompt-free model, no clicks).
        use_point_labels: clicks carry labels (1 positive, 0 negative) through a label embedding.
        clicks: `"official"` (`num_positive_points` tumour voxels and `num_patch_points` voxels of the whole patch,
            all unlabelled; only the patch voxels when the patch holds no tumour), `"labelled"` (the same clicks with
            their labels: a patch voxel outside the tumour is negative, plus `num_negative_points` negatives next to
            the lesion; all positive when the patch holds no tumour) or `"legacy"` (`num_positive_points` tumour
            voxels, `num_negative_points` labelled negatives next to the lesion; `num_patch_points` positive patch
            voxels when the patch holds no tumour).
        num_positive_points, num_patch_points, num_negative_points: the click counts of `clicks`.
        sampler: `"official"` (crop the body, pad and draw a `crop_scale` x patch crop centred on tumour : other with
            the ratio `crop_pos : crop_neg`, then a random patch inside it) or `"legacy"` (a 1:1 crop of patch / 0.9,
            then its centre).
        crop_scale, crop_pos, crop_neg: the official sampler's values.
        augmentation: `"official"` (the official code's: a +-20 HU intensity shift, the dataset's branch, `zoom` or
            `rotate_zoom` as its preset says, flips and quarter turns; see `sam3d_hf.sampling`), `"table4"` (the
            paper's Table 4) or `"none"`.
        validation: `"patches"` (each validation scan's tumour-centred patch, Dice loss, every epoch: the official
            code) or `"scans"` (whole scans through the processor, one click per lesion, Dice, every
            `--validation_steps`). Either way `final_model/` holds the last step's weights (the official `test.py`
            loads `last.pth.tar`) and `best_model/` the best validation's.
        resampling: the processor's resampling the recipe expects (`"official"` for the official presets).
        use_mask_prompt: the model also takes its previous prediction (`mask_decoder_config.use_mask_prompt`).
        correction_rounds: simulated correction rounds per step, `k` drawn uniformly from `0 .. correction_rounds`:
            `k` predictions without gradient, each adding one labelled click at the centre of the largest error of
            the model's own prediction (`sam3d_hf.metrics.correction_click`) and feeding that prediction back as the
            mask prompt; the loss is on the prediction after the `k`-th click (see `sam3d_hf.training`).
    """

    name: str
    description: str
    learning_rate: float = 4e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    schedule: str = "linear_per_epoch"
    end_factor: float = 0.01
    lr_warmup_steps: int = 0
    num_train_epochs: int = 500
    max_grad_norm: float = 1.0
    clip_per_part: bool = True
    train_batch_size: int = 1
    patch_size: tuple[int, int, int] = (128, 128, 128)
    token_stride: int = 4
    use_prompt_encoder: bool = True
    use_point_labels: bool = False
    clicks: str = "official"
    num_positive_points: int = 10
    num_patch_points: int = 20
    num_negative_points: int = 0
    sampler: str = "official"
    crop_scale: float = 1.2
    crop_pos: float = 2.0
    crop_neg: float = 1.0
    augmentation: str = "official"
    validation: str = "patches"
    resampling: str = "official"
    use_mask_prompt: bool = False
    correction_rounds: int = 0

    def __post_init__(self):
        for field, allowed in (
            ("schedule", SCHEDULES),
            ("clicks", CLICK_SCHEMES),
            ("sampler", SAMPLERS),
            ("augmentation", AUGMENTATIONS),
            ("validation", VALIDATIONS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"recipe {self.name!r}: {field} must be one of {allowed}, got {getattr(self, field)!r}"
                )
        if self.clicks == "official" and self.use_point_labels:
            raise ValueError(f"recipe {self.name!r}: official clicks carry no labels; use clicks='labelled'")
        if self.clicks in ("labelled", "legacy") and not self.use_point_labels:
            raise ValueError(f"recipe {self.name!r}: {self.clicks!r} clicks need use_point_labels=True")
        if self.correction_rounds < 0 or (self.correction_rounds and not self.use_point_labels):
            raise ValueError(
                f"recipe {self.name!r}: correction_rounds must be >= 0, and corrections (negative clicks) need "
                f"use_point_labels=True; got {self.correction_rounds} with use_point_labels={self.use_point_labels}"
            )

    def replace(self, **changes: Any) -> Sam3DRecipe:
        """A copy with `changes` (the training flags that override this recipe's values)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"not fields of a recipe: {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["patch_size"] = list(self.patch_size)
        return values


def official_learning_rate_factor(epoch: int, num_epochs: int, end_factor: float) -> float:
    """The learning-rate factor of epoch `epoch` (0-based) under torch's `LinearLR(start_factor=1, end_factor,
    total_iters=num_epochs)` stepped once per epoch: `1 + (end_factor - 1) * min(epoch, num_epochs) / num_epochs`."""
    return 1.0 + (end_factor - 1.0) * min(epoch, num_epochs) / num_epochs


_OFFICIAL = Sam3DRecipe(
    name="official",
    description="the official code (train.py, dataset/): the default; what made the paper's tables",
)
RECIPES: dict[str, Sam3DRecipe] = {
    "official": _OFFICIAL,
    "paper": _OFFICIAL.replace(
        name="paper",
        description="the paper's text where it differs from the code: lr 1e-4, wd 1e-5, end factor 0.1, 200 "
        "epochs, Table 4 augmentations",
        learning_rate=1e-4,
        weight_decay=1e-5,
        end_factor=0.1,
        num_train_epochs=200,
        augmentation="table4",
    ),
    "interactive": _OFFICIAL.replace(
        name="interactive",
        description="the official schedule, crops and augmentations with few labelled clicks, the previous mask as a "
        "prompt and 0-5 simulated corrections per step (as SAM, SAM-Med3D and nnInteractive train): for models that "
        "improve with each click",
        use_point_labels=True,
        clicks="labelled",
        num_positive_points=1,
        num_patch_points=1,
        num_negative_points=0,
        validation="scans",
        use_mask_prompt=True,
        correction_rounds=5,
    ),
    "official_auto": _OFFICIAL.replace(
        name="official_auto",
        description="the prompt-free model of the paper's Table 3 (train_auto.py): no prompt encoder, 256³ crops, "
        "clipping at 12",
        patch_size=(256, 256, 256),
        token_stride=8,
        use_prompt_encoder=False,
        max_grad_norm=12.0,
        num_positive_points=0,
        num_patch_points=0,
    ),
    "legacy": Sam3DRecipe(
        name="legacy",
        description="what sam3d-hf trained before the recipes (kept to compare with)",
        learning_rate=1e-4,
        weight_decay=1e-5,
        schedule="linear_per_step",
        end_factor=0.0,
        num_train_epochs=100,
        clip_per_part=False,
        use_point_labels=True,
        clicks="legacy",
        num_positive_points=40,
        num_patch_points=10,
        num_negative_points=3,
        sampler="legacy",
        augmentation="table4",
        validation="scans",
        resampling="nnunet",
    ),
}


def get_recipe(name: str) -> Sam3DRecipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {list(RECIPES)}")
    return RECIPES[name]
