"""Pictures of scans, masks and clicks: PNG overlays of three orthogonal slices (`sam3d segment --overlay`, the
evaluation's `overlays/`) and curves of Dice per round.

Conventions: arrays are in the scan's stored axis order (NIfTI `i, j, k`, `Sam3DVolume.data`) with their `(4, 4)`
voxel -> RAS mm affine; they are drawn in RAS display orientation. Every PNG is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import atomic_write

__all__ = ["save_curve", "save_overlay"]


def save_overlay(path, image, affine, outlines, points, labels, window, title: str | None = None) -> None:
    """A PNG of three orthogonal slices (axial, coronal, sagittal; RAS, R to the right, A / S upwards; each drawn with
    its voxel spacing's aspect, so anisotropic scans are not distorted) through the centre of each connected region of
    the first outline's mask (the 4 largest, one row each; the first click when it is empty): the outlines, and the
    clicks within 2 slices as x (yellow positive, cyan negative). Written atomically. Used by `sam3d segment --overlay`
    and examples/evaluate.py.

    Args:
        path: the `.png` to write.
        image: the scan, in its stored axis order (NIfTI i, j, k; `Sam3DVolume.data`).
        affine: `(4, 4)` voxel -> RAS mm of the scan.
        outlines: `{name: (mask, colour)}`, masks in the scan's stored axis order, e.g. `{"ground truth": (label,
            "lime"), "prediction": (mask, "red")}`.
        points: `(N, 3)` clicks, stored voxel indices `(i, j, k)`; labels: `(N,)` 1 positive / 0 negative.
        window: `(low, high)` grey levels shown (e.g. the processor's HU window).
        title: first words of the figure's title (the outlines' colours follow).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    orientation = nib.orientations.io_orientation(affine)  # stored axis -> (RAS display axis, flip)
    image = nib.orientations.apply_orientation(image, orientation)
    masks = {name: (nib.orientations.apply_orientation(mask, orientation), colour) for name, (mask, colour) in
             outlines.items()}  # fmt: skip
    shape = np.asarray(image.shape)
    points, labels = np.asarray(points, dtype=float).reshape(-1, 3), np.asarray(labels)
    shown = np.zeros((len(points), 3))
    for stored_axis, (axis, flip) in enumerate(orientation.astype(int)):  # stored voxel -> RAS display voxel
        shown[:, axis] = points[:, stored_axis] if flip > 0 else shape[axis] - 1 - points[:, stored_axis]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(orientation[:, 0])]  # mm per display axis
    first = next(iter(masks.values()))[0].astype(bool)
    regions, count = ndimage.label(first, np.ones((3, 3, 3)))
    largest = 1 + np.argsort(-ndimage.sum_labels(first, regions, range(1, count + 1)), kind="stable")[:4]
    centres = ndimage.center_of_mass(first, regions, largest) if count else shown[:1]
    centres = [np.rint(c).astype(int).clip(0, shape - 1) for c in centres] or [(shape - 1) // 2]
    views = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))  # (name, cut axis, (x, y))
    figure, axes = plt.subplots(len(centres), 3, figsize=(10, 0.4 + 3.4 * len(centres)), squeeze=False)
    for row, centre in enumerate(centres):
        for panel, (name, axis, (horizontal, vertical)) in zip(axes[row], views):
            index = [slice(None)] * 3
            index[axis] = centre[axis]
            index = tuple(index)
            panel.imshow(image[index].T, cmap="gray", origin="lower", vmin=window[0], vmax=window[1],
                         aspect=spacing[vertical] / spacing[horizontal])  # fmt: skip
            for mask, colour in masks.values():
                if mask[index].any():
                    panel.contour(mask[index].T.astype(float), levels=[0.5], colors=colour, linewidths=1)
            near = np.abs(shown[:, axis] - centre[axis]) <= 2
            for value, colour in ((1, "yellow"), (0, "cyan")):
                chosen = near & (labels == value)
                panel.scatter(shown[chosen, horizontal], shown[chosen, vertical], s=30, c=colour, marker="x")
            panel.set_title(f"#{row + 1} {name} slice {centre[axis]}", fontsize=9)
            panel.set_axis_off()
    legend = ", ".join(f"{colour}: {name}" for name, (_, colour) in masks.items())
    figure.suptitle(f"{title + ' -- ' if title else ''}{legend}, x: clicks (yellow +, cyan -)", fontsize=10)
    figure.tight_layout()
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=90), suffix=".png")
    plt.close(figure)


def save_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    """Mean Dice and NSD per correction round, one line per session protocol (`interactive`, with its NSD at 2 mm, and
    `correction`) and metric; without such rows, per number of clicks; nothing without either."""
    sessions = {name: [r for r in rows if r["protocol_name"] == name] for name in ("interactive", "correction")}
    curves, key, xlabel = (
        ({name: chosen for name, chosen in sessions.items() if chosen}, "round", "correction round")
        if any(sessions.values())
        else ({"": [r for r in rows if r["protocol_name"].isdigit()]}, "num_clicks", "clicks")
    )
    if not any(curves.values()):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name, chosen in curves.items():
        xs = sorted({r[key] for r in chosen})
        for metric in ("dice", "nsd", "nsd_2mm"):
            if chosen[0].get(metric) is None:  # nsd_2mm: interactive rows only
                continue
            means = [np.mean([r[metric] for r in chosen if r[key] == x]) for x in xs]
            axis.plot(xs, means, marker="o", label=f"{name} {metric}".strip())
    axis.set_xlabel(xlabel)
    axis.set_ylabel("mean over cases")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90), suffix=".png")
    plt.close(figure)
