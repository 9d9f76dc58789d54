"""bf16 autocast and dynamic int8 of the ViT's linear layers against float32: agreement, Dice and speed, in one run.

    OMP_NUM_THREADS=2 python benchmarks/benchmark_precision.py --cases 3            # ViT-B, 128³ patches
    OMP_NUM_THREADS=1 python benchmarks/benchmark_precision.py --preset tiny --patch 40 24 44 --cases 2 --repeats 1

On generated CT scans (`sam3d_hf.synthetic.generate_case`, one lesion each), `Sam3DPredictor` predicts from one
click inside the lesion with the float32 model, with `bf16=True` (refused, with the reason, where bf16 does not pay:
`sam3d_hf.inference.bf16_verdict`) and with the ViT blocks' `nn.Linear` layers quantized to dynamic int8
(`torch.ao.quantization.quantize_dynamic`). For each variant: the share of patch voxels whose foreground/background
argmax equals float32's, the Dice of its mask with the lesion and its difference to float32's Dice, and the encoding
time (`get_image_embeddings` of the first case's patch, the variants alternating) as a ratio to float32's. Weights are
random (no trained ViT-B is at hand offline), so the Dice values say nothing about accuracy, only how far the reduced
precisions move a mask; pass `--model` to judge a trained model instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DImageProcessor, Sam3DProcessor
from sam3d_hf.inference import Sam3DPredictor, bf16_verdict
from sam3d_hf.metrics import dice_score
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_case


def int8_model(model: Sam3DForPromptableSegmentation) -> Sam3DForPromptableSegmentation:
    """A copy whose ViT blocks' linear layers (qkv, proj, MLP, adapters) are dynamic int8 (weights int8 per tensor,
    activations quantized per batch at run time); necks, prompt encoder and decoder stay float32."""
    quantized = copy.deepcopy(model)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao (not installed)
        warnings.simplefilter("ignore")
        quantized.vision_encoder.layers = torch.ao.quantization.quantize_dynamic(
            quantized.vision_encoder.layers, {nn.Linear}, dtype=torch.qint8
        )
    return quantized


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["vit_b", "tiny"], default="vit_b", help="random-weight model size")
    parser.add_argument("--model", help="a saved Sam3DForPromptableSegmentation folder instead of random weights")
    parser.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128), help="(D, H, W) patch")
    parser.add_argument("--cases", type=int, default=3, help="generated scans")
    parser.add_argument("--repeats", type=int, default=3, help="timed encodings of each variant, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    patch = tuple(args.patch)
    torch.manual_seed(0)
    if args.model:
        model = Sam3DForPromptableSegmentation.from_pretrained(args.model, dtype=torch.float32).eval()
    else:
        config = Sam3DConfig.from_preset(args.preset, vision_config={"image_size": patch})
        model = Sam3DForPromptableSegmentation(config).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, 0.02)
    margin = min(16, min(patch) // 4)  # the processor default, or what a small patch allows
    processor = Sam3DProcessor(
        Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS), patch_size=patch, cluster_margin=margin
    )
    models = {"fp32": model, "int8": int8_model(model)}
    native, reason = bf16_verdict(model.device.type)
    predictors = {"fp32": Sam3DPredictor(model, processor), "int8": Sam3DPredictor(models["int8"], processor)}
    if native:
        predictors["bf16"] = Sam3DPredictor(model, processor, bf16=True)
    print(
        f"{args.model or args.preset}, patch {patch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()}; bf16: {'used' if native else 'refused'} ({reason})"
    )

    rows, first_patch = [], None
    for case in range(args.cases):
        image, label = generate_case(300 + case, num_lesions=1)
        tumour = np.asarray(label.dataobj) == 2
        click = np.argwhere(tumour)[len(np.argwhere(tumour)) // 2].astype(np.float64)
        results = {}
        for name, predictor in predictors.items():
            predictor.set_image(image)
            results[name] = predictor.predict([click])
        first_patch = first_patch if first_patch is not None else results["fp32"].inputs["pixel_values"]
        reference = results["fp32"]
        margin = (reference.logits[:, 1] - reference.logits[:, 0]).abs()
        row = {"case": case, "fp32_dice": round(dice_score(reference.mask, tumour), 4)}
        for name in predictors:
            if name == "fp32":
                continue
            result = results[name]
            agreement = (result.logits.argmax(1) == reference.logits.argmax(1)).float().mean().item()
            dice = dice_score(result.mask, tumour)
            row[name] = {
                "argmax_agreement": round(agreement, 6),
                "dice": round(dice, 4),
                "dice_difference": round(abs(dice - row["fp32_dice"]), 4),
                "dice_with_fp32_mask": round(dice_score(result.mask, reference.mask), 4),
            }
        row["near_ties"] = int((margin < 1e-3).sum())  # voxels where float32 itself hardly decides
        rows.append(row)
        print(json.dumps(row), flush=True)

    seconds = {name: [] for name in predictors}
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first round warms up and is not kept
            for name in predictors:
                autocast = torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()
                start = time.perf_counter()
                with autocast:
                    models.get(name, model).get_image_embeddings(first_patch)
                seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times[1:]) for name, times in seconds.items()}
    summary = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_end": os.getloadavg(),
        "bf16": reason,
        "encode_median_s": {name: round(value, 2) for name, value in medians.items()},
        "encode_speedup_vs_fp32": {name: round(medians["fp32"] / value, 2) for name, value in medians.items()},
        "min_argmax_agreement": {n: min(r[n]["argmax_agreement"] for r in rows) for n in predictors if n != "fp32"},
        "max_dice_difference": {n: max(r[n]["dice_difference"] for r in rows) for n in predictors if n != "fp32"},
    }
    for name in predictors:
        line = f"{name}: encoding {medians[name]:.2f} s (median), {summary['encode_speedup_vs_fp32'][name]:.2f}x fp32"
        if name != "fp32":
            line += (
                f"; argmax agreement >= {summary['min_argmax_agreement'][name]:.4%}, "
                f"|Dice - fp32 Dice| <= {summary['max_dice_difference'][name]:.4f}"
            )
        print(line)
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"cases": rows, "summary": summary}, file, indent=1)
    return {"cases": rows, "summary": summary}


if __name__ == "__main__":
    main()
