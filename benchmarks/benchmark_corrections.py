"""What one negative click does to a false positive: for each test scan of a split, a first click at the centre of the
largest lesion, then a negative click at the deepest voxel of the largest false-positive component of that
prediction (the previous prediction passed, as in a session); prints the component's voxels before and the voxels of
it still predicted after, and the scan's Dice before and after.

    python benchmarks/benchmark_corrections.py --model runs/interactive/final_model --data_dir synthetic-task \
        --split_file runs/interactive/split.json

The interactive protocol (`sam3d evaluate --protocols interactive`) gives the whole correction curve; this isolates
the negative click.
"""

import argparse
import json

import nibabel as nib
import numpy as np
from scipy import ndimage

from sam3d_hf import Sam3DForPromptableSegmentation, Sam3DProcessor
from sam3d_hf.data import index_dataset
from sam3d_hf.inference import Sam3DPredictor
from sam3d_hf.metrics import correction_click, dice_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--split_file", required=True, help="a split JSON with a 'test' list of case ids")
    parser.add_argument("--target_label", type=int, default=2)
    args = parser.parse_args()
    model = Sam3DForPromptableSegmentation.from_pretrained(args.model).eval()
    predictor = Sam3DPredictor(model, Sam3DProcessor.from_pretrained(args.model))
    cases = {case["case_id"]: case for case in index_dataset(args.data_dir)}
    before_total = removed_total = 0
    for case_id in json.loads(open(args.split_file).read())["test"]:
        label = nib.load(cases[case_id]["label"])
        truth = np.asarray(label.dataobj) == args.target_label
        spacing = label.header.get_zooms()[:3]
        predictor.set_image(cases[case_id]["image"])
        first = correction_click(truth, np.zeros_like(truth), spacing)
        prediction = predictor.predict([first[0]], [1])
        mask = prediction.mask.numpy().astype(bool)
        components, count = ndimage.label(mask & ~truth, np.ones((3, 3, 3)))
        if count == 0:
            print(f"{case_id}: no false positive after the first click")
            continue
        blob = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
        negative = correction_click(truth | blob, truth, spacing)[0]  # the blob: the only error of truth vs truth|blob
        after = predictor.predict([first[0], negative], [1, 0], previous=prediction).mask.numpy().astype(bool)
        kept = int((after & blob).sum())
        before_total, removed_total = before_total + int(blob.sum()), removed_total + int(blob.sum()) - kept
        print(f"{case_id}: false-positive blob {int(blob.sum())} voxels, {kept} still predicted after the negative "
              f"click; Dice {dice_score(mask, truth):.3f} -> {dice_score(after, truth):.3f}")  # fmt: skip
    if before_total:
        print(f"removed {removed_total} of {before_total} false-positive voxels ({removed_total / before_total:.1%})")


if __name__ == "__main__":
    main()
