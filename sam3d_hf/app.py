"""The interactive app (`sam3d app`, `examples/app.py`): click on a CT in the browser, see the mask in three planes.

Two layers in one file. The lower one is plain Python and is tested without a browser: the display geometry of the
three views, their rendering, model and scan loading, and [`AppSession`], which owns one scan, one
[`Sam3DPredictor`] for it (each patch is encoded once, every later click in it costs the prompt-dependent part only)
and the undoable history of clicks and masks. The upper one, [`build_app`], is the Gradio page over it; Gradio is
imported only there (`pip install "sam3d-hf[app]"`), so `import sam3d_hf.app` works without it.

Coordinates
-----------
* **Voxels** `(i, j, k)` index the scan's stored axes (NIfTI `(i, j, k)`, what ITK-SNAP / 3D Slicer show as IJK;
  for NRRD and DICOM the reader's axis order), as everywhere in the package. Integer indices are voxel centres.
* **World** coordinates are RAS+ millimetres, `affine @ [i, j, k, 1]`.
* **View pixels** `(x, y)`: column and row of a rendered view image (what a click on it reports), `(0, 0)` at the
  top left.

Display orientation
-------------------
Each view shows the stored voxel grid itself (no interpolation: one voxel is one block of pixels), with each image
direction taken by the stored axis closest to an anatomical direction (`nibabel.orientations.io_orientation`; an
oblique scan is shown on its own grid, as ITK-SNAP does, not resliced):

| view | image columns grow towards | image rows grow towards | the slider grows towards |
|---|---|---|---|
| axial | patient's left (the patient's right is on the image's left) | posterior (anterior at the top) | superior |
| coronal | patient's left | inferior (superior at the top) | anterior |
| sagittal | posterior (anterior on the image's left) | inferior | right |

That is the radiological convention (the viewer faces the patient's feet for axial, the patient's front for
coronal). Voxels are drawn as rectangles of their spacing in mm, so anisotropic scans are not stretched; a rendered
pixel shows the voxel whose extent holds the pixel's centre.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MODEL",
    "VIEWS",
    "WINDOW_PRESETS",
    "AppSession",
    "Click",
    "ClusterPrediction",
    "LoadedModel",
    "ModelStore",
    "SegmentationState",
    "ViewGeometry",
    "build_app",
    "launch",
    "load_model",
    "read_scan",
]

logger = logging.getLogger(__name__)

VIEWS = ("axial", "coronal", "sagittal")

# The model `sam3d demo` writes; the app's default when it exists in the working directory.
DEFAULT_MODEL = os.path.join("sam3d-demo", "model")

# Per view: (RAS axis, sign) of the image's column direction, of its row direction (downwards) and of the slider.
_VIEW_DIRECTIONS = {
    "axial": ((0, -1), (1, -1), (2, 1)),  # columns -> L, rows -> P, slider -> S
    "coronal": ((0, -1), (2, -1), (1, 1)),  # columns -> L, rows -> I, slider -> A
    "sagittal": ((1, -1), (2, -1), (0, 1)),  # columns -> P, rows -> I, slider -> R
}
_SLIDER_LABELS = {"axial": "axial slice (inferior → superior)", "coronal": "coronal slice (posterior → anterior)",
                  "sagittal": "sagittal slice (left → right)"}  # fmt: skip

# (level, width) in HU. CT soft tissue is the default; "auto" is the 1st-99th percentile of the scan (MR, non-CT).
WINDOW_PRESETS: dict[str, tuple[float, float] | None] = {
    "CT soft tissue (L 40, W 400)": (40.0, 400.0),
    "CT abdomen / liver (L 60, W 160)": (60.0, 160.0),
    "CT lung (L -600, W 1500)": (-600.0, 1500.0),
    "CT bone (L 400, W 1800)": (400.0, 1800.0),
    "CT brain (L 40, W 80)": (40.0, 80.0),
    "auto (1st-99th percentile)": None,
}
DEFAULT_WINDOW = "CT soft tissue (L 40, W 400)"

# Colours (RGB). The mask is the only red thing on a view (its fill and outline); tests look for red.
MASK_RGB = (255, 32, 32)
MASK_ALPHA = 0.45
REFERENCE_RGB = (0, 200, 255)  # outline of a generated case's own lesion label
CURSOR_RGB = (255, 215, 0)
POSITIVE_RGB = (40, 230, 40)
NEGATIVE_RGB = (200, 80, 255)

# Undo steps kept. Each state keeps, per click cluster, the patch's foreground logits (float16: 4 MB per 128³ patch)
# for the model's previous-mask input; this bounds that memory.
MAX_HISTORY = 32

CLICK_MODES = ("positive", "negative", "move cursor")
CLICK_TABLE_HEADERS = ["#", "label", "i", "j", "k", "x (mm)", "y (mm)", "z (mm)", "intensity", "time (s)", "encoder",
                       "mask (mL)"]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Display geometry
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewGeometry:
    """How one view shows a scan: which stored axis runs along its columns, rows and slider, and its pixel size.

    Attributes:
        name: `"axial"`, `"coronal"` or `"sagittal"`.
        column_axis, row_axis, slice_axis: the stored axes shown along the image's columns, rows and the slider.
        column_flip, row_flip, slice_flip: display index `c` shows stored index `n - 1 - c` when set.
        shape: the scan's stored shape.
        width, height: rendered image size in pixels; each voxel is drawn `spacing` mm wide at one pixel scale, so
            `width / height` is the view's physical aspect.
    """

    name: str
    column_axis: int
    column_flip: bool
    row_axis: int
    row_flip: bool
    slice_axis: int
    slice_flip: bool
    shape: tuple[int, int, int]
    width: int
    height: int

    @classmethod
    def build(cls, name: str, affine: np.ndarray, shape: Sequence[int], size: int = 400) -> ViewGeometry:
        """The geometry of view `name` for a scan of stored `shape` with voxel-to-RAS `affine`; the longer physical
        side of the image gets `size` pixels (or one per voxel, if there are more)."""
        from nibabel.orientations import io_orientation

        if name not in _VIEW_DIRECTIONS:
            raise ValueError(f"view must be one of {VIEWS}, got {name!r}")
        orientation = io_orientation(np.asarray(affine, np.float64))  # per stored axis: (RAS axis, +1/-1)
        shape = tuple(int(n) for n in shape)
        spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)

        def stored(world_axis: int, sign: int) -> tuple[int, bool]:
            axis = int(np.flatnonzero(orientation[:, 0] == world_axis)[0])
            return axis, bool(orientation[axis, 1] * sign < 0)

        (column_axis, column_flip), (row_axis, row_flip), (slice_axis, slice_flip) = (
            stored(*direction) for direction in _VIEW_DIRECTIONS[name]
        )
        extent_x, extent_y = shape[column_axis] * spacing[column_axis], shape[row_axis] * spacing[row_axis]
        longest = max(size, shape[column_axis] if extent_x >= extent_y else shape[row_axis])
        per_mm = longest / max(extent_x, extent_y)
        width, height = max(1, round(extent_x * per_mm)), max(1, round(extent_y * per_mm))
        return cls(name, column_axis, column_flip, row_axis, row_flip, slice_axis, slice_flip, shape, width, height)

    # A rendered pixel p of N shows display index floor((p + 0.5) * n / N): the voxel whose extent holds the pixel's
    # centre. Rendering and clicks both go through these two lookups.
    @property
    def columns(self) -> np.ndarray:
        """`(width,)` stored index along `column_axis` shown by each pixel column."""
        return self._lookup(self.width, self.shape[self.column_axis], self.column_flip)

    @property
    def rows(self) -> np.ndarray:
        """`(height,)` stored index along `row_axis` shown by each pixel row."""
        return self._lookup(self.height, self.shape[self.row_axis], self.row_flip)

    @staticmethod
    def _lookup(pixels: int, voxels: int, flip: bool) -> np.ndarray:
        display = np.minimum(((np.arange(pixels) + 0.5) * voxels / pixels).astype(np.int64), voxels - 1)
        return voxels - 1 - display if flip else display

    @property
    def num_slices(self) -> int:
        return self.shape[self.slice_axis]

    def slice_of(self, position: int) -> int:
        """Slider position (growing towards S / A / R) -> stored index along `slice_axis`."""
        position = int(position)
        if not 0 <= position < self.num_slices:
            raise ValueError(f"{self.name} slice {position} is outside 0..{self.num_slices - 1}")
        return self.num_slices - 1 - position if self.slice_flip else position

    def position_of(self, stored_index: int) -> int:
        """Stored index along `slice_axis` -> slider position (its own inverse)."""
        return self.num_slices - 1 - int(stored_index) if self.slice_flip else int(stored_index)

    def pixel_to_voxel(self, x: float, y: float, slice_index: int) -> tuple[int, int, int]:
        """The stored voxel `(i, j, k)` a click at pixel `(x, y)` of this view hits, on stored slice `slice_index`."""
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < self.width and 0 <= y < self.height):
            raise ValueError(
                f"the click at pixel ({x}, {y}) lies outside the {self.name} view ({self.width} x {self.height} "
                "pixels); click on the image"
            )
        voxel = [0, 0, 0]
        voxel[self.column_axis] = int(self.columns[int(x)])
        voxel[self.row_axis] = int(self.rows[int(y)])
        voxel[self.slice_axis] = int(slice_index)
        return tuple(voxel)

    def voxel_to_pixel(self, voxel: Sequence[float]) -> tuple[float, float]:
        """Centre `(x, y)` in pixels of stored voxel `voxel` on this view (its index along `slice_axis` is ignored)."""

        def centre(index: float, voxels: int, pixels: int, flip: bool) -> float:
            display = voxels - 1 - index if flip else index
            return (display + 0.5) * pixels / voxels - 0.5

        return (
            centre(voxel[self.column_axis], self.shape[self.column_axis], self.width, self.column_flip),
            centre(voxel[self.row_axis], self.shape[self.row_axis], self.height, self.row_flip),
        )

    def take(self, volume: np.ndarray, slice_index: int) -> np.ndarray:
        """The `(height, width)` image of stored slice `slice_index` of a stored-order `volume`, one value a pixel."""
        return volume[self._index(slice_index)]

    def _index(self, slice_index: int) -> tuple:
        index: list[Any] = [None, None, None]
        index[self.slice_axis] = int(slice_index)
        index[self.row_axis] = self.rows[:, None]
        index[self.column_axis] = self.columns[None, :]
        return tuple(index)


def window_bounds(window: tuple[float, float] | None, data: np.ndarray) -> tuple[float, float]:
    """`(level, width)` -> `(low, high)` grey levels; `None` -> the 1st and 99th percentiles of `data`."""
    if window is None:
        sample = data.reshape(-1)[:: max(1, data.size // 1_000_000)]
        low, high = (float(v) for v in np.percentile(sample, [1, 99]))
        return (low, high) if high > low else (low, low + 1.0)
    level, width = window
    if not width > 0:
        raise ValueError(f"the window width must be > 0, got {width}")
    return level - width / 2, level + width / 2


def _blend(rgb: np.ndarray, where: np.ndarray, colour: Sequence[int], alpha: float) -> None:
    if where.any():
        rgb[where] = (rgb[where] * (1 - alpha) + np.asarray(colour, np.float32) * alpha).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D boolean mask with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def render_view(
    geometry: ViewGeometry,
    volume: np.ndarray,
    cursor: Sequence[int],
    bounds: tuple[float, float],
    mask: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    clicks: Sequence[Click] = (),
) -> np.ndarray:
    """`(height, width, 3)` uint8 image of the view through `cursor`: the scan in grey between `bounds`, the mask in
    red (fill and outline), a reference label's outline in cyan, the cursor lines in yellow and the clicks of this
    slice as crosses (green positive, violet negative). Arrays are in the stored axis order."""
    slice_index = int(cursor[geometry.slice_axis])
    low, high = bounds
    grey = (np.clip((geometry.take(volume, slice_index) - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if mask is not None:
        shown = geometry.take(mask, slice_index).astype(bool)
        _blend(rgb, shown, MASK_RGB, MASK_ALPHA)
        rgb[_outline(shown)] = MASK_RGB
    if reference is not None:
        rgb[_outline(geometry.take(reference, slice_index).astype(bool))] = REFERENCE_RGB
    x, y = (round(v) for v in geometry.voxel_to_pixel(cursor))
    rgb[:, x] = (rgb[:, x] * 0.4 + np.asarray(CURSOR_RGB) * 0.6).astype(np.uint8)
    rgb[y, :] = (rgb[y, :] * 0.4 + np.asarray(CURSOR_RGB) * 0.6).astype(np.uint8)
    arm = max(3, min(geometry.width, geometry.height) // 60)
    for click in clicks:
        if click.voxel[geometry.slice_axis] != slice_index:
            continue
        cx, cy = (round(v) for v in geometry.voxel_to_pixel(click.voxel))
        colour = POSITIVE_RGB if click.label == 1 else NEGATIVE_RGB
        rgb[max(cy - arm, 0) : cy + arm + 1, max(cx - 1, 0) : cx + 2] = colour
        rgb[max(cy - 1, 0) : cy + 2, max(cx - arm, 0) : cx + arm + 1] = colour
    return rgb


# ----------------------------------------------------------------------------------------------------------------------
# Models and scans
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model with its processor, as the app serves it.

    Attributes:
        model: a [`Sam3DForPromptableSegmentation`] (adapters merged), in eval mode.
        processor: its [`Sam3DProcessor`].
        name: what was loaded (folder, Hub id, or the name a preloaded model was given), plus the adapter.
        encode_seconds: how long the last click that ran the encoder took with this model (for the progress message).
    """

    model: Any
    processor: Any
    name: str
    encode_seconds: float | None = None

    @property
    def accepts_negative(self) -> bool:
        """Whether the model was trained with point labels (`prompt_encoder_config.use_point_labels`)."""
        return bool(getattr(self.model.config.prompt_encoder_config, "use_point_labels", False))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.processor.patch_size)

    def describe(self) -> str:
        vision = self.model.config.vision_config
        negative = "takes negative clicks" if self.accepts_negative else "positive clicks only (no point labels)"
        patch = "×".join(map(str, self.patch_size))
        spacing = "×".join(f"{s:g}" for s in self.processor.image_processor.target_spacing)
        return (
            f"**{self.name}**: ViT {vision.num_hidden_layers} blocks × {vision.hidden_size}, patch {patch} voxels "
            f"at {spacing} mm, {negative}, on {self.model.device}"
        )


def load_model(name: str, adapter: str | None = None, preset: str | None = None) -> LoadedModel:
    """Load a model folder or Hub id, optionally with an adapter, and its processor.

    Args:
        name: a folder written by `save_pretrained` or a Hub id.
        adapter: a spatial-adapter (`Sam3DAdapterModel.save_pretrained`) or peft LoRA folder or Hub id to put on the
            model; merged before use.
        preset: processor preset (`kits21`, ...) for a model (and adapter) without `processor_config.json`.

    Raises:
        ValueError: with one line saying what is wrong and what to give instead.
    """
    import json

    import torch

    from .hub import looks_like_hub_id
    from .image_processing_sam3d import SAM3D_PRESETS
    from .modeling_sam3d import Sam3DForPromptableSegmentation
    from .processing_sam3d import Sam3DProcessor

    name = (name or "").strip()
    adapter = (adapter or "").strip() or None
    preset = (preset or "").strip() or None
    if not name:
        raise ValueError("give a model: a folder written by save_pretrained (e.g. sam3d-demo/model) or a Hub id")
    for what, value in (("model", name), ("adapter", adapter)):
        if value is not None and not Path(value).expanduser().exists() and not looks_like_hub_id(value):
            raise ValueError(f"{what} {value!r}: no such folder, and not a Hub id ('owner/name')")
    try:
        model = Sam3DForPromptableSegmentation.from_pretrained(name, dtype=torch.float32)
        processor_folder = None
        if adapter is not None:
            from .peft_sam3d import PEFT_TYPE, Sam3DAdapterModel, resolve_adapter_folder

            adapter_folder = resolve_adapter_folder(adapter)  # a folder, or the two adapter files of a Hub repo
            config = json.loads((adapter_folder / "adapter_config.json").read_text())
            if config.get("peft_type") == PEFT_TYPE:  # the paper's spatial adapters
                model = Sam3DAdapterModel.from_pretrained(model, adapter_folder).merge_and_unload()
            else:  # a peft method (LoRA, ...)
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, os.fspath(adapter_folder)).merge_and_unload()
            if (adapter_folder / "processor_config.json").is_file():
                processor_folder = adapter_folder
        if preset is not None:
            processor = Sam3DProcessor.from_preset(preset)
        else:
            try:
                processor = Sam3DProcessor.from_pretrained(processor_folder or name)
            except OSError:
                raise ValueError(
                    f"{name!r} has no processor_config.json: choose the processor preset the model was trained with "
                    f"({', '.join(SAM3D_PRESETS)})"
                ) from None
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not load {name!r}{f' with {adapter!r}' if adapter else ''}: {message}") from None
    if not model.config.use_prompt_encoder:
        raise ValueError(
            f"{name!r} is a prompt-free model (config.use_prompt_encoder=False): it takes no clicks, so the app cannot "
            "use it; segment its scans with `sam3d evaluate --automatic` or Sam3DPredictor.predict_automatic"
        )
    described = name if adapter is None else f"{name} + {adapter}"
    return LoadedModel(model.eval(), processor, described)


class ModelStore:
    """The models of one app, shared by every browser session: each (model, adapter, preset) is loaded once.

    Args:
        preloaded: `{name: LoadedModel or (model, processor)}` served under these names without loading anything
            (e.g. a model built in Python, or one already on a GPU).
    """

    def __init__(self, preloaded: dict[str, Any] | None = None):
        self._models: dict[tuple[str, str | None, str | None], LoadedModel] = {}
        self._lock = threading.Lock()
        for name, entry in (preloaded or {}).items():
            if not isinstance(entry, LoadedModel):
                model, processor = entry
                entry = LoadedModel(model.eval(), processor, name)
            self._models[(name, None, None)] = entry

    def get(self, name: str, adapter: str | None = None, preset: str | None = None) -> LoadedModel:
        key = ((name or "").strip(), (adapter or "").strip() or None, (preset or "").strip() or None)
        with self._lock:  # one load at a time: two sessions asking for the same model wait for one copy
            if key not in self._models:
                self._models[key] = load_model(*key)
            return self._models[key]


@dataclass
class Scan:
    """A loaded scan: the volume as stored, where it came from, and a reference label when one is known."""

    volume: Any  # Sam3DVolume
    name: str
    reference: np.ndarray | None = None  # e.g. a generated case's lesion label, stored order

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.data.shape)

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.volume.affine[:3, :3]))) / 1000.0


def read_scan(path: str | os.PathLike, workdir: str | os.PathLike) -> Scan:
    """Read an uploaded scan: NIfTI, NRRD, or a `.zip` of one DICOM series (extracted into `workdir`).

    Raises:
        ValueError: unreadable, not 3D (a 2D picture or a single slice), or a zip without a DICOM series.
    """

    path = Path(path)
    name = path.name
    try:
        return _read_scan(path, name, workdir)
    except (ValueError, FileNotFoundError) as error:
        # Uploads live under temporary names: the message names the file as the user knows it.
        if error.__cause__ is not None:  # a reader refused the file
            reason = str(error.__cause__).replace(os.fspath(path), name)
            raise ValueError(
                f"{name} could not be read as a scan ({type(error.__cause__).__name__}: {reason}). Upload a NIfTI "
                "(.nii, .nii.gz) or NRRD (.nrrd, .nhdr) file, or a .zip of one DICOM series"
            ) from None
        raise ValueError(str(error).replace(os.fspath(path), name)) from None


def _read_scan(path: Path, name: str, workdir: str | os.PathLike) -> Scan:
    from .image_processing_sam3d import load_volume

    if name.lower().endswith(".zip"):
        folder = Path(tempfile.mkdtemp(prefix="dicom-", dir=workdir))
        try:
            with zipfile.ZipFile(path) as archive:
                archive.extractall(folder)  # member names with '..' or a leading '/' are made safe by zipfile
        except zipfile.BadZipFile as error:
            raise ValueError(f"{name}: not a readable zip file ({error})") from None
        files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
        if not files:
            raise ValueError(f"{name}: the zip file is empty; zip the folder of one DICOM series")
        parents = {p.parent for p in files}
        series = max(parents, key=lambda parent: sum(p.parent == parent for p in files))  # the folder with most files
        volume = load_volume(os.fspath(series))
    elif name.lower().endswith((".dcm", ".ima")):
        raise ValueError(f"{name} is a single DICOM file (one slice); upload a .zip of the whole series' folder")
    else:
        volume = load_volume(os.fspath(path))
    if min(volume.data.shape) < 2:
        raise ValueError(
            f"{name} has shape {tuple(volume.data.shape)}: a single slice, not a 3D scan; upload the whole volume"
        )
    return Scan(volume, name)


def generated_scan(seed: int, orientation: str | None, num_lesions: int, workdir: str | os.PathLike) -> Scan:
    """A synthetic CT case (`sam3d_hf.synthetic.generate_case`), written to `workdir` as NIfTI and read back as an
    upload is; its lesion label (2) becomes the reference outline."""
    import nibabel as nib

    from .image_processing_sam3d import load_volume
    from .synthetic import SYNTHETIC_LABELS, generate_case

    orientation = None if orientation in (None, "", "random") else orientation
    image, label = generate_case(int(seed), orientation=orientation, num_lesions=int(num_lesions))
    path = Path(workdir) / f"synthetic_seed{int(seed)}.nii.gz"
    nib.save(image, path)
    reference = (np.asarray(label.dataobj) == SYNTHETIC_LABELS["tumour"]).astype(np.uint8)
    return Scan(load_volume(os.fspath(path)), path.name, reference=reference)


# ----------------------------------------------------------------------------------------------------------------------
# The session: one scan, one predictor, an undoable history
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Click:
    """One click and what it gave.

    Attributes:
        voxel: stored voxel `(i, j, k)`.
        label: 1 positive, 0 negative.
        world: RAS mm of the voxel centre.
        intensity: the scan's value there (HU for CT).
        seconds: time of the prediction that followed the click (predictor and mapping back to the scan).
        encoded: whether that prediction ran the image encoder (a patch not seen before).
        volume_ml: the mask's volume after this click.
    """

    voxel: tuple[int, int, int]
    label: int
    world: tuple[float, float, float]
    intensity: float
    seconds: float = 0.0
    encoded: bool = False
    volume_ml: float = 0.0


@dataclass(frozen=True)
class ClusterPrediction:
    """The prediction of one click cluster (one patch): what the model's previous-mask input of a later click on the
    same cluster would take.

    Attributes:
        patch_origin: resampled voxel of the patch's corner (`prediction.inputs["patch_origins"]` row).
        clicks: indices (into the state's clicks) of the clicks in this patch.
        foreground_logits: `(D, H, W)` float16, foreground minus background logit on the patch.
    """

    patch_origin: tuple[int, int, int]
    clicks: tuple[int, ...]
    foreground_logits: Any  # torch.Tensor


@dataclass(frozen=True)
class SegmentationState:
    """One step of the history: the clicks so far and the mask they gave (flat indices of its foreground voxels in
    the stored shape, C order), per cluster the patch prediction."""

    clicks: tuple[Click, ...] = ()
    mask_voxels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    clusters: tuple[ClusterPrediction, ...] = ()
    volume_ml: float = 0.0


class AppSession:
    """The state of one user of the app: a model, a scan, the cursor, the window, the clicks with undo and redo.

    Every click goes through one [`Sam3DPredictor`] per loaded scan (`predict(..., reuse_patches=True)`): only a click
    that needs a patch not seen before runs the encoder. Undo and redo restore the stored masks exactly (nothing is
    recomputed); a new click after an undo drops the redo steps. Clear is a step too (undoable).

    Args:
        store: where models come from.
        default_model: `(name, adapter, preset)` used when a scan is loaded before any model.
        workdir: folder for uploads, generated cases and saved masks (a new temporary folder by default; removed
            with the session).
        display_size: pixels of the longer side of a view.
    """

    def __init__(
        self,
        store: ModelStore | None = None,
        default_model: tuple[str | None, str | None, str | None] | None = None,
        workdir: str | os.PathLike | None = None,
        display_size: int = 400,
    ):
        self.store = store or ModelStore()
        self.default_model = default_model
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="sam3d-app-")
            weakref.finalize(self, shutil.rmtree, workdir, True)
        self.workdir = Path(workdir)
        self.display_size = int(display_size)
        self.model: LoadedModel | None = None
        self.scan: Scan | None = None
        self.predictor = None
        self.views: dict[str, ViewGeometry] = {}
        self.cursor: tuple[int, int, int] = (0, 0, 0)
        self.window: tuple[float, float] | None = WINDOW_PRESETS[DEFAULT_WINDOW]
        self._bounds: tuple[float, float] = window_bounds(self.window, np.zeros(1))
        self._history: list[SegmentationState] = [SegmentationState()]
        self._position = 0
        self._mask: np.ndarray | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------------------ loading
    def set_model(self, name: str, adapter: str | None = None, preset: str | None = None) -> str:
        """Load (or take from the store) a model; a loaded scan is preprocessed again for it, its clicks cleared.
        On an error nothing changes."""
        with self._lock:
            model = self.store.get(name, adapter, preset)
            predictor = _predictor(model, self.scan)
            self.model, self.predictor = model, predictor
            self._reset_history()
            return model.describe()

    def set_scan(self, scan: Scan) -> str:
        """Show a new scan (cursor at its centre, or at the reference lesion's centre) and preprocess it. On an error
        (the default model does not load, the scan cannot be preprocessed) nothing changes."""
        with self._lock:
            model = self.model
            if model is None and self.default_model and self.default_model[0]:
                model = self.store.get(*self.default_model)
            predictor = _predictor(model, scan)
            views = {
                name: ViewGeometry.build(name, scan.volume.affine, scan.shape, self.display_size) for name in VIEWS
            }
            if scan.reference is not None and scan.reference.any():
                from scipy import ndimage

                regions, count = ndimage.label(scan.reference)
                largest = 1 + int(np.argmax(ndimage.sum_labels(scan.reference, regions, range(1, count + 1))))
                inside = np.argwhere(regions == largest)
                cursor = tuple(int(v) for v in inside[np.argmin(((inside - inside.mean(0)) ** 2).sum(1))])
            else:
                cursor = tuple(int(n) // 2 for n in scan.shape)
            bounds = window_bounds(self.window, scan.volume.data)
            self.model, self.scan, self.predictor, self.views, self.cursor, self._bounds = (
                model, scan, predictor, views, cursor, bounds
            )  # fmt: skip
            self._reset_history()
            size = "×".join(map(str, scan.shape))
            spacing = "×".join(f"{s:.2f}" for s in scan.volume.spacing)
            return f"loaded **{scan.name}**: {size} voxels of {spacing} mm" + (
                "" if self.model else "; load a model to segment"
            )

    def load_file(self, path: str | os.PathLike) -> str:
        return self.set_scan(read_scan(path, self.workdir))

    def load_generated(self, seed: int, orientation: str | None = "oblique", num_lesions: int = 1) -> str:
        """Load a generated case (`orientation` `None` or "random" draws one from the seed)."""
        message = self.set_scan(generated_scan(seed, orientation, num_lesions, self.workdir))
        return message + " (generated; its lesion's outline is drawn in cyan)"

    def _reset_history(self) -> None:
        self._history, self._position, self._mask = [SegmentationState()], 0, None

    # ------------------------------------------------------------------------------------------------------- state
    @property
    def state(self) -> SegmentationState:
        return self._history[self._position]

    @property
    def clicks(self) -> tuple[Click, ...]:
        return self.state.clicks

    @property
    def mask(self) -> np.ndarray | None:
        """The current mask, uint8 in the scan's stored shape (`None` without a scan)."""
        if self.scan is None:
            return None
        if self._mask is None:
            mask = np.zeros(self.scan.shape, np.uint8)
            mask.reshape(-1)[self.state.mask_voxels] = 1
            self._mask = mask
        return self._mask

    @property
    def can_undo(self) -> bool:
        return self._position > 0

    @property
    def can_redo(self) -> bool:
        return self._position < len(self._history) - 1

    def previous_logits(self, patch_origin: Sequence[int]):
        """The current foreground logits of the patch at `patch_origin`, or `None`: the previous mask of that click
        cluster, for a model that takes one."""
        for cluster in self.state.clusters:
            if cluster.patch_origin == tuple(int(v) for v in patch_origin):
                return cluster.foreground_logits
        return None

    def _push(self, state: SegmentationState) -> None:
        del self._history[self._position + 1 :]  # a new step drops what could have been redone
        self._history.append(state)
        if len(self._history) > MAX_HISTORY + 1:
            del self._history[0]
        self._position = len(self._history) - 1
        self._mask = None

    def undo(self) -> str:
        with self._lock:
            if not self.can_undo:
                raise ValueError("nothing to undo")
            self._position -= 1
            self._mask = None
            return f"undone: {self._summary()}"

    def redo(self) -> str:
        with self._lock:
            if not self.can_redo:
                raise ValueError("nothing to redo")
            self._position += 1
            self._mask = None
            return f"redone: {self._summary()}"

    def clear(self) -> str:
        with self._lock:
            self._require_scan()
            if not self.clicks:
                raise ValueError("nothing to clear: there are no clicks")
            self._push(SegmentationState())
            return "cleared every click (Undo brings them back)"

    def _summary(self) -> str:
        n = len(self.clicks)
        return f"{n} click{'s' * (n != 1)}, mask {self.state.volume_ml:.2f} mL"

    # ------------------------------------------------------------------------------------------------------ clicks
    def _require_scan(self) -> Scan:
        if self.scan is None:
            raise ValueError("load a scan first (upload a file or load a generated case)")
        return self.scan

    def _require_predictor(self):
        self._require_scan()
        if self.predictor is None:
            raise ValueError("load a model first (a folder written by save_pretrained, or a Hub id)")
        return self.predictor

    def voxel_info(self, voxel: Sequence[int]) -> tuple[tuple[float, float, float], float]:
        """World RAS mm of a voxel centre and the scan's value there."""
        import nibabel as nib

        scan = self._require_scan()
        world = nib.affines.apply_affine(scan.volume.affine, np.asarray(voxel, np.float64))
        return tuple(float(v) for v in world), float(scan.volume.data[tuple(int(v) for v in voxel)])

    def checked_voxel(self, voxel: Sequence[float]) -> tuple[int, int, int]:
        """`voxel` rounded to the nearest stored voxel, or a ValueError when it lies outside the scan."""
        scan = self._require_scan()
        values = np.asarray(voxel, np.float64).reshape(-1)
        if values.shape != (3,) or not np.all(np.isfinite(values)):
            raise ValueError(f"a click is three finite numbers i, j, k, got {list(values)}")
        rounded = np.rint(values).astype(np.int64)
        if np.any(rounded < 0) or np.any(rounded >= np.asarray(scan.shape)):
            raise ValueError(
                f"the click at voxel {tuple(values.round(2).tolist())} lies outside the scan (shape {scan.shape}: "
                f"i, j, k from 0 to {tuple(n - 1 for n in scan.shape)})"
            )
        return tuple(int(v) for v in rounded)

    def world_to_voxel(self, world: Sequence[float]) -> tuple[int, int, int]:
        """RAS mm -> the nearest stored voxel (a ValueError outside the scan)."""
        import nibabel as nib

        scan = self._require_scan()
        voxel = nib.affines.apply_affine(np.linalg.inv(scan.volume.affine), np.asarray(world, np.float64))
        return self.checked_voxel(voxel)

    # Cursor and window changes take no lock: they are one assignment each, and must not wait for a click whose
    # encoding runs (the page stays usable during it).
    def move_cursor(self, voxel: Sequence[float]) -> str:
        self.cursor = self.checked_voxel(voxel)
        return self.describe_cursor()

    def set_slice(self, view: str, position: int) -> None:
        """Move the cursor to slider position `position` of `view` (the other two views follow)."""
        geometry = self._view(view)
        cursor = list(self.cursor)
        cursor[geometry.slice_axis] = geometry.slice_of(position)
        self.cursor = tuple(cursor)

    def _view(self, view: str) -> ViewGeometry:
        self._require_scan()
        if view not in self.views:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        return self.views[view]

    def view_pixel_to_voxel(self, view: str, x: float, y: float) -> tuple[int, int, int]:
        """The stored voxel under pixel `(x, y)` of `view` as it is shown now (through the cursor)."""
        geometry = self._view(view)
        return geometry.pixel_to_voxel(x, y, self.cursor[geometry.slice_axis])

    def will_encode(self, voxel: Sequence[int], label: int) -> bool:
        """Whether adding this click would run the image encoder (a patch the predictor has not encoded)."""
        predictor = self._require_predictor()
        points = [c.voxel for c in self.clicks] + [tuple(voxel)]
        labels = [c.label for c in self.clicks] + [int(label)]
        if 1 not in labels:
            return False
        # The predictor places patches as `prepare_prompts` does with its cached origins, most recent first
        # (`predict(reuse_patches=True)`); ask the same question without running the model.
        cache = getattr(predictor, "_cache", None)
        if cache is None:
            return True
        inputs = predictor.processor.prepare_prompts(
            predictor.preprocessed, points, labels, "voxel", None, list(reversed(cache))
        )
        return any(tuple(int(v) for v in origin) not in cache for origin in inputs["patch_origins"])

    def add_click(self, voxel: Sequence[float], label: int = 1) -> str:
        """Add a click at stored voxel `voxel` (1 positive, 0 negative) and segment with every click so far.

        Returns a one-line message (time, whether the encoder ran, the mask's volume). Raises ValueError (nothing
        changed) for a click outside the scan, a negative click on a model without point labels, or a first click
        that is negative.
        """
        with self._lock:
            predictor = self._require_predictor()
            voxel = self.checked_voxel(voxel)
            label = int(label)
            if label not in (0, 1):
                raise ValueError(f"a click's label is 1 (positive) or 0 (negative), got {label}")
            if label == 0 and not self.model.accepts_negative:
                raise ValueError(
                    "this model takes no negative clicks (it was trained without point labels: "
                    "prompt_encoder_config.use_point_labels is False), so a negative click would act as a positive "
                    "one; add positive clicks, or load a model trained with point labels"
                )
            world, intensity = self.voxel_info(voxel)
            click = Click(voxel, label, world, intensity)
            clicks = (*self.clicks, click)
            if not any(c.label == 1 for c in clicks):
                raise ValueError("the first click must be positive (on the lesion); negative clicks only correct it")
            misses = predictor.cache_misses
            started = time.perf_counter()
            # The current step's patch predictions (after an undo, the step undone to) are the mask prompt.
            previous = {c.patch_origin: c.foreground_logits.float().sigmoid() for c in self.state.clusters}
            prediction = predictor.predict([c.voxel for c in clicks], [c.label for c in clicks], previous=previous)
            seconds = time.perf_counter() - started
            encoded = predictor.cache_misses > misses
            if encoded:
                self.model.encode_seconds = seconds
            mask = prediction.mask.numpy()
            volume_ml = float(mask.sum()) * self.scan.voxel_ml
            click = Click(voxel, label, world, intensity, seconds, encoded, volume_ml)
            clicks = (*self.clicks, click)
            rows = prediction.inputs["point_cluster"].tolist()
            clusters = tuple(
                ClusterPrediction(
                    tuple(int(v) for v in origin),
                    tuple(i for i, row in enumerate(rows) if row == b),
                    (prediction.logits[b, 1] - prediction.logits[b, 0]).to(dtype=_float16()),
                )
                for b, origin in enumerate(prediction.inputs["patch_origins"].tolist())
            )
            self._push(SegmentationState(clicks, np.flatnonzero(mask), clusters, volume_ml))
            self._mask = mask
            self.cursor = voxel
            what = "ran the encoder (a new patch)" if encoded else "cached patch"
            message = (
                f"click {len(clicks)} ({'positive' if label else 'negative'}) at voxel {voxel}: {seconds:.2f} s, "
                f"{what}; mask {volume_ml:.2f} mL"
            )
            if label == 0 and rows[-1] < 0:
                message += (
                    ". This negative click lies in no patch of a positive click, so it was not used: "
                    "put negative clicks near the positive ones they correct"
                )
            elif volume_ml == 0:
                message += ". The mask is empty: the model found nothing here; try a click nearer the lesion's centre"
            return message

    def click_view(self, view: str, x: float, y: float, mode: str = "positive") -> str:
        """A click on pixel `(x, y)` of `view`: moves the cursor there, and adds a positive or negative click unless
        `mode` is `"move cursor"`."""
        if mode not in CLICK_MODES:
            raise ValueError(f"the click mode must be one of {CLICK_MODES}, got {mode!r}")
        voxel = self.view_pixel_to_voxel(view, x, y)
        if mode == "move cursor":
            return self.move_cursor(voxel)
        return self.add_click(voxel, 1 if mode == "positive" else 0)

    # ------------------------------------------------------------------------------------------------------ output
    def set_window(self, level: float, width: float) -> None:
        self._bounds = window_bounds((float(level), float(width)), np.zeros(1))
        self.window = (float(level), float(width))

    def set_window_preset(self, preset: str) -> tuple[float, float]:
        """Apply a preset of [`WINDOW_PRESETS`]; returns its `(level, width)` (computed for "auto")."""
        if preset not in WINDOW_PRESETS:
            raise ValueError(f"the window preset must be one of {list(WINDOW_PRESETS)}, got {preset!r}")
        window = WINDOW_PRESETS[preset]
        if window is None:
            low, high = window_bounds(None, self._require_scan().volume.data)
            window = ((low + high) / 2, high - low)
        self.set_window(*window)
        return window

    def render(self, view: str) -> np.ndarray:
        """The view through the cursor (see [`render_view`])."""
        geometry = self._view(view)
        scan = self.scan
        return render_view(
            geometry, scan.volume.data, self.cursor, self._bounds, self.mask, scan.reference, self.clicks
        )

    def slider_position(self, view: str) -> int:
        geometry = self._view(view)
        return geometry.position_of(self.cursor[geometry.slice_axis])

    def describe_cursor(self) -> str:
        if self.scan is None:
            return ""
        world, intensity = self.voxel_info(self.cursor)
        inside = bool(self.mask[self.cursor]) if self.mask is not None else False
        return (
            f"cursor: voxel (i, j, k) = {self.cursor}, RAS = ({world[0]:.1f}, {world[1]:.1f}, {world[2]:.1f}) mm, "
            f"intensity {intensity:g}{', in the mask' if inside else ''}"
        )

    def click_rows(self) -> list[list[Any]]:
        """The clicks as table rows (`CLICK_TABLE_HEADERS`)."""
        return [
            [n + 1, "+" if c.label else "−", *c.voxel, *(round(v, 1) for v in c.world), round(c.intensity, 1),
             round(c.seconds, 2), "ran" if c.encoded else "cached", round(c.volume_ml, 2)]
            for n, c in enumerate(self.clicks)
        ]  # fmt: skip

    def save_mask(self, folder: str | os.PathLike | None = None) -> Path:
        """Write the current mask as NIfTI in the scan's geometry (shape, affine and, for NIfTI scans, header) with
        `save_mask_nifti`; returns the path (`<scan>_sam3d_mask.nii.gz`)."""
        from .processing_sam3d import save_mask_nifti

        with self._lock:
            scan = self._require_scan()
            if not self.clicks:
                raise ValueError("nothing to save yet: click on the lesion first")
            folder = Path(tempfile.mkdtemp(prefix="mask-", dir=self.workdir) if folder is None else folder)
            folder.mkdir(parents=True, exist_ok=True)
            stem = scan.name
            for suffix in (".gz", ".nii", ".nrrd", ".nhdr", ".zip"):
                stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
            path = folder / f"{stem}_sam3d_mask.nii.gz"
            reference = scan.volume.nifti if scan.volume.nifti is not None else self.predictor.preprocessed
            save_mask_nifti(self.mask, reference, path)
            return path


def _predictor(model: LoadedModel | None, scan: Scan | None):
    """A `Sam3DPredictor` with the scan preprocessed for the model, or `None` without one of them."""
    from .inference import Sam3DPredictor

    if model is None or scan is None:
        return None
    predictor = Sam3DPredictor(model.model, model.processor)
    volume = scan.volume
    if volume.nifti is not None:
        predictor.set_image(volume.nifti)
    else:
        predictor.set_image(volume.data, affine=volume.affine)
    return predictor


def _float16():
    import torch

    return torch.float16


# ----------------------------------------------------------------------------------------------------------------------
# The Gradio page
# ----------------------------------------------------------------------------------------------------------------------
_INTRO = """# sam3d-hf: click on a CT, get the tumour mask
Load a model and a scan, then click on the lesion in any view. The first click on a region runs the image encoder on
a patch around it (**a minute or more for ViT-B on a CPU**: 1 to 4 minutes measured on a shared 2-core machine);
later clicks in that region reuse it (several seconds for ViT-B on a CPU, under a second for small models). Views:
radiological orientation (patient's right on the image's left); red = mask, cyan = a generated case's own lesion,
yellow = cursor, green / violet crosses = positive / negative clicks."""


def _encoding_notice(session: AppSession) -> str:
    model = session.model
    patch = "×".join(map(str, model.patch_size))
    last = f" (the last encoding with this model took {model.encode_seconds:.0f} s)" if model.encode_seconds else ""
    return (
        f"**Encoding a new {patch} patch** (the first click in this region runs the image encoder): a minute or "
        f"more for ViT-B on a CPU{last}. The page stays usable; the mask appears when it is done."
    )


def build_app(
    model: str | None = None,
    adapter: str | None = None,
    preset: str | None = None,
    models: dict[str, Any] | None = None,
    display_size: int = 400,
    store: ModelStore | None = None,
):
    """The Gradio page (a `gradio.Blocks`); `.launch()` it, or see [`launch`].

    Args:
        model: the model shown in the model box and used when a scan is loaded before any model (a folder or Hub
            id; by default `sam3d-demo/model` when that folder exists).
        adapter, preset: its adapter and processor preset, if any (see [`load_model`]).
        models: preloaded `{name: LoadedModel or (model, processor)}`, served under these names (see [`ModelStore`]).
        display_size: pixels of the longer side of each view.
        store: the [`ModelStore`] to serve from (instead of a new one holding `models`).

    Every action has an API endpoint (`gradio_client`): `/load_model` (model, adapter, preset), `/load_scan` (file),
    `/load_generated` (seed, orientation, lesions), `/click_view` (view, x, y, mode), `/click_voxel` ("i, j, k",
    "voxel" or "world", mode), `/set_slice` (view, position), `/set_window` (level, width), `/undo`, `/redo`,
    `/clear`, `/save_mask`. Each returns the three views (PNG files), the three sliders (updates: `value` is the
    position, `maximum` the last slice), the message, the cursor line and the clicks table (`/save_mask`: the message
    and the NIfTI file). The session is the client's: a `gradio_client.Client` keeps its own.
    """
    try:
        import gradio as gr
    except ImportError:
        raise ValueError('the app needs Gradio: pip install "sam3d-hf[app]"') from None

    from .image_processing_sam3d import SAM3D_PRESETS

    if model is None and Path(DEFAULT_MODEL).is_dir():
        model = DEFAULT_MODEL
    store = store or ModelStore(models)
    default = (model, adapter, preset) if model else None

    def new_session() -> AppSession:
        return AppSession(store, default, display_size=display_size)

    def error_text(error: BaseException) -> str:
        return "**Error:** " + (" ".join(str(error).split()) or type(error).__name__)

    with gr.Blocks(title="sam3d-hf") as page:
        session_state = gr.State(None, delete_callback=lambda session: session and shutil.rmtree(session.workdir, True))
        gr.Markdown(_INTRO)
        with gr.Row():
            model_box = gr.Textbox(model or "", label="model (folder or Hub id)", elem_id="model", scale=3)
            adapter_box = gr.Textbox(adapter or "", label="adapter (optional)", elem_id="adapter", scale=2)
            preset_box = gr.Dropdown(
                ["", *SAM3D_PRESETS],
                value=preset or "",
                label="processor preset (for a model without processor_config.json)",
                scale=2,
            )
            load_model_button = gr.Button("Load model", elem_id="load-model", scale=1)
        model_info = gr.Markdown("", elem_id="model-info")
        with gr.Row():
            upload = gr.File(label="scan: NIfTI, NRRD or a .zip of one DICOM series", elem_id="upload", scale=3)
            with gr.Column(scale=2):
                with gr.Row():
                    seed_box = gr.Number(7, precision=0, label="generated case: seed", elem_id="seed")
                    orientation_box = gr.Dropdown(
                        ["random", "RAS", "LPS", "permuted", "oblique"], value="oblique", label="orientation"
                    )
                    lesions_box = gr.Dropdown([1, 2, 3], value=1, label="lesions")
                generate_button = gr.Button("Load generated case", elem_id="load-generated")
        with gr.Row():
            mode_box = gr.Radio(list(CLICK_MODES), value="positive", label="a click on a view adds", elem_id="mode")
            window_box = gr.Dropdown(list(WINDOW_PRESETS), value=DEFAULT_WINDOW, label="window", elem_id="window")
            level_box = gr.Number(WINDOW_PRESETS[DEFAULT_WINDOW][0], label="level (HU)", elem_id="level")
            width_box = gr.Number(WINDOW_PRESETS[DEFAULT_WINDOW][1], label="width (HU)", elem_id="width")
        images, sliders = {}, {}
        with gr.Row():
            for view in VIEWS:
                with gr.Column():
                    images[view] = gr.Image(
                        None, format="png", interactive=False, buttons=["fullscreen"], label=view,
                        elem_id=f"view-{view}",
                    )  # fmt: skip
                    sliders[view] = gr.Slider(
                        0, 1, value=0, step=1, label=_SLIDER_LABELS[view], elem_id=f"slider-{view}"
                    )
        status = gr.Markdown("", elem_id="status")
        cursor_info = gr.Markdown("", elem_id="cursor")
        with gr.Row():
            undo_button = gr.Button("Undo", elem_id="undo", interactive=False)
            redo_button = gr.Button("Redo", elem_id="redo", interactive=False)
            clear_button = gr.Button("Clear", elem_id="clear")
            save_button = gr.Button("Save mask (NIfTI)", elem_id="save", variant="primary")
        mask_file = gr.File(label="mask in the scan's geometry", elem_id="mask-file", interactive=False)
        clicks_table = gr.Dataframe(
            headers=CLICK_TABLE_HEADERS, value=[], label="clicks", elem_id="clicks", interactive=False
        )
        with gr.Accordion("Add a click by coordinates", open=False):
            with gr.Row():
                coordinates_box = gr.Textbox("", label="i, j, k (voxel) or x, y, z (RAS mm)", elem_id="coordinates")
                space_box = gr.Radio(["voxel", "world"], value="voxel", label="coordinates")
                add_button = gr.Button("Add", elem_id="add-coordinates")
        # Inputs of the API-only endpoints (a view's pixel, a slider by view name), never shown.
        view_box = gr.Textbox("axial", visible=False)
        x_box, y_box = gr.Number(0, visible=False), gr.Number(0, visible=False)
        position_box = gr.Number(0, precision=0, visible=False)
        api_click, api_slice, api_window = (gr.Button(visible=False) for _ in range(3))

        outputs = [
            session_state, *images.values(), *sliders.values(), status, cursor_info, clicks_table, undo_button,
            redo_button,
        ]  # fmt: skip

        def everything(session: AppSession, message: str) -> list[Any]:
            """New values of every output for the session's state, with `message` in the status line."""
            if session.scan is None:
                pictures, positions = [None] * 3, [gr.Slider(0, 1, value=0)] * 3
            else:
                pictures = [session.render(view) for view in VIEWS]
                positions = [
                    gr.Slider(0, session.views[view].num_slices - 1, value=session.slider_position(view), step=1)
                    for view in VIEWS
                ]
            return [
                session, *pictures, *positions, message, session.describe_cursor(), session.click_rows(),
                gr.Button(interactive=session.can_undo), gr.Button(interactive=session.can_redo),
            ]  # fmt: skip

        def only_message(session: AppSession, message: str) -> list[Any]:
            """The status line changes; everything else keeps what the page shows."""
            return [session, *[gr.skip()] * 6, message, *[gr.skip()] * 4]

        def guarded(action: Callable[..., str | None]) -> Callable[..., list[Any]]:
            """A handler running `action(session, *inputs) -> message`: every output, or the error in the status
            line (the session keeps its state). Never a traceback in the page."""

            def handler(session: AppSession | None, *inputs: Any) -> list[Any]:
                session = session or new_session()
                try:
                    message = action(session, *inputs) or ""
                except (ValueError, TypeError, OSError, RuntimeError, KeyError, IndexError) as error:
                    return everything(session, error_text(error))
                except Exception as error:  # a bug: the page says so and keeps working; the log has the traceback
                    logger.exception("sam3d app: unexpected error")
                    return everything(session, f"**Internal error** ({type(error).__name__}: {error}); see the log")
                return everything(session, message)

            return handler

        def label_of(mode: str) -> int | None:
            if mode not in CLICK_MODES:
                raise ValueError(f"the click mode must be one of {CLICK_MODES}, got {mode!r}")
            return None if mode == "move cursor" else int(mode == "positive")

        def clicking(voxel_of: Callable[..., tuple[int, int, int]]) -> Callable[..., Any]:
            """A click handler (a generator): a progress message first when the click will run the encoder, then
            the result."""
            add = guarded(lambda session, voxel, label: session.add_click(voxel, label))
            move = guarded(lambda session, voxel: session.move_cursor(voxel))

            def handler(session: AppSession | None, *inputs: Any):
                session = session or new_session()
                *inputs, mode = inputs
                try:
                    label = label_of(mode)
                    voxel = voxel_of(session, *inputs)
                    if label is not None and session.predictor is not None and session.will_encode(voxel, label):
                        yield only_message(session, _encoding_notice(session))
                except (ValueError, TypeError, OSError, RuntimeError) as error:
                    yield everything(session, error_text(error))
                    return
                yield move(session, voxel) if label is None else add(session, voxel, label)

            return handler

        def view_voxel(session: AppSession, view: str, x: float, y: float) -> tuple[int, int, int]:
            return session.view_pixel_to_voxel(view, float(x), float(y))

        def typed_voxel(session: AppSession, text: str, space: str) -> tuple[int, int, int]:
            try:
                values = [float(v) for v in str(text).replace(";", ",").split(",")]
            except ValueError:
                values = []
            if len(values) != 3:
                raise ValueError(f"give three numbers separated by commas (e.g. 60, 48, 20), got {text!r}")
            if space not in ("voxel", "world"):
                raise ValueError(f"coordinates are 'voxel' or 'world', got {space!r}")
            return session.world_to_voxel(values) if space == "world" else session.checked_voxel(values)

        click_on_view = clicking(view_voxel)

        def on_select(view: str):
            def handler(session: AppSession | None, mode: str, evt):
                if evt is None or not isinstance(getattr(evt, "index", None), (list, tuple)):
                    yield only_message(session or new_session(), "**Error:** the click came without a position")
                    return
                yield from click_on_view(session, view, evt.index[0], evt.index[1], mode)

            # Gradio passes the click's position to a parameter annotated with the class itself; this module's
            # postponed annotations would hand it the string "gr.SelectData" instead.
            handler.__annotations__ = {"evt": gr.SelectData}
            return handler

        def on_slide(view: str):
            return guarded(lambda session, position: session.set_slice(view, int(position)))

        for view in VIEWS:
            images[view].select(
                on_select(view), [session_state, mode_box], outputs, api_visibility="private",
                show_progress="minimal", trigger_mode="multiple",
            )  # fmt: skip
            sliders[view].input(
                on_slide(view), [session_state, sliders[view]], outputs, api_visibility="private",
                show_progress="hidden", trigger_mode="always_last",
            )  # fmt: skip

        api_click.click(
            click_on_view, [session_state, view_box, x_box, y_box, mode_box], outputs, api_name="click_view",
            show_progress="minimal",
        )  # fmt: skip
        add_button.click(
            clicking(typed_voxel), [session_state, coordinates_box, space_box, mode_box], outputs,
            api_name="click_voxel", show_progress="minimal",
        )  # fmt: skip
        api_slice.click(
            guarded(lambda session, view, position: session.set_slice(view, int(position))),
            [session_state, view_box, position_box], outputs, api_name="set_slice",
        )  # fmt: skip

        def announce_model(session: AppSession | None) -> str:
            return session.model.describe() if session is not None and session.model is not None else ""

        load_model_button.click(
            guarded(lambda session, name, adapter, preset: session.set_model(name, adapter, preset)),
            [session_state, model_box, adapter_box, preset_box], outputs, api_name="load_model",
        ).then(announce_model, [session_state], [model_info], api_visibility="private")  # fmt: skip
        upload.upload(
            guarded(lambda session, path: session.load_file(path)), [session_state, upload], outputs,
            api_name="load_scan",
        ).then(announce_model, [session_state], [model_info], api_visibility="private")  # fmt: skip
        generate_button.click(
            guarded(lambda session, seed, orientation, lesions: session.load_generated(seed, orientation, lesions)),
            [session_state, seed_box, orientation_box, lesions_box], outputs, api_name="load_generated",
        ).then(announce_model, [session_state], [model_info], api_visibility="private")  # fmt: skip

        def on_preset(session: AppSession | None, preset: str) -> list[Any]:
            session = session or new_session()
            try:
                if session.scan is None and WINDOW_PRESETS.get(preset, ()) is None:
                    raise ValueError("the auto window needs a scan: load one first")
                level, width = session.set_window_preset(preset)
            except ValueError as error:
                return [*only_message(session, error_text(error)), gr.skip(), gr.skip()]
            return [*everything(session, ""), level, width]

        window_box.change(
            on_preset, [session_state, window_box], [*outputs, level_box, width_box], api_visibility="private",
            show_progress="hidden",
        )  # fmt: skip
        set_window = guarded(lambda session, level, width: session.set_window(level, width))
        for trigger in (level_box.submit, width_box.submit):
            trigger(set_window, [session_state, level_box, width_box], outputs, api_visibility="private")
        api_window.click(set_window, [session_state, level_box, width_box], outputs, api_name="set_window")

        undo_button.click(guarded(AppSession.undo), [session_state], outputs, api_name="undo")
        redo_button.click(guarded(AppSession.redo), [session_state], outputs, api_name="redo")
        clear_button.click(guarded(AppSession.clear), [session_state], outputs, api_name="clear")

        def on_save(session: AppSession | None) -> tuple[AppSession, str, str | None]:
            session = session or new_session()
            try:
                path = session.save_mask()
            except (ValueError, OSError) as error:
                return session, error_text(error), None
            volume = session.state.volume_ml
            return session, f"saved **{path.name}** ({volume:.2f} mL), in the scan's own geometry", str(path)

        save_button.click(on_save, [session_state], [session_state, status, mask_file], api_name="save_mask")

        def on_start(session: AppSession | None) -> tuple[AppSession, str]:
            session = session or new_session()
            if session.model is None and default is not None:
                try:
                    session.model = store.get(*default)
                except ValueError as error:
                    return session, error_text(error)
            if session.model is None:
                return session, "no model loaded: run `sam3d demo` to make one, or give a folder or Hub id above"
            return session, session.model.describe()

        page.load(on_start, [session_state], [session_state, model_info], api_visibility="private")
    return page


def launch(
    model: str | None = None,
    adapter: str | None = None,
    preset: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    **launch_kwargs: Any,
):
    """Build the app, load its default model once (a bad model is an error here, not in the page) and serve it.

    `launch_kwargs` go to `gradio.Blocks.launch` (e.g. `prevent_thread_lock=True`); returns what it returns."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError('the app needs Gradio: pip install "sam3d-hf[app]"') from None
    if model is None and Path(DEFAULT_MODEL).is_dir():
        model = DEFAULT_MODEL
    store = ModelStore()
    if model:
        print(f"loading the model {model}{f' with the adapter {adapter}' if adapter else ''}", flush=True)
        store.get(model, adapter, preset)
    else:
        print("no model given and no ./sam3d-demo/model: load one in the page (or run `sam3d demo` first)")
    page = build_app(model, adapter, preset, store=store)
    page.queue(default_concurrency_limit=4)
    return page.launch(server_name=host, server_port=port, share=share, **launch_kwargs)
