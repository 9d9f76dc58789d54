"""The `sam3d` command line: `sam3d <command> --help` for each command."""

from __future__ import annotations

import argparse
import sys


def _summary(args: argparse.Namespace) -> int:
    """Build the model of a SAM preset on the meta device and print its parameter counts per part."""
    import torch

    from .configuration_sam3d import Sam3DConfig
    from .modeling_sam3d import Sam3DForPromptableSegmentation

    config = Sam3DConfig.from_sam_preset(args.preset)
    with torch.device("meta"):
        model = Sam3DForPromptableSegmentation(config)
    print(f"Sam3DForPromptableSegmentation ({args.preset}, patch {config.vision_config.image_size})")
    for name, module in model.named_children():
        print(f"  {name:16s} {sum(p.numel() for p in module.parameters()) / 1e6:8.2f} M parameters")
    print(f"  {'total':16s} {sum(p.numel() for p in model.parameters()) / 1e6:8.2f} M parameters")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam3d", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="print the model's parameter counts for a SAM size")
    summary.add_argument("--preset", choices=["vit_b", "vit_l", "vit_h"], default="vit_b")
    summary.set_defaults(func=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
