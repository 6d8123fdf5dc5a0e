"""Initial pose: the rigid fixed->moving map that overlays the two bodies, found from HU alone.

CT values are calibrated (HU), so coarse HU values are the same scalars whatever the patient's
orientation; unlike MIND or SAM descriptors they can be compared under any rotation. The search
scores the 24 axis-aligned rotations (each also turned 45 degrees about each axis), refines the
best (and a close second) by hill climbing in steps of 30 down to 3.75 degrees, and for each
rotation scores every translation at once by FFT: the normalised
cross-correlation of HU over the overlap of the two bodies, among shifts where that overlap covers
most of the SMALLER body (a longer scan's extra anatomy neither dilutes nor pulls the score).

When the best rotation is large and clearly beats no rotation, the moving image is re-oriented by
changing its geometry only (no resampling): the later stages see the patient the fixed way round,
and the final affine is composed with that re-orientation (``A_total = T @ A'``). Only
``coarse_ct`` and ``reorient`` touch SimpleITK; the search itself is numpy and torch.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .config import InitialPoseConfig
from .grid import Grid
from .image import to_working_grid

HU_RANGE = (-1000.0, 1500.0)  # lungs to cortical bone; metal and air outside add nothing
MIN_OVERLAP = 0.7  # share of the smaller body the overlap must cover for a shift to count
# ... on the rough grid of rotations, which may be 40 degrees off the truth
ROUGH_MIN_OVERLAP = 0.5
REFINE_STEPS_DEG = (30.0, 15.0, 7.5, 3.75)
CLIMBS = 2  # at most this many axis-aligned rotations are refined by hill climbing
CLOSE_START = 0.1  # ... the second only when it scores within this of the best
MIN_GAIN = 0.1  # a rotation is applied only if it beats no rotation by this much NCC ...
ROTATION_SIMILARITY = 0.6  # ... and reaches this NCC
WARN_ROTATION_DEG = 30.0  # a better-fitting rotation not applied is reported beyond this
TRUSTED_SIMILARITY = 0.3  # below this the pose does not check the initial translation
AMBIGUITY = 0.03  # a distinct rotation this close to the best one makes the pose ambiguous
MAX_ROTATION_CHANGE_DEG = 20.0  # the final affine turning this far from the pose is suspicious
FINAL_SIMILARITY_DROP = 0.15  # the final affine scoring this far below the pose is suspicious
MIN_FINAL_SIMILARITY = 0.3


@dataclass
class CoarseCT:
    """A CT on a coarse axis-aligned isotropic grid: scaled HU inside the body, 0 outside."""

    values: np.ndarray  # float32 (z, y, x): HU clipped to HU_RANGE, / 1000
    body: np.ndarray  # bool (z, y, x)
    grid: Grid


@dataclass
class PoseSearch:
    """The best rigid pose (4x4 fixed -> moving, LPS mm) and what the search saw."""

    matrix: np.ndarray
    similarity: float  # masked NCC of HU over the bodies' overlap
    overlap_share: float  # of the smaller body, under the best pose
    identity: np.ndarray  # the best pose without rotation
    identity_similarity: float
    runner_up_similarity: float  # the best rotation more than 60 degrees from the chosen one
    evaluations: int


@dataclass
class InitialPose:
    """What the rest of the pipeline needs from the pose search.

    ``moving`` is the moving image re-oriented by ``reorientation`` (identity when not applied):
    a point p of the re-oriented image lies at ``reorientation @ p`` in the original moving image.
    ``prior`` is the pose in the re-oriented frame, or None when it is not trusted.
    """

    moving: sitk.Image
    reorientation: np.ndarray
    prior: np.ndarray | None
    info: dict
    warnings: list[str] = field(default_factory=list)
    fixed_coarse: CoarseCT | None = None
    moving_coarse: CoarseCT | None = None
    similarity: float | None = None
    start: np.ndarray | None = None  # the pose in the re-oriented frame, trusted or not

    def compose(self, affine: np.ndarray) -> np.ndarray:
        """The fixed -> original-moving affine from one found on the re-oriented image."""
        return self.reorientation @ affine

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Re-oriented moving points (N, 3) to the original moving space."""
        return apply(self.reorientation, points)

    def final_warnings(self, affine: np.ndarray) -> list[str]:
        """Warnings about a final fixed -> original-moving affine, judged against the pose."""
        if self.fixed_coarse is None or self.similarity is None:
            return []
        found = []
        final = masked_ncc_at(self.fixed_coarse, self.moving_coarse, affine)
        self.info["final_similarity"] = round(final, 3)
        if final < min(MIN_FINAL_SIMILARITY, self.similarity - FINAL_SIMILARITY_DROP):
            found.append(
                f"The registered scans agree poorly (HU correlation {final:.2f} under the final "
                f"affine, {self.similarity:.2f} under the initial pose): the result is probably "
                "wrong. Check that both scans show the same body region."
            )
        if self.prior is not None:
            used = self.reorientation @ self.prior
            turn = rotation_angle_deg(_rotation_part(affine) @ used[:3, :3].T)
            self.info["final_rotation_change_deg"] = round(turn, 1)
            if turn > MAX_ROTATION_CHANGE_DEG:
                found.append(
                    f"The final affine is rotated {turn:.0f} degrees away from the initial pose "
                    "found from HU: one of them is wrong. Check the result visually."
                )
        return found


def find_initial_pose(
    fixed: sitk.Image, moving: sitk.Image, config: InitialPoseConfig, keep_placement: bool = False
) -> InitialPose:
    """Search the rigid pose and re-orient ``moving`` when it is rotated beyond the threshold.

    With ``keep_placement`` (the scans are to be registered as placed) the moving image is never
    re-oriented; a rotation that would have been applied is reported as a warning instead.
    """
    if not config.enabled:
        return InitialPose(moving, np.eye(4), None, {"status": "skipped", "reason": "disabled"})
    clock = time.perf_counter()
    fixed_coarse = coarse_ct(fixed, config.spacing_mm)
    moving_coarse = coarse_ct(moving, config.spacing_mm)
    search = search_pose(fixed_coarse, moving_coarse, config.rotation_search)
    pose = search.matrix
    angle = rotation_angle_deg(pose[:3, :3])
    rotated = angle > config.angle_threshold_deg
    # Scanners record the orientation, so a large rotation needs strong evidence: a close fit
    # that clearly beats the best pose without rotation.
    convincing = (
        rotated
        and search.similarity >= ROTATION_SIMILARITY
        and search.similarity >= search.identity_similarity + MIN_GAIN
    )
    rotate = convincing and not keep_placement
    if rotated and not rotate:
        pose, similarity = search.identity, search.identity_similarity
    else:
        similarity = search.similarity
    trusted = similarity >= TRUSTED_SIMILARITY
    reorientation = pose if rotate else np.eye(4)
    warnings = _pose_warnings(search, angle, rotated, convincing, keep_placement, trusted)
    info = {
        "status": "done",
        "seconds": round(time.perf_counter() - clock, 3),
        "spacing_mm": config.spacing_mm,
        "best_rotation_deg": round(angle, 1),
        "best_similarity": round(search.similarity, 3),
        "similarity_without_rotation": round(search.identity_similarity, 3),
        "runner_up_similarity": round(search.runner_up_similarity, 3),
        "rotations_scored": search.evaluations,
        "reoriented": bool(rotate),
        "pose_matrix": pose.round(6).tolist(),
        "similarity": round(similarity, 3),
        "overlap_share": round(search.overlap_share, 3),
        "used_as_prior": bool(trusted),
    }
    return InitialPose(
        moving=reorient(moving, reorientation) if rotate else moving,
        reorientation=reorientation,
        prior=np.linalg.inv(reorientation) @ pose if trusted else None,
        info=info,
        warnings=warnings,
        fixed_coarse=fixed_coarse,
        moving_coarse=moving_coarse,
        similarity=similarity,
        start=np.linalg.inv(reorientation) @ pose,
    )


def _pose_warnings(
    search: PoseSearch, angle: float, rotated: bool, convincing: bool, keep_placement: bool,
    trusted: bool,
) -> list[str]:  # fmt: skip
    warnings = []
    doubtful = rotated and not convincing and angle > WARN_ROTATION_DEG
    if doubtful and search.similarity >= search.identity_similarity + MIN_GAIN:
        warnings.append(
            f"A rotation of {angle:.0f} degrees fits the scans better than their recorded "
            f"orientation (HU correlation {search.similarity:.2f} against "
            f"{search.identity_similarity:.2f}) but not closely enough to be trusted; the "
            "recorded orientation was kept. Check that both scans are oriented alike."
        )
    if convincing and keep_placement:
        warnings.append(
            f"A rotation of {angle:.0f} degrees fits the scans clearly better than their placement "
            f"(HU correlation {search.similarity:.2f} against {search.identity_similarity:.2f}); "
            "the placement was kept as asked (initialisation=identity). Check it, or use "
            "initialisation=search to let the pose search re-orient the moving scan."
        )
    if not trusted:
        warnings.append(
            "The initial pose search found little agreement between the scans' HU; the scans may "
            "show different body regions, or one may be masked or cropped. Check the result."
        )
    elif (
        convincing
        and not keep_placement
        and search.runner_up_similarity > (search.similarity - AMBIGUITY)
    ):
        warnings.append(
            f"The scans' orientation is ambiguous: a rotation of {angle:.0f} degrees and one at "
            "least 60 degrees from it fit almost equally well. Check the result visually."
        )
    return warnings


def coarse_ct(image: sitk.Image, spacing: float) -> CoarseCT:
    """HU and body on an axis-aligned grid of ``spacing``: resampled at half of it, then averaged."""
    work = to_working_grid(image, spacing / 2.0, margin_mm=spacing)
    values = (np.clip(work.hu, *HU_RANGE) / 1000.0 * work.body).astype(np.float32)
    return _halved(CoarseCT(values, work.body, work.grid))


def reorient(image: sitk.Image, pose: np.ndarray) -> sitk.Image:
    """The image with geometry changed so that its point p is the original's ``pose @ p``."""
    rotation, translation = pose[:3, :3], pose[:3, 3]
    out = sitk.Image(image)
    direction = rotation.T @ np.array(image.GetDirection()).reshape(3, 3)
    out.SetDirection(tuple(direction.ravel()))
    out.SetOrigin(tuple(rotation.T @ (np.array(image.GetOrigin()) - translation)))
    return out


def search_pose(fixed: CoarseCT, moving: CoarseCT, rotations: bool = True) -> PoseSearch:
    """Best rigid fixed -> moving pose: axis-aligned rotations, hill climbing, FFT translations.

    The rough rotations are scored on a grid twice as coarse (8x fewer voxels); the best of them
    (and the runner-up when close) are refined on the given grid.
    """
    scorer = _Scorer(fixed, moving)
    identity = scorer.best(np.eye(3))
    if not rotations:
        return PoseSearch(
            identity.matrix, identity.score, identity.share, identity.matrix, identity.score,
            -1.0, 1,
        )  # fmt: skip
    rough = _Scorer(_halved(fixed), _halved(moving), ROUGH_MIN_OVERLAP)
    candidates = sorted(
        (rough.best(r) for r in rough_rotations()), key=lambda c: c.score, reverse=True
    )
    starts = [c for c in candidates[:CLIMBS] if c.score >= candidates[0].score - CLOSE_START]
    climbed = [_climb(scorer, scorer.best(c.rotation)) for c in starts]
    best = max(climbed, key=lambda c: c.score)
    others = [c for c in candidates if _angle_between(c, best) > 60.0]
    runner_up = scorer.best(others[0].rotation).score if others else -1.0
    evaluations = scorer.evaluations + rough.evaluations
    return PoseSearch(
        best.matrix, best.score, best.share, identity.matrix, identity.score, runner_up, evaluations
    )


def _halved(ct: CoarseCT) -> CoarseCT:
    """The CT on a grid of twice the spacing (2x2x2 blocks averaged over the body)."""
    pad = [(0, n % 2) for n in ct.body.shape]
    body = _block_mean(np.pad(ct.body.astype(np.float32), pad))
    values = _block_mean(np.pad(ct.values, pad))
    mask = body >= 0.5
    values = np.where(mask, values / np.maximum(body, 1e-6), 0.0).astype(np.float32)
    grid = ct.grid
    origin = grid.index_to_physical(np.full((1, 3), 0.5))[0]
    spacing = tuple(2.0 * s for s in grid.spacing)
    return CoarseCT(values, mask, Grid(body.shape, spacing, tuple(origin), np.eye(3)))


def _block_mean(array: np.ndarray) -> np.ndarray:
    """Means of 2x2x2 blocks of an array with even sizes."""
    z, y, x = (n // 2 for n in array.shape)
    return array.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5))


@dataclass
class _Candidate:
    rotation: np.ndarray
    score: float
    matrix: np.ndarray
    share: float = 0.0  # overlap / smaller body


def _angle_between(a: _Candidate, b: _Candidate) -> float:
    return rotation_angle_deg(a.rotation @ b.rotation.T)


def _climb(scorer: _Scorer, start: _Candidate) -> _Candidate:
    current = start
    for step in REFINE_STEPS_DEG:
        for _ in range(6):  # a few moves per step size; the next smaller step continues
            moves = [
                scorer.best(current.rotation @ axis_rotation(axis, sign * step))
                for axis in range(3)
                for sign in (-1.0, 1.0)
            ]
            best = max(moves, key=lambda c: c.score)
            if best.score <= current.score:
                break
            current = best
    return current


class _Scorer:
    """Masked NCC of HU over the bodies' overlap, for every translation of one rotation, by FFT.

    corr(a, b)[k] = sum_x a(x) b(x + k); the six correlations below give, for every shift, the
    overlap size, the sums and the sums of squares of both images over the overlap, and their
    cross term.
    """

    def __init__(self, fixed: CoarseCT, moving: CoarseCT, min_overlap: float = MIN_OVERLAP):
        self.fixed = fixed
        self.moving = moving
        mask = torch.as_tensor(fixed.body, dtype=torch.float32)
        values = torch.as_tensor(fixed.values) * mask
        self.fixed_stack = torch.stack([mask, values, values**2])
        self.smaller = min(float(fixed.body.sum()), float(moving.body.sum()))
        self.min_count = min_overlap * self.smaller
        self.moving_volume = torch.stack(
            [torch.as_tensor(moving.body, dtype=torch.float32), torch.as_tensor(moving.values)]
        )[None]
        self.moving_body = moving.grid.index_to_physical(np.argwhere(moving.body)[:, ::-1] * 1.0)
        self._spectra: dict[tuple[int, ...], torch.Tensor] = {}
        self.evaluations = 0

    def best(self, rotation: np.ndarray) -> _Candidate:
        """The best translation for ``rotation`` (fixed -> moving, 3x3)."""
        self.evaluations += 1
        grid, mask, values = self._rotated_moving(rotation)
        score, count = self._scores(mask, values)
        flat = int(torch.argmax(score))
        value = float(score.reshape(-1)[flat])
        if not np.isfinite(value):
            return _Candidate(rotation, -1.0, np.eye(4))
        share = float(count.reshape(-1)[flat]) / self.smaller
        peak = np.array(np.unravel_index(flat, score.shape))
        shift = peak + _parabolic_offsets(score, peak)
        padded = np.array(score.shape)
        shift = np.where(peak >= np.array(mask.shape), shift - padded, shift)
        spacing = self.fixed.grid.spacing[0]
        translation = (
            np.array(grid.origin)
            + rotation @ (shift[::-1] * spacing)
            - rotation @ np.array(self.fixed.grid.origin)
        )
        matrix = np.eye(4)
        matrix[:3, :3], matrix[:3, 3] = rotation, translation
        return _Candidate(rotation, value, matrix, share)

    def _rotated_moving(self, rotation: np.ndarray) -> tuple[Grid, torch.Tensor, torch.Tensor]:
        """The moving CT resampled on a grid of direction ``rotation`` tight around its body."""
        spacing = self.moving.grid.spacing[0]
        local = self.moving_body @ rotation  # coordinates along the rotated axes
        low, high = local.min(axis=0) - spacing, local.max(axis=0) + spacing
        size_xyz = np.ceil((high - low) / spacing).astype(int) + 1
        grid = Grid(tuple(size_xyz[::-1]), (spacing,) * 3, tuple(rotation @ low), rotation)
        axes = [torch.arange(n, dtype=torch.float64) * spacing for n in size_xyz]
        x, y, z = torch.meshgrid(*axes, indexing="ij")
        local_points = torch.stack([x, y, z], dim=-1).permute(2, 1, 0, 3) + torch.as_tensor(low)
        points = local_points @ torch.as_tensor(rotation).T  # (z, y, x, 3) LPS mm
        source = self.moving.grid
        last = torch.tensor([max(n - 1, 1) for n in source.size_xyz], dtype=torch.float64)
        norm = (points - torch.as_tensor(source.origin)) / spacing / last * 2.0 - 1.0
        sampled = F.grid_sample(
            self.moving_volume, norm[None].float(), mode="bilinear", align_corners=True
        )[0]
        mask = (sampled[0] >= 0.5).float()
        values = torch.where(mask > 0, sampled[1] / sampled[0].clamp(min=1e-6), 0.0)
        return grid, mask, values

    def _scores(
        self, mask: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """NCC and overlap size for every shift."""
        shape = [_fast_size(a + b - 1) for a, b in zip(self.fixed.body.shape, mask.shape)]
        fixed = self._fixed_spectra(shape)
        dims = (1, 2, 3)
        moving = torch.fft.rfftn(torch.stack([mask, values, values**2]), s=shape, dim=dims)
        # (overlap, sum f, sum f^2) against the moving mask; (sum m, sum m^2, sum fm).
        products = torch.stack(
            [fixed[0] * moving[0], fixed[1] * moving[0], fixed[2] * moving[0]]
            + [fixed[0] * moving[1], fixed[0] * moving[2], fixed[1] * moving[1]]
        )
        count, sf, sff, sm, smm, sfm = torch.fft.irfftn(products, s=shape, dim=dims)
        count = count.round()
        n = count.clamp(min=1.0)
        cov = sfm - sf * sm / n
        var = (sff - sf**2 / n).clamp(min=0.0) * (smm - sm**2 / n).clamp(min=0.0)
        valid = (count >= max(self.min_count, 8.0)) & (var > 1e-6 * n**2)
        return torch.where(valid, cov / var.clamp(min=1e-12).sqrt(), -np.inf), count

    def _fixed_spectra(self, shape: list[int]) -> torch.Tensor:
        key = tuple(shape)
        if key not in self._spectra:
            spectra = torch.fft.rfftn(self.fixed_stack, s=shape, dim=(1, 2, 3)).conj()
            self._spectra = {key: spectra}  # the next rotation usually has another shape
        return self._spectra[key]


def _fast_size(n: int) -> int:
    """The smallest size >= n with no prime factor above 5: FFTs of other sizes are far slower."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _parabolic_offsets(score: torch.Tensor, peak: np.ndarray) -> np.ndarray:
    """Sub-voxel offset of the peak along each axis from a parabola through its neighbours."""
    offsets = np.zeros(3)
    for axis in range(3):
        values = []
        for step in (-1, 0, 1):
            index = peak.copy()
            index[axis] = (index[axis] + step) % score.shape[axis]
            values.append(float(score[tuple(index)]))
        low, mid, high = values
        curvature = low - 2.0 * mid + high
        if np.isfinite(low) and np.isfinite(high) and curvature < 0:
            offsets[axis] = np.clip(0.5 * (low - high) / curvature, -0.5, 0.5)
    return offsets


def masked_ncc_at(fixed: CoarseCT, moving: CoarseCT, affine: np.ndarray) -> float:
    """NCC of HU over the bodies' overlap when the moving CT is pulled through ``affine``."""
    zyx = np.argwhere(fixed.body)
    points = fixed.grid.index_to_physical(zyx[:, ::-1] * 1.0)
    mapped = apply(affine, points)
    source = moving.grid
    last = np.array([max(n - 1, 1) for n in source.size_xyz])
    norm = (mapped - np.array(source.origin)) / np.array(source.spacing) / last * 2.0 - 1.0
    volume = torch.stack(
        [torch.as_tensor(moving.body, dtype=torch.float32), torch.as_tensor(moving.values)]
    )[None]
    sampled = F.grid_sample(
        volume, torch.as_tensor(norm, dtype=torch.float32).reshape(1, -1, 1, 1, 3),
        mode="bilinear", align_corners=True,
    ).reshape(2, -1)  # fmt: skip
    inside = (sampled[0] >= 0.5).numpy()
    if inside.sum() < 8:
        return -1.0
    f = fixed.values[tuple(zyx[inside].T)].astype(np.float64)
    m = (sampled[1] / sampled[0].clamp(min=1e-6)).numpy()[inside].astype(np.float64)
    f, m = f - f.mean(), m - m.mean()
    denominator = np.sqrt((f**2).sum() * (m**2).sum())
    return float((f * m).sum() / denominator) if denominator > 0 else -1.0


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, dtype=np.float64) @ matrix[:3, :3].T + matrix[:3, 3]


def axis_rotations() -> list[np.ndarray]:
    """The 24 rotations that map the coordinate axes onto coordinate axes (no reflections)."""
    found = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[list(range(3)), list(perm)] = signs
            if np.linalg.det(matrix) > 0:
                found.append(matrix)
    return found


def rough_rotations() -> list[np.ndarray]:
    """The 24 axis-aligned rotations, each also turned 45 degrees either way about each axis.

    No rotation is more than about 40 degrees from one of these 168, close enough for the hill
    climb; the axis-aligned ones alone leave gaps of up to 63 degrees.
    """
    turns = [np.eye(3)] + [axis_rotation(a, d) for a in range(3) for d in (-45.0, 45.0)]
    return [base @ turn for base in axis_rotations() for turn in turns]


def axis_rotation(axis: int, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about coordinate axis 0 (x), 1 (y) or 2 (z)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """The angle of a rotation matrix (0 to 180 degrees)."""
    cosine = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cosine)))


def _rotation_part(affine: np.ndarray) -> np.ndarray:
    """The rotation nearest to the linear part of an affine (polar decomposition)."""
    u, _, vt = np.linalg.svd(affine[:3, :3])
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        u[:, -1] *= -1
        rotation = u @ vt
    return rotation
