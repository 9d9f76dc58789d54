"""The `sam3d` command line: `sam3d <command> --help` for each command.

A user mistake is one line on stderr (`sam3d <command>: error: ...`) and a non-zero exit status, never a traceback;
every file is written under a temporary name and moved into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .version import __version__

# Nothing heavy is imported at module level: torch, transformers, nibabel and the rest are imported inside the
# commands, so that building the parser costs only what `import sam3d_hf` costs.


def _load_config(name: str):
    """`--config`: a Sam3DConfig folder or config.json, or a Hub id (online only). A path that does not exist is a
    clear error before anything is downloaded."""
    from .configuration_sam3d import Sam3DConfig
    from .hub import check_model_reference

    check_model_reference(name, "--config", "file or folder", "give a Sam3DConfig folder or config.json")
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
    if args.source == "sam" and args.dataset:
        raise ValueError("--dataset is for `sam3d convert official` (the preprocessing the snapshot was trained on)")
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
        factory = None
        if args.dataset:  # the official code's reading of the dataset: the model sees the input it was trained on
            from .processing_sam3d import Sam3DProcessor

            def factory(model):
                size = model.config.vision_config.image_size
                return Sam3DProcessor.from_preset(
                    f"official_{args.dataset}", patch_size=size, cluster_margin=min(size) // 8
                )

        report = convert_official_checkpoint(
            args.checkpoint, args.output, overwrite=args.overwrite, processor_factory=factory, **kwargs
        )
    print(report.summary())
    extra = ", processor_config.json" if args.source == "official" and args.dataset else ""
    print(f"wrote {args.output} (config.json, model.safetensors, conversion_report.json{extra})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`sam3d <command>: error: ...`, exit status 2), like the other errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_module_args(module, argv: list[str], command: str):
    """The library module's own `parse_args` (`sam3d_hf.training`, `sam3d_hf.evaluation`), its usage errors reduced to
    one line (`sam3d <command>: error: ...`)."""
    import contextlib
    import io

    stderr = io.StringIO()
    script = sys.argv[:1]
    sys.argv[:1] = [f"sam3d {command}"]  # argparse names the usage line (`usage: sam3d evaluate ...`) after argv[0]
    try:
        with contextlib.redirect_stderr(stderr):
            return module.parse_args(argv, prog=f"sam3d {command}")
    except SystemExit as exit_info:
        if exit_info.code in (0, None):  # --help
            raise
        lines = stderr.getvalue().strip().splitlines() or ["invalid arguments"]
        raise ValueError(lines[-1].split("error: ", 1)[-1]) from None
    finally:
        sys.argv[:1] = script


def _triple(text: str) -> list[float]:
    """`i,j,k` -> three numbers (argparse type of --point/--negative)."""
    parts = text.replace(" ", "").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or not all(map(math.isfinite, values)):
        raise argparse.ArgumentTypeError(f"expected three numbers i,j,k (e.g. 60,48,20), got {text!r}")
    return values


def _load_model_and_processor(name: str, preset: str | None):
    """A model folder/Hub id and its processor (`processor_config.json` next to it, else `--preset`)."""
    import torch

    _quiet_transformers()

    from .hub import check_model_reference
    from .image_processing_sam3d import SAM3D_PRESETS
    from .modeling_sam3d import Sam3DForPromptableSegmentation
    from .processing_sam3d import Sam3DProcessor

    path = Path(name).expanduser()
    check_model_reference(name, "--model", hint="give a model folder (save_pretrained) or a Hub id")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"--model {name!r} has no config.json; give the folder written by save_pretrained")
    no_processor = f"pass --preset (one of {', '.join(SAM3D_PRESETS)}) or save the training processor there"
    if path.is_dir() and not preset and not (path / "processor_config.json").is_file():
        raise ValueError(f"--model {name!r} has no processor_config.json: {no_processor}")
    try:
        model = Sam3DForPromptableSegmentation.from_pretrained(name, dtype=torch.float32)
        processor = Sam3DProcessor.from_preset(preset) if preset else Sam3DProcessor.from_pretrained(name)
    # transformers and peft raise KeyError / ValueError for folders they misread (e.g. one that also holds an adapter
    # config, which transformers hands to peft); the message is kept, on one line, without the traceback.
    except (OSError, KeyError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, KeyError):
            message = f"{type(error).__name__}: {message}"
        if "processor" in message.lower() and not preset:
            message += f" ({no_processor})"
        raise ValueError(f"--model {name!r} could not be loaded: {message}") from None
    return model, processor


def _progress(text: str) -> None:
    print(text, flush=True)


def _segment(args: argparse.Namespace) -> int:
    """`sam3d segment`: clicks on one scan -> a NIfTI mask in the scan's geometry (and an optional overlay PNG)."""
    # What the arguments alone decide, before anything is imported, read or loaded.
    if not 0 < args.threshold < 1:
        raise ValueError(f"--threshold is a foreground probability strictly between 0 and 1, got {args.threshold}")
    if not args.output.endswith((".nii", ".nii.gz")):
        raise ValueError(f"--output must end in .nii or .nii.gz, got {args.output!r}")
    if args.overlay and not args.overlay.endswith(".png"):
        raise ValueError(f"--overlay must end in .png, got {args.overlay!r}")
    for option, target in (("--output", args.output), ("--overlay", args.overlay)):
        if target is None:
            continue
        target = Path(target).expanduser().absolute()
        blocking = next((p for p in reversed(target.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ValueError(f"{option} {str(target)!r}: {str(blocking)!r} is a file, not a folder")
        if not target.parent.is_dir():
            raise ValueError(f"{option} {str(target)!r}: the folder {str(target.parent)!r} does not exist; create it")
        if target.is_dir():
            raise ValueError(f"{option} {str(target)!r} is a folder; give a file name")

    _progress(f"reading {args.image} (torch and transformers are imported first: a few seconds)")
    import nibabel as nib
    import numpy as np

    from .image_processing_sam3d import load_volume
    from .inference import Sam3DPredictor
    from .processing_sam3d import save_mask_nifti, validate_points
    from .visualization import save_overlay

    volume = load_volume(args.image)  # reports a missing/unreadable scan before the model is loaded
    points = [*args.point, *args.negative]
    labels = [1] * len(args.point) + [0] * len(args.negative)
    validate_points(points, labels, volume.data.shape, volume.affine, args.points_in)  # clicks outside: now
    _progress(f"loading the model {args.model}")
    model, processor = _load_model_and_processor(args.model, args.preset)
    if args.negative and not model.config.prompt_encoder_config.use_point_labels:
        raise ValueError(
            "--negative needs a model trained with point labels (prompt_encoder_config.use_point_labels=True); "
            "this model treats every click as positive: drop --negative"
        )
    predictor = Sam3DPredictor(model, processor)
    _progress("preprocessing the scan (orientation, spacing, intensities)")
    predictor.set_image(volume.nifti if volume.nifti is not None else args.image)
    _progress(f"encoding and segmenting from {len(args.point)} positive and {len(args.negative)} negative click(s)")
    prediction = predictor.predict(points, labels, points_in=args.points_in, threshold=args.threshold)
    mask = prediction.mask.numpy()
    _progress(f"writing {args.output}" + (f" and {args.overlay}" if args.overlay else ""))
    save_mask_nifti(mask, volume.nifti if volume.nifti is not None else args.image, args.output)
    if args.overlay:
        voxels = np.asarray(points, dtype=float)
        if args.points_in == "world":  # RAS mm -> stored voxel indices, for drawing
            voxels = nib.affines.apply_affine(np.linalg.inv(volume.affine), voxels)
        window = processor.image_processor.window
        save_overlay(args.overlay, volume.data, volume.affine, {"prediction": (mask, "red")}, voxels, labels, window)
    scores = ", ".join(f"{s:.3f}" for s in prediction.scores.tolist())
    spacing = np.prod(volume.spacing)
    print(f"wrote {args.output}: {int(mask.sum())} voxels ({mask.sum() * spacing / 1000:.2f} ml), scores [{scores}]")
    if args.overlay:
        print(f"wrote {args.overlay}")
    return 0


def _evaluate(argv: list[str]) -> int:
    """`sam3d evaluate ...`: `sam3d_hf.evaluation.main` with the same arguments, in this process."""
    from . import evaluation

    _parse_module_args(evaluation, argv, "evaluate")
    evaluation.main(argv)
    return 0


def _train(argv: list[str]) -> int:
    """`sam3d train [--accelerate_config FILE] ...`: `accelerate launch -m sam3d_hf.training`, in a subprocess."""
    import subprocess

    from . import training

    launch_options = []
    if "--accelerate_config" in argv:
        at = argv.index("--accelerate_config")
        if at + 1 >= len(argv):
            raise ValueError("--accelerate_config needs a file")
        launch_options = ["--config_file", argv[at + 1]]
        argv = argv[:at] + argv[at + 2 :]
        if not Path(launch_options[1]).is_file():
            raise ValueError(f"--accelerate_config {launch_options[1]!r}: no such file")
    _parse_module_args(training, argv, "train")  # argument mistakes: one line, before launching
    result = subprocess.run(training.launch_command(argv, launch_options), env=training.launch_environment())
    if result.returncode:
        raise SystemExit(f"sam3d train: error: training failed (exit status {result.returncode}; see above)")
    return 0


def _push(args: argparse.Namespace) -> int:
    """`sam3d push`: one commit with the folder's files and a rendered model card (`hub.push_to_hub`)."""
    from .hub import push_to_hub, render_model_card, upload_plan

    if args.adapter_only and not args.base_model_id:
        raise ValueError("--adapter-only needs --base-model-id: the Hub id of the model the adapter goes on")
    card_kwargs = {"dataset": args.dataset, "evaluation": args.evaluation, "training": args.training_info}
    card = render_model_card(
        args.folder, repo_id=args.repo_id, base_model=args.base_model_id, adapter=args.adapter_only or None,
        license=args.license, **card_kwargs,
    )  # fmt: skip
    if args.card_out:
        card.save(args.card_out)
        print(f"wrote the card to {args.card_out}")
    print(f"files for {args.repo_id}:")
    for name, source in upload_plan(args.folder, adapter_only=args.adapter_only).items():
        print(f"  {name}  <-  {source}" if isinstance(source, Path) else f"  {name}  (made by sam3d-hf)")
    print("  README.md (the model card, " + f"{len(str(card))} characters)")
    if args.adapter_only:
        print("  adapter_config.json (the folder's, naming the base model)")
    if args.dry_run:
        print(f"\nREADME.md, as it would be uploaded:\n\n{card}")
        return 0
    info = push_to_hub(
        args.folder, args.repo_id, adapter_only=args.adapter_only, base_model_id=args.base_model_id,
        license=args.license, private=args.private, revision=args.revision, token=args.token,
        commit_message=args.commit_message, **card_kwargs,
    )  # fmt: skip
    print(f"pushed: {info.commit_url}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads is a number of torch threads >= 1, got {args.threads}")
    run_demo(args.output_dir, quick=args.quick, overwrite=args.overwrite, seed=args.seed, threads=args.threads)
    return 0


def _app(args: argparse.Namespace) -> int:
    """`sam3d app`: the interactive web app (sam3d_hf.app; needs the `app` extra, Gradio)."""
    from .app import launch

    launch(args.model, args.adapter, args.preset, host=args.host, port=args.port, share=args.share)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sam3d", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser(
        "demo",
        help="generate synthetic CT, fine-tune a small model on the CPU, evaluate it, write everything to a folder",
        description="Offline, on the CPU: generates synthetic CT scans with lesions (sam3d_hf.synthetic), fine-tunes "
        "a small configuration with sam3d_hf.training (accelerate launch), evaluates 1/3/10-click and correction-round "
        "Dice and NSD on held-out cases (sam3d_hf.evaluation) and writes the model, processor, adapter, predictions "
        "(NIfTI), overlays, metrics table and model card into --output-dir.",
    )
    demo.add_argument("--output-dir", default="sam3d-demo", help="folder to write (default ./sam3d-demo)")
    demo.add_argument("--quick", action="store_true", help="a 1-2 minute run: fewer cases and steps, no Dice target")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    demo.add_argument("--seed", type=int, default=0, help="data, training and click seed")
    demo.add_argument(
        "--threads", type=int, help="torch threads (default: one per core other processes leave idle, per stage)"
    )
    demo.set_defaults(func=_demo)

    segment = commands.add_parser(
        "segment",
        help="segment a scan from clicks and write the mask as NIfTI",
        description="Clicks are voxel indices i,j,k of the scan's stored axes (what nib.load(scan).get_fdata()[i, j, "
        "k] reads; ITK-SNAP/3D Slicer show them as IJK), or RAS world mm with --points-in world. The mask is written "
        "in the scan's own geometry (same shape and affine), atomically.",
    )
    segment.add_argument("--model", required=True, help="model folder (save_pretrained) or Hub id")
    segment.add_argument("--image", required=True, help="the scan: NIfTI (.nii/.nii.gz), NRRD or a DICOM folder")
    segment.add_argument("--point", action="append", type=_triple, required=True, metavar="I,J,K",
                         help="a positive click (repeat for several)")  # fmt: skip
    segment.add_argument("--negative", action="append", type=_triple, default=[], metavar="I,J,K",
                         help="a negative click (repeat; needs a model trained with point labels)")  # fmt: skip
    segment.add_argument("--points-in", choices=["voxel", "world"], default="voxel",
                         help="voxel: stored i,j,k (default); world: RAS mm (--point=-9,4,8 if negative)")  # fmt: skip
    segment.add_argument("--output", required=True, help="mask to write (.nii or .nii.gz)")
    segment.add_argument("--overlay", help="also draw three orthogonal slices with the mask's outline (.png)")
    segment.add_argument("--threshold", type=float, default=0.5,
                         help="foreground probability threshold, strictly between 0 and 1 (default 0.5)")  # fmt: skip
    segment.add_argument("--preset", help="processor preset when the model folder has no processor_config.json")
    segment.set_defaults(func=_segment)

    for name, help_text in (
        ("evaluate", "evaluate a model on a test set (sam3d_hf.evaluation: Dice/NSD per click protocol)"),
        ("train", "fine-tune through `accelerate launch -m sam3d_hf.training` (--accelerate_config FILE optional)"),
    ):
        # Their options are the library modules' own: `sam3d train --help` prints them.
        commands.add_parser(name, help=help_text, add_help=False)

    push = commands.add_parser(
        "push",
        help="publish a trained folder to the Hugging Face Hub with a rendered model card",
        description="One commit: the folder's model (or adapter) and processor files plus README.md, the model card "
        "rendered from the processor, the training record and --evaluation. A full model also gets the pipeline's "
        "code and `custom_pipelines` in its config.json, so the repo serves pipeline('sam3d-segmentation', model=REPO, "
        "trust_remote_code=True) without sam3d-hf. The folder itself is not modified.",
    )
    push.add_argument("folder", help="folder written by save_pretrained (model or adapter, and the processor)")
    push.add_argument("--repo-id", required=True, help="target repository, 'owner/name'")
    push.add_argument("--adapter-only", action="store_true", help="publish only the adapter files (needs a base)")
    push.add_argument("--base-model-id", help="Hub id of the base model the adapter goes on")
    push.add_argument("--dataset", help="hub_cards dataset key or your own .yaml (default: from the processor)")
    push.add_argument("--evaluation", help="evaluation summary JSON (sam3d evaluate's summary.json; the card reads the "
                      "column named like its dataset, i.e. evaluate's --dataset_name, or the only one)")  # fmt: skip
    push.add_argument("--training-info", help="the training record (default: the folder's training_info.json, which "
                      "sam3d train writes into every saved model folder)")  # fmt: skip
    push.add_argument("--license", default="apache-2.0", help="licence of the weights (default: SAM's apache-2.0)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch to commit to (created if missing)")
    push.add_argument("--token", help="Hub token (default: the logged-in user's)")
    push.add_argument("--commit-message", default="Upload Sam3D checkpoint with sam3d-hf", help="the commit's message")
    push.add_argument("--card-out", help="also write the rendered card to this file, for review")
    push.add_argument("--dry-run", action="store_true",
                      help="list the files and print the card as it would be uploaded; upload nothing")  # fmt: skip
    push.set_defaults(func=_push)

    summary = commands.add_parser(
        "summary",
        help="print the model's parameter counts for a SAM size",
        description="Builds Sam3DForPromptableSegmentation for a SAM size on the meta device (no memory, no weights) "
        "and prints its parameter counts per part.",
    )
    summary.add_argument("--preset", choices=["vit_b", "vit_l", "vit_h"], default="vit_b",
                         help="SAM image-encoder size (default vit_b)")  # fmt: skip
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
    convert.add_argument("--dataset", choices=["kits", "lits", "pancreas", "colon"],
                         help="(official) also save the processor of the dataset the snapshot was trained on: the "
                         "official code's window, statistics, resampling and axes (official_<dataset>)")  # fmt: skip
    convert.set_defaults(func=_convert)

    app = commands.add_parser(
        "app",
        help="the interactive web app: click on a CT in the browser, see the mask in three planes, download it",
        description='Serves a Gradio page (pip install "sam3d-hf[app]"): load a scan (NIfTI, NRRD, a zipped DICOM '
        "series or a generated case), click on the lesion in the axial, coronal or sagittal view, undo, redo, and "
        "download the mask as NIfTI in the scan's geometry.",
    )
    app.add_argument("--model", help="model folder or Hub id (default ./sam3d-demo/model when it exists)")
    app.add_argument("--adapter", help="adapter folder or Hub id to put on --model (spatial adapter or LoRA)")
    app.add_argument("--preset", help="processor preset when the model folder has no processor_config.json")
    app.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; 0.0.0.0: all)")
    app.add_argument("--port", type=int, help="port (default 7860, or the next free one)")
    app.add_argument("--share", action="store_true", help="also open a temporary public link through Gradio")
    app.set_defaults(func=_app)
    return parser


PASS_THROUGH = ("evaluate", "train")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASS_THROUGH:  # sam3d_hf.training and sam3d_hf.evaluation parse their own arguments
        command, rest = argv[0], argv[1:]
        if command == "train" and {"-h", "--help"} & set(rest):
            print("sam3d train runs `accelerate launch [--config_file FILE] -m sam3d_hf.training TRAIN_ARGS`.\n"
                  "  --accelerate_config FILE  Accelerate config file (default: accelerate's own)\n")  # fmt: skip
        _quiet_transformers()
        try:
            return _evaluate(rest) if command == "evaluate" else _train(rest)
        except (ValueError, TypeError, OSError) as error:
            print(f"sam3d {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 1
    args = build_parser().parse_args(argv)
    if args.command != "segment":  # segment quiets it when it loads the model, after its first progress line
        _quiet_transformers()
    try:
        return args.func(args)
    # The library's messages say what was expected and how to fix it; OSError covers what the system refuses
    # (permissions, a full disk). Anything else is a bug and keeps its traceback.
    except (ValueError, TypeError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"sam3d {args.command}: error: {message}", file=sys.stderr)
        return 1


def _quiet_transformers() -> None:
    """No "Loading weights" bars on stderr: they would bury the one-line errors."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
