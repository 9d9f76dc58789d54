#!/usr/bin/env python
"""Publish a trained Sam3D folder to the Hugging Face Hub, with a model card written from the run's own files: the
documented entry point of `sam3d push` (same options; `python examples/push_to_hub.py --help` lists them).

The folder is what training saved (`final_model/`): the model or the adapter, and the processor. The card reads the
preprocessing from that processor, the recipe from the folder's `training_info.json` (the training run's record) and
the results from the evaluation's `summary.json`; the folder itself is never modified.

    # look first: list what would be uploaded, print the card and keep a copy for review
    python examples/push_to_hub.py runs/kits21/final_model --repo-id my-lab/sam3d-kits21 \
        --evaluation eval/summary.json --card-out card.md --dry-run
    # then publish only the adapter, against the SAM-initialised base it goes on
    python examples/push_to_hub.py runs/kits21/final_model --repo-id my-lab/sam3d-kits21-adapter --adapter-only \
        --base-model-id my-lab/sam3d-vit-b --evaluation eval/summary.json

Log in first (`hf auth login`) or pass `--token`.
"""

import sys

from sam3d_hf.cli import main as sam3d


def main(argv: list[str] | None = None) -> int:
    return sam3d(["push", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
