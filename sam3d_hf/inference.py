"""Inference on whole scans: a predictor that preprocesses a scan once, encodes each patch once and decodes clicks.

[`Sam3DPredictor`] follows segment-anything's `SamPredictor`: `set_image` reads, reorients, resamples and normalises
the scan once (`Sam3DImageProcessor.preprocess`); every `predict` maps its clicks to patches
(`Sam3DProcessor.prepare_prompts`), encodes the patches it has not seen yet (`model.get_image_embeddings`, cached per
patch origin) and runs only the prompt-dependent part of the model (prompt encoder, level-3 head and its share of the
fused convolution) on the cached embeddings. The result comes back in the scan's original geometry
(`Sam3DProcessor.post_process_masks`): the data's stored axis order, voxel for voxel.

Patch placement and the cache are two different things. The embedding cache is exact: a patch at the same origin has
the same voxels, so its cached embeddings are what a fresh encoding would give. Where a patch is *placed* is a choice:
by default (`reuse_patches=True`, an interactive session) a click cluster that fits in an already encoded patch with
`cluster_margin` voxels of context keeps that patch, so a click added near earlier ones costs only the
prompt-dependent part; the mask then depends on the clicks that came before. `reuse_patches=False` places every patch
centred on its click cluster exactly as `Sam3DProcessor.__call__` does (embeddings still come from the cache when an
origin coincides), so the same clicks give the same mask whatever was predicted before: what an evaluation needs.

Coordinates. Clicks index the original data's stored axes (NIfTI `(i, j, k)`, i.e. `nib.load(path).get_fdata()[i, j,
k]`; array axes for arrays), or are RAS world mm with `points_in="world"`, exactly as for [`Sam3DProcessor`].
Masks and probabilities have the original data's stored shape.

Automatic mode ([`Sam3DPredictor.predict_automatic`]) segments the whole scan with MONAI's
`sliding_window_inference` (Gaussian weighting, overlap 0.7 as in the paper). The model always takes clicks, so each
window gets one positive click at its centre voxel: a model trained without clicks carries no click information to
honour, and the official training code (which samples clicks inside the patch, falling back to background points
labelled positive when a crop holds no tumour) has seen a click in every kind of patch, so a fixed, content-free
click at the window centre is the prompt closest to "no prompt" that such a model accepts. A model trained with
clicks will segment whatever lies under each window's centre instead: use `predict` for it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from transformers.feature_extraction_utils import BatchFeature

from .modeling_sam3d import Sam3DForPromptableSegmentation, Sam3DImageEmbeddings
from .processing_sam3d import Sam3DProcessor

__all__ = ["Sam3DPrediction", "Sam3DPredictor", "bf16_verdict"]

# CPU flags of native bf16 arithmetic; without them torch emulates bf16 matmuls (an AVX2-only EPYC ran a 1024³ bf16
# matmul at 0.9 GFLOP/s against ~160 in float32; an AVX512-BF16 one at 2.2x float32's speed).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")

# Probabilities are handed to `post_process_masks` as one-channel logits `logit(p)`, whose sigmoid is `p` again;
# clamping keeps 0 and 1 finite (the processor refuses non-finite logits).
_PROBABILITY_EPS = 1e-6


@dataclass
class Sam3DPrediction:
    """What [`Sam3DPredictor`] returns for one set of clicks (or one automatic pass).

    Args:
        mask (`torch.Tensor` uint8 of the scan's stored shape): `probabilities >= threshold`, in the original data's
            stored axis order (NIfTI `(i, j, k)`), aligned voxel for voxel with the scan.
        probabilities (`torch.Tensor` float32, same shape): foreground probability in the original geometry (patches
            pasted with `max` where they overlap, 0 outside every patch).
        scores (`torch.Tensor` float32 of shape `(B,)`): per patch (click cluster, one batch row; one value in
            automatic mode), the mean foreground probability inside the predicted mask of that patch, 0 if empty.
        logits (`torch.Tensor` of shape `(B, 2, D, H, W)`, *optional*): per-patch model logits in resampled patch
            voxels (`None` in automatic mode).
        inputs ([`BatchFeature`], *optional*): the processor's output for these clicks (`patch_origins`,
            `point_cluster`, geometry), as from `Sam3DProcessor.__call__` (`None` in automatic mode).
    """

    mask: torch.Tensor
    probabilities: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor | None = None
    inputs: BatchFeature | None = None


class Sam3DPredictor:
    """Set a scan once, then predict from many click sets; each patch is encoded once.

    Args:
        model ([`Sam3DForPromptableSegmentation`]): in eval mode (the predictor calls `model.eval()`), on any device;
            inputs follow `model.device`.
        processor ([`Sam3DProcessor`]): gives the patch size, the intensity settings and the geometry mapping.
        bf16 (`bool`, defaults to `False`): run the model under `torch.autocast(dtype=torch.bfloat16)`. Refused
            (`ValueError`, saying why) where it does not pay: see [`bf16_verdict`] (GPUs with bf16, CPUs with native
            bf16 such as `avx512_bf16`/`amx_bf16`; elsewhere bf16 is far slower than float32).
        max_cached_patches (`int`, defaults to 8): image embeddings kept (least recently used dropped first). At
            ViT-B and 128³ one patch's embeddings take about 270 MB (four `(256, 32³)` levels and the `(128, 64³)`
            decoder context, float32).

    Example:
    ```python
    predictor = Sam3DPredictor(model, processor)
    predictor.set_image("ct.nii.gz")
    first = predictor.predict([[120, 85, 40]])                            # encodes the patch around the click
    second = predictor.predict([[120, 85, 40], [126, 85, 40]], [1, 0])  # same patch: prompt-dependent part only
    save_mask_nifti(second.mask, "ct.nii.gz", "ct_mask.nii.gz")
    fresh = predictor.predict([[118, 80, 41]], reuse_patches=False)      # placed as a fresh processor call would
    ```

    `predict(..., reuse_patches=True)` (the default, for interactive use) keeps a new click in an already encoded patch
    when it fits there, so its mask depends on what was predicted before; `reuse_patches=False` gives exactly the mask
    of a fresh predictor (or of `processor(...)` + `model(**inputs)` + `post_process_masks`) for the same clicks. An
    evaluation uses `False` for a protocol's first prediction (see examples/evaluate.py).
    """

    def __init__(
        self,
        model: Sam3DForPromptableSegmentation,
        processor: Sam3DProcessor,
        bf16: bool = False,
        max_cached_patches: int = 8,
    ):
        if not isinstance(processor, Sam3DProcessor):
            raise TypeError(f"`processor` must be a Sam3DProcessor, got {type(processor).__name__}.")
        if isinstance(max_cached_patches, bool) or not isinstance(max_cached_patches, int) or max_cached_patches < 1:
            raise ValueError(f"`max_cached_patches` must be an int >= 1, got {max_cached_patches!r}.")
        if bf16:
            native, reason = bf16_verdict(model.device.type)
            if not native:
                raise ValueError(
                    f"bf16=True is refused on {model.device.type}: {reason}; bf16 autocast would be slower than "
                    "float32 there. Use bf16=False."
                )
        self.model = model.eval()
        self.processor = processor
        self.bf16 = bool(bf16)
        self.max_cached_patches = max_cached_patches
        self.cache_hits = 0
        self.cache_misses = 0
        self._preprocessed: BatchFeature | None = None
        self._cache: OrderedDict[tuple[int, int, int], Sam3DImageEmbeddings] = OrderedDict()

    # ------------------------------------------------------------------------------------------------------ image
    def set_image(self, images: Any, spacing: Sequence[float] | None = None, affine: np.ndarray | None = None) -> None:
        """Read and preprocess one scan (path, nibabel image or array, see `load_volume`) and forget the previous
        scan's cached patches. `spacing`/`affine` give the geometry of array inputs (per stored axis / voxel -> RAS
        mm). If reading or preprocessing fails, the predictor holds no scan (never the previous one)."""
        self._preprocessed = None
        self.reset_cache()
        self._preprocessed = self.processor.image_processor.preprocess(
            images, spacing=spacing, affine=affine, return_tensors=None
        )

    def reset_cache(self) -> None:
        """Drop the cached patch embeddings and zero the hit/miss counters."""
        self._cache.clear()
        self.cache_hits = self.cache_misses = 0

    @property
    def preprocessed(self) -> BatchFeature:
        """The scan as `image_processor.preprocess` returned it (resampled canonical `pixel_values` and geometry)."""
        if self._preprocessed is None:
            raise ValueError("No scan is set: call `predictor.set_image(path_or_array)` before predicting.")
        return self._preprocessed

    def autocast(self):
        """The context the predictor runs the model in: bf16 autocast with `bf16=True`, else nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)

    def _embeddings(self, origin: tuple[int, int, int], pixel_values: torch.Tensor) -> Sam3DImageEmbeddings:
        """The cached embeddings of the patch at `origin` (resampled voxel of its corner), encoding it on a miss."""
        if origin in self._cache:
            self.cache_hits += 1
            self._cache.move_to_end(origin)
            return self._cache[origin]
        self.cache_misses += 1
        embeddings = self.model.get_image_embeddings(pixel_values.to(self.model.device))
        self._cache[origin] = embeddings
        if len(self._cache) > self.max_cached_patches:
            self._cache.popitem(last=False)
        return embeddings

    # ---------------------------------------------------------------------------------------------------- prompts
    def predict(
        self,
        input_points: Any,
        input_labels: Any = None,
        points_in: str = "voxel",
        threshold: float = 0.5,
        reuse_patches: bool | Sequence[Sequence[int]] = True,
        previous: Sam3DPrediction | Mapping[tuple[int, int, int], torch.Tensor] | None = None,
    ) -> Sam3DPrediction:
        """Segment what the clicks point at, in the scan's original geometry.

        Args:
            input_points: `(N, 3)` clicks: stored voxel indices of the original data (NIfTI `(i, j, k)`, fractional
                allowed) or RAS world mm with `points_in="world"`.
            input_labels: `(N,)` 1 positive / 0 negative (defaults to all positive); negative clicks need a model with
                `prompt_encoder_config.use_point_labels=True`. Positive clicks are grouped into patches; a negative
                click refines every patch it falls in (see `Sam3DProcessor.__call__`).
            points_in: `"voxel"` or `"world"`.
            threshold: foreground probability threshold, strictly between 0 and 1.
            reuse_patches: where the patches go (see the module docstring).
                * `True` (interactive): a click cluster that fits, with `cluster_margin` voxels of context, in a cached
                  patch (most recently used first) keeps it; the mask then depends on the earlier predictions.
                * `False`: patches centred on the click clusters, as a fresh `Sam3DProcessor.__call__` places them; the
                  same clicks give the same mask whatever came before (cached embeddings are still used where an
                  origin coincides).
                * a list of patch origins (`(3,)` resampled voxels, e.g. earlier `prediction.inputs["patch_origins"]`,
                  preferred first): only these may be kept, e.g. the patches of one click session among several on
                  the same scan. An empty list is the same as `False`.
            previous: the prediction these clicks correct (the session's last one; after an undo, the one undone
                to). For a model with the mask prompt (`mask_decoder_config.use_mask_prompt`, the `interactive`
                recipe) each patch gets that prediction's foreground probabilities of the same patch (same origin) as
                `input_masks`, a new patch none; other models ignore it. `None`: a first click. Also a mapping
                `{patch origin (3 ints): (D, H, W) foreground probabilities in patch voxels}` (what a session stores).

        Returns:
            [`Sam3DPrediction`] with one score and one logits row per patch.
        """
        if not self.model.config.use_prompt_encoder:
            raise ValueError(
                "this model is prompt-free (config.use_prompt_encoder=False): it takes no clicks; segment the scan "
                "with predictor.predict_automatic() (sliding windows)"
            )
        preprocessed = self.preprocessed
        if isinstance(reuse_patches, bool):
            reusable = list(reversed(self._cache)) if reuse_patches else None  # most recently used first
        else:
            reusable = _patch_origins(reuse_patches)
        inputs = self.processor.prepare_prompts(preprocessed, input_points, input_labels, points_in, "pt", reusable)
        origins = inputs["patch_origins"].tolist()
        with torch.inference_mode(), self.autocast():
            rows = [self._embeddings(tuple(o), inputs["pixel_values"][b : b + 1]) for b, o in enumerate(origins)]
            # The class the model returned: with `trust_remote_code` the model and this module may come from two
            # copies of modeling_sam3d, and the model checks the type of its embeddings.
            embeddings = type(rows[0])(
                feature_maps=tuple(torch.cat(level) for level in zip(*(row.feature_maps for row in rows))),
                decoder_context=torch.cat([row.decoder_context for row in rows]),
            )
            masks = self._previous_masks(previous, origins)  # only given when there is one: a model loaded with
            extra = {} if masks is None else {"input_masks": masks}  # older remote code has no such argument
            logits = self.model(
                image_embeddings=embeddings,
                input_points=inputs["input_points"].to(self.model.device),
                input_labels=inputs["input_labels"].to(self.model.device),
                **extra,
            ).logits.float()
        probabilities = self.processor.post_process_masks(logits, inputs, threshold, return_probabilities=True)
        return Sam3DPrediction(
            mask=(probabilities >= threshold).to(torch.uint8),
            probabilities=probabilities,
            scores=_scores(torch.softmax(logits, 1)[:, 1], threshold),
            logits=logits.cpu(),
            inputs=inputs,
        )

    def _previous_masks(self, previous, origins: list[list[int]]) -> torch.Tensor | None:
        """`(B, 1, *patch)` foreground probabilities of `previous` for the patches at `origins` (zeros, i.e. no
        mask, for a patch `previous` did not have), or `None` when the model has no mask prompt or nothing is given."""
        if previous is None or not self.model.config.mask_decoder_config.use_mask_prompt:
            return None
        if isinstance(previous, Sam3DPrediction) and previous.logits is not None:
            rows = torch.softmax(previous.logits.float(), 1)[:, 1]
            previous = {tuple(o): rows[b] for b, o in enumerate(previous.inputs["patch_origins"].tolist())}
        elif not isinstance(previous, Mapping):
            raise TypeError(
                "`previous` must be a Sam3DPrediction of predictor.predict, a {patch origin: probabilities} mapping, "
                f"or None; got {type(previous).__name__}"
            )
        patch = tuple(self.processor.patch_size)
        masks = torch.zeros(len(origins), 1, *patch)
        for row, origin in enumerate(origins):
            earlier = previous.get(tuple(int(v) for v in origin))
            if earlier is not None:
                if tuple(earlier.shape) != patch:
                    raise ValueError(f"a previous mask must have the patch shape {patch}, got {tuple(earlier.shape)}")
                masks[row, 0] = earlier.float()
        return masks.to(self.model.device, self.model.dtype)

    # -------------------------------------------------------------------------------------------------- automatic
    def predict_automatic(
        self, batch_size: int = 1, overlap: float = 0.5, threshold: float = 0.5, centre_clicks: bool = False
    ) -> Sam3DPrediction:
        """Segment the whole scan with sliding windows (MONAI `sliding_window_inference`, Gaussian weighting), as the
        official `test_auto.py` does with the prompt-free model (`config.use_prompt_encoder=False`).

        Every window is a `processor.patch_size` patch of the resampled scan (padded with `image_processor.pad_value`
        where it leaves the scan: 0, the mean, for the official presets, as `test_auto.py` pads). The windows'
        foreground probabilities are blended with Gaussian weights and mapped back to the original geometry.

        Args:
            batch_size: windows per forward pass.
            overlap: fraction of a window shared with its neighbour along each axis, in `[0, 1)`: 0.5 as the official
                code, 0.7 as the paper's text says.
            threshold: foreground probability threshold, strictly between 0 and 1.
            centre_clicks: a prompted model needs clicks: with `True` every window gets one positive click at its
                centre voxel (not the paper's method: a stand-in for models trained with prompts only). A prompted
                model without it, or a prompt-free one with it, is refused.

        Returns:
            [`Sam3DPrediction`] whose `scores` holds one value (mean probability inside the mask); no logits/inputs.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1 (windows per forward pass), got {batch_size!r}.")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"`overlap` must lie in [0, 1) (window fraction shared with a neighbour), got {overlap}.")
        prompted = self.model.config.use_prompt_encoder
        if prompted and not centre_clicks:
            raise ValueError(
                "automatic (sliding-window) mode needs the prompt-free model (config.use_prompt_encoder=False, "
                "trained with the official_auto recipe or converted from a train_auto.py snapshot); this model is "
                "prompted: give clicks with predict(), or pass centre_clicks=True for one click per window's centre"
            )
        if centre_clicks and not prompted:
            raise ValueError("centre_clicks=True is for prompted models; a prompt-free model takes no clicks")
        preprocessed = self.preprocessed
        volume = torch.as_tensor(np.asarray(preprocessed["pixel_values"]), dtype=torch.float32)  # (1, 1, D, H, W)
        patch = self.processor.patch_size
        centre = torch.tensor([(p - 1) / 2 for p in patch], dtype=torch.float32, device=self.model.device)

        def window_probabilities(windows: torch.Tensor) -> torch.Tensor:  # (B, 1, *patch) -> (B, 1, *patch)
            if not prompted:
                return torch.softmax(self.model(pixel_values=windows).logits.float(), dim=1)[:, 1:]
            batch = windows.shape[0]
            logits = self.model(
                pixel_values=windows,
                input_points=centre.expand(batch, 1, 3),
                input_labels=torch.ones(batch, 1, dtype=torch.long, device=self.model.device),
            ).logits.float()
            return torch.softmax(logits, dim=1)[:, 1:]

        with torch.inference_mode(), self.autocast():
            resampled = sliding_window_inference(
                volume,
                roi_size=patch,
                sw_batch_size=batch_size,
                predictor=window_probabilities,
                overlap=overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=self.processor.image_processor.pad_value,
                sw_device=self.model.device,
                device="cpu",
            )[0, 0].float()
        probabilities = self._resampled_to_original(resampled)
        mask = probabilities >= threshold
        return Sam3DPrediction(
            mask=mask.to(torch.uint8), probabilities=probabilities, scores=_scores(probabilities[None], threshold)
        )

    def _resampled_to_original(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Probabilities on the resampled canonical grid -> the original geometry.

        Reuses `post_process_masks` (the one definition of the inverse geometry) by cutting the grid into
        non-overlapping patch tiles, so the paste is exact, and passing `logit(p)` as one-channel logits.
        """
        patch = np.asarray(self.processor.patch_size)
        size = probabilities.shape
        counts = [int(np.ceil(n / p)) for n, p in zip(size, patch)]
        grids = np.meshgrid(*[np.arange(c) * p for c, p in zip(counts, patch)], indexing="ij")
        origins = np.stack(grids, axis=-1).reshape(-1, 3)
        padded = torch.zeros(tuple(c * p for c, p in zip(counts, patch)))
        padded[: size[0], : size[1], : size[2]] = probabilities
        tiles = torch.stack([padded[tuple(slice(o, o + p) for o, p in zip(origin, patch))] for origin in origins])
        logits = torch.logit(tiles.clamp(_PROBABILITY_EPS, 1 - _PROBABILITY_EPS))[:, None]
        inputs = {**self.preprocessed, "patch_origins": origins}
        return self.processor.post_process_masks(logits, inputs, return_probabilities=True)


@functools.cache
def bf16_verdict(device_type: str) -> tuple[bool, str]:
    """Whether bf16 autocast pays on this machine's `device_type` (`"cpu"`, `"cuda"`), and why; decided once per
    process. CUDA: `torch.cuda.is_bf16_supported()`. CPU: the native bf16 flags (`avx512_bf16`, `amx_bf16`) in
    `/proc/cpuinfo`; where there is no such file, a 512³ bf16 matmul must be faster than the float32 one. Other
    devices are not judged (`True`)."""
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, "this GPU supports bf16"
        return False, "this GPU does not support bf16 (torch.cuda.is_bf16_supported() is False)"
    if device_type != "cpu":
        return True, f"bf16 on {device_type} is not judged"
    try:
        flags = {flag for line in CPUINFO.read_text().splitlines() if line.startswith("flags") for flag in line.split()}
    except OSError:
        flags = None
    if flags is not None:
        found = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
        if found:
            return True, f"this CPU has native bf16 ({', '.join(found)} in {CPUINFO})"
        return False, (
            f"this CPU has no native bf16 (neither {' nor '.join(NATIVE_BF16_FLAGS)} in {CPUINFO}), so torch emulates "
            "bf16 matmuls, far slower than float32"
        )
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(512, 512).to(dtype)
        a @ a
        start = time.perf_counter()
        a @ a
        seconds[dtype] = time.perf_counter() - start
    faster = seconds[torch.bfloat16] < seconds[torch.float32]
    return faster, (
        f"a 512³ bf16 matmul took {seconds[torch.bfloat16] * 1e3:.1f} ms against {seconds[torch.float32] * 1e3:.1f} "
        f"ms in float32 ({CPUINFO} is not readable here)"
    )


def _patch_origins(value: Any) -> np.ndarray:
    """`reuse_patches` given as patch origins -> `(K, 3)` int64 resampled voxels."""
    try:
        origins = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        origins = None
    if origins is None or (origins.size and (origins.ndim != 2 or origins.shape[1] != 3)):
        raise ValueError(
            "`reuse_patches` must be True, False or a list of (3,) patch origins (resampled voxels, e.g. an earlier "
            f"`prediction.inputs['patch_origins']`), got {value!r}."
        )
    return origins.reshape(-1, 3).astype(np.int64)


def _scores(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row of `(B, ...)` probabilities, the mean probability where it reaches `threshold` (0 if it never does)."""
    inside = probabilities >= threshold
    total = (probabilities * inside).flatten(1).sum(1)
    count = inside.flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).float()
