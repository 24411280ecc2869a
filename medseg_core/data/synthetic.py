"""Synthetic multi-site federation: anatomy-like 3D phantoms written as real nnU-Net v2 site folders.

Each case is one "patient": a body (elliptic cylinder with an irregular outline, subcutaneous fat,
visceral fat patches, a spine with discs, an unlabelled distractor organ), a labelled organ (smooth
irregular blob on the patient's right, liver-like) and, in a site-specific fraction of cases, 1-3
lesions inside the organ. The anatomy is defined in world coordinates (millimetres, RAS+) and sampled
on each site's voxel grid, so spacing, axis order and flips change only how a patient is *stored*, and
the affine written to the NIfTI file says so correctly.

Each site is a different "scanner" (:class:`ScannerProfile`): CT in Hounsfield units (air -1000, one
site stored without the rescale intercept) or MR in arbitrary positive units with Rician noise and a
strong bias field; T1-like or T2-like contrast (lesions darker or brighter than the organ); isotropic
or thick-slice spacing; LPS-flipped or permuted storage; noise level; lesion prevalence.

Image formation per channel: tissue means + texture -> multiplicative bias field -> partial-volume
blur (Gaussian PSF, 0.5 voxel) -> noise -> site intensity scale/offset. Labels are ``uint8``
(0 background, 1 organ, 2 lesion), images ``float32``. The same seed gives byte-identical arrays.

Why not an existing generator: MONAI's ``create_test_image_3d`` draws random spheres in voxel space
(no anatomy, spacing, orientation or scanner model), and TorchIO's random artefact transforms need
real images to start from; neither writes a multi-site federation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

LABELS = {"background": 0, "organ": 1, "lesion": 2}
FILE_ENDING = ".nii.gz"

# Tissue indices of the internal tissue map (not written; the label map is derived from it).
AIR, FAT, MUSCLE, BONE, OTHER, ORGAN, LESION, COUCH = range(8)
_N_TISSUES = 8

# Mean intensity per tissue (index order above) and texture amplitude per tissue, per contrast.
# CT values are Hounsfield units; MR values are arbitrary units before the site's scale.
_CONTRASTS: dict[str, dict[str, tuple[float, ...]]] = {
    "CT-venous": {  # portal-venous phase: enhancing organ, hypodense lesions
        "mean": (-1000.0, -100.0, 45.0, 650.0, 160.0, 110.0, 50.0, 0.0),
        "texture": (0.0, 10.0, 8.0, 60.0, 8.0, 6.0, 8.0, 20.0),
    },
    "CT-arterial": {  # arterial phase: hyper-enhancing lesions
        "mean": (-1000.0, -100.0, 50.0, 650.0, 210.0, 75.0, 140.0, 0.0),
        "texture": (0.0, 10.0, 8.0, 60.0, 10.0, 6.0, 12.0, 20.0),
    },
    "T1": {  # fat bright, organ mid-grey, lesions dark
        "mean": (0.0, 850.0, 300.0, 620.0, 360.0, 520.0, 250.0, 0.0),
        "texture": (0.0, 40.0, 20.0, 40.0, 20.0, 20.0, 20.0, 0.0),
    },
    "T2": {  # organ dark, lesions and distractor bright
        "mean": (0.0, 560.0, 140.0, 380.0, 480.0, 260.0, 680.0, 0.0),
        "texture": (0.0, 30.0, 12.0, 20.0, 25.0, 12.0, 40.0, 0.0),
    },
}


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner images a patient.

    Attributes:
        description: human-readable summary written to ``dataset.json`` and used as plot title.
        modality: ``"CT"`` or ``"MR"``.
        contrasts: one contrast name per channel (keys of the contrast table); cycled if a site is
            asked for more channels.
        channel_names: ``dataset.json`` channel name per contrast (``"CT"`` triggers CT normalisation).
        spacing_mm: voxel size along world x, y, z (RAS) in millimetres.
        axis_order: world axis stored along each voxel axis, e.g. ``(2, 1, 0)``: array axis 0 is S-I.
        flips: per world axis, ``True`` if the array index increases towards -x / -y / -z.
        noise_sigma: standard deviation of the acquisition noise, in the contrast's units.
        rician: magnitude (MR) noise instead of Gaussian (CT).
        bias_strength: standard deviation of the log bias field (0.3 is strong MR shading).
        intensity_scale: multiplies the stored values (MR: arbitrary scanner scale).
        intensity_offset: added to the stored values (CT without rescale intercept: +1024).
        case_scale_jitter: per-case relative jitter of the global scale (MR is not calibrated).
        lesion_prevalence: fraction of cases with at least one lesion.
        couch: draw the CT table below the patient.
    """

    description: str
    modality: str
    contrasts: tuple[str, ...]
    channel_names: tuple[str, ...]
    spacing_mm: tuple[float, float, float]
    axis_order: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)
    noise_sigma: float = 20.0
    rician: bool = False
    bias_strength: float = 0.0
    intensity_scale: float = 1.0
    intensity_offset: float = 0.0
    case_scale_jitter: float = 0.0
    lesion_prevalence: float = 0.5
    couch: bool = False

    def __post_init__(self) -> None:
        if sorted(self.axis_order) != [0, 1, 2]:
            raise ValueError(f"axis_order must be a permutation of (0, 1, 2), got {self.axis_order}")
        if len(self.spacing_mm) != 3 or not all(s > 0 and math.isfinite(s) for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be 3 positive numbers, got {self.spacing_mm}")
        if not self.contrasts or any(c not in _CONTRASTS for c in self.contrasts):
            raise ValueError(f"contrasts must be among {sorted(_CONTRASTS)}, got {self.contrasts}")
        if len(self.channel_names) != len(self.contrasts):
            raise ValueError(f"need one channel name per contrast, got {self.channel_names} for {self.contrasts}")
        if not 0.0 <= self.lesion_prevalence <= 1.0:
            raise ValueError(f"lesion_prevalence must be in [0, 1], got {self.lesion_prevalence}")
        if self.noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {self.noise_sigma}")

    @property
    def orientation(self) -> str:
        """Axis codes of the stored array, e.g. ``"LPS"`` or ``"SAL"`` (nibabel convention)."""
        pos, neg = ("R", "A", "S"), ("L", "P", "I")
        return "".join((neg if self.flips[w] else pos)[w] for w in self.axis_order)

    @property
    def voxel_spacing_mm(self) -> tuple[float, float, float]:
        """Spacing along the stored array axes (what the NIfTI header's pixdim says)."""
        return tuple(self.spacing_mm[w] for w in self.axis_order)  # type: ignore[return-value]

    def affine(self, shape: Sequence[int], center_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
        """4x4 voxel-to-world (RAS+, mm) matrix of a grid of ``shape`` centred on ``center_mm``."""
        aff = np.zeros((4, 4))
        aff[3, 3] = 1.0
        for a, w in enumerate(self.axis_order):
            aff[w, a] = -self.spacing_mm[w] if self.flips[w] else self.spacing_mm[w]
        centre_vox = (np.asarray(shape, dtype=float) - 1.0) / 2.0
        aff[:3, 3] = np.asarray(center_mm, dtype=float) - aff[:3, :3] @ centre_vox
        return aff

    def to_dict(self) -> dict:
        d = asdict(self)
        d["orientation"] = self.orientation
        d["voxel_spacing_mm"] = list(self.voxel_spacing_mm)
        return d


BASE_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        description="CT portal-venous, HU, 0.8x0.8x2.5 mm, stored LPS",
        modality="CT", contrasts=("CT-venous", "CT-arterial"), channel_names=("CT", "CT"),
        spacing_mm=(0.8, 0.8, 2.5), flips=(True, True, False), noise_sigma=18.0, bias_strength=0.01,
        lesion_prevalence=0.5, couch=True,
    ),
    ScannerProfile(
        description="MR T1-like 1.5T, arbitrary units, 1 mm isotropic, RAS, strong bias field",
        modality="MR", contrasts=("T1", "T2"), channel_names=("T1", "T2"),
        spacing_mm=(1.0, 1.0, 1.0), noise_sigma=30.0, rician=True, bias_strength=0.25,
        intensity_scale=1.0, case_scale_jitter=0.15, lesion_prevalence=0.75,
    ),
    ScannerProfile(
        description="MR T2-like 3T, arbitrary units x4, 1.2x1.2x2 mm, stored axes permuted (SAL)",
        modality="MR", contrasts=("T2", "T1"), channel_names=("T2", "T1"),
        spacing_mm=(1.2, 1.2, 2.0), axis_order=(2, 1, 0), flips=(True, False, False), noise_sigma=28.0,
        rician=True, bias_strength=0.35, intensity_scale=4.0, case_scale_jitter=0.2, lesion_prevalence=0.3,
    ),
    ScannerProfile(
        description="CT low-dose, stored without rescale intercept (air ~ +24), 0.7x0.7x3 mm, RAS",
        modality="CT", contrasts=("CT-venous", "CT-arterial"), channel_names=("CT", "CT"),
        spacing_mm=(0.7, 0.7, 3.0), noise_sigma=35.0, bias_strength=0.01, intensity_offset=1024.0,
        lesion_prevalence=0.6, couch=True,
    ),
)


def site_profile(site_index: int, seed: int = 0) -> ScannerProfile:
    """Scanner profile of site ``site_index``.

    Sites 0-3 use :data:`BASE_PROFILES` unchanged (seed-independent, so ``site_00`` is always the CT
    site); later sites cycle through them with seeded perturbations of spacing, noise, intensity scale
    and lesion prevalence.
    """
    if site_index < 0:
        raise ValueError(f"site_index must be >= 0, got {site_index}")
    base = BASE_PROFILES[site_index % len(BASE_PROFILES)]
    if site_index < len(BASE_PROFILES):
        return base
    rng = np.random.default_rng(np.random.SeedSequence([seed, site_index, 7919]))
    inplane = float(rng.choice([0.6, 0.7, 0.8, 0.9, 1.0]))
    spacing = (inplane, inplane, float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0])))
    noise = base.noise_sigma * float(rng.uniform(0.7, 1.5))
    scale = base.intensity_scale * (float(rng.uniform(0.5, 3.0)) if base.modality == "MR" else 1.0)
    prevalence = round(float(rng.uniform(0.2, 0.9)), 2)
    desc = (f"{base.description.split(',')[0]} (variant {site_index}), "
            f"{spacing[0]:g}x{spacing[1]:g}x{spacing[2]:g} mm, noise x{noise / base.noise_sigma:.2f}")
    return replace(base, description=desc, spacing_mm=spacing, noise_sigma=noise, intensity_scale=scale,
                   lesion_prevalence=prevalence)


class _Grid:
    """World coordinates of a voxel grid whose affine is a scaled, signed axis permutation.

    World coordinate ``w`` depends on one voxel axis only, so coordinates are kept as broadcastable 1D
    arrays and smooth noise fields are built by separable B-spline upsampling (cheap tensor products
    instead of ``map_coordinates`` on every voxel).
    """

    def __init__(self, shape: Sequence[int], affine: np.ndarray) -> None:
        self.shape = tuple(int(s) for s in shape)
        lin = affine[:3, :3]
        self.axis_of_world = [int(np.argmax(np.abs(lin[w]))) for w in range(3)]  # voxel axis per world axis
        if sorted(self.axis_of_world) != [0, 1, 2] or np.count_nonzero(lin) != 3:
            raise ValueError(f"affine must be a scaled axis permutation, got\n{affine}")
        self.world_of_axis = [self.axis_of_world.index(a) for a in range(3)]
        self.coords = [
            affine[w, 3] + lin[w, self.axis_of_world[w]] * np.arange(self.shape[self.axis_of_world[w]])
            for w in range(3)
        ]  # 1D world coordinate (mm) along the voxel axis carrying world axis w

    def world(self, w: int) -> np.ndarray:
        """World coordinate ``w`` (mm) as an array broadcastable to the grid shape."""
        view = [1, 1, 1]
        view[self.axis_of_world[w]] = -1
        return self.coords[w].astype(np.float32).reshape(view)

    def field(self, rng: np.random.Generator, cell_mm: float) -> np.ndarray:
        """Smooth random field of roughly unit variance with features about ``2 * cell_mm`` wide.

        Returns:
            float32 array of the grid shape.
        """
        weights, n_nodes = [], []
        for w in range(3):
            c = self.coords[w]
            lo = float(c.min()) - 2.0 * cell_mm
            n = int(math.ceil((float(c.max()) + 2.0 * cell_mm - lo) / cell_mm)) + 1
            d = np.abs((c[:, None] - lo) / cell_mm - np.arange(n)[None, :])  # [N_w, n] distance in cells
            b = np.where(d < 1.0, 2.0 / 3.0 - d**2 + 0.5 * d**3, np.where(d < 2.0, (2.0 - d) ** 3 / 6.0, 0.0))
            weights.append(b.astype(np.float32))
            n_nodes.append(n)
        nodes = rng.standard_normal(n_nodes).astype(np.float32)
        # One axis at a time with plain einsum (no BLAS: multithreaded BLAS on these tiny products only
        # spins on a busy machine). Result [Nx, Ny, Nz] in world-axis order; 1 / 0.331 undoes the cubic
        # B-spline's variance reduction.
        f = np.einsum("ia,abc->ibc", weights[0], nodes)
        f = np.einsum("jb,ibc->ijc", weights[1], f)
        f = np.einsum("kc,ijc->ijk", weights[2], f) * np.float32(1.0 / 0.331)
        return np.ascontiguousarray(np.transpose(f, self.world_of_axis))


def _rotation(rng: np.random.Generator, max_deg: Sequence[float]) -> np.ndarray:
    """Random rotation: about x, y, z by up to ``max_deg`` degrees each."""
    ax, ay, az = (math.radians(rng.uniform(-m, m)) for m in max_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid_level(grid: _Grid, center: Sequence[float], semi_axes: Sequence[float],
                     rot: np.ndarray) -> np.ndarray:
    """Normalised radius ``|R^T (p - c) / a|`` at every voxel (< 1 inside the ellipsoid)."""
    d = [grid.world(w) - np.float32(center[w]) for w in range(3)]
    level = np.zeros(grid.shape, dtype=np.float32)
    for k in range(3):  # body axis k of the rotated ellipsoid
        u = d[0] * np.float32(rot[0, k]) + d[1] * np.float32(rot[1, k]) + d[2] * np.float32(rot[2, k])
        level += (u / np.float32(semi_axes[k])) ** 2
    return np.sqrt(level)


def _phantom(grid: _Grid, rng: np.random.Generator, radius_mm: float, profile: ScannerProfile,
             with_lesion: bool) -> np.ndarray:
    """Tissue map (uint8 tissue indices, grid shape) of one random patient."""
    r = radius_mm * rng.uniform(0.93, 1.05)  # patient size
    shift = rng.uniform(-0.04, 0.04, size=3) * radius_mm
    x, y, z = (grid.world(w) - np.float32(shift[w]) for w in range(3))
    tissue = np.full(grid.shape, AIR, dtype=np.uint8)

    # Body: elliptic cylinder along z, outline and fat thickness wobbling smoothly.
    a, b = r, r * rng.uniform(0.68, 0.8)
    body_r = np.sqrt((x / np.float32(a)) ** 2 + (y / np.float32(b)) ** 2)
    body_r = body_r * (1.0 + np.float32(0.05) * grid.field(rng, 0.5 * r))
    body = body_r < 1.0
    fat_thickness = rng.uniform(0.1, 0.2)
    inner = body_r * (1.0 + np.float32(0.4 * fat_thickness) * grid.field(rng, 0.3 * r)) < 1.0 - fat_thickness
    tissue[body] = FAT
    tissue[inner] = MUSCLE
    tex = grid.field(rng, 0.12 * r)  # reused below: visceral fat where it is high
    tissue[inner & (tex > 1.3) & (body_r < 0.8)] = FAT

    # Spine: posterior midline, discs every ~0.9 r along z.
    sx, sy = 0.16 * r, 0.13 * r
    spine = ((x / np.float32(sx)) ** 2 + ((y + np.float32(0.58 * b)) / np.float32(sy)) ** 2) < 1.0
    discs = np.cos(np.float32(2 * math.pi / (0.9 * r)) * z + np.float32(rng.uniform(0, 2 * math.pi))) > -0.8
    tissue[spine & discs] = BONE
    tissue[spine & ~discs] = MUSCLE

    # Distractor organ (spleen/kidney-like): patient's left (-x), posterior; unlabelled.
    deform = grid.field(rng, 0.25 * r)
    other_c = (-0.5 * a + rng.normal(0, 0.04 * r), -0.2 * b + rng.normal(0, 0.04 * r), rng.normal(0, 0.15 * r))
    other_ax = (0.22 * r * rng.uniform(0.85, 1.15), 0.3 * r * rng.uniform(0.85, 1.15), 0.55 * r)
    other = _ellipsoid_level(grid, np.add(other_c, shift), other_ax, _rotation(rng, (10, 10, 30)))
    tissue[(other * (1.0 + np.float32(0.12) * deform) < 1.0) & inner] = OTHER

    # Organ (liver-like): patient's right (+x), anterior; irregular low-frequency deformation.
    organ_c = (0.3 * a + rng.normal(0, 0.05 * r), 0.05 * b + rng.normal(0, 0.05 * r), rng.normal(0, 0.12 * r))
    organ_ax = (0.6 * r * rng.uniform(0.85, 1.1), 0.52 * r * rng.uniform(0.85, 1.1), 0.9 * r * rng.uniform(0.85, 1.1))
    organ_lv = _ellipsoid_level(grid, np.add(organ_c, shift), organ_ax, _rotation(rng, (10, 10, 25)))
    organ_lv *= 1.0 + np.float32(0.18) * grid.field(rng, 0.22 * r)
    organ = (organ_lv < 1.0) & inner & (body_r < 0.94 - fat_thickness)  # keep a muscle wall
    components, n_components = ndimage.label(organ)
    if n_components > 1:  # one connected organ: drop fragments cut off by the deformation
        organ = components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    tissue[organ] = ORGAN

    if with_lesion and organ.any():
        deep = np.flatnonzero(organ & (organ_lv < 0.6))
        if deep.size == 0:
            deep = np.flatnonzero(organ)
        n_lesions = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        min_r = 0.9 * max(abs(float(c[1] - c[0])) if c.size > 1 else 1.0 for c in grid.coords)
        lesion = np.zeros(grid.shape, dtype=bool)
        for _ in range(n_lesions):
            idx = np.unravel_index(int(deep[rng.integers(deep.size)]), grid.shape)
            centre = [float(grid.coords[w][idx[grid.axis_of_world[w]]]) for w in range(3)]
            rad = max(rng.uniform(0.13, 0.26) * r, min_r)
            lv = _ellipsoid_level(grid, centre, (rad, rad * rng.uniform(0.8, 1.2), rad * rng.uniform(0.8, 1.2)),
                                  _rotation(rng, (30, 30, 30)))
            lesion |= lv * (1.0 + np.float32(0.12) * deform) < 1.0
        tissue[lesion & organ] = LESION

    if profile.couch:  # CT table: thin curved slab below the patient's back, only in air
        top = -1.2 * b + shift[1]
        curve = top + 0.1 * b * (grid.world(0) / np.float32(a)) ** 2
        yy = grid.world(1)
        couch = (yy < curve) & (yy > curve - np.float32(0.15 * r)) & (np.abs(grid.world(0)) < 1.3 * a)
        tissue[couch & (tissue == AIR)] = COUCH
    return tissue


def _render(tissue: np.ndarray, grid: _Grid, rng: np.random.Generator, profile: ScannerProfile,
            contrast: str, radius_mm: float) -> np.ndarray:
    """One channel (float32, grid shape) of a tissue map as seen by ``profile`` with ``contrast``."""
    table = _CONTRASTS[contrast]
    ct = profile.modality == "CT"
    jitter = rng.normal(0.0, 8.0 if ct else 0.04, size=_N_TISSUES)
    means = np.asarray(table["mean"]) + (jitter if ct else np.asarray(table["mean"]) * jitter)
    means[AIR] = table["mean"][AIR]
    img = means.astype(np.float32)[tissue]
    img += np.asarray(table["texture"], dtype=np.float32)[tissue] * grid.field(rng, 0.08 * radius_mm)
    if profile.bias_strength > 0:
        bias = np.exp(np.float32(profile.bias_strength) * grid.field(rng, 1.2 * radius_mm))
        img = (img + 1000.0) * bias - 1000.0 if ct else img * bias  # CT: bias acts on attenuation
    img = ndimage.gaussian_filter(img, sigma=0.5, mode="nearest")  # partial volume (PSF ~ 1 voxel FWHM)
    sigma = np.float32(profile.noise_sigma)
    if profile.rician:
        img = np.sqrt((img + sigma * rng.standard_normal(img.shape, dtype=np.float32)) ** 2
                      + (sigma * rng.standard_normal(img.shape, dtype=np.float32)) ** 2)
    else:
        img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    if ct:
        img = np.clip(img, -1024.0, 3071.0)
    scale = profile.intensity_scale * (1.0 + profile.case_scale_jitter * rng.uniform(-1.0, 1.0))
    return (img * np.float32(scale) + np.float32(profile.intensity_offset)).astype(np.float32)


def make_case(profile: ScannerProfile, shape: Sequence[int], radius_mm: float, rng: np.random.Generator,
              n_channels: int = 1) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, bool]:
    """Simulate one patient at one site.

    Args:
        profile: the site's scanner.
        shape: stored array shape (voxel axes).
        radius_mm: nominal body half-width (mm); organs scale with it.
        rng: random generator (consumed).
        n_channels: number of channels (contrasts cycle through ``profile.contrasts``).

    Returns:
        ``(images, label, affine, has_lesion)``: ``n_channels`` float32 arrays of ``shape``, a uint8
        label map of ``shape`` (0 background, 1 organ, 2 lesion), the 4x4 affine, and whether the
        patient was drawn with lesions (the label may still miss a lesion smaller than a voxel).
    """
    affine = profile.affine(shape)
    grid = _Grid(shape, affine)
    has_lesion = bool(rng.random() < profile.lesion_prevalence)
    tissue = _phantom(grid, rng, radius_mm, profile, has_lesion)
    label = np.zeros(tissue.shape, dtype=np.uint8)
    label[tissue == ORGAN] = LABELS["organ"]
    label[tissue == LESION] = LABELS["lesion"]
    images = [_render(tissue, grid, rng, profile, profile.contrasts[c % len(profile.contrasts)], radius_mm)
              for c in range(n_channels)]
    return images, label, affine, has_lesion


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be 3 integers, got {shape!r}") from None
    if len(out) != 3 or any(s < 8 for s in out):
        raise ValueError(f"shape must be 3 integers >= 8 (3D only), got {shape!r}")
    return out  # type: ignore[return-value]


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def patient_radius_mm(profiles: Sequence[ScannerProfile], shape: Sequence[int]) -> float:
    """Nominal body half-width (mm) that fits every site's in-plane field of view.

    The smallest in-plane half field of view over the sites, times 0.72: with size jitter, outline
    wobble and positioning shift the body stays inside every site's grid.
    """
    shape = _check_shape(shape)
    half_fovs = []
    for p in profiles:
        for w in (0, 1):
            half_fovs.append(0.5 * shape[p.axis_order.index(w)] * p.spacing_mm[w])
    return 0.72 * min(half_fovs)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)  # scanner-anchored, both forms set as DICOM converters do
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def make_site(out_dir: str | Path, site_index: int = 0, cases: int = 8, seed: int = 0,
              shape: Sequence[int] = (64, 64, 64), n_test: int | None = None, n_unlabelled: int = 0,
              n_channels: int = 1, profile: ScannerProfile | None = None, radius_mm: float | None = None,
              on_case: Callable[[str], None] | None = None) -> Path:
    """Write one synthetic site folder (nnU-Net v2 raw layout).

    Files: ``imagesTr/{id}_{c:04d}.nii.gz`` + ``labelsTr/{id}.nii.gz`` for ``cases`` labelled cases,
    ``imagesTs``/``labelsTs`` for ``n_test`` test cases, and ``n_unlabelled`` images in ``imagesTr``
    without a label. Case ids are ``{site}_tr000``, ``{site}_ts000``, ``{site}_ul000``.

    Args:
        out_dir: the site folder (created; must be empty or absent).
        site_index: selects the scanner profile (:func:`site_profile`) and the random stream.
        cases: labelled training cases.
        seed: random seed; each case draws from ``SeedSequence([seed, site, split, index])``, so adding
            test or unlabelled cases does not change the training cases.
        shape: stored array shape (voxel axes), 3D.
        n_test: labelled test cases; default ``max(1, cases // 4)``.
        n_unlabelled: images without label (the pretraining pool).
        n_channels: channels per case (e.g. CT venous + arterial, MR T1 + T2).
        profile: scanner; default :func:`site_profile(site_index, seed) <site_profile>`.
        radius_mm: nominal body half-width; default fits this site's field of view.
        on_case: called with each case id after it is written (progress reporting).

    Returns:
        The site folder.

    Raises:
        ValueError: bad counts or shape.
        FileExistsError: ``out_dir`` exists and is not empty.
    """
    shape = _check_shape(shape)
    site_index = _check_count("site_index", site_index, 0)
    cases = _check_count("cases", cases, 1)
    seed = _check_count("seed", seed, 0)
    n_test = max(1, cases // 4) if n_test is None else _check_count("n_test", n_test, 0)
    n_unlabelled = _check_count("n_unlabelled", n_unlabelled, 0)
    n_channels = _check_count("n_channels", n_channels, 1)
    profile = profile or site_profile(site_index, seed)
    radius_mm = patient_radius_mm([profile], shape) if radius_mm is None else float(radius_mm)
    if not radius_mm > 0:
        raise ValueError(f"radius_mm must be > 0, got {radius_mm}")
    site = Path(out_dir)
    if site.exists() and (not site.is_dir() or any(site.iterdir())):
        raise FileExistsError(f"{site} already exists and is not an empty folder; choose a new output folder")
    name = site.name
    folders = {k: site / k for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for k, d in folders.items():
        if k.endswith("Tr") or n_test > 0:
            d.mkdir(parents=True, exist_ok=True)

    channel_names = {str(c): profile.channel_names[c % len(profile.channel_names)] for c in range(n_channels)}
    stats = {"with_lesion": 0, "labelled": 0}
    plan = ([("tr", i, "imagesTr", "labelsTr") for i in range(cases)]
            + [("ts", i, "imagesTs", "labelsTs") for i in range(n_test)]
            + [("ul", i, "imagesTr", None) for i in range(n_unlabelled)])
    split_code = {"tr": 0, "ts": 1, "ul": 2}
    for split, i, img_dir, lab_dir in plan:
        rng = np.random.default_rng(np.random.SeedSequence([seed, site_index, split_code[split], i]))
        images, label, affine, has_lesion = make_case(profile, shape, radius_mm, rng, n_channels)
        case_id = f"{name}_{split}{i:03d}"
        for c, image in enumerate(images):
            _save(image, affine, folders[img_dir] / f"{case_id}_{c:04d}{FILE_ENDING}")
        if lab_dir is not None:
            _save(label, affine, folders[lab_dir] / f"{case_id}{FILE_ENDING}")
            stats["labelled"] += 1
            stats["with_lesion"] += int(bool((label == LABELS["lesion"]).any()))
        if on_case is not None:
            on_case(case_id)

    meta = {
        "name": f"synthetic {name}",
        "description": f"Synthetic phantoms (medseg_core.data.synthetic), scanner: {profile.description}",
        "channel_names": channel_names,
        "labels": dict(LABELS),
        "numTraining": cases,
        "numTest": n_test,
        "numUnlabelled": n_unlabelled,
        "file_ending": FILE_ENDING,
        "scanner": {**profile.to_dict(), "patient_radius_mm": round(radius_mm, 3)},
        "synthetic": {"seed": seed, "site_index": site_index, "shape": list(shape),
                      "labelled_cases_with_lesion": stats["with_lesion"]},
    }
    with open(site / "dataset.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return site


def make_federation(out_dir: str | Path, n_sites: int = 3, cases_per_site: int = 8, seed: int = 0,
                    shape: Sequence[int] = (64, 64, 64), n_test: int | None = None, n_unlabelled: int = 0,
                    progress: bool = False) -> list[Path]:
    """Write a synthetic federation: ``out_dir/site_00``, ``site_01``, ... one scanner per site.

    Every site images patients of the same nominal size (:func:`patient_radius_mm` over all sites), so
    differences between sites come from the scanners, not from the anatomy.

    Args:
        out_dir: federation root (created if needed; the site folders must not exist or be empty).
        n_sites: number of sites (profiles cycle after 4, with seeded variations).
        cases_per_site: labelled training cases per site.
        seed: random seed; the same seed writes the same voxels.
        shape: stored array shape (voxel axes) of every volume, 3D.
        n_test: labelled test cases per site (``imagesTs``/``labelsTs``); default
            ``max(1, cases_per_site // 4)``.
        n_unlabelled: unlabelled images per site (in ``imagesTr`` without a label).
        progress: show a progress bar (rich) on stderr.

    Returns:
        The site folders, in order.

    Raises:
        ValueError: bad counts or shape.
        FileExistsError: a site folder exists and is not empty.
    """
    shape = _check_shape(shape)
    n_sites = _check_count("n_sites", n_sites, 1)
    cases_per_site = _check_count("cases_per_site", cases_per_site, 1)
    seed = _check_count("seed", seed, 0)
    n_test = max(1, cases_per_site // 4) if n_test is None else _check_count("n_test", n_test, 0)
    n_unlabelled = _check_count("n_unlabelled", n_unlabelled, 0)
    root = Path(out_dir)
    names = [f"site_{i:02d}" for i in range(n_sites)]
    for n in names:  # fail before writing anything
        d = root / n
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise FileExistsError(f"{d} already exists and is not an empty folder; choose a new output folder")
    profiles = [site_profile(i, seed) for i in range(n_sites)]
    radius = patient_radius_mm(profiles, shape)
    root.mkdir(parents=True, exist_ok=True)
    total = n_sites * (cases_per_site + n_test + n_unlabelled)

    def write_all(advance: Callable[[str], None]) -> list[Path]:
        return [make_site(root / name, i, cases_per_site, seed, shape, n_test, n_unlabelled,
                          profile=profiles[i], radius_mm=radius, on_case=advance)
                for i, name in enumerate(names)]

    if not progress:
        return write_all(lambda _case: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]synth[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(str(root), total=total)
        return write_all(lambda case_id: bar.update(task, advance=1, description=case_id))
