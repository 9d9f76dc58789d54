"""The `sam3d` command line: `sam3d <command> --help` for each command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__


def _load_config(name: str):
    """`--config`: a Sam3DConfig folder or config.json, or a Hub id (online only). A path that does not exist is a
    clear error before anything is downloaded."""
    from huggingface_hub import constants

    from .configuration_sam3d import Sam3DConfig

    looks_local = name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") > 1
    if not Path(name).expanduser().exists() and (looks_local or constants.HF_HUB_OFFLINE):
        where = "" if looks_local else " (HF_HUB_OFFLINE is set, so it cannot be a Hub id)"
        raise ValueError(f"--config {name!r}: no such file or folder{where}; give a Sam3DConfig folder or config.json")
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():  # transformers would silently give default sizes
        found = sorted(p.name for p in path.iterdir())[:10]
        raise ValueError(f"--config {name!r} is a folder without config.json (found {found}); give the config itself")
    try:
        return Sam3DConfig.from_pretrained(os.fspath(path))
    except OSError as error:
        raise ValueError(f"--config {name!r} could not be loaded: {str(error).splitlines()[0]}") from error


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


def _convert(args: argparse.Namespace) -> int:
    """`sam3d convert sam|official`: convert a checkpoint into a `from_pretrained` folder and print the report."""
    from .convert_sam3d import convert_official_checkpoint, convert_sam_checkpoint

    vision = {"image_size": tuple(args.image_size)} if args.image_size else {}
    if args.source == "sam":
        config = None
        if args.config:
            if vision:
                raise ValueError("give either --config or --image-size, not both (set image_size in the config)")
            config = _load_config(args.config)
        kwargs = {"vision_config": vision} if vision else {}
        report = convert_sam_checkpoint(
            args.checkpoint, args.output, config, overwrite=args.overwrite, revision=args.revision, **kwargs
        )
    else:
        if args.config or args.revision:
            raise ValueError(
                "--config and --revision are for `sam3d convert sam`; official sizes are read from the file"
            )
        kwargs = {"vision_config": vision} if vision else {}
        report = convert_official_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite, **kwargs)
    print(report.summary())
    print(f"wrote {args.output} (config.json, model.safetensors, conversion_report.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam3d", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="print the model's parameter counts for a SAM size")
    summary.add_argument("--preset", choices=["vit_b", "vit_l", "vit_h"], default="vit_b")
    summary.set_defaults(func=_summary)

    convert = commands.add_parser(
        "convert",
        help="convert SAM 2D weights or an official 3DSAM-adapter snapshot into a from_pretrained folder",
        description="Writes config.json, model.safetensors and conversion_report.json (what was copied, inflated, "
        "newly initialised and ignored) into --output, atomically.",
    )
    convert.add_argument(
        "source",
        choices=["sam", "official"],
        help="sam: Meta's SAM (segment_anything .pth, transformers SamModel folder/.safetensors or Hub id), "
        "inflated to 3D as in the paper; official: a 3DSAM-adapter training snapshot (*.pth.tar)",
    )
    convert.add_argument("--checkpoint", required=True, help="checkpoint file, model folder or (sam only) Hub repo id")
    convert.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    convert.add_argument(
        "--image-size",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        help="the patch size the model is trained at (default 128 128 128)",
    )
    convert.add_argument(
        "--config", help="(sam) a Sam3DConfig folder or config.json, required for SAM sizes other than B/L/H"
    )
    convert.add_argument("--revision", help="(sam) Hub revision")
    convert.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # The library's messages say what was expected and how to fix it; OSError covers what the system refuses
    # (permissions, a full disk). Anything else is a bug and keeps its traceback.
    except (ValueError, TypeError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"sam3d {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
