"""Publish a trained Sam3D folder to the Hugging Face Hub, with a model card written from the run's own files.

The folder is what training saved: the model (`config.json` + `model.safetensors`) or the adapter
(`adapter_config.json` + `adapter_model.safetensors`), and the processor (`processor_config.json`). The card reads the
preprocessing from that processor, the recipe from the training arguments JSON and the results table and `model-index`
from the evaluation summary JSON (`sam3d evaluate`'s summary.json: its column named by `--dataset_name` should be the
card's dataset). A full model's repo also gets the pipeline code and `custom_pipelines` in its config.json, so it
serves `pipeline("sam3d-segmentation", model=repo_id, trust_remote_code=True)` without sam3d-hf. The folder itself is
never modified.

    # look first: print what would be uploaded and write the card for review
    python examples/push_to_hub.py runs/kits21 --repo-id my-lab/sam3d-kits21 --evaluation runs/kits21/eval.json \
        --training-args runs/kits21/training_args.json --card-out card.md --dry-run
    # then publish only the adapter, against the SAM-initialised base it goes on
    python examples/push_to_hub.py runs/kits21 --repo-id my-lab/sam3d-kits21-adapter --adapter-only \
        --base-model-id my-lab/sam3d-vit-b --evaluation runs/kits21/eval.json

Log in first (`hf auth login`) or pass `--token`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sam3d_hf.hub import push_to_hub, render_model_card, upload_plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder written by save_pretrained (model or adapter, and the processor)")
    parser.add_argument("--repo-id", required=True, help="target repository, 'owner/name'")
    parser.add_argument("--adapter-only", action="store_true", help="publish only the adapter files (needs a base)")
    parser.add_argument("--base-model-id", help="Hub id of the base model the adapter goes on")
    parser.add_argument("--dataset", help="hub_cards dataset key or your own .yaml (default: from the processor)")
    parser.add_argument("--evaluation", help="evaluation summary JSON (Dice / NSD per click protocol)")
    parser.add_argument("--training-args", help="the training run's arguments JSON")
    parser.add_argument("--license", default="apache-2.0", help="licence of the weights (default: SAM's apache-2.0)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to commit to (created if missing)")
    parser.add_argument("--token", help="Hub token (default: the logged-in user's)")
    parser.add_argument("--commit-message", default="Upload Sam3D checkpoint with sam3d-hf")
    parser.add_argument("--card-out", help="also write the rendered card here, for review")
    parser.add_argument("--dry-run", action="store_true", help="print the files and write --card-out; upload nothing")
    args = parser.parse_args(argv)
    if args.adapter_only and not args.base_model_id:
        parser.error("--adapter-only needs --base-model-id: the Hub id of the model the adapter goes on")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # 1. The card, exactly as it will be uploaded.
    card = render_model_card(
        args.folder,
        dataset=args.dataset,
        evaluation=args.evaluation,
        training_args=args.training_args,
        repo_id=args.repo_id,
        base_model=args.base_model_id,
        adapter=args.adapter_only,
        license=args.license,
    )
    if args.card_out:
        card.save(args.card_out)
        print(f"wrote the card to {args.card_out}")

    # 2. The files: from the folder, the pipeline code from the installed package, and made in memory the config with
    #    `custom_pipelines`, the card and, with --adapter-only, the adapter config naming the base.
    print(f"files for {args.repo_id}:")
    for name, source in upload_plan(args.folder, adapter_only=args.adapter_only).items():
        print(f"  {name}  <-  {source}" if isinstance(source, Path) else f"  {name}  (made by sam3d-hf)")
    print("  README.md (the card)" + ("\n  adapter_config.json (base set)" if args.adapter_only else ""))
    if args.dry_run:
        return 0

    # 3. One commit to the Hub.
    info = push_to_hub(
        args.folder,
        args.repo_id,
        adapter_only=args.adapter_only,
        base_model_id=args.base_model_id,
        dataset=args.dataset,
        evaluation=args.evaluation,
        training_args=args.training_args,
        license=args.license,
        private=args.private,
        revision=args.revision,
        token=args.token,
        commit_message=args.commit_message,
    )
    print(f"pushed: {info.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
