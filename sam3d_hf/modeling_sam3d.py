"""3DSAM-adapter (Gong et al.): SAM's 2D ViT turned into a 3D point-promptable segmenter.

The computation is the official one, to float32 rounding; `docs/design.md` describes it with its shapes.
Conventions used throughout:
- volumes are `(batch, channel, depth, height, width)`; token grids are `(batch, D', H', W', channels)` with
  `D' = D / 4` etc.;
- points are continuous voxel coordinates `(z, y, x)` = `(d, h, w)` inside the input patch.
"""

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import OutputRecorder, capture_outputs
from typing_extensions import Unpack  # typing.Unpack is Python 3.11+

from .configuration_sam3d import Sam3DConfig, Sam3DMaskDecoderConfig, Sam3DPromptEncoderConfig, Sam3DVisionConfig

# Additive logit for tokens that must not be attended to (the official value; not -inf).
MASKED_LOGIT = -100.0

# On the CPU, row-wise work (attention per window, the MLP) runs in chunks whose temporaries stay below glibc's largest
# mmap threshold (32 MB): larger buffers are fresh mappings on every allocation, and their first-touch page faults cost
# more than the arithmetic of a GELU or an add (400 MB: 140 ms fresh, 20 ms into reused memory, on the 2-core test
# machine). CUDA's caching allocator reuses its blocks, so there every op takes all rows at once.
CPU_CHUNK_BYTES = 24 * 2**20


def rows_per_chunk(tensor: torch.Tensor, width: int) -> int:
    """Rows of `width` elements that one chunk of `tensor`'s row-wise work takes (all of them off the CPU)."""
    if tensor.device.type != "cpu":
        return max(1, tensor.shape[0])
    return max(1, CPU_CHUNK_BYTES // (width * tensor.element_size()))


class Sam3DOutputKwargs(TypedDict, total=False):
    """transformers' output flags: the keyword arguments both models' `forward` accepts (the share of
    `TransformersKwargs` these models honour; `return_dict` is handled by the output-capturing wrapper). Other names
    are a `TypeError`, so a typo never passes silently."""

    output_attentions: bool | None
    output_hidden_states: bool | None
    return_dict: bool | None


class Sam3DProcessorGeometry(TypedDict, total=False):
    """The geometry entries of a `Sam3DProcessor` output, which `Sam3DForPromptableSegmentation.forward` accepts by
    name (so that `model(**inputs)` works) and ignores: they map the patch back to the original volume."""

    patch_origins: Any
    patch_affines: Any
    point_cluster: Any
    original_size: Any
    original_affine: Any
    canonical_axes: Any
    canonical_flips: Any
    canonical_size: Any
    resampled_size: Any
    resampling_scale: Any
    resampled_spacing: Any
    resampled_affine: Any


class Sam3DSegmentationKwargs(Sam3DOutputKwargs, Sam3DProcessorGeometry, total=False):
    """The keyword arguments of `Sam3DForPromptableSegmentation.forward`: output flags and processor geometry."""


OUTPUT_FLAG_KEYS = tuple(Sam3DOutputKwargs.__annotations__)
PROCESSOR_GEOMETRY_KEYS = tuple(Sam3DProcessorGeometry.__annotations__)


@dataclass
class Sam3DImageEmbeddings(ModelOutput):
    """What the image alone determines; compute once per patch and reuse for every set of clicks.

    Args:
        feature_maps (`tuple[torch.FloatTensor]` of 4 tensors `(batch, 256, D/4, H/4, W/4)`): the encoder levels
            after blocks 3, 6, 9 and 12 (ViT-B); level 3 is the one the prompt encoder refines.
        decoder_context (`torch.FloatTensor` of shape `(batch, 128, D/2, H/2, W/2)`): the prompt-independent part of
            the decoder's fused convolution (levels 0-2 and the image channel), before normalisation.
    """

    feature_maps: tuple[torch.FloatTensor, ...] | None = None
    decoder_context: torch.FloatTensor | None = None


@dataclass
class Sam3DSegmentationOutput(ModelOutput):
    """Output of [`Sam3DForPromptableSegmentation`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): DiceCE loss, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch, 2, D, H, W)`): background/foreground logits on the input patch;
            the foreground probability is `logits.softmax(1)[:, 1]`.
        image_embeddings ([`Sam3DImageEmbeddings`]): pass back as `image_embeddings=` to decode new clicks without
            running the encoder again.
        hidden_states (`tuple[torch.FloatTensor]`, *optional*, with `output_hidden_states=True`): the encoder's token
            grids `(batch, D/4, H/4, W/4, hidden_size)`: the input of block 0 (patch + position embeddings), then the
            output of every block (`num_hidden_layers + 1` tensors). Empty when `image_embeddings` were passed.
        attentions (`tuple[torch.FloatTensor]`, *optional*, with `output_attentions=True` and the `"eager"` attention
            implementation): per encoder block, the softmaxed window attention `(batch * windows, heads, N, N)` with
            `N = wd * wh * ww` tokens per window, windows in (depth, height, width) raster order of the padded and (in
            shifted blocks) rolled grid. SDPA does not return weights: load with `attn_implementation="eager"`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_embeddings: Sam3DImageEmbeddings | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class Sam3DVisionModelOutput(ModelOutput):
    """Output of [`Sam3DVisionModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, D/4, H/4, W/4, hidden_size)`): the tokens after the
            last block (channels last).
        feature_maps (`tuple[torch.FloatTensor]` of 4 tensors `(batch, output_channels, D/4, H/4, W/4)`): the neck
            outputs after the blocks of `feature_indexes` (what the decoder and prompt encoder use).
        hidden_states, attentions: as in [`Sam3DSegmentationOutput`].
    """

    last_hidden_state: torch.FloatTensor | None = None
    feature_maps: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@functools.lru_cache(maxsize=8)
def _interpolation_weights(taps: int, stride: int) -> tuple[tuple[float, ...], ...]:
    rows = []
    for i in range(taps):
        position = (i + 0.5) / stride + 0.5
        low = math.floor(position)
        row = [0.0] * (taps // stride + 2)
        row[low], row[low + 1] = 1 - (position - low), position - low
        rows.append(tuple(row))
    return tuple(rows)


def interpolation_matrix(taps: int, stride: int) -> torch.Tensor:
    """`(taps, taps // stride + 2)` weights that fold "x`stride` linear upsampling then a `taps`-tap filter".

    Row `i` says how the upsampled sample `i` of a token's receptive field mixes the replicate-padded source samples
    `stride * t .. stride * t + taps // stride + 1` (float64, exact). A new tensor each call (the weights are cached as
    plain numbers), so it never carries the device, inference mode or autograd state of an earlier caller.
    """
    return torch.tensor(_interpolation_weights(taps, stride), dtype=torch.float64, device="cpu")


class Sam3DPatchEmbeddings(nn.Module):
    """SAM's 16x16 patch kernel on upsampled slices followed by a 16-tap depth filter, folded into one convolution of
    the replicate-padded patch (never materialising the upsampled volume): x4 upsampling gives a 6³ stride-4 kernel
    (`token_stride=4`), x2 a 10³ stride-8 one (`token_stride=8`).

    Stores the official parameters: `projection_weight (C, 1, 16, 16)` (SAM's RGB kernel summed over its inputs; axis 2
    is H, axis 3 is W), `projection_bias (C,)`, `depth_weight (C, 16)`, `depth_bias (C,)`.
    """

    def __init__(self, config: Sam3DVisionConfig):
        super().__init__()
        size, channels = config.patch_size, config.hidden_size
        self.stride = config.token_stride
        self.projection_weight = nn.Parameter(torch.empty(channels, config.num_channels, size, size))
        self.projection_bias = nn.Parameter(torch.empty(channels))
        self.depth_weight = nn.Parameter(torch.empty(channels, size))
        self.depth_bias = nn.Parameter(torch.empty(channels))
        self.taps = size
        self.upsampling = size // self.stride  # the official upsampling factor (4 for the prompted model)

    def folded_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent `(C, in, k, k, k)` stride-`token_stride` kernel (`k = 16 / upsampling + 2`) and its bias,
        composed from the stored parameters."""
        # Not a buffer: from_pretrained builds models on the meta device, where a computed buffer would be lost.
        fold = interpolation_matrix(self.taps, self.upsampling).to(
            self.projection_weight.device, self.projection_weight.dtype
        )
        plane = torch.einsum("ia,ocij,jb->ocab", fold, self.projection_weight, fold)  # (C, in, k, k)
        depth = self.depth_weight @ fold  # (C, k)
        kernel = depth[:, None, :, None, None] * plane[:, :, None]  # (C, in, k[d], k[h], k[w])
        bias = self.projection_bias * self.depth_weight.sum(1) + self.depth_bias
        return kernel, bias

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        kernel, bias = self.folded_kernel()
        padded = F.pad(pixel_values, (1, 1, 1, 1, 1, 1), mode="replicate")  # reproduces the upsampler's clamping
        embeddings = F.conv3d(padded, kernel.to(padded.dtype), bias.to(padded.dtype), stride=self.stride)
        return embeddings.permute(0, 2, 3, 4, 1)  # (B, D', H', W', C)


class Sam3DSpatialAdapter(nn.Module):
    """Bottleneck adapter with a depthwise 3x3x3 convolution on the token grid, applied before each block."""

    def __init__(self, config: Sam3DVisionConfig):
        super().__init__()
        self.linear1 = nn.Linear(config.hidden_size, config.adapter_dim)
        self.conv = nn.Conv3d(config.adapter_dim, config.adapter_dim, 3, padding=1, groups=config.adapter_dim)
        self.linear2 = nn.Linear(config.adapter_dim, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: (B, D', H', W', C). The ReLUs work in place: no backward needs the linear or convolution
        # outputs they overwrite (ReLU's own reads its result), and a fresh buffer per ReLU costs its page faults.
        x = F.relu(self.linear1(hidden_states), inplace=True)
        x = F.relu(self.conv(x.permute(0, 4, 1, 2, 3)), inplace=True).permute(0, 2, 3, 4, 1)
        return F.relu(self.linear2(x), inplace=True) + hidden_states


def relative_position_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """`(window, window, head_dim)` table `R[i, j] = table'[i - j + window - 1]`, `table'` linearly resized to
    `2 * window - 1` rows (SAM's `get_rel_pos` for equal query and key sizes)."""
    length = 2 * window - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None], size=length, mode="linear", align_corners=False)[0].t()
    coords = torch.arange(window, device=table.device)
    return table[coords[:, None] - coords[None, :] + window - 1]


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention: `softmax(q kᵀ * scaling + attention_mask) v`; returns the output `(B, N, heads, head_dim)` and
    the weights `(B, heads, N, N)` (transformers' attention-interface contract)."""
    weights = (query @ key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


class Sam3DWindowAttention(nn.Module):
    """Multi-head attention inside 3D windows with decomposed relative positions along depth, height and width.

    Two computations of the same logits `q·k * scale + rel_pos_scale * (q·Rd + q·Rh + q·Rw) + mask`:
    - `"eager"` writes them out as the official code does: the relative-position terms are expanded into a dense
      `(windows, heads, N, N)` bias, the mask is added to it, and the sum goes to the softmax (the reference, and the
      only implementation that returns attention weights);
    - every other implementation (`"sdpa"`, the default) gets the terms inside the dot product. A term
      `q_i·R_axis[c_i, c_j]` depends on the key only through its window coordinate `c_j` along that axis, so the query
      is extended by its terms against every coordinate (`wd + wh + ww` values) and the key by the one-hot of its
      coordinates: `q'·k'` is the logit, and no `N x N` tensor is built but the mask shared by every block.
    """

    def __init__(self, config: Sam3DVisionConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        rows = config.rel_pos_size(layer_index)
        self.rel_pos_d = nn.Parameter(torch.zeros(rows, self.head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(rows, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(rows, self.head_dim))
        # The official per-block scale `lr` of the relative-position terms: 1.0 and frozen when trained here, but an
        # imported checkpoint's stored value is used as it is, so it is state, not a hyper-parameter.
        self.register_buffer("rel_pos_scale", torch.ones(()))
        self.is_causal = False  # transformers' SDPA wrapper assumes causal attention unless told otherwise

    def relative_position_terms(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`rel_pos_scale * q·R_axis[c, k]` for every window coordinate `k` of each axis: three tensors
        `(windows, heads, wd, wh, ww, w_axis)` from the unscaled `query (windows, heads, N, head_dim)`."""
        window = self.config.window_size
        q = query.reshape(*query.shape[:2], *window, self.head_dim)
        # The scale goes on the small tables, not on the query: no pass over the block's largest input.
        scale = self.rel_pos_scale.to(q.dtype)
        tables = [
            relative_position_table(table, size).to(q.dtype) * scale
            for table, size in zip((self.rel_pos_d, self.rel_pos_h, self.rel_pos_w), window, strict=True)
        ]
        return (
            torch.einsum("bndhwc,dkc->bndhwk", q, tables[0]),
            torch.einsum("bndhwc,hkc->bndhwk", q, tables[1]),
            torch.einsum("bndhwc,wkc->bndhwk", q, tables[2]),
        )

    def relative_position_bias(self, query: torch.Tensor, window_mask: torch.Tensor | None) -> torch.Tensor:
        """`rel_pos_scale * (q·Rd + q·Rh + q·Rw) + window_mask` of shape `(windows, heads, N, N)` from the unscaled
        `query (windows, heads, N, head_dim)`, `N = wd * wh * ww`; `window_mask (windows, N, N)` or `None`."""
        bias_d, bias_h, bias_w = self.relative_position_terms(query)
        bias = bias_d[..., :, None, None] + bias_h[..., None, :, None]  # (windows, heads, wd, wh, ww, wd', wh', 1)
        bias = (bias + bias_w[..., None, None, :]).reshape(*query.shape[:3], -1)  # (windows, heads, N, N)
        if window_mask is not None:
            bias += window_mask[:, None].to(bias.dtype)  # in place: the sum's backward does not need its output
        return bias

    def forward(
        self,
        windows: torch.Tensor,
        window_mask: torch.Tensor | None,
        output_attentions: bool = False,
        key_coordinates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`windows (B*nW, N, C)`; `window_mask (nW, N, N)` additive (shift and padding), shared by every image;
        `key_coordinates (N, wd + wh + ww)` from [`window_key_coordinates`] (built here when not given).

        Returns the output `(B*nW, N, C)` and, with the eager implementation, the attention weights
        `(B*nW, heads, N, N)` (`None` otherwise)."""
        if self.config._attn_implementation == "eager":
            return self.dense_forward(windows, window_mask, output_attentions)
        if key_coordinates is None:
            key_coordinates = window_key_coordinates(self.config.window_size, windows.device)
        return self.folded_forward(windows, window_mask, key_coordinates, output_attentions), None

    def dense_forward(
        self, windows: torch.Tensor, window_mask: torch.Tensor | None, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eager attention with the dense bias. Windows are processed in chunks (`attention_chunk_size`) to bound the
        memory of that bias and of the weights, which are kept only when requested. Requested weights come from one
        call over all windows, so they are the very tensor the output is computed from (gradients reach them)."""
        num_windows, tokens, channels = windows.shape
        chunk_size = num_windows if output_attentions else self.config.attention_chunk_size
        outputs = []
        for start in range(0, num_windows, chunk_size):
            chunk = windows[start : start + chunk_size]
            qkv = self.qkv(chunk).reshape(chunk.shape[0], tokens, 3, self.num_heads, self.head_dim)
            query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (chunk, heads, N, head_dim)
            mask = None
            if window_mask is not None:
                mask = window_mask[torch.arange(start, start + chunk.shape[0], device=chunk.device) % len(window_mask)]
            bias = self.relative_position_bias(query, mask)
            out, attention_weights = eager_attention_forward(self, query, key, value, bias, self.scale)
            if not output_attentions:
                attention_weights = None  # dropped at once: at ViT-B/128³ all windows' weights are ~0.8 GB per block
            outputs.append(out.reshape(chunk.shape[0], tokens, channels))
        return self.proj(torch.cat(outputs)), attention_weights  # weights wanted: one chunk, so these are all

    def folded_forward(
        self,
        windows: torch.Tensor,
        window_mask: torch.Tensor | None,
        key_coordinates: torch.Tensor,
        output_attentions: bool,
    ) -> torch.Tensor:
        """The relative-position terms folded into `q'·k'` (see the class docstring), through the configured
        attention implementation, in chunks of windows (see [`rows_per_chunk`])."""
        num_windows, tokens, channels = windows.shape
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        chunk_size = rows_per_chunk(windows, 3 * tokens * channels)  # windows whose qkv fits in a chunk
        outputs = []
        for start in range(0, num_windows, chunk_size):
            chunk = windows[start : start + chunk_size]
            qkv = self.qkv(chunk).reshape(chunk.shape[0], tokens, 3, self.num_heads, self.head_dim)
            query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (chunk, heads, N, head_dim)
            terms = torch.cat([t.flatten(2, 4) for t in self.relative_position_terms(query)], dim=-1)
            query = torch.cat([query * self.scale, terms], dim=-1)  # (chunk, heads, N, head_dim + wd + wh + ww)
            key = torch.cat([key, key_coordinates.to(key.dtype).expand(*key.shape[:3], -1)], dim=-1)
            value = F.pad(value, (0, terms.shape[-1]))  # SDPA's CPU kernel needs q, k and v of one head size
            mask = None
            if window_mask is not None:
                index = torch.arange(start, start + chunk.shape[0], device=chunk.device) % len(window_mask)
                mask = window_mask[index][:, None].to(query.dtype)  # (chunk, 1, N, N): the same for every head
            # `output_attentions` goes to the implementation as in transformers' ViT: SDPA warns that it has no weights.
            out, _ = attention(
                self,
                query,
                key,
                value,
                attention_mask=mask,
                dropout=0.0,
                scaling=1.0,  # the scale is in the query
                is_causal=False,
                output_attentions=output_attentions,
            )
            out = out[..., : self.head_dim].reshape(chunk.shape[0], tokens, channels)  # (chunk, N, heads, hd) -> C
            outputs.append(self.proj(out))
        return torch.cat(outputs)


class Sam3DMLP(nn.Module):
    def __init__(self, config: Sam3DVisionConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.lin2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(hidden_states)))


def window_masks(
    grid: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int] | None, device
) -> torch.Tensor | None:
    """Additive `(nW, N, N)` mask for a `grid` zero-padded to whole windows and rolled by `-shift` (or not rolled):
    `-100` between tokens of different shift regions and for padded keys, 0 elsewhere; `None` if nothing is masked."""
    padded = [math.ceil(g / w) * w for g, w in zip(grid, window, strict=True)]
    if shift is None and list(grid) == padded:
        return None
    valid = torch.zeros(padded, device=device)
    valid[: grid[0], : grid[1], : grid[2]] = 1
    regions = torch.zeros(padded, device=device)
    if shift is not None:
        valid = torch.roll(valid, [-s for s in shift], dims=(0, 1, 2))
        for axis, (size, w, s) in enumerate(zip(padded, window, shift, strict=True)):
            label = torch.zeros(size, device=device)
            label[size - w : size - s] = 1
            label[size - s :] = 2
            regions = regions * 3 + label.reshape([-1 if a == axis else 1 for a in range(3)])
    region_windows = partition_windows(regions[None, ..., None], window).squeeze(-1)  # (nW, N)
    valid_windows = partition_windows(valid[None, ..., None], window).squeeze(-1)
    mask = torch.where(region_windows[:, :, None] != region_windows[:, None, :], MASKED_LOGIT, 0.0)
    return mask + torch.where(valid_windows[:, None, :] > 0, 0.0, MASKED_LOGIT)


def window_key_coordinates(window: tuple[int, int, int], device) -> torch.Tensor:
    """`(N, wd + wh + ww)`: for each token of a window (raster order), the one-hot of its coordinate along each axis."""
    tokens = torch.arange(math.prod(window), device=device)
    _, wh, ww = window
    coordinates = (tokens // (wh * ww), tokens // ww % wh, tokens % ww)
    return torch.cat([F.one_hot(c, size) for c, size in zip(coordinates, window, strict=True)], dim=-1).float()


def partition_windows(hidden_states: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """`(B, D, H, W, C)` with sizes multiple of `window` -> `(B * nW, wd * wh * ww, C)`."""
    batch, depth, height, width, channels = hidden_states.shape
    wd, wh, ww = window
    x = hidden_states.reshape(batch, depth // wd, wd, height // wh, wh, width // ww, ww, channels)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, channels)


def merge_windows(windows: torch.Tensor, window: tuple[int, int, int], grid: list[int]) -> torch.Tensor:
    """Inverse of [`partition_windows`]: `(B * nW, N, C)` -> `(B, D, H, W, C)` for the padded `grid`."""
    wd, wh, ww = window
    depth, height, width = grid
    channels = windows.shape[-1]
    x = windows.reshape(-1, depth // wd, height // wh, width // ww, wd, wh, ww, channels)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, depth, height, width, channels)


@dataclass
class Sam3DWindowPartition:
    """How the blocks of one kind (shifted or not) cut a token grid into windows: the same for all of them, so the
    encoder builds it once per forward (see [`Sam3DWindowPartition.build`]).

    Args:
        padded (`tuple[int, int, int]`): the grid zero-padded to whole windows.
        gather (`torch.LongTensor` of shape `(nW * N,)`): the padded-grid row of every window token, windows in raster
            order of the rolled grid: roll and partition are one gather.
        scatter (`torch.LongTensor` of shape `(D' * H' * W',)`): the window row of every token of the grid: merge,
            roll back and crop are one gather.
        mask (`torch.FloatTensor` of shape `(nW, N, N)`, *optional*): [`window_masks`] (`None`: nothing masked).
        key_coordinates (`torch.FloatTensor` of shape `(N, wd + wh + ww)`): [`window_key_coordinates`].
    """

    padded: tuple[int, int, int]
    gather: torch.Tensor
    scatter: torch.Tensor
    mask: torch.Tensor | None
    key_coordinates: torch.Tensor

    @classmethod
    def build(
        cls,
        grid: tuple[int, int, int],
        window: tuple[int, int, int],
        shift: tuple[int, int, int] | None,
        device: torch.device,
    ) -> "Sam3DWindowPartition":
        padded = tuple(math.ceil(g / w) * w for g, w in zip(grid, window, strict=True))
        rows = torch.arange(math.prod(padded), device=device).reshape(padded)
        if shift is not None:
            rows = torch.roll(rows, [-s for s in shift], dims=(0, 1, 2))  # exactly what the roll does to the tokens
        gather = partition_windows(rows[None, ..., None], window).flatten()
        inverse = torch.empty_like(gather)
        inverse[gather] = torch.arange(len(gather), device=device)
        scatter = inverse.reshape(padded)[: grid[0], : grid[1], : grid[2]].flatten()
        mask = window_masks(grid, window, shift, device)
        return cls(padded, gather, scatter, mask, window_key_coordinates(window, device))


class Sam3DVisionLayer(GradientCheckpointingLayer):
    """Adapter, then (shifted) 3D window attention and MLP, each with a residual."""

    def __init__(self, config: Sam3DVisionConfig, layer_index: int):
        super().__init__()
        self.window = config.window_size
        self.shift = config.shift_size if layer_index % 2 == 0 and any(config.shift_size) else None
        self.adapter = Sam3DSpatialAdapter(config) if config.has_adapter(layer_index) else None
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Sam3DWindowAttention(config, layer_index)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Sam3DMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        partition: Sam3DWindowPartition | None = None,
        output_attentions: bool = False,
    ) -> torch.Tensor:
        """`hidden_states (B, D', H', W', C)`; `partition` for this block's shift (built here when not given; the
        eager implementation builds its own masks and windows, as the official code does)."""
        if self.adapter is not None:
            hidden_states = self.adapter(hidden_states)
        if self.attn.config._attn_implementation == "eager":
            hidden_states = hidden_states + self.plain_attention(hidden_states, output_attentions)
            return hidden_states + self.mlp(self.layer_norm2(hidden_states))
        if partition is None:
            partition = Sam3DWindowPartition.build(
                tuple(hidden_states.shape[1:4]), self.window, self.shift, hidden_states.device
            )
        # Residuals added in place into the branch outputs (fresh tensors whose backward does not read them).
        hidden_states = self.window_attention(hidden_states, partition, output_attentions).add_(hidden_states)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B * D' * H' * W', C)
        chunks = rows.split(rows_per_chunk(rows, self.mlp.lin1.out_features))
        return torch.cat([self.mlp(self.layer_norm2(x)).add_(x) for x in chunks]).reshape(hidden_states.shape)

    def plain_attention(self, hidden_states: torch.Tensor, output_attentions: bool) -> torch.Tensor:
        """The attention branch step by step as the official code runs it: pad, roll, partition, masks, attention,
        merge, roll back, crop."""
        depth, height, width = hidden_states.shape[1:4]
        x = self.layer_norm1(hidden_states)
        padded = [math.ceil(s / w) * w for s, w in zip((depth, height, width), self.window, strict=True)]
        x = F.pad(x, (0, 0, 0, padded[2] - width, 0, padded[1] - height, 0, padded[0] - depth))
        if self.shift is not None:
            x = torch.roll(x, [-s for s in self.shift], dims=(1, 2, 3))
        mask = window_masks((depth, height, width), self.window, self.shift, x.device)
        x, _ = self.attn(partition_windows(x, self.window), mask, output_attentions)
        x = merge_windows(x, self.window, padded)
        if self.shift is not None:
            x = torch.roll(x, list(self.shift), dims=(1, 2, 3))
        return x[:, :depth, :height, :width]

    def window_attention(
        self, hidden_states: torch.Tensor, partition: Sam3DWindowPartition, output_attentions: bool
    ) -> torch.Tensor:
        """The same branch with the windows cut and put back by one gather each (see [`Sam3DWindowPartition`])."""
        batch, depth, height, width, channels = hidden_states.shape
        x = self.layer_norm1(hidden_states)
        pad_d, pad_h, pad_w = (p - s for p, s in zip(partition.padded, (depth, height, width), strict=True))
        if pad_d or pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h, 0, pad_d))
        windows = x.reshape(batch, -1, channels).index_select(1, partition.gather)  # (B, nW * N, C)
        tokens = math.prod(self.window)
        x, _ = self.attn(
            windows.reshape(-1, tokens, channels), partition.mask, output_attentions, partition.key_coordinates
        )
        return x.reshape(batch, -1, channels).index_select(1, partition.scatter).reshape(hidden_states.shape)


class Sam3DLayerNorm(nn.Module):
    """LayerNorm over the channels of a `(B, C, D, H, W)` map (biased variance, per voxel)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm on the channels-last view: one pass, and only its input and statistics are kept for backward
        # (written out as mean, variance, division, it kept seven full-size temporaries: ~1 GB at ViT-B/128³ training).
        normalised = F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return normalised.permute(0, 4, 1, 2, 3)


class Sam3DNeck(nn.Module):
    """Tokens `(B, D', H', W', C)` -> level map `(B, 256, D', H', W')`."""

    def __init__(self, config: Sam3DVisionConfig):
        super().__init__()
        self.conv1 = nn.Conv3d(config.hidden_size, config.output_channels, 1, bias=False)
        self.layer_norm1 = Sam3DLayerNorm(config.output_channels, config.layer_norm_eps)
        self.conv2 = nn.Conv3d(config.output_channels, config.output_channels, 3, padding=1, bias=False)
        self.layer_norm2 = Sam3DLayerNorm(config.output_channels, config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm1(self.conv1(hidden_states.permute(0, 4, 1, 2, 3)))
        return self.layer_norm2(self.conv2(x))


# The files of the paper's spatial adapters (sam3d_hf.peft_sam3d), named here so that a model folder can be told apart.
PEFT_TYPE = "SAM3D_SPATIAL_ADAPTER"
ADAPTER_CONFIG_NAME = "adapter_config.json"


def _sam3d_adapter_config(folder: Path) -> dict | None:
    """The Sam3D spatial adapter config in `folder`, or `None` (none there, or not ours to judge)."""
    try:
        values = json.loads((folder / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) and values.get("peft_type") == PEFT_TYPE else None


def check_not_an_adapter_folder(name_or_path: str | os.PathLike | None, subfolder: str = "") -> None:
    """`ValueError` if the local folder `name_or_path` holds a Sam3D spatial adapter's `adapter_config.json`:
    transformers' `from_pretrained` reads such a folder as a peft adapter, and peft does not know this scheme."""
    if name_or_path is None:
        return
    folder = Path(name_or_path, subfolder)
    values = _sam3d_adapter_config(folder)
    if values is None:
        return
    if (folder / "config.json").is_file():
        raise ValueError(
            f"{os.fspath(folder)!r} holds a model and a Sam3D adapter ({ADAPTER_CONFIG_NAME}): transformers reads a "
            "folder with an adapter_config.json as a peft adapter, so the model cannot be loaded from it. Move "
            f"{ADAPTER_CONFIG_NAME} and adapter_model.safetensors into a subfolder (e.g. "
            f"{os.fspath(folder / 'adapter')!r}) and load them with Sam3DAdapterModel.from_pretrained(model, subfolder)"
        )
    base = values.get("base_model_name_or_path")
    raise ValueError(
        f"{os.fspath(folder)!r} holds a Sam3D adapter, not a model: load its base model"
        + (f" ({base!r})" if base else "")
        + f", then the adapter with Sam3DAdapterModel.from_pretrained(base, {os.fspath(folder)!r})"
    )


def _damaged_safetensors(name_or_path: str | os.PathLike | None, subfolder: str = "") -> Path | None:
    """The first `*.safetensors` file of a local model folder that safetensors cannot open (None if all open, or if
    `name_or_path` is not a local folder)."""
    folder = Path(name_or_path or "") / subfolder
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError:
            return path
    return None


class Sam3DPreTrainedModel(PreTrainedModel):
    config_class = Sam3DConfig
    config: Sam3DConfig
    base_model_prefix = "sam3d"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["Sam3DVisionLayer"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # transformers' output capturing: `output_hidden_states` records every encoder block's tokens (and the input of
    # the first), `output_attentions` every block's window attention weights (eager only: SDPA returns none).
    _can_record_outputs = {
        "hidden_states": Sam3DVisionLayer,
        "attentions": OutputRecorder(Sam3DWindowAttention, index=1),
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, after refusing a folder that holds a Sam3D adapter (which transformers
        would hand to peft): see [`check_not_an_adapter_folder`]."""
        adapter_path = (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path")  # set by AutoModel
        for name in dict.fromkeys([pretrained_model_name_or_path, adapter_path]):
            check_not_an_adapter_folder(name, kwargs.get("subfolder", ""))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:  # a truncated or foreign file: safetensors' message names no file
            where = _damaged_safetensors(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
            raise OSError(
                f"could not read the weights of {os.fspath(pretrained_model_name_or_path)!r}: "
                f"{os.fspath(where) + ' is' if where else 'a weights file is'} damaged or incomplete ({error}); "
                "save or download the model again"
            ) from None

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """transformers' `save_pretrained`, after refusing a folder that holds a Sam3D adapter: the model could not be
        loaded from it (see [`check_not_an_adapter_folder`]). Nothing is written then."""
        if _sam3d_adapter_config(Path(save_directory)) is not None:
            raise ValueError(
                f"{os.fspath(save_directory)!r} holds a Sam3D adapter ({ADAPTER_CONFIG_NAME}): a model saved there "
                "could not be loaded, because transformers reads a folder with an adapter_config.json as a peft "
                "adapter. Save the model in a folder of its own (and the adapter in a subfolder of it, e.g. "
                f"{os.fspath(Path(save_directory, 'adapter'))!r}). Nothing was written."
            )
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Sam3DPatchEmbeddings):
            # The official depth filter is a default-initialised Conv3d (fan-in 16): U(-1/4, 1/4) for taps and bias.
            bound = 1 / math.sqrt(module.depth_weight.shape[1])
            init.normal_(module.projection_weight, std=std)
            init.zeros_(module.projection_bias)
            init.uniform_(module.depth_weight, -bound, bound)
            init.uniform_(module.depth_bias, -bound, bound)
        elif isinstance(module, Sam3DVisionEncoder):
            init.trunc_normal_(module.pos_embed, std=std)
            init.zeros_(module.depth_embed)  # the paper's choice (the official code used ones)
        elif isinstance(module, Sam3DWindowAttention):
            init.zeros_(module.rel_pos_d)
            init.zeros_(module.rel_pos_h)
            init.zeros_(module.rel_pos_w)
            init.ones_(module.rel_pos_scale)
        elif isinstance(module, Sam3DLayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, Sam3DPromptEncoderLayer):
            init.normal_(module.global_query, std=std)
        elif isinstance(module, Sam3DMaskPromptEmbedding):
            init.zeros_(module.weight)  # a new input changes nothing until trained


class Sam3DVisionEncoder(Sam3DPreTrainedModel):
    """`pixel_values (B, 1, D, H, W)` -> four level maps `(B, 256, D/4, H/4, W/4)`.

    A sub-model holding its sub-config (as `SamVisionEncoder`), like the prompt encoder and the mask decoder, so that
    `set_attn_implementation` finds the model of every sub-config."""

    config_class = Sam3DVisionConfig
    config: Sam3DVisionConfig

    def __init__(self, config: Sam3DVisionConfig):
        super().__init__(config)
        self.patch_embed = Sam3DPatchEmbeddings(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.pos_embed_size, config.pos_embed_size, config.hidden_size))
        self.depth_embed = nn.Parameter(torch.zeros(1, config.depth_embed_size, config.hidden_size))
        self.layers = nn.ModuleList([Sam3DVisionLayer(config, i) for i in range(config.num_hidden_layers)])
        self.necks = nn.ModuleList([Sam3DNeck(config) for _ in config.feature_indexes])
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def position_embeddings(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """`(1, D', H', W', C)`: SAM's in-plane table resized to `(H', W')` plus the depth table resized to `D'`."""
        depth, height, width = grid
        plane = self.pos_embed.permute(0, 3, 1, 2)  # (1, C, 64, 64)
        if height <= plane.shape[2] and width <= plane.shape[3]:
            # Area averaging: exactly the official 2x2 average pooling at a 32x32 grid.
            plane = F.adaptive_avg_pool2d(plane, (height, width))
        else:
            plane = F.interpolate(plane, size=(height, width), mode="bicubic", align_corners=False)
        column = self.depth_embed.permute(0, 2, 1)  # (1, C, 32)
        if depth != column.shape[2]:
            column = F.interpolate(column, size=depth, mode="linear", align_corners=False)
        return plane.permute(0, 2, 3, 1)[:, None] + column.permute(0, 2, 1)[:, :, None, None]

    def forward(
        self, pixel_values: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Returns the last block's tokens `(B, D', H', W', C)` and the four level maps."""
        hidden_states = self.patch_embed(pixel_values)  # (B, D', H', W', C)
        hidden_states = hidden_states + self.position_embeddings(tuple(hidden_states.shape[1:4]))
        grid = tuple(hidden_states.shape[1:4])
        partitions = {}  # by shift: what every block of one kind shares
        levels = []
        for index, layer in enumerate(self.layers):
            partition = None
            if self.config._attn_implementation != "eager":  # eager builds its masks per block, as the official code
                if layer.shift not in partitions:
                    partitions[layer.shift] = Sam3DWindowPartition.build(
                        grid, layer.window, layer.shift, hidden_states.device
                    )
                partition = partitions[layer.shift]
            hidden_states = layer(hidden_states, partition, output_attentions)
            if index in self.config.feature_indexes:
                levels.append(self.necks[len(levels)](hidden_states))
        return hidden_states, tuple(levels)


class Sam3DAttention(nn.Module):
    """Multi-head attention with q/k/v projected to `hidden_size / downsample_rate` channels (SAM's `Attention`)."""

    def __init__(self, config: Sam3DPromptEncoderConfig, downsample_rate: int = 1):
        super().__init__()
        self.config = config
        inner = config.hidden_size // downsample_rate
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, inner)
        self.k_proj = nn.Linear(config.hidden_size, inner)
        self.v_proj = nn.Linear(config.hidden_size, inner)
        self.out_proj = nn.Linear(inner, config.hidden_size)
        self.is_causal = False

    def forward(self, query, key, value, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`query (B, Nq, C)`, `key`/`value (B, Nk, C)`; `key_padding_mask (B, Nk)` is True for keys to ignore."""
        batch = query.shape[0]

        def heads(x):  # (B, N, inner) -> (B, heads, N, inner / heads)
            return x.reshape(batch, x.shape[1], self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        mask = None
        if key_padding_mask is not None:
            mask = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        scaling = q.shape[-1] ** -0.5
        out, _ = attention(self, q, k, v, attention_mask=mask, dropout=0.0, scaling=scaling, is_causal=False)
        return self.out_proj(out.reshape(batch, query.shape[1], -1))


class Sam3DPromptEncoderMLP(nn.Module):
    def __init__(self, config: Sam3DPromptEncoderConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.lin2 = nn.Linear(config.mlp_dim, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class Sam3DPromptEncoderLayer(nn.Module):
    """Global queries and point embeddings attend to each other; then image tokens attend to the queries."""

    def __init__(self, config: Sam3DPromptEncoderConfig):
        super().__init__()
        self.global_query = nn.Parameter(torch.zeros(1, config.num_global_queries, config.hidden_size))
        self.self_attn = Sam3DAttention(config)
        self.cross_attn_image_to_token = Sam3DAttention(config, config.attention_downsample_rate)
        self.mlp = Sam3DPromptEncoderMLP(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layer_norm3 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layer_norm4 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, image_tokens, point_embeddings, padding_mask):
        """`image_tokens (B, L, C)`, `point_embeddings (B, N, C)`, `padding_mask (B, N)` True for padding points."""
        batch, num_queries = image_tokens.shape[0], self.global_query.shape[1]
        tokens = torch.cat([self.global_query.expand(batch, -1, -1), point_embeddings], dim=1)  # (B, 10 + N, C)
        key_mask = F.pad(padding_mask, (num_queries, 0), value=False)
        attended = self.self_attn(tokens, tokens, tokens, key_padding_mask=key_mask)
        tokens = self.layer_norm2(tokens + self.layer_norm1(attended))
        queries, point_embeddings = tokens[:, :num_queries], tokens[:, num_queries:]
        queries = self.layer_norm3(queries + self.mlp(queries))
        image_tokens = self.layer_norm4(image_tokens + self.cross_attn_image_to_token(image_tokens, queries, queries))
        return image_tokens, point_embeddings


class Sam3DPromptEncoder(Sam3DPreTrainedModel):
    """Samples the last level at the clicks and refines it with learned global queries: `(B, 256, D', H', W')` in,
    same shape out."""

    config_class = Sam3DPromptEncoderConfig
    config: Sam3DPromptEncoderConfig

    def __init__(self, config: Sam3DPromptEncoderConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([Sam3DPromptEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        # Extension (off by default, absent from the official model): positive/negative click embeddings.
        self.label_embed = nn.Embedding(2, config.hidden_size) if config.use_point_labels else None
        self.post_init()

    def forward(self, feature_map, input_points, input_labels, patch_size) -> torch.Tensor:
        """`input_points (B, N, 3)` patch voxels `(z, y, x)`; `input_labels (B, N)` with -1 for padding points;
        `patch_size` the input patch's `(D, H, W)`."""
        batch, channels, depth, height, width = feature_map.shape
        size = torch.tensor(patch_size, dtype=feature_map.dtype, device=feature_map.device)
        # Voxel centres of the input patch -> grid_sample's [-1, 1] (align_corners=False); last axis to (x, y, z).
        grid = ((input_points.to(feature_map.dtype) + 0.5) * 2 / size - 1).flip(-1)
        sampled = F.grid_sample(feature_map, grid[:, None, None], mode="bilinear", align_corners=False)
        point_embeddings = sampled[:, :, 0, 0].transpose(1, 2)  # (B, N, C)
        padding_mask = input_labels < 0
        if self.label_embed is not None:
            point_embeddings = point_embeddings + self.label_embed(input_labels.clamp(min=0))
        image_tokens = feature_map.flatten(2).transpose(1, 2)  # (B, D'H'W', C)
        for layer in self.layers:
            image_tokens, point_embeddings = layer(image_tokens, point_embeddings, padding_mask)
        return image_tokens.transpose(1, 2).reshape(batch, channels, depth, height, width)


def conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3x3 convolution, instance norm, ReLU (the official `Conv3d, InstanceNorm3d, ReLU` triple)."""
    return [nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False), nn.InstanceNorm3d(out_channels), nn.ReLU()]


class Sam3DMaskPromptEmbedding(nn.Conv3d):
    """The previous prediction and the clicks as a local prompt of the decoder: three maps on the fused convolution's
    grid (`D / 2`) -- the previous foreground probabilities `(B, 1, D, H, W)` in patch voxels resized there (trilinear,
    as the image channel), and a Gaussian of `click_sigma` patch voxels around each positive and each negative click
    (the largest over the clicks of each kind) -- through a 3x3x3 convolution into its channels. The prompt encoder's
    clicks act on the whole token grid; these maps let a correction act where it is placed (as nnInteractive and
    SAM-Med3D feed clicks and the previous mask as maps). Zero at initialisation, so the decoder computes what it
    computed without it."""

    def __init__(self, hidden_size: int, click_sigma: float):
        super().__init__(3, hidden_size, 3, padding=1, bias=False)
        self.click_sigma = click_sigma
        init.zeros_(self.weight)

    def click_maps(self, input_points, input_labels, size: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
        """`(B, 2, *size)`: the positive and the negative clicks' Gaussians at the grid voxels' centres (a grid voxel
        `g` lies at patch voxel `(g + 0.5) * patch / size - 0.5`); padding clicks (-1) draw nothing."""
        squared = 0
        for axis, (grid, patch) in enumerate(zip(size, patch_size, strict=True)):
            centres = (torch.arange(grid, device=input_points.device, dtype=self.weight.dtype) + 0.5) * patch / grid
            offset = (centres - 0.5)[None, None] - input_points[..., axis, None].to(self.weight.dtype)  # (B, N, grid)
            shape = [*offset.shape[:2], 1, 1, 1]
            shape[2 + axis] = grid
            squared = squared + offset.square().reshape(shape)
        gaussians = torch.exp(-squared / (2 * self.click_sigma**2))  # (B, N, *size)
        maps = [(gaussians * (input_labels == kind)[..., None, None, None]).amax(1) for kind in (1, 0)]
        return torch.stack(maps, dim=1)

    def forward(self, size, patch_size, input_masks=None, input_points=None, input_labels=None) -> torch.Tensor:
        batch = (input_masks if input_masks is not None else input_points).shape[0]
        if input_masks is None:
            mask = torch.zeros(batch, 1, *size, device=self.weight.device, dtype=self.weight.dtype)
        else:
            masks = input_masks.to(self.weight.dtype)
            mask = F.interpolate(masks, size=tuple(size), mode="trilinear", align_corners=False)
        if input_points is None:
            clicks = torch.zeros(batch, 2, *size, device=self.weight.device, dtype=self.weight.dtype)
        else:
            clicks = self.click_maps(input_points, input_labels, size, patch_size)
        return super().forward(torch.cat([mask, clicks], dim=1))


class Sam3DMaskDecoder(Sam3DPreTrainedModel):
    """Multi-level aggregation: four level heads at `D/2`, fused with the image channel, to 2-class logits at `D`.

    The fused convolution is linear in its input channels, so it is split into a prompt-independent part (levels
    0-2 and the image, [`Sam3DImageEmbeddings.decoder_context`]) and the part of the prompt-refined level 3.
    """

    config_class = Sam3DMaskDecoderConfig
    config: Sam3DMaskDecoderConfig

    def __init__(self, config: Sam3DMaskDecoderConfig, input_channels: int, upsampling: int = 2):
        super().__init__(config)
        self.upsampling = upsampling  # the final upsampling: token_stride / 2 (the levels are upsampled x2 first)
        hidden = config.hidden_size
        self.heads = nn.ModuleList(
            [nn.Sequential(*conv_block(input_channels, hidden), *conv_block(hidden, hidden)) for _ in range(4)]
        )
        self.fuse = nn.Sequential(
            *conv_block(4 * hidden + 1, hidden), nn.Conv3d(hidden, config.num_labels, 3, padding=1, bias=False)
        )
        self.mask_prompt = Sam3DMaskPromptEmbedding(hidden, config.click_sigma) if config.use_mask_prompt else None
        self.post_init()

    def level(self, index: int, feature_map: torch.Tensor) -> torch.Tensor:
        """Level head `index`: `(B, 256, D', H', W')` -> `(B, 128, 2D', 2H', 2W')`."""
        return F.interpolate(self.heads[index](feature_map), scale_factor=2, mode="trilinear", align_corners=True)

    def context(self, feature_maps: tuple[torch.Tensor, ...], pixel_values: torch.Tensor) -> torch.Tensor:
        """The prompt-independent share of the fused convolution: levels 0-2 and the image channel."""
        hidden = self.heads[0][0].out_channels
        static = [self.level(k, feature_maps[k]) for k in range(3)]
        size = static[0].shape[2:]
        image = F.interpolate(pixel_values, size=size, mode="trilinear", align_corners=False)
        weight = self.fuse[0].weight
        weight = torch.cat([weight[:, : 3 * hidden], weight[:, 4 * hidden :]], dim=1)
        return F.conv3d(torch.cat([*static, image], dim=1), weight, padding=1)

    def forward(
        self,
        context: torch.Tensor,
        prompted_level: torch.Tensor,
        input_masks: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`context (B, 128, 2D', 2H', 2W')`, `prompted_level (B, 256, D', H', W')` (the token grid) and, with the
        mask prompt, `input_masks (B, 1, D, H, W)` (previous foreground probabilities) and the clicks
        (`(B, N, 3)` patch voxels, `(B, N)` labels) -> logits `(B, 2, D, H, W)`, `D = D' * token_stride`."""
        hidden = self.heads[0][0].out_channels
        weight = self.fuse[0].weight[:, 3 * hidden : 4 * hidden]
        x = context + F.conv3d(self.level(3, prompted_level), weight, padding=1)
        if self.mask_prompt is not None and (input_masks is not None or input_points is not None):
            patch_size = [self.upsampling * 2 * s for s in prompted_level.shape[2:]]
            x = x + self.mask_prompt(x.shape[2:], patch_size, input_masks, input_points, input_labels)
        x = self.fuse[3](self.fuse[2](self.fuse[1](x)))
        return F.interpolate(x, scale_factor=self.upsampling, mode="trilinear", align_corners=True)


def check_pixel_values(pixel_values, config: Sam3DVisionConfig, check_values: bool = True) -> None:
    """Validate `pixel_values (batch, channels, D, H, W)`: type, shape, sizes multiple of the token stride, and (with
    `check_values`) finiteness."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor (B, 1, D, H, W), got {type(pixel_values).__name__}")
    channels = config.num_channels
    if pixel_values.ndim != 5 or pixel_values.shape[1] != channels:
        raise ValueError(
            f"pixel_values must have shape (batch, {channels}, depth, height, width), got "
            f"{tuple(pixel_values.shape)}; add the channel axis with pixel_values[:, None] for (B, D, H, W) volumes"
        )
    stride = config.token_stride
    bad = [name for name, s in zip("DHW", pixel_values.shape[2:], strict=True) if s % stride or s == 0]
    if bad:
        raise ValueError(
            f"pixel_values spatial size {tuple(pixel_values.shape[2:])} must be positive multiples of {stride} "
            f"(the token stride) along every axis; {', '.join(bad)} is not. Crop or pad the patch."
        )
    if check_values and pixel_values.is_floating_point() and not torch.isfinite(pixel_values).all():
        nan, inf = int(torch.isnan(pixel_values).sum()), int(torch.isinf(pixel_values).sum())
        raise ValueError(
            f"pixel_values holds {nan} NaN and {inf} infinite values; the model needs finite intensities. Fill or "
            "mask them before normalisation (e.g. torch.nan_to_num with the background intensity)."
        )


def check_keyword_arguments(kwargs: dict, accepted: tuple[str, ...], method: str) -> None:
    """`TypeError` for keyword arguments outside `accepted` (typos such as `input_label=` must not pass silently)."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"{method} got unexpected keyword arguments {unknown}; it accepts only {list(accepted)}")


class Sam3DVisionModel(Sam3DPreTrainedModel):
    """The 3D image encoder alone (patch embedding, adapted ViT blocks, the four necks), for users who want the 3D
    features without prompts, as `SamVisionModel` stands beside `SamModel`. Its weights are the `vision_encoder.*`
    entries of a [`Sam3DForPromptableSegmentation`] checkpoint.

    Example:
    ```python
    >>> import torch
    >>> from sam3d_hf import Sam3DVisionConfig, Sam3DVisionModel
    >>> config = Sam3DVisionConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, mlp_dim=96,
    ...     global_attn_indexes=[1, 3], adapter_dim=16, output_channels=32, image_size=32)
    >>> model = Sam3DVisionModel(config).eval()
    >>> outputs = model(torch.randn(1, 1, 32, 32, 32))  # (batch, channel, depth, height, width)
    >>> outputs.last_hidden_state.shape, outputs.feature_maps[3].shape
    (torch.Size([1, 8, 8, 8, 48]), torch.Size([1, 32, 8, 8, 8]))
    ```
    """

    config_class = Sam3DVisionConfig
    config: Sam3DVisionConfig

    def __init__(self, config: Sam3DVisionConfig):
        super().__init__(config)
        self.vision_encoder = Sam3DVisionEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_encoder.patch_embed

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[Sam3DOutputKwargs]) -> Sam3DVisionModelOutput:
        r"""Encode CT patches.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 1, D, H, W)`): normalised patches, sizes multiples of
                4; other dtypes (float64, integers) are cast to the model's dtype.
            kwargs: only transformers' `output_hidden_states`, `output_attentions` and `return_dict`.
        """
        check_keyword_arguments(kwargs, OUTPUT_FLAG_KEYS, f"{type(self).__name__}.forward")
        check_pixel_values(pixel_values, self.config, check_values=not torch.compiler.is_compiling())
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        last_hidden_state, feature_maps = self.vision_encoder(pixel_values.to(self.dtype), bool(output_attentions))
        return Sam3DVisionModelOutput(last_hidden_state=last_hidden_state, feature_maps=feature_maps)


class Sam3DForPromptableSegmentation(Sam3DPreTrainedModel):
    """3DSAM-adapter: a CT patch and a few clicks in, 2-class logits on the patch out.

    Input checks: [`validate_inputs`] runs at the start of `forward`. Its checks of values (NaN/inf, click labels and
    bounds, label values) need the data and are skipped while `torch.compile` traces the model (so that
    `fullgraph=True` compiles); call `model.validate_inputs(**inputs)` yourself before a compiled call if the inputs
    are untrusted.

    Example:
    ```python
    >>> import torch
    >>> from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation
    >>> config = Sam3DConfig(vision_config={"hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 2,
    ...     "mlp_dim": 96, "global_attn_indexes": [1, 3], "adapter_dim": 16, "output_channels": 32, "image_size": 32},
    ...     prompt_encoder_config={"hidden_size": 32, "num_attention_heads": 2, "mlp_dim": 64},
    ...     mask_decoder_config={"hidden_size": 16})
    >>> model = Sam3DForPromptableSegmentation(config).eval()
    >>> pixel_values = torch.randn(1, 1, 32, 32, 32)  # (batch, channel, depth, height, width)
    >>> points = torch.tensor([[[16.0, 10.0, 20.0]]])  # (batch, clicks, (z, y, x)) in patch voxels
    >>> model(pixel_values=pixel_values, input_points=points).logits.shape
    torch.Size([1, 2, 32, 32, 32])
    ```
    """

    def __init__(self, config: Sam3DConfig):
        super().__init__(config)
        self.vision_encoder = Sam3DVisionEncoder(config.vision_config)
        if config.use_prompt_encoder:
            self.prompt_encoder = Sam3DPromptEncoder(config.prompt_encoder_config)
        upsampling = config.vision_config.token_stride // 2
        self.mask_decoder = Sam3DMaskDecoder(
            config.mask_decoder_config, config.vision_config.output_channels, upsampling
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (as `SamModel`), so `enable_input_require_grads` works (peft with reentrant
        checkpointing needs gradients at its output)."""
        return self.vision_encoder.patch_embed

    @classmethod
    def from_sam_pretrained(
        cls, path_or_repo_id: str, config: Sam3DConfig | None = None, **kwargs
    ) -> "Sam3DForPromptableSegmentation":
        """Initialise from SAM 2D weights (a `segment_anything` `.pth` or a transformers `SamModel` folder / Hub id)
        the way the paper does; see `sam3d_hf.convert_sam3d.load_sam_checkpoint` for `kwargs` and the report."""
        from .convert_sam3d import load_sam_checkpoint

        model, _ = load_sam_checkpoint(path_or_repo_id, config=config, **kwargs)
        return model

    def get_image_embeddings(self, pixel_values: torch.Tensor) -> Sam3DImageEmbeddings:
        """Run the encoder (and the prompt-independent part of the decoder) once for a patch.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 1, D, H, W)`): normalised CT patches; other dtypes
                (float64, integers) are cast to the model's dtype.

        Returns:
            [`Sam3DImageEmbeddings`]: pass it to `forward(image_embeddings=...)` with any clicks.
        """
        check_pixel_values(pixel_values, self.config.vision_config, check_values=not torch.compiler.is_compiling())
        return self._image_embeddings(pixel_values, output_attentions=False)

    def _image_embeddings(self, pixel_values: torch.Tensor, output_attentions: bool) -> Sam3DImageEmbeddings:
        pixel_values = pixel_values.to(self.dtype)
        _, feature_maps = self.vision_encoder(pixel_values, output_attentions)
        context = self.mask_decoder.context(feature_maps, pixel_values)
        return Sam3DImageEmbeddings(feature_maps=feature_maps, decoder_context=context)

    @capture_outputs
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_points: torch.FloatTensor | None = None,
        input_labels: torch.LongTensor | None = None,
        image_embeddings: Sam3DImageEmbeddings | None = None,
        labels: torch.LongTensor | None = None,
        input_masks: torch.FloatTensor | None = None,
        **kwargs: Unpack[Sam3DSegmentationKwargs],
    ) -> Sam3DSegmentationOutput:
        r"""Segment the object the clicks point at.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 1, D, H, W)`, *optional*): normalised CT patches;
                every size a multiple of 4; other dtypes (float64, integers) are cast to the model's dtype; NaN/inf
                are refused. Give either this or `image_embeddings`.
            input_points (`torch.FloatTensor` of shape `(batch, num_points, 3)`): clicks as patch voxel coordinates
                `(z, y, x)` = `(depth, row, column)`, each in `[0, size - 1]`, finite. Required by a prompted model,
                refused by a prompt-free one (`config.use_prompt_encoder=False`), which segments without clicks.
            input_labels (`torch.LongTensor` of shape `(batch, num_points)`, *optional*): 1 positive, 0 negative,
                -1 padding (ignored entirely, so prompt sets of different lengths can share a batch). Defaults to all
                1. Every prompt set needs a positive click. Negative clicks need a model built with
                `prompt_encoder_config.use_point_labels=True` (the official model, and every conversion of it, cannot
                tell them from positive ones: they are refused with a `ValueError`).
            image_embeddings ([`Sam3DImageEmbeddings`], *optional*): from [`get_image_embeddings`]; skips the
                encoder. A batch of 1 is broadcast over the prompt batch (one patch, several prompt sets).
            labels (`torch.LongTensor` of shape `(batch, D, H, W)` or `(batch, 1, D, H, W)`, *optional*): 0/1 ground
                truth (integers or booleans; a float tensor only if every value is exactly 0 or 1); gives the DiceCE
                loss ([`segmentation_loss`]).
            input_masks (`torch.FloatTensor` of shape `(batch, 1, D, H, W)` or `(batch, D, H, W)`, *optional*): the
                previous prediction of each prompt set's patch as foreground probabilities in `[0, 1]`, patch voxels
                `(z, y, x)` like `pixel_values` (from logits: `logits.softmax(1)[:, 1:]`). Only for a model built with
                `mask_decoder_config.use_mask_prompt=True`; omitting it is the same as an empty (all-zero) mask.
            kwargs: exactly the geometry entries of a [`Sam3DProcessor`] output ([`PROCESSOR_GEOMETRY_KEYS`]), so
                that `model(**inputs)` works (not used here), and transformers' `output_hidden_states`,
                `output_attentions` and `return_dict`. Anything else is a `TypeError`.

        Returns:
            [`Sam3DSegmentationOutput`] (a tuple with `return_dict=False`).
        """
        self.validate_inputs(
            pixel_values=pixel_values,
            input_points=input_points,
            input_labels=input_labels,
            image_embeddings=image_embeddings,
            labels=labels,
            input_masks=input_masks,
            **kwargs,
        )
        if pixel_values is not None:
            output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
            image_embeddings = self._image_embeddings(pixel_values, bool(output_attentions))
        feature_maps, context = image_embeddings.feature_maps, image_embeddings.decoder_context
        level3 = feature_maps[3]
        if self.config.use_prompt_encoder:
            patch_size = tuple(self.mask_decoder.upsampling * s for s in context.shape[2:])
            if input_labels is None:
                input_labels = torch.ones(input_points.shape[:2], dtype=torch.long, device=input_points.device)
            batch = input_points.shape[0]
            if level3.shape[0] != batch:  # one patch, several prompt sets
                level3, context = level3.expand(batch, -1, -1, -1, -1), context.expand(batch, -1, -1, -1, -1)
            level3 = self.prompt_encoder(level3, input_points, input_labels.long(), patch_size)
        if input_masks is not None:
            input_masks = input_masks if input_masks.ndim == 5 else input_masks[:, None]
            if context.shape[0] != input_masks.shape[0]:  # one patch, one mask per prompt set
                context = context.expand(input_masks.shape[0], -1, -1, -1, -1)
                level3 = level3.expand(input_masks.shape[0], -1, -1, -1, -1)
        # the prompt-free model: level 3 unchanged, no clicks
        logits = self.mask_decoder(context, level3, input_masks, input_points, input_labels)
        loss = None if labels is None else self.segmentation_loss(logits, labels)
        return Sam3DSegmentationOutput(loss=loss, logits=logits, image_embeddings=image_embeddings)

    def validate_inputs(
        self,
        pixel_values: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        image_embeddings: Sam3DImageEmbeddings | None = None,
        labels: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
        **kwargs,
    ) -> None:
        """Check `forward`'s inputs; raise `TypeError`/`ValueError` saying what is wrong and how to fix it.

        Types, shapes and keyword names are always checked. The checks that read values (NaN/inf in `pixel_values`
        or clicks, click labels and bounds, 0/1 `labels`) are skipped while `torch.compile` traces (they would break
        `fullgraph=True`): call this method eagerly on untrusted inputs before a compiled call.
        """
        check_keyword_arguments(kwargs, PROCESSOR_GEOMETRY_KEYS + OUTPUT_FLAG_KEYS, f"{type(self).__name__}.forward")
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError(
                "Give exactly one of pixel_values (B, 1, D, H, W) or image_embeddings (from get_image_embeddings), "
                f"got {'both' if pixel_values is not None else 'neither'}"
            )
        check_values = not torch.compiler.is_compiling()
        if pixel_values is not None:
            check_pixel_values(pixel_values, self.config.vision_config, check_values=check_values)
            image_batch, patch_size = pixel_values.shape[0], tuple(pixel_values.shape[2:])
        elif not isinstance(image_embeddings, Sam3DImageEmbeddings):
            raise TypeError(
                "image_embeddings must be the Sam3DImageEmbeddings returned by get_image_embeddings, got "
                f"{type(image_embeddings).__name__}"
            )
        else:
            context = image_embeddings.decoder_context
            image_batch = context.shape[0]
            patch_size = tuple(self.config.vision_config.token_stride // 2 * s for s in context.shape[2:])
        if not self.config.use_prompt_encoder:
            if input_points is not None or input_labels is not None:
                raise ValueError(
                    "this model is prompt-free (config.use_prompt_encoder=False, the paper's automatic model): it "
                    "takes no clicks; drop input_points/input_labels (Sam3DPredictor.predict_automatic segments a "
                    "whole scan with sliding windows), or use a prompted model"
                )
            if labels is not None:
                self._check_labels(labels, (image_batch, *patch_size), check_values)
            self._check_masks(input_masks, (image_batch, *patch_size), check_values)
            return
        if input_points is None:
            raise ValueError("input_points is required: a (batch, num_points, 3) tensor of (z, y, x) patch voxels")
        if not isinstance(input_points, torch.Tensor):
            raise TypeError(
                f"input_points must be a torch.Tensor (batch, num_points, 3), got {type(input_points).__name__}"
            )
        if input_points.ndim != 3 or input_points.shape[-1] != 3 or input_points.shape[1] == 0:
            raise ValueError(
                "input_points must have shape (batch, num_points >= 1, 3) with (z, y, x), got "
                f"{tuple(input_points.shape)}"
            )
        if input_points.shape[0] != image_batch and image_batch != 1:
            raise ValueError(
                f"input_points has batch {input_points.shape[0]} but the image batch is {image_batch}; give one "
                "prompt set per image, or a single image to share across prompt sets"
            )
        if input_labels is not None:
            if not isinstance(input_labels, torch.Tensor):
                raise TypeError(
                    f"input_labels must be a torch.Tensor (batch, num_points), got {type(input_labels).__name__}"
                )
            if input_labels.shape != input_points.shape[:2]:
                raise ValueError(
                    f"input_labels shape {tuple(input_labels.shape)} must match input_points' (batch, num_points) "
                    f"{tuple(input_points.shape[:2])}"
                )
        if labels is not None:
            self._check_labels(labels, (input_points.shape[0], *patch_size), check_values)
        self._check_masks(input_masks, (input_points.shape[0], *patch_size), check_values)
        if not check_values:
            return
        if not torch.isfinite(input_points).all():
            raise ValueError(
                f"input_points holds NaN or infinite coordinates: {input_points.tolist()}; clicks must be finite "
                "(z, y, x) patch voxels (mark unused slots as padding with label -1 and any finite coordinate)"
            )
        if input_labels is None:
            input_labels = torch.ones(input_points.shape[:2], dtype=torch.long, device=input_points.device)
        known = (input_labels == -1) | (input_labels == 0) | (input_labels == 1)
        if not known.all():
            raise ValueError(
                f"input_labels must be 1 (positive), 0 (negative) or -1 (padding), got {input_labels.unique().tolist()}"
            )
        if not self.config.prompt_encoder_config.use_point_labels and (input_labels == 0).any():
            where = (input_labels == 0).nonzero().tolist()
            raise ValueError(
                f"input_labels has negative clicks (label 0) at (batch, point) {where}, but this model cannot use "
                "them: its prompt_encoder_config.use_point_labels is False (as in the official model and every "
                "conversion of it), so a negative click would act exactly like a positive one. Drop the negative "
                "clicks, or use a model trained with use_point_labels=True."
            )
        no_positive = (~(input_labels == 1).any(dim=1)).nonzero().flatten().tolist()
        if no_positive:
            raise ValueError(
                f"every prompt set needs at least one positive click (label 1); input_labels rows {no_positive} have "
                "none (only negative clicks or -1 padding). Add a click on the object, or drop those rows."
            )
        real = input_labels >= 0
        upper = torch.tensor(patch_size, device=input_points.device, dtype=input_points.dtype) - 1
        outside = real[..., None] & ((input_points < 0) | (input_points > upper))
        if outside.any():
            batch_index, point_index = outside.any(-1).nonzero()[0].tolist()
            raise ValueError(
                f"input_points[{batch_index}, {point_index}] = {input_points[batch_index, point_index].tolist()} lies "
                f"outside the patch: (z, y, x) must be within [0, {[int(s) - 1 for s in patch_size]}] (patch voxels)"
            )

    def _check_masks(self, input_masks: torch.Tensor | None, expected: tuple[int, ...], check_values: bool) -> None:
        """`input_masks`: `None`, or probabilities of shape `expected` `(batch, D, H, W)` (or with a channel axis) for
        a model with the mask prompt."""
        if input_masks is None:
            return
        if not self.config.mask_decoder_config.use_mask_prompt:
            raise ValueError(
                "input_masks (the previous prediction) needs a model built with mask_decoder_config.use_mask_prompt="
                "True (e.g. trained with --recipe interactive); this model has none: drop input_masks"
            )
        if not isinstance(input_masks, torch.Tensor) or not input_masks.is_floating_point():
            raise TypeError(f"input_masks must be a float torch.Tensor of probabilities, got {type(input_masks)}")
        if tuple(input_masks.shape) not in (expected, (expected[0], 1, *expected[1:])):
            raise ValueError(
                f"input_masks must have shape (batch, 1, D, H, W) = {(expected[0], 1, *expected[1:])} or {expected} "
                f"(one previous prediction per prompt set, in patch voxels), got {tuple(input_masks.shape)}"
            )
        if check_values and not ((input_masks >= 0) & (input_masks <= 1)).all():
            raise ValueError(
                "input_masks must be foreground probabilities in [0, 1] (NaN refused); from logits use "
                "logits.softmax(1)[:, 1:]"
            )

    @staticmethod
    def _check_labels(labels: torch.Tensor, expected: tuple[int, ...], check_values: bool) -> None:
        """`labels`: a tensor of shape `expected` `(batch, D, H, W)` (or with a channel axis) holding 0/1."""
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor (batch, D, H, W), got {type(labels).__name__}")
        if tuple(labels.shape) not in (expected, (expected[0], 1, *expected[1:])):
            raise ValueError(
                f"labels must have shape (batch, D, H, W) = {expected} or {(expected[0], 1, *expected[1:])}, got "
                f"{tuple(labels.shape)}"
            )
        if check_values and labels.dtype != torch.bool and not ((labels == 0) | (labels == 1)).all():
            found = labels.unique()
            raise ValueError(
                f"labels must be 0/1 (background/foreground) integers or booleans, found values {found[:10].tolist()}"
                f"{' ...' if len(found) > 10 else ''}; binarise with labels == target_label or set the "
                "processor's target_label"
            )

    def segmentation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MONAI `DiceCELoss(include_background=False, softmax=True, to_onehot_y=True, lambda_dice=0.5,
        lambda_ce=0.5)` on `logits (B, 2, D, H, W)` and 0/1 `labels (B, D, H, W)` or `(B, 1, D, H, W)`.

        (Named so as not to shadow `PreTrainedModel.loss_function`, transformers' loss registry.)"""
        from monai.losses import DiceCELoss

        if labels.ndim == 4:
            labels = labels[:, None]
        expected = (logits.shape[0], 1, *logits.shape[2:])
        if tuple(labels.shape) != expected:
            raise ValueError(
                f"labels must have shape (batch, D, H, W) = {(expected[0], *expected[2:])} or {expected}, got "
                f"{tuple(labels.shape)}"
            )
        criterion = DiceCELoss(include_background=False, softmax=True, to_onehot_y=True, lambda_dice=0.5, lambda_ce=0.5)
        return criterion(logits.float(), labels.long())


# Saved folders carry the code and an `auto_map` (see configuration_sam3d.py).
Sam3DForPromptableSegmentation.register_for_auto_class("AutoModel")

__all__ = [
    "OUTPUT_FLAG_KEYS",
    "PROCESSOR_GEOMETRY_KEYS",
    "Sam3DForPromptableSegmentation",
    "Sam3DImageEmbeddings",
    "Sam3DPreTrainedModel",
    "Sam3DSegmentationOutput",
    "Sam3DVisionModel",
    "Sam3DVisionModelOutput",
]
