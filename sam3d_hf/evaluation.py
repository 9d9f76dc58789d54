"""Evaluate a Sam3D model on a test set the way the 3DSAM-adapter paper reports it, on one or several processes.

The evaluation runner of the package: `sam3d evaluate`, `examples/evaluate.py` and `python -m sam3d_hf.evaluation` run
its [`main`]; `accelerate launch -m sam3d_hf.evaluation` runs it on several processes.

For every test scan: simulated clicks (`sam3d_hf.metrics.simulate_clicks`) -> `Sam3DPredictor` (the scan is
preprocessed once, and each patch encoded once for all protocols) -> mask in the scan's original geometry -> Dice and
NSD at 5 mm per scan and per lesion (`sam3d_hf.metrics.evaluate_case`).

Protocols (`--protocols`, comma separated; default 1,3,10):
* a number N (the paper: 1, 3, 10): N clicks placed by each of `--click_placement` (default `official,per_lesion`,
  both rows in the table) -- `official` (`test.py`: N tumour voxels of the label map resized to the resampled grid,
  drawn with replacement, here seeded; one crop of the patch size centred on their bounding box, zero-padded after
  normalisation, never shifted; lesions outside it count as missed), `per_lesion` (the package's improvement: one
  click in each lesion as long as there are clicks, the rest uniform over the tumour; one patch per click cluster) or
  `uniform` (uniform over all tumour voxels, one patch per cluster);
* `center`, `surrounding`, `marginal`: the paper's ablation, one click in that depth band of the largest lesion;
* `correction` (models with `prompt_encoder_config.use_point_labels=True`): one click as for `1`, then up to
  `--rounds` (5) corrective clicks at the centre of the largest error region (`correction_click`: negative in a false
  positive, positive in a miss), Dice and NSD after every round. Its rows are named `<method> (interactive)`;
* `interactive` (models with `use_point_labels=True`; the default of the `interactive` recipe, 1,3,10,interactive):
  the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical Image Segmentation" (`CVPR25_iter_eval.py`)
  without its box prompt. The first click at the centre of the largest lesion (`correction_click` of an empty
  prediction), then `--rounds` corrections at the centre of the largest error, never on an earlier click's voxel
  (`correction_click(avoid=...)`: a model that ignored a click gets the next largest error instead; such repeats are
  counted). Per round Dice, NSD at `--tolerance_mm` and at 2 mm (the challenge's; column `nsd_2mm`); per scan the
  area under each curve (trapezoid over rounds 0..R with x = round, at most R: the challenge integrates its 5 click
  rounds against x = 0..4, at most 4, so `--rounds 4` gives as many points, our first being a click, not a box).
  The NSD is the measured one: the challenge sets it to 0 where Dice <= 0.2, this evaluation does not. Rows
  `<method>, 1 click (interactive) + k corrections`.
With `--automatic`, the prompt-free model (`config.use_prompt_encoder=False`, the paper's Table 3) segments each scan
with sliding windows (`Sam3DPredictor.predict_automatic`: MONAI, Gaussian weighting, `--overlap` 0.5 as the official
`test_auto.py`, 0.7 as the paper's text), as the row `<method>, automatic (sliding window)` (protocol `automatic` in
the CSV files); `--automatic` without `--protocols` evaluates only it, and a prompt-free model takes no click protocol.
A prompted model is evaluated that way only with `--centre_clicks` (one click at each window's centre: not the
paper's method).

Patches. Each protocol's first prediction places its patches centred on its clicks, as a fresh `Sam3DProcessor` call
does (`predict(..., reuse_patches=False)`), so a protocol's results do not depend on which protocols ran before it.
Correction rounds keep the patches of that protocol's earlier rounds when the clicks still fit in them, as an
interactive session would (`Session`, which also keeps the session's last prediction). Image embeddings are shared
between protocols wherever a patch origin coincides (exact).

Outputs in `--output_dir`: `cases.csv` (one row per scan, protocol and round), `lesions.csv` (one row per lesion),
`summary.json` (`{"format": "sam3d-hf-evaluation-v1", "sam3d_hf_version", "dataset", "split", "settings": {"cases",
"protocols", "click_placement", "rounds", "seed", "tolerance_mm", "target_label", ...}, "summary": ...}`, the
summary being `sam3d_hf.metrics.summarize`'s mean and std per protocol and round, NaN written as null: the model card
reads the settings from it, never a default), with `--save_masks` `masks/<protocol>/<case>.nii.gz` (each protocol's
last scored mask, in the scan's geometry; `<protocol>` is e.g. `1-official`, `3-per_lesion`, `correction-per_lesion`,
`center`, `automatic`, `interactive`), `table.md` (Table 1 shape; with `interactive`, its curve, areas and repeats
below), `dice_per_round.png` (mean Dice/NSD per correction round, or per number of clicks; only with such rows), and
`overlays/<case>.png` (three orthogonal slices through each lesion: ground truth, prediction, clicks; from the first
protocol, or the last correction round). With `interactive` also `interactive.csv` (one row per scan: the areas
under its Dice, NSD and 2 mm NSD curves, their final values, the corrections and how many would have repeated a
click) and the block `"interactive"` of `summary.json` (`sam3d_hf.metrics.summarize_interactive`: means per round,
areas, repeats, both tolerances). Everything is written into a hidden sibling folder and renamed to `--output_dir`
once complete, so a failed or interrupted run leaves nothing; an existing non-empty `--output_dir` is refused unless
`--overwrite`, which replaces it only then.

Several processes: cases are split with `accelerator.split_between_processes` and gathered on the main process with
`gather_object`; clicks are seeded per case, so any number of processes gives the same files:

    sam3d evaluate --model my-model --data_dir Task07_Pancreas --split_file split.json --output_dir eval
    accelerate launch --multi_gpu --num_processes 4 -m sam3d_hf.evaluation --model my-model ...   # 4 GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m sam3d_hf.evaluation ...  # 2 CPU processes
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from .data import index_dataset, load_or_create_split, validate_dataset
from .files import atomic_write, atomic_write_text, make_staging_folder, replace_folder, write_json
from .hub import check_model_reference
from .image_processing_sam3d import to_canonical
from .inference import Sam3DPrediction, Sam3DPredictor
from .metrics import (
    correction_click,
    curve_auc,
    evaluate_case,
    markdown_interactive,
    markdown_table,
    normalized_surface_dice,
    repeats_click,
    simulate_clicks,
    summarize,
    summarize_interactive,
)
from .modeling_sam3d import Sam3DForPromptableSegmentation
from .peft_sam3d import PEFT_TYPE as SPATIAL_ADAPTER_TYPE
from .peft_sam3d import Sam3DAdapterModel
from .processing_sam3d import Sam3DProcessor, save_mask_nifti
from .recipes import RECIPES
from .version import __version__
from .visualization import save_curve, save_overlay

POSITION_PROTOCOLS = ("center", "surrounding", "marginal")
SESSION_PROTOCOLS = ("correction", "interactive")  # one first click, then --rounds corrections (negative clicks too)
CHALLENGE_TOLERANCE_MM = 2.0  # the NSD tolerance of the CVPR 2025 interactive challenge (CVPR25_iter_eval.py)
CLICK_PLACEMENTS = ("official", "per_lesion", "uniform")
SUMMARY_FORMAT = "sam3d-hf-evaluation-v1"
CASE_COLUMNS = (
    "case_id", "dataset", "method", "protocol_name", "protocol", "num_clicks", "round", "dice", "nsd", "voxels",
    "volume_mm3", "n_lesions", "lesions_detected", "clicks", "click_labels", "nsd_2mm",
)  # fmt: skip
INTERACTIVE_COLUMNS = (
    "case_id", "dataset", "method", "rounds", "dice_auc", "nsd_auc", "nsd_2mm_auc", "dice_final", "nsd_final",
    "nsd_2mm_final", "corrections", "repeated_corrections",
)  # fmt: skip
LESION_COLUMNS = (
    "case_id", "dataset", "method", "protocol", "num_clicks", "round", "lesion", "voxels", "volume_mm3", "detected",
    "dice", "nsd",
)  # fmt: skip


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line; `prog` names the command in usage lines (`sam3d evaluate` when run through the CLI)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model folder (save_pretrained) with its processor_config.json")
    parser.add_argument("--base", help="base model folder, with --adapter")
    parser.add_argument("--adapter", help="Sam3DAdapterModel or peft LoRA folder to put on --base")
    parser.add_argument("--preset", help="processor preset when the model folder has no processor_config.json")
    parser.add_argument("--data_dir", required=True, help="dataset folder (MSD, KiTS21, LiTS17 or images/labels)")
    parser.add_argument("--split_file", help="JSON split (made with seed --seed if missing); without it: all cases")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"],
                        help="which part of --split_file to evaluate (default: test)")  # fmt: skip
    parser.add_argument("--recipe", choices=list(RECIPES), help="the training recipe whose test protocol to run "
                        "(default: the model's, from its training_info.json, else official): official and paper: 1, "
                        "3, 10 clicks; interactive: also protocol interactive; official_auto: --automatic")  # fmt: skip
    parser.add_argument("--protocols", help="comma separated: N (clicks), center, surrounding, marginal, correction, "
                        "interactive (default: 1,3,10; with the interactive recipe 1,3,10,interactive; none with "
                        "--automatic alone)")  # fmt: skip
    parser.add_argument("--automatic", action="store_true", help="also evaluate sliding windows without clicks "
                        "(the prompt-free model; Sam3DPredictor.predict_automatic) as the row 'automatic'")  # fmt: skip
    parser.add_argument("--sw_batch_size", type=int, default=1, help="windows per forward pass with --automatic")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap with --automatic (the "
                        "official code: 0.5; the paper's text: 0.7)")  # fmt: skip
    parser.add_argument("--centre_clicks", action="store_true", help="--automatic with a prompted model: one click at "
                        "each window's centre (not the paper's method)")  # fmt: skip
    parser.add_argument("--click_placement", default="official,per_lesion",
                        help="comma separated, each gives its rows: official (test.py: clicks and one crop as the "
                        "official code), per_lesion (one click per lesion first, one patch per cluster) or uniform "
                        "(uniform over all tumour voxels, one patch per cluster); corrections start from the first "
                        "that is not official")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="correction rounds of the protocols correction and "
                        "interactive")  # fmt: skip
    parser.add_argument("--target_label", type=int, help="tumour label (default: the processor's target_label)")
    parser.add_argument("--method", default="3DSAM-adapter", help="row name in the table")
    parser.add_argument("--dataset_name", help="column name in the table and key in summary.json (default: the "
                        "processor's preset, e.g. msd_pancreas or kits21, when it has one, else the data folder's "
                        "name); sam3d push --dataset reads this key")  # fmt: skip
    parser.add_argument("--output_dir", required=True, help="folder for the outputs; written only once complete")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty --output_dir (once the new one is complete)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="click seed (per case: seed and case position)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs, CPUs with native bf16)")
    parser.add_argument("--max_cases", type=int, help="evaluate only the first N cases of the split")
    parser.add_argument("--tolerance_mm", type=float, default=5.0, help="NSD tolerance in mm (the paper: 5)")
    parser.add_argument("--save_masks", action="store_true",
                        help="also write the scored masks as NIfTI: masks/<protocol>/<case>.nii.gz (e.g. "
                        "masks/1-official/), each protocol's last prediction, in the scan's geometry")  # fmt: skip
    return parser


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if (args.model is None) == (args.base is None) or (args.base is None) != (args.adapter is None):
        parser.error("give --model, or --base together with --adapter")
    if args.recipe is None:  # the recipe the model was trained with, as its training record says
        args.recipe = _trained_recipe(args.model or args.base) or "official"
    if args.recipe == "official_auto" and args.protocols is None:
        args.automatic = True  # the prompt-free model: sliding windows, test_auto.py
    if args.protocols is None:
        args.protocols = "" if args.automatic else "1,3,10,interactive" if args.recipe == "interactive" else "1,3,10"
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    for protocol in protocols:
        if not (protocol.isdigit() and int(protocol) > 0) and protocol not in (*POSITION_PROTOCOLS, *SESSION_PROTOCOLS):
            parser.error(
                f"unknown protocol {protocol!r}: use a number of clicks, {POSITION_PROTOCOLS} or {SESSION_PROTOCOLS}"
            )
    if not protocols and not args.automatic:
        parser.error("--protocols is empty (give click protocols, or --automatic)")
    args.protocols = protocols + (["automatic"] if args.automatic else [])
    args.click_placements = [p.strip() for p in args.click_placement.split(",") if p.strip()]
    unknown = [p for p in args.click_placements if p not in CLICK_PLACEMENTS]
    if unknown or not args.click_placements:
        parser.error(
            f"--click_placement takes {', '.join(CLICK_PLACEMENTS)}, comma separated; got {args.click_placement!r}"
        )
    if not 0 <= args.overlap < 1:
        parser.error(f"--overlap must lie in [0, 1), got {args.overlap}")
    if args.rounds < 1 or args.sw_batch_size < 1 or (args.max_cases is not None and args.max_cases < 1):
        parser.error("--rounds, --sw_batch_size and --max_cases must be >= 1")
    if not args.tolerance_mm > 0:
        parser.error(f"--tolerance_mm must be > 0 (millimetres), got {args.tolerance_mm}")
    return args


def _trained_recipe(folder: str | None) -> str | None:
    """The recipe named by a local model folder's training_info.json, if it has one."""
    path = Path(folder or "") / "training_info.json"
    try:
        name = json.loads(path.read_text(encoding="utf-8"))["recipe"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if name in RECIPES else None


def load_processor(args: argparse.Namespace) -> Sam3DProcessor:
    """The processor saved with --adapter or --model/--base, else --preset's."""
    for option in ("model", "base", "adapter"):
        if getattr(args, option) is not None:
            check_model_reference(getattr(args, option), f"--{option}")
    folder = Path(args.model or args.base)
    for candidate in (Path(args.adapter) if args.adapter else None, folder):
        if candidate is not None and (candidate / "processor_config.json").is_file():
            return Sam3DProcessor.from_pretrained(candidate)
    if args.preset is None:
        raise ValueError(f"{folder} has no processor_config.json: pass --preset (e.g. kits21, msd_pancreas).")
    return Sam3DProcessor.from_preset(args.preset)


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model (adapters merged), from --model or --base + --adapter."""
    model = Sam3DForPromptableSegmentation.from_pretrained(Path(args.model or args.base), dtype=torch.float32)
    if args.adapter is not None:
        adapter_config = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
        if adapter_config.get("peft_type") == SPATIAL_ADAPTER_TYPE:  # the paper's spatial adapters
            model = Sam3DAdapterModel.from_pretrained(model, args.adapter).merge_and_unload()
        else:  # a peft method (LoRA, ...)
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    return model


def select_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    cases = [dict(row) for row in index_dataset(args.data_dir, labelled_only=True)]
    if args.split_file is not None:
        wanted = set(load_or_create_split([c["case_id"] for c in cases], args.split_file, seed=args.seed)[args.split])
        cases = [c for c in cases if c["case_id"] in wanted]
        if not cases:
            raise ValueError(
                f"the {args.split!r} split of {args.split_file} holds no case: choose another --split, or a split file "
                "with cases there"
            )
    for position, case in enumerate(cases):
        case["position"] = position  # seeds the clicks: the same for any number of processes
    return cases[: args.max_cases]


# ------------------------------------------------------------------------------------------------ one case
@dataclass
class Session:
    """One interactive session (one protocol on one scan, several rounds): the patch origins it used, most recently
    used first (the order in which a fresh predictor's cache would offer them), and its last prediction."""

    origins: list[list[int]] = field(default_factory=list)
    last: Sam3DPrediction | None = None


def predict_in_session(predictor: Sam3DPredictor, points, labels, session: Session) -> torch.Tensor:
    """The mask of one prediction of a correction session; `session` is updated here.

    The first round (no origin yet) places its patches as a fresh processor call would (`reuse_patches=False`); later
    rounds may keep only this session's own patches, as an interactive user's would, so the rounds give the same masks
    whichever protocols ran before on the predictor. `session.last` keeps the prediction for the next round: a model
    with the mask prompt gets it as each patch's previous mask.
    """
    prediction = predictor.predict(points, labels, reuse_patches=session.origins or False, previous=session.last)
    for origin in prediction.inputs["patch_origins"].tolist():  # rows in order, as the cache records them
        if origin in session.origins:
            session.origins.remove(origin)
        session.origins.insert(0, origin)
    del session.origins[predictor.max_cached_patches :]
    session.last = prediction
    return prediction.mask


def official_crop_prediction(
    predictor: Sam3DPredictor, tumour: np.ndarray, num_clicks: int, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """`test.py`'s prediction: `num_clicks` tumour voxels of the label map resized (nearest) to the resampled grid,
    drawn uniformly with replacement (here from `seed`), one crop of the processor's patch size centred on the clicks'
    bounding box (`(max + min) // 2` per axis), zero-padded where it leaves the scan (0 after normalisation: the
    dataset mean), never shifted; the foreground probability pasted into an empty scan and mapped back to its
    geometry. Returns `(mask in the scan's geometry, clicks as stored voxel indices (i, j, k))`."""
    processor, model, pre = predictor.processor, predictor.model, predictor.preprocessed
    axes, flips = np.asarray(pre["canonical_axes"]).tolist(), np.asarray(pre["canonical_flips"]).tolist()
    canonical = torch.from_numpy(to_canonical(tumour.astype(np.float32), axes, flips).copy())
    size = tuple(np.asarray(pre["resampled_size"]).tolist())
    prompt = F.interpolate(canonical[None, None], size=size, mode="nearest")[0, 0].numpy() > 0
    candidates = np.argwhere(prompt)
    if len(candidates) == 0:  # a lesion smaller than a resampled voxel: the nearest voxel of its centre
        candidates = np.rint(np.argwhere(canonical.numpy()).mean(0) / np.asarray(pre["resampling_scale"]))[None]
    clicks = candidates[np.random.default_rng(seed).integers(len(candidates), size=num_clicks)].astype(np.int64)
    patch = np.asarray(processor.patch_size)
    origin = (clicks.max(0) + clicks.min(0)) // 2 - patch // 2
    volume = torch.as_tensor(np.asarray(pre["pixel_values"]), dtype=torch.float32)[0, 0]
    crop = torch.zeros(tuple(patch.tolist()))  # zero padding: the dataset mean
    lo, hi = np.maximum(origin, 0), np.minimum(origin + patch, size)
    inside = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))] = volume[inside]
    with torch.inference_mode(), predictor.autocast():
        logits = model(
            pixel_values=crop[None, None].to(model.device),
            input_points=torch.from_numpy((clicks - origin).astype(np.float32))[None].to(model.device),
        ).logits.float()
    mask = processor.post_process_masks(logits, {**pre, "patch_origins": origin[None]})
    stored = nib.affines.apply_affine(
        np.linalg.inv(np.asarray(pre["original_affine"])) @ np.asarray(pre["resampled_affine"]), clicks
    )
    return mask, stored


def interactive_session(predictor: Sam3DPredictor, tumour: np.ndarray, spacing, rounds: int, record, args) -> dict:
    """Protocol `interactive` on one scan: the first click at the centre of the largest lesion (`correction_click` of
    an empty prediction), then `rounds` corrections that never repeat an earlier click (`avoid=`); `record` scores,
    stores and returns each round's row. Returns the scan's curves, their areas and how many corrections the model
    ignored (the error it left would have been clicked again)."""
    point, click_label = correction_click(tumour, np.zeros_like(tumour), spacing)
    points, labels = point[None], np.array([click_label])
    session = Session()
    mask = predict_in_session(predictor, points, labels, session)
    rows = [record("interactive", "interactive", points, labels, 0, mask, args.method)]
    corrections = repeated = 0
    for round_ in range(1, rounds + 1):
        click = correction_click(tumour, mask, spacing)
        if click is not None:  # otherwise the prediction is perfect: it stays as it is
            corrections += 1
            if repeats_click(click[0], points):  # the model ignored that click: the next largest error instead
                repeated += 1
                click = correction_click(tumour, mask, spacing, avoid=points)
        if click is not None:
            points, labels = np.vstack([points, click[0]]), np.append(labels, click[1])
            mask = predict_in_session(predictor, points, labels, session)
        rows.append(record("interactive", "interactive", points, labels, round_, mask, args.method))
    curves = {metric: [row[metric] for row in rows] for metric in ("dice", "nsd", "nsd_2mm")}
    return {
        "case_id": rows[0]["case_id"], "dataset": args.dataset_name, "method": args.method, "rounds": rounds,
        **{f"{metric}_auc": curve_auc(values) for metric, values in curves.items()},
        **{f"{metric}_final": values[-1] for metric, values in curves.items()},
        **curves, "corrections": corrections, "repeated_corrections": repeated,
    }  # fmt: skip


def evaluate_one(case: dict[str, Any], predictor: Sam3DPredictor, args: argparse.Namespace) -> dict[str, Any]:
    """Every protocol on one scan; returns CSV rows, lesion rows and what the overlay needs."""
    label_image = nib.load(case["label"])
    target = args.target_label_used
    label = np.asarray(label_image.dataobj)
    tumour = label == target if target is not None else label > 0
    result = {"case_id": case["case_id"], "position": case["position"], "rows": [], "lesion_rows": []}
    if not tumour.any():
        values = np.unique(label).tolist()
        result["skipped"] = (
            f"no voxel with label {target} (the tumour label: --target_label or the processor's target_label) in "
            f"the label map, which holds {values[:10]}"
        )
        return result
    spacing = np.linalg.norm(label_image.affine[:3, :3], axis=0)
    predictor.set_image(case["image"])
    seed = args.seed * 1_000_003 + case["position"]

    def record(protocol_name, protocol, points, labels, round_, mask, method):
        scores = evaluate_case(mask, tumour, spacing, tolerance_mm=args.tolerance_mm)
        meta = {
            "case_id": case["case_id"], "dataset": args.dataset_name, "method": method, "protocol": protocol,
            "num_clicks": 1 if protocol_name in SESSION_PROTOCOLS else len(points), "round": round_,
        }  # fmt: skip
        if protocol_name == "interactive":  # also the challenge's tolerance
            scores["nsd_2mm"] = normalized_surface_dice(mask, tumour, spacing, CHALLENGE_TOLERANCE_MM)
        row = {
            **meta, "protocol_name": protocol_name, "dice": scores["dice"], "nsd": scores["nsd"],
            "voxels": scores["voxels"], "volume_mm3": scores["volume_mm3"], "n_lesions": len(scores["lesions"]),
            "lesions": scores["lesions"],  # for `summarize`; the CSV writer leaves it out
            "lesions_detected": sum(lesion["detected"] for lesion in scores["lesions"]),
            "clicks": json.dumps(np.asarray(points).tolist()), "click_labels": json.dumps(np.asarray(labels).tolist()),
            "nsd_2mm": scores.get("nsd_2mm"),
        }  # fmt: skip
        result["rows"].append(row)
        result["lesion_rows"].extend({**meta, **lesion} for lesion in scores["lesions"])
        if args.mask_dir is not None:  # each protocol's last scored mask (the last round's, for corrections)
            folder = args.mask_dir / (protocol_name if protocol == protocol_name else f"{protocol_name}-{protocol}")
            folder.mkdir(parents=True, exist_ok=True)
            save_mask_nifti(mask, case["image"], folder / f"{case['case_id']}.nii.gz")
        if "overlay" not in result or protocol_name in SESSION_PROTOCOLS:
            result["overlay"] = (mask, np.asarray(points), np.asarray(labels), f"{protocol_name} round {round_}")
        return row

    session_placement = next((p for p in args.click_placements if p != "official"), "per_lesion")
    for protocol_name in args.protocols:
        if protocol_name == "automatic":
            mask = predictor.predict_automatic(
                batch_size=args.sw_batch_size, overlap=args.overlap, centre_clicks=args.centre_clicks
            ).mask
            record(protocol_name, protocol_name, np.zeros((0, 3)), np.zeros(0, np.int64), 0, mask, args.method)
        elif protocol_name in POSITION_PROTOCOLS:
            try:
                points, labels = simulate_clicks(tumour, protocol_name, 1, seed=seed, spacing=spacing)
            except ValueError as err:  # a lesion too small for three depth bands
                result.setdefault("notes", []).append(f"{protocol_name}: {err}")
                continue
            mask = predictor.predict(points, labels, reuse_patches=False).mask
            record(protocol_name, protocol_name, points, labels, 0, mask, args.method)
        elif protocol_name == "correction":
            points, labels = simulate_clicks(tumour, session_placement, 1, seed=seed, spacing=spacing)
            session = Session()
            mask = predict_in_session(predictor, points, labels, session)
            method = f"{args.method} (interactive)"
            record(protocol_name, session_placement, points, labels, 0, mask, method)
            for round_ in range(1, args.rounds + 1):
                click = correction_click(tumour, mask, spacing)
                if click is not None:  # otherwise the prediction is perfect: it stays as it is
                    points, labels = np.vstack([points, click[0]]), np.append(labels, click[1])
                    mask = predict_in_session(predictor, points, labels, session)
                record(protocol_name, session_placement, points, labels, round_, mask, method)
        elif protocol_name == "interactive":
            result["interactive"] = interactive_session(predictor, tumour, spacing, args.rounds, record, args)
        else:
            count = int(protocol_name)
            for placement in args.click_placements:
                if placement == "official":
                    mask, points = official_crop_prediction(predictor, tumour, count, seed)
                    labels = np.ones(count, np.int64)
                else:
                    points, labels = simulate_clicks(tumour, placement, count, seed=seed, spacing=spacing)
                    mask = predictor.predict(points, labels, reuse_patches=False).mask
                record(protocol_name, placement, points, labels, 0, mask, args.method)
    if "overlay" in result and args.overlay_dir is not None:
        mask, points, labels, title = result.pop("overlay")
        image = np.asarray(nib.load(case["image"]).dataobj, dtype=np.float32)
        window = predictor.processor.image_processor.window
        outlines = {"ground truth": (tumour, "lime"), "prediction": (mask.numpy().astype(bool), "red")}
        save_overlay(args.overlay_dir / f"{case['case_id']}.png", image, label_image.affine, outlines, points, labels,
                     window, f"{case['case_id']}: {title}")  # fmt: skip
    result.pop("overlay", None)
    return result


# ------------------------------------------------------------------------------------------------ outputs
def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write, suffix=path.suffix)


def _json_safe(value: Any) -> Any:
    """NaN (a standard deviation of one case) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------ main
def check_output_dir(output_dir: Path, overwrite: bool) -> Path:
    """Check that `output_dir` may be written and return the existing folder to build it in (its nearest existing
    ancestor: the output folder and its missing parents appear only once everything is written)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} exists and is not a folder: choose a folder path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"--output_dir {output_dir} exists and is not empty: choose a new folder, or pass --overwrite to replace "
            "it once the new evaluation is complete."
        )
    anchor = output_dir.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ValueError(f"cannot create --output_dir {output_dir}: {anchor} is a file, not a folder.")
    return anchor


def evaluate_cases(
    cases: list[dict[str, Any]],
    predictor: Sam3DPredictor,
    args: argparse.Namespace,
    accelerator: Accelerator,
    staging: Path,
) -> list[dict[str, Any]]:
    """This process's share of the cases; every process returns all results, in case order.

    A case that fails ends this process's share; every process still reaches the gather, the main process deletes
    `staging` (with every process's overlays), and then all raise (the failing one its own error): a launcher that
    stops the other processes once one has failed finds nothing left to clean up.
    """
    results, failure = [], None
    with accelerator.split_between_processes(cases) as own_cases:
        progress = tqdm(own_cases, desc="cases", unit="case", disable=not accelerator.is_local_main_process)
        for case in progress:
            progress.set_postfix_str(case["case_id"])
            try:
                results.append(evaluate_one(case, predictor, args))
            except Exception as error:
                failure = error
                results.append({"case_id": case["case_id"], "position": case["position"], "error": repr(error)})
                break
    results = sorted(gather_object(results), key=lambda r: r["position"])
    failed = [r for r in results if "error" in r]
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        if failure is not None:
            raise failure
        raise RuntimeError(f"case {failed[0]['case_id']} failed on another process: {failed[0]['error']}")
    return results


def write_outputs(
    folder: Path, results: list[dict[str, Any]], args: argparse.Namespace, accelerator: Accelerator
) -> int:
    """cases.csv, lesions.csv, summary.json, table.md and dice_per_round.png in `folder`; prints the table and
    returns the number of case rows."""
    rows = [row for r in results for row in r["rows"]]
    lesion_rows = [row for r in results for row in r["lesion_rows"]]
    for r in results:
        for note in [r.get("skipped"), *r.get("notes", [])]:
            if note:
                accelerator.print(f"{r['case_id']}: {note}")
    if not rows:
        skipped = [r for r in results if r.get("skipped")]
        reason = f"; {len(skipped)} skipped, e.g. {skipped[0]['case_id']}: {skipped[0]['skipped']}" if skipped else ""
        raise ValueError(f"no case of {args.data_dir} ({args.split}) could be evaluated ({len(results)} cases{reason})")
    write_csv(folder / "cases.csv", rows, CASE_COLUMNS)
    write_csv(folder / "lesions.csv", lesion_rows, LESION_COLUMNS)
    summary = summarize(rows)
    interactive = [r["interactive"] for r in results if "interactive" in r]
    if interactive:
        write_csv(folder / "interactive.csv", interactive, INTERACTIVE_COLUMNS)
        interactive_block = {
            "dataset": args.dataset_name, "method": args.method,
            **summarize_interactive(interactive, args.tolerance_mm, CHALLENGE_TOLERANCE_MM),
        }  # fmt: skip
    record = {
        "format": SUMMARY_FORMAT,
        "sam3d_hf_version": __version__,
        "dataset": args.dataset_name,
        "split": args.split if args.split_file is not None else "all labelled cases",
        "settings": {
            "cases": len({r["case_id"] for r in rows}),
            "protocols": args.protocols,
            "click_placement": args.click_placement,
            "overlap": args.overlap if "automatic" in args.protocols else None,
            "rounds": args.rounds,
            "seed": args.seed,
            "tolerance_mm": args.tolerance_mm,
            "target_label": args.target_label_used,
            "bf16": args.bf16,
            "sw_batch_size": args.sw_batch_size,
            "max_cases": args.max_cases,
            "method": args.method,
            "recipe": args.recipe,
        },
        "summary": summary,
    }
    if interactive:
        record["interactive"] = interactive_block
    write_json(folder / "summary.json", _json_safe(record))
    table = markdown_table(summary) + ("\n" + markdown_interactive(interactive_block) if interactive else "")
    atomic_write_text(folder / "table.md", table)
    save_curve(folder / "dice_per_round.png", rows)
    accelerator.print(table)
    return len(rows)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    accelerator = Accelerator()
    try:
        run(args, accelerator)
    finally:
        # A process that exits with its process group alive can abort in Gloo's teardown ("terminate called without
        # an active exception", 1 run in 16 with two CPU processes), which fails the launch of a complete evaluation.
        accelerator.end_training()


def run(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Check the output folder, the cases and the data, load the model, evaluate, write the outputs atomically."""
    output_dir = Path(args.output_dir).resolve()
    anchor = check_output_dir(output_dir, args.overwrite)
    with accelerator.main_process_first():  # the main process writes a new split file before the others read it
        cases = select_cases(args)
    processor = load_processor(args)
    target = processor.image_processor.target_label
    args.target_label_used = args.target_label if args.target_label is not None else target
    try:  # misaligned, unreadable or mislabelled data: one line naming the case, before the model is loaded
        validate_dataset(cases, processor, target_label=args.target_label_used)
    except (ValueError, TypeError) as error:
        raise ValueError(f"the dataset in {args.data_dir} is not usable: {error}") from None
    model = load_model(args)
    click_protocols = [p for p in args.protocols if p != "automatic"]
    if not model.config.use_prompt_encoder and click_protocols:
        raise ValueError(
            f"this model is prompt-free (use_prompt_encoder=False) and takes no clicks: evaluate it with --automatic "
            f"alone, not the click protocols {click_protocols}"
        )
    if "automatic" in args.protocols and model.config.use_prompt_encoder and not args.centre_clicks:
        raise ValueError(
            "--automatic evaluates the prompt-free model (sliding windows, no click); this model is prompted: drop "
            "--automatic, or add --centre_clicks for one click at each window's centre (not the paper's method)"
        )
    sessions = [p for p in SESSION_PROTOCOLS if p in args.protocols]
    if sessions and not model.config.prompt_encoder_config.use_point_labels:
        raise ValueError(
            f"protocol {sessions[0]!r} places negative clicks, but this model has prompt_encoder_config."
            f"use_point_labels=False and cannot use them; drop {sessions[0]!r} from --protocols or evaluate a model "
            "trained with labels."
        )
    args.dataset_name = args.dataset_name or processor.image_processor.preset or Path(args.data_dir).resolve().name
    predictor = Sam3DPredictor(model.to(accelerator.device), processor, bf16=args.bf16)

    # Everything goes into a hidden sibling folder, renamed to --output_dir once complete; the main process makes it
    # and tells the others (they write their cases' overlays and masks there).
    staging = None
    if accelerator.is_main_process:
        staging = make_staging_folder(output_dir, anchor)
        (staging / "overlays").mkdir()
    staging = Path(broadcast_object_list([staging])[0])
    try:
        args.overlay_dir = staging / "overlays"
        args.mask_dir = staging / "masks" if args.save_masks else None
        results = evaluate_cases(cases, predictor, args, accelerator, staging)
        if accelerator.is_main_process:
            rows = write_outputs(staging, results, args, accelerator)
            replace_folder(staging, output_dir)
            print(f"{len(results)} cases on {accelerator.num_processes} process(es), {rows} rows -> {output_dir}")
    except BaseException:  # an error or an interrupt: nothing half-written stays
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise


if __name__ == "__main__":
    main()
