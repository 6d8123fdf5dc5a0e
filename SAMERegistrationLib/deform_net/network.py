"""The SAM-deform U-Net (VoxelMorph layout, same-code-facts.md section 4.4).

Encoder 16, 32, 32, 32 channels with max-pooling; decoder 32 x 4 with nearest upsampling and skip
connections by concatenation; then 32, 16, 16 channels at full resolution and a 16 -> 3 flow layer
initialised near zero, so that an untrained network starts at the identity. Every convolution is
3x3x3 followed by LeakyReLU(0.2), without normalisation. The 27-channel SAM correlation enters at
half resolution, next to the first level's output (encoder level 1 input: 16 + 27 channels).

Inputs of any size work: they are padded (replicating the border) to a multiple of 16, the network's
total downsampling, and the output is cropped back. The output is a 3-channel field in voxels of the
input grid, channels in (x, y, z) order; ``field`` turns it into a displacement in mm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..grid import slab_bounds

ENCODER = (16, 32, 32, 32)
DECODER = (32, 32, 32, 32)
FULL_RESOLUTION = (32, 16, 16)
CORRELATION_CHANNELS = 27
MULTIPLE = 2 ** len(ENCODER)  # the input size must be divisible by the total downsampling
FLOW_INIT_STD = 1e-5
# Without autograd the full-resolution layers run on slabs of about this many voxels; each slab
# carries one extra slice per convolution after the last upsampling on either side.
TAIL_SLAB_VOXELS = 2_000_000
TAIL_HALO = len(FULL_RESOLUTION) + 1


class _ConvAct(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),  # no second copy of the activations
        )


class DeformNetwork(nn.Module):
    """U-Net from (moving, fixed) images, plus optional correlation, to a field in voxels."""

    def __init__(self, correlation: bool = True) -> None:
        super().__init__()
        self.correlation = correlation
        extra = CORRELATION_CHANNELS if correlation else 0
        inputs = [2, ENCODER[0] + extra, *ENCODER[1:-1]]
        self.encoder = nn.ModuleList(_ConvAct(i, o) for i, o in zip(inputs, ENCODER))
        skips = ENCODER[::-1]  # the decoder meets the encoder levels from the deepest up
        decoder_in = [ENCODER[-1]] + [d + s for d, s in zip(DECODER[:-1], skips[:-1])]
        self.decoder = nn.ModuleList(_ConvAct(i, o) for i, o in zip(decoder_in, DECODER))
        full_in = [DECODER[-1] + skips[-1], *FULL_RESOLUTION[:-1]]
        self.full_resolution = nn.ModuleList(
            _ConvAct(i, o) for i, o in zip(full_in, FULL_RESOLUTION)
        )
        self.flow = nn.Conv3d(FULL_RESOLUTION[-1], 3, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, std=FLOW_INIT_STD)
        nn.init.zeros_(self.flow.bias)

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        correlation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(1, 1, D, H, W) images (and a (1, 27, ceil(D/2), ...) correlation) -> (1, 3, D, H, W)."""
        if moving.shape != fixed.shape or moving.dim() != 5 or moving.shape[1] != 1:
            raise ValueError(
                f"moving and fixed must both be (N, 1, D, H, W); got {tuple(moving.shape)} and "
                f"{tuple(fixed.shape)}"
            )
        if self.correlation != (correlation is not None):
            raise ValueError(
                "this network was built "
                + ("with" if self.correlation else "without")
                + " the correlation input; pass it exactly when it was built with it"
            )
        size = moving.shape[2:]
        x = _pad_to(
            torch.cat([moving, fixed], dim=1), [math.ceil(n / MULTIPLE) * MULTIPLE for n in size]
        )
        skips = []
        for level, block in enumerate(self.encoder):
            if level == 1 and correlation is not None:
                half = [math.ceil(n / 2) for n in size]
                if list(correlation.shape[2:]) != half:
                    raise ValueError(
                        f"the correlation must lie on the half-resolution grid {half}, "
                        f"not {list(correlation.shape[2:])}"
                    )
                x = torch.cat([x, _pad_to(correlation.to(x.dtype), list(x.shape[2:]))], dim=1)
            x = block(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        for block in self.decoder[:-1]:
            x = F.interpolate(block(x), scale_factor=2, mode="nearest")
            x = torch.cat([x, skips.pop()], dim=1)
        x = self.decoder[-1](x)
        return self._full_resolution(x, skips.pop(), list(size))

    def _full_resolution(
        self, half: torch.Tensor, skip: torch.Tensor, size: list[int]
    ) -> torch.Tensor:
        """The last upsampling, the full-resolution layers and the flow layer, slab by slab.

        Without autograd the volume goes through in slabs of z-slices, each with TAIL_HALO
        neighbouring slices on either side (one per 3x3x3 convolution), so that the activations
        at full resolution, the largest arrays of the network, are never held for the whole
        volume; the slabs' centres equal the whole-volume result. With autograd every slab's
        activations are kept for the backward pass anyway, and the volume goes through at once.
        Only the unpadded ``size`` and TAIL_HALO voxels beyond it go through these layers: the
        padding to a multiple of 16 is cut from the output, and a voxel here sees no further.
        """
        depth = skip.shape[2]
        # Rows and columns kept: the input's and the halo beyond, within the padded volume.
        rows, cols = (min(n + TAIL_HALO, have) for n, have in zip(size[1:], skip.shape[3:]))
        half = half[:, :, :, : (rows + 1) // 2, : (cols + 1) // 2]
        skip = skip[:, :, :, :rows, :cols]
        voxels = skip[0, 0].numel() if torch.is_grad_enabled() else TAIL_SLAB_VOXELS
        flows = []
        for z0, z1 in slab_bounds((size[0], rows, cols), voxels):
            lo, hi = max(z0 - TAIL_HALO, 0), min(z1 + TAIL_HALO, depth)
            # Nearest upsampling by 2: full-resolution slice z shows half-resolution slice z // 2.
            up = F.interpolate(half[:, :, lo // 2 : (hi + 1) // 2], scale_factor=2, mode="nearest")
            up = up[:, :, lo % 2 : lo % 2 + hi - lo, :rows, :cols]
            x = torch.cat([up, skip[:, :, lo:hi]], dim=1)
            del up
            for block in self.full_resolution:
                x = block(x)
            flows.append(self.flow(x)[:, :, z0 - lo : z1 - lo, : size[1], : size[2]])
            del x
        return flows[0] if len(flows) == 1 else torch.cat(flows, dim=2)


def _pad_to(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Pad a (N, C, D, H, W) tensor at the far end of each axis to ``shape``, replicating borders."""
    pad = []
    for have, want in zip(reversed(x.shape[2:]), reversed(shape)):
        pad += [0, want - have]
    return F.pad(x, pad, mode="replicate") if any(pad) else x
