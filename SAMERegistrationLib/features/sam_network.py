"""The SAM network (3D ResNet-18 backbone + FPN heads) in plain PyTorch, and its weights files.

The module and parameter names reproduce the state_dict of the official mmdet/mmcv ``Sam`` detector
(see same-code-facts.md §1-2), so an official ``SAM.pth`` loads into ``SAMNetwork()`` unchanged.

Geometry (tensors are (N, C, D, H, W) = (z, y, x)). For an input of size (D, H, W):

- local map:  (ceil(D/2), ceil(H/2), ceil(W/2)), ``embedding_dim`` channels;
- global map: (ceil(D/4), ceil(H/16), ceil(W/16)), ``embedding_dim`` channels.

The input is padded at its far end to a multiple of (4, 16, 16) by repeating its last slice, row and
column, and the maps are cropped back, so sizes that are already multiples give exactly the official
network's output. Where the map voxels sit on the input (input voxel units, (z, y, x)):

- local voxel (i, j, k) is centred on input voxel (2i + 0.5, 2j, 2k): in-plane, the stride-2 3x3
  convs centre output j on input 2j; in z, the (2, 1, 1) max pool after layer1 merges slices 2i and
  2i + 1. The library's "local voxel i <-> input voxel 2i" is thus exact in y and x and half an input
  voxel short in z (1 mm at 2 mm spacing). The coarser FPN levels reach the local map by nearest
  upsampling, so in y and x their contributions lag by up to 2 (layer2, odd j) and 6 (layer3,
  j not a multiple of 4) input voxels; this is the official network's behaviour and is kept.
- global voxel (i, j, k) is centred on input voxel (4i + 0.5, 16j, 16k).

The official training targets (align_corners=False trilinear resampling of the voxel-position grid)
place local voxel (i, j, k) at (2i, 2j, 2k) + 0.5 and global voxel (i, j, k) at
(4i + 1.5, 16j + 7.5, 16k + 7.5). A constant offset is the same in both images of a pair on the same
grid, so it moves where a match is placed, not the displacement between the matched points.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint_io import load_weights_only, write_checkpoint
from ..errors import CheckpointError

logger = logging.getLogger(__name__)

#: Backbone channel counts of the official (width 1) network.
BASE_CHANNELS = (64, 128, 256, 512)
#: (z, y, x) stride of each residual stage's first block, and its conv kernel.
STAGE_STRIDES = ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2))
STAGE_KERNELS = ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
#: (z, y, x) downsampling of the local and global maps relative to the input.
LOCAL_STRIDE = (2, 2, 2)
GLOBAL_STRIDE = (4, 16, 16)

_SAM_PREFIXES = ("backbone.", "neck.", "read_out_head.")
#: Heads of other SAM variants that share our backbone; their weights are skipped when loading.
_EXTRA_HEAD_PREFIXES = ("semantic_head.",)
_STEM_KEY = "backbone.conv1.conv.weight"
_EMBEDDING_KEY = "neck.fpn_convs.0.conv.weight"
_SHOW = 5  # how many offending keys an error message lists


def scaled_channels(channels: int, width: float) -> int:
    """Backbone channel count for a slim variant: ``channels * width`` rounded, at least 8."""
    return max(8, round(channels * width))


def feature_map_sizes(
    size: Sequence[int],
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(local, global) map sizes for an input of (D, H, W) voxels, as ``SAMNetwork`` returns them."""
    local = tuple(-(-int(s) // m) for s, m in zip(size, LOCAL_STRIDE, strict=True))
    global_ = tuple(-(-int(s) // m) for s, m in zip(size, GLOBAL_STRIDE, strict=True))
    return local, global_  # type: ignore[return-value]


class _ConvBN(nn.Module):
    """Bias-free conv + BatchNorm (+ ReLU), named ``conv``/``bn`` like mmcv's ConvModule."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int],
        stride: tuple[int, int, int] = (1, 1, 1),
        relu: bool = True,
    ) -> None:
        super().__init__()
        padding = tuple(k // 2 for k in kernel)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.relu is not None else x


class _Conv(nn.Module):
    """Conv with bias and no norm/activation, named ``conv`` like mmcv's ConvModule in the FPN."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, padding=kernel // 2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _BasicBlock(nn.Module):
    """ResNet basic block: two convs of the same kernel, the first one strided."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel: tuple[int, int, int],
        stride: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.conv1 = _ConvBN(in_channels, channels, kernel, stride)
        self.conv2 = _ConvBN(channels, channels, kernel, relu=False)
        self.downsample = None
        if stride != (1, 1, 1) or in_channels != channels:
            self.downsample = _ConvBN(in_channels, channels, (1, 1, 1), stride, relu=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class _Backbone(nn.Module):
    """3D ResNet-18 without stem downsampling; returns the outputs of layer1 (pooled) to layer4."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = _ConvBN(1, channels[0], (3, 7, 7))
        in_channels = channels[0]
        for index, (out, kernel, stride) in enumerate(
            zip(channels, STAGE_KERNELS, STAGE_STRIDES, strict=True), start=1
        ):
            blocks = [
                _BasicBlock(in_channels, out, kernel, stride),
                _BasicBlock(out, out, kernel, (1, 1, 1)),
            ]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = out
        self.pool2 = nn.MaxPool3d((2, 1, 1), (2, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.conv1(x)
        x = self.pool2(self.layer1(x))
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return x, c2, c3, self.layer4(c3)


class _FPN(nn.Module):
    """FPN reduced to its finest output: laterals, nearest top-down sum, one 3x3x3 conv."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(_Conv(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList([_Conv(out_channels, out_channels, 3)])

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=True)]
        for level in range(len(laterals) - 1, 0, -1):
            finer = laterals[level - 1]
            laterals[level - 1] = finer + F.interpolate(
                laterals[level], size=finer.shape[2:], mode="nearest"
            )
        return self.fpn_convs[0](laterals[0])


class SAMNetwork(nn.Module):
    """SAM: dense local (fine) and global (coarse) anatomical embeddings of a CT volume.

    ``width`` scales the backbone channels for slim CPU variants (1.0 is the official network);
    ``embedding_dim`` is the channel count of both maps. Input: (N, 1, D, H, W) SAM-normalised
    intensities (HU clipped to [-1024, 3071] mapped to [0, 255], minus 50) at 2 mm. Output:
    ``(local, global_)``, each L2-normalised along channels, with the sizes and voxel centres given
    in the module docstring (see ``feature_map_sizes``). Call ``.eval()`` before inference: the
    network uses BatchNorm.
    """

    def __init__(self, width: float = 1.0, embedding_dim: int = 128) -> None:
        super().__init__()
        if not (math.isfinite(width) and width > 0):
            raise ValueError(f"width must be a positive number, got {width!r}")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be at least 1, got {embedding_dim!r}")
        self.width = float(width)
        self.embedding_dim = int(embedding_dim)
        channels = [scaled_channels(c, self.width) for c in BASE_CHANNELS]
        self.backbone = _Backbone(channels)
        self.neck = _FPN(channels[:3], self.embedding_dim)
        self.read_out_head = _FPN(channels[3:], self.embedding_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected an (N, 1, D, H, W) tensor, got shape {tuple(x.shape)}")
        size = x.shape[2:]
        (ld, lh, lw), (gd, gh, gw) = feature_map_sizes(size)
        pad = [(-s) % m for s, m in zip(size, GLOBAL_STRIDE, strict=True)]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        features = self.backbone(x)
        local = self.neck(features[:3])[:, :, :ld, :lh, :lw]
        global_ = self.read_out_head(features[3:])[:, :, :gd, :gh, :gw]
        return F.normalize(local, dim=1), F.normalize(global_, dim=1)


def _describe_shape(tensor: torch.Tensor | None) -> str:
    return "missing" if tensor is None else str(tuple(tensor.shape))


def _split_checkpoint(
    obj: Any, path: Path
) -> tuple[dict[str, torch.Tensor], Mapping[str, Any], list[str]]:
    """The tensors (``module.`` prefix stripped), the metadata and the first few raw key names."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"SAM weights file {path} holds a {type(obj).__name__}, not a state dict. Expected a "
            "dict of tensors, or a dict with a 'state_dict' entry (and optional 'meta')."
        )
    meta: Mapping[str, Any] = {}
    state = obj
    if isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
        if isinstance(obj.get("meta"), Mapping):
            meta = obj["meta"]
    tensors = {}
    for key, value in state.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            tensors[key.removeprefix("module.")] = value
    return tensors, meta, [str(k) for k in state][:_SHOW]


def _meta_number(meta: Mapping[str, Any], key: str, kind: type, path: Path) -> Any:
    value = meta.get(key)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"SAM weights file {path} has an invalid meta[{key!r}] = {value!r}; expected a "
            f"{kind.__name__}. Remove the entry or re-save the file with save_sam_checkpoint."
        ) from exc


def load_sam_checkpoint(
    path: str | os.PathLike[str],
    width: float | None = None,
    map_location: Any = "cpu",
) -> SAMNetwork:
    """Build a ``SAMNetwork`` from an official SAM ``.pth`` or one written by ``save_sam_checkpoint``.

    Weights are read with ``weights_only=True`` so an untrusted file cannot run code. ``width`` comes
    from the argument, else ``meta["width"]``, else the stem conv's channel count (64 -> 1.0);
    ``embedding_dim`` from ``meta``, else the neck's output channels. Weights of known extra heads
    (``semantic_head.*`` of SAMv2) are skipped; anything else that does not fit raises
    ``CheckpointError``. The network is returned in eval mode, on ``map_location`` when that names a
    device.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"SAM weights file {path} does not exist or is not a file. Give the path of a SAM "
            "checkpoint (.pth), e.g. SAM.pth from ModelScope "
            "'viggin/Self-supervised_Anatomical_Embeddings', or one saved by this library."
        )
    obj = load_weights_only(
        path,
        map_location,
        "SAM weights file",
        "If the file comes from a source you trust, re-save only its weights: "
        "torch.save({'state_dict': torch.load(path, weights_only=False)['state_dict']}, "
        "new_path), and load new_path.",
        "Download or copy it again.",
    )

    tensors, meta, found = _split_checkpoint(obj, path)
    extra = sorted(k for k in tensors if k.startswith(_EXTRA_HEAD_PREFIXES))
    unknown = sorted(k for k in tensors if not k.startswith(_SAM_PREFIXES + _EXTRA_HEAD_PREFIXES))
    state = {k: v for k, v in tensors.items() if k.startswith(_SAM_PREFIXES)}
    if not state:
        raise CheckpointError(
            f"SAM weights file {path} contains no SAM network weights. Found keys such as {found}; "
            f"expected keys such as ['{_STEM_KEY}', 'neck.lateral_convs.0.conv.weight', "
            "'read_out_head.fpn_convs.0.conv.weight']. Check that the file is a SAM checkpoint."
        )
    if unknown:
        raise CheckpointError(
            f"SAM weights file {path} has {len(unknown)} keys that belong to no known SAM part, "
            f"e.g. {unknown[:_SHOW]}. Expected only backbone.*, neck.*, read_out_head.* (and "
            "semantic_head.*). Check that the file is a SAM checkpoint of this architecture."
        )
    if extra:
        logger.info(
            "Ignoring %d weights of extra heads in %s (e.g. %s)", len(extra), path, extra[0]
        )

    if width is None:
        width = _meta_number(meta, "width", float, path)
    if width is None:
        stem = state.get(_STEM_KEY)
        width = stem.shape[0] / BASE_CHANNELS[0] if stem is not None and stem.ndim == 5 else 1.0
    embedding_dim = _meta_number(meta, "embedding_dim", int, path)
    if embedding_dim is None:
        head = state.get(_EMBEDDING_KEY)
        embedding_dim = head.shape[0] if head is not None and head.ndim == 5 else 128
    try:
        model = SAMNetwork(width=width, embedding_dim=embedding_dim)
    except ValueError as exc:
        raise CheckpointError(
            f"SAM weights file {path} describes an invalid network: {exc}"
        ) from exc

    expected = model.state_dict()
    for key, value in expected.items():
        # Old BatchNorm weights lack this counter; it only matters when training with momentum=None.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{k}: expected {tuple(expected[k].shape)}, found {_describe_shape(state.get(k))}"
            for k in (mismatched + missing)[:_SHOW]
        ]
        problems += [f"{k}: not part of the network" for k in unexpected[:_SHOW]]
        raise CheckpointError(
            f"SAM weights file {path} does not fit a SAM network of width {width:g} and embedding "
            f"dim {embedding_dim} ({len(mismatched)} shape mismatches, {len(missing)} missing, "
            f"{len(unexpected)} unexpected keys): " + "; ".join(problems) + ". Use a complete "
            "checkpoint of this architecture, or pass the width it was trained with."
        )
    model.load_state_dict(state, strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def save_sam_checkpoint(
    model: SAMNetwork,
    path: str | os.PathLike[str],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write ``{"state_dict", "meta"}`` so ``load_sam_checkpoint`` rebuilds the same network.

    ``meta`` must hold plain Python values (weights_only loading); its ``width`` and
    ``embedding_dim`` are always the model's. The file is written to a temporary name and then
    renamed, so an interrupted save never leaves a truncated checkpoint behind.
    """
    path = Path(path)
    full_meta = {**(meta or {}), "width": model.width, "embedding_dim": model.embedding_dim}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_checkpoint({"state_dict": state, "meta": full_meta}, path)
