"""Evaluate a Sam3D model on a test set the way the 3DSAM-adapter paper reports it, on one or several processes.

For every test scan: simulated clicks (`sam3d_hf.metrics.simulate_clicks`) -> `Sam3DPredictor` (the scan is
preprocessed once and each patch encoded once for all protocols) -> mask in the scan's original geometry -> Dice and
NSD at 5 mm per scan and per lesion (`sam3d_hf.metrics.evaluate_case`).

Protocols (`--protocols`, comma separated):
* a number N (the paper: 1, 3, 10): N clicks placed by `--click_placement` -- `per_lesion` (default: one click in each
  lesion as long as there are clicks, the rest uniform over the tumour; a scan with several lesions gets one patch
  per click cluster) or `uniform` (the official evaluation: uniform over all tumour voxels);
* `center`, `surrounding`, `marginal`: the paper's ablation, one click in that depth band of the largest lesion;
* `correction` (models with `prompt_encoder_config.use_point_labels=True`): one click as for `1`, then up to
  `--rounds` (5) corrective clicks at the centre of the largest error region (`correction_click`: negative in a false
  positive, positive in a miss), Dice and NSD after every round. Its rows are named `<method> (interactive)`.

Outputs in `--output_dir`: `cases.csv` (one row per scan, protocol and round), `lesions.csv` (one row per lesion),
`summary.json` (`sam3d_hf.metrics.summarize`: mean and std per protocol and round; NaN written as null),
`table.md` (Table 1 shape), `dice_per_round.png` (mean Dice/NSD per correction round, or per number of clicks), and
`overlays/<case>.png` (three orthogonal slices through each lesion: ground truth, prediction, clicks; from the first
protocol, or the last correction round).

Several processes: cases are split with `accelerator.split_between_processes` and gathered on the main process with
`gather_object`; clicks are seeded per case, so any number of processes gives the same files:

    python examples/evaluate.py --model my-model --data_dir Task07_Pancreas --split_file split.json --output_dir eval
    accelerate launch --multi_gpu --num_processes 4 examples/evaluate.py --model my-model ...   # 4 GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/evaluate.py ...  # 2 CPU processes

Needs matplotlib (`pip install sam3d-hf[eval]`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from sam3d_hf import Sam3DAdapterModel, Sam3DForPromptableSegmentation, Sam3DProcessor
from sam3d_hf.cli import save_overlay
from sam3d_hf.convert_sam3d import atomic_write
from sam3d_hf.data import index_dataset, load_or_create_split
from sam3d_hf.inference import Sam3DPredictor
from sam3d_hf.metrics import correction_click, evaluate_case, markdown_table, simulate_clicks, summarize
from sam3d_hf.peft_sam3d import PEFT_TYPE as SPATIAL_ADAPTER_TYPE

POSITION_PROTOCOLS = ("center", "surrounding", "marginal")
CASE_COLUMNS = (
    "case_id", "dataset", "method", "protocol_name", "protocol", "num_clicks", "round", "dice", "nsd", "voxels",
    "volume_mm3", "n_lesions", "lesions_detected", "clicks", "click_labels",
)  # fmt: skip
LESION_COLUMNS = (
    "case_id", "dataset", "method", "protocol", "num_clicks", "round", "lesion", "voxels", "volume_mm3", "detected",
    "dice", "nsd",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (save_pretrained) with its processor_config.json")
    parser.add_argument("--base", help="base model folder, with --adapter")
    parser.add_argument("--adapter", help="Sam3DAdapterModel or peft LoRA folder to put on --base")
    parser.add_argument("--preset", help="processor preset when the model folder has no processor_config.json")
    parser.add_argument("--data_dir", required=True, help="dataset folder (MSD, KiTS21, LiTS17 or images/labels)")
    parser.add_argument("--split_file", help="JSON split (made with seed --seed if missing); without it: all cases")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--protocols", default="1,3,10", help="comma separated: N, center, surrounding, marginal, "
                        "correction")  # fmt: skip
    parser.add_argument("--click_placement", default="per_lesion", choices=["per_lesion", "uniform"])
    parser.add_argument("--rounds", type=int, default=5, help="correction rounds")
    parser.add_argument("--target_label", type=int, help="tumour label (default: the processor's target_label)")
    parser.add_argument("--method", default="3DSAM-adapter", help="row name in the table")
    parser.add_argument("--dataset_name", help="column name in the table (default: the data folder's name)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0, help="click seed (per case: seed and case position)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs, CPUs with native bf16)")
    parser.add_argument("--max_cases", type=int, help="evaluate only the first N cases of the split")
    parser.add_argument("--tolerance_mm", type=float, default=5.0, help="NSD tolerance")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.base is None) or (args.base is None) != (args.adapter is None):
        parser.error("give --model, or --base together with --adapter")
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    for protocol in protocols:
        if not (protocol.isdigit() and int(protocol) > 0) and protocol not in (*POSITION_PROTOCOLS, "correction"):
            parser.error(f"unknown protocol {protocol!r}: use a number of clicks, {POSITION_PROTOCOLS} or correction")
    if not protocols:
        parser.error("--protocols is empty")
    args.protocols = protocols
    if args.rounds < 1 or (args.max_cases is not None and args.max_cases < 1):
        parser.error("--rounds and --max_cases must be >= 1")
    return args


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Sam3DProcessor]:
    """The model (adapters merged) and its processor, from --model or --base + --adapter."""
    folder = Path(args.model or args.base)
    model = Sam3DForPromptableSegmentation.from_pretrained(folder, dtype=torch.float32)
    if args.adapter is not None:
        adapter_config = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
        if adapter_config.get("peft_type") == SPATIAL_ADAPTER_TYPE:  # the paper's spatial adapters
            model = Sam3DAdapterModel.from_pretrained(model, args.adapter).merge_and_unload()
        else:  # a peft method (LoRA, ...)
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    for candidate in (Path(args.adapter) if args.adapter else None, folder):
        if candidate is not None and (candidate / "processor_config.json").is_file():
            return model, Sam3DProcessor.from_pretrained(candidate)
    if args.preset is None:
        raise ValueError(f"{folder} has no processor_config.json: pass --preset (e.g. kits21, msd_pancreas).")
    return model, Sam3DProcessor.from_preset(args.preset)


def select_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    dataset = index_dataset(args.data_dir)
    cases = [dict(row) for row in dataset if row["label"] is not None]
    if args.split_file is not None:
        wanted = set(load_or_create_split([c["case_id"] for c in cases], args.split_file, seed=args.seed)[args.split])
        cases = [c for c in cases if c["case_id"] in wanted]
    for position, case in enumerate(cases):
        case["position"] = position  # seeds the clicks: the same for any number of processes
    return cases[: args.max_cases]


# ------------------------------------------------------------------------------------------------ one case
def evaluate_one(case: dict[str, Any], predictor: Sam3DPredictor, args: argparse.Namespace) -> dict[str, Any]:
    """Every protocol on one scan; returns CSV rows, lesion rows and what the overlay needs."""
    label_image = nib.load(case["label"])
    target = args.target_label if args.target_label is not None else predictor.processor.image_processor.target_label
    label = np.asarray(label_image.dataobj)
    tumour = label == target if target is not None else label > 0
    result = {"case_id": case["case_id"], "position": case["position"], "rows": [], "lesion_rows": []}
    if not tumour.any():
        result["skipped"] = "no tumour voxel in the label map"
        return result
    spacing = np.linalg.norm(label_image.affine[:3, :3], axis=0)
    predictor.set_image(case["image"])
    seed = args.seed * 1_000_003 + case["position"]

    def record(protocol_name, protocol, points, labels, round_, mask, method):
        scores = evaluate_case(mask, tumour, spacing, tolerance_mm=args.tolerance_mm)
        meta = {
            "case_id": case["case_id"], "dataset": args.dataset_name, "method": method, "protocol": protocol,
            "num_clicks": 1 if protocol_name == "correction" else len(points), "round": round_,
        }  # fmt: skip
        result["rows"].append({
            **meta, "protocol_name": protocol_name, "dice": scores["dice"], "nsd": scores["nsd"],
            "voxels": scores["voxels"], "volume_mm3": scores["volume_mm3"], "n_lesions": len(scores["lesions"]),
            "lesions": scores["lesions"],  # for `summarize`; the CSV writer leaves it out
            "lesions_detected": sum(lesion["detected"] for lesion in scores["lesions"]),
            "clicks": json.dumps(np.asarray(points).tolist()), "click_labels": json.dumps(np.asarray(labels).tolist()),
        })  # fmt: skip
        result["lesion_rows"].extend({**meta, **lesion} for lesion in scores["lesions"])
        if "overlay" not in result or protocol_name == "correction":
            result["overlay"] = (mask, np.asarray(points), np.asarray(labels), f"{protocol_name} round {round_}")

    for protocol_name in args.protocols:
        if protocol_name in POSITION_PROTOCOLS:
            try:
                points, labels = simulate_clicks(tumour, protocol_name, 1, seed=seed, spacing=spacing)
            except ValueError as err:  # a lesion too small for three depth bands
                result.setdefault("notes", []).append(f"{protocol_name}: {err}")
                continue
            record(protocol_name, protocol_name, points, labels, 0, predictor.predict(points, labels).mask, args.method)
        elif protocol_name == "correction":
            points, labels = simulate_clicks(tumour, args.click_placement, 1, seed=seed, spacing=spacing)
            mask = predictor.predict(points, labels).mask
            method = f"{args.method} (interactive)"
            record(protocol_name, args.click_placement, points, labels, 0, mask, method)
            for round_ in range(1, args.rounds + 1):
                click = correction_click(tumour, mask, spacing)
                if click is not None:  # otherwise the prediction is perfect: it stays as it is
                    points, labels = np.vstack([points, click[0]]), np.append(labels, click[1])
                    mask = predictor.predict(points, labels).mask
                record(protocol_name, args.click_placement, points, labels, round_, mask, method)
        else:
            count = int(protocol_name)
            points, labels = simulate_clicks(tumour, args.click_placement, count, seed=seed, spacing=spacing)
            mask = predictor.predict(points, labels).mask
            record(protocol_name, args.click_placement, points, labels, 0, mask, args.method)
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


def write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, suffix=path.suffix)


def _json_safe(value: Any) -> Any:
    """NaN (a standard deviation of one case) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    """Mean Dice and NSD per correction round; without correction rows, per number of clicks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    interactive = [r for r in rows if r["protocol_name"] == "correction"]
    chosen, key, xlabel = (
        (interactive, "round", "correction round")
        if interactive
        else ([r for r in rows if r["protocol_name"].isdigit()], "num_clicks", "clicks")
    )
    figure, axis = plt.subplots(figsize=(5, 3.5))
    xs = sorted({r[key] for r in chosen})
    for metric in ("dice", "nsd"):
        axis.plot(xs, [np.mean([r[metric] for r in chosen if r[key] == x]) for x in xs], marker="o", label=metric)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("mean over cases")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90), suffix=".png")
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator()
    output_dir = Path(args.output_dir)
    args.overlay_dir = output_dir / "overlays"
    if accelerator.is_main_process:
        args.overlay_dir.mkdir(parents=True, exist_ok=True)
    args.dataset_name = args.dataset_name or Path(args.data_dir).resolve().name
    with accelerator.main_process_first():  # the main process writes a new split file before the others read it
        cases = select_cases(args)
    model, processor = load_model(args)
    if "correction" in args.protocols and not model.config.prompt_encoder_config.use_point_labels:
        raise ValueError(
            "protocol 'correction' places negative clicks, but this model has prompt_encoder_config.use_point_labels="
            "False and cannot use them; drop 'correction' from --protocols or evaluate a model trained with labels."
        )
    predictor = Sam3DPredictor(model.to(accelerator.device), processor, bf16=args.bf16)
    accelerator.wait_for_everyone()  # the overlay folder exists

    with accelerator.split_between_processes(cases) as own_cases:
        results = [evaluate_one(case, predictor, args) for case in own_cases]
    results = sorted(gather_object(results), key=lambda r: r["position"])
    if not accelerator.is_main_process:
        return

    rows = [row for r in results for row in r["rows"]]
    lesion_rows = [row for r in results for row in r["lesion_rows"]]
    for r in results:
        for note in [r.get("skipped"), *r.get("notes", [])]:
            if note:
                accelerator.print(f"{r['case_id']}: {note}")
    if not rows:
        raise ValueError(f"No case of {args.data_dir} ({args.split}) could be evaluated (no tumour in any label map?).")
    write_csv(output_dir / "cases.csv", rows, CASE_COLUMNS)
    write_csv(output_dir / "lesions.csv", lesion_rows, LESION_COLUMNS)
    summary = summarize(rows)
    write_text(output_dir / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
    table = markdown_table(summary)
    write_text(output_dir / "table.md", table)
    save_curve(output_dir / "dice_per_round.png", rows)
    accelerator.print(table)
    processes = accelerator.num_processes
    accelerator.print(f"{len(results)} cases on {processes} process(es), {len(rows)} rows -> {output_dir}")


if __name__ == "__main__":
    main()
