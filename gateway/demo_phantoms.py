"""Pixel phantoms for the demo studies: deterministic images that look like the anatomy they name.

No random generator and no clock: noise comes from an integer hash, so every call returns the same
pixels (tests compare them byte for byte).
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# Phantoms. Coordinates are normalised: u (left->right of the image), v (top->bottom), in [-1, 1].


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    v, u = np.meshgrid(axis, axis, indexing="ij")
    return u, v


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    if ru <= 0 or rv <= 0:
        return np.zeros(u.shape, dtype=bool)
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _noise(shape: tuple[int, ...], seed: int, amplitude: int) -> np.ndarray:
    """Deterministic triangular-ish noise in [-amplitude, amplitude] from an integer hash."""
    count = int(np.prod(shape))
    x = np.arange(count, dtype=np.uint64) + np.uint64(seed * 1_000_003 + 12345)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    span = np.uint64(amplitude + 1)
    a = (x % span).astype(np.int32)
    b = ((x >> np.uint64(20)) % span).astype(np.int32)
    return (a + b - amplitude).reshape(shape)


def _unsigned(img: np.ndarray, maximum: int) -> np.ndarray:
    out: np.ndarray = np.clip(np.rint(img), 0, maximum).astype(np.uint16)
    return out


def _ct_chest_hu(size: int, z: float, seed: int, noise: int = 12) -> np.ndarray:
    """Axial chest slice in HU; z=0 at the lung apices, z=1 at the bases (values outside allowed)."""
    u, v = _grid(size)
    img = np.full(u.shape, -1000.0)
    img[(np.abs(u) < 0.8) & (v > 0.74) & (v < 0.8)] = 150.0  # table
    img[_ellipse(u, v, 0, 0.05, 0.86, 0.62)] = -100.0  # subcutaneous fat
    img[_ellipse(u, v, 0, 0.05, 0.80, 0.56)] = 40.0  # muscle / mediastinum
    lung = max(0.0, np.sin(np.pi * min(max(z * 0.9 + 0.08, 0.0), 1.0))) if 0 <= z <= 1.1 else 0.0
    for side in (-1, 1):
        img[_ellipse(u, v, side * 0.37, 0.02, 0.27 * lung, 0.42 * lung)] = -860.0
        vessels = _ellipse(u, v, side * 0.3, 0.05, 0.03 * lung, 0.03 * lung)
        img[vessels] = 30.0
    heart = max(0.0, min(1.0, (z - 0.35) * 2.0)) * (1.0 if z < 1.05 else 0.0)
    img[_ellipse(u, v, 0.12, 0.0, 0.24 * heart, 0.2 * heart)] = 45.0
    img[_ellipse(u, v, -0.04, 0.25, 0.07, 0.07)] = 42.0  # descending aorta
    img[_ellipse(u, v, 0, 0.42, 0.1, 0.09)] = 800.0  # vertebral body cortex
    img[_ellipse(u, v, 0, 0.42, 0.085, 0.075)] = 300.0  # cancellous bone
    img[_ellipse(u, v, 0, 0.54, 0.035, 0.03)] = 20.0  # spinal canal
    img[_ellipse(u, v, 0, -0.5, 0.05, 0.025)] = 450.0  # sternum
    for k in range(14):
        angle = np.pi * (0.12 + 0.76 * k / 13) if k < 7 else np.pi * (1.12 + 0.76 * (k - 7) / 6)
        cu, cv = 0.74 * np.cos(angle), 0.05 + 0.5 * np.sin(angle)
        img[_ellipse(u, v, cu, cv, 0.03, 0.02)] = 700.0  # ribs
    img += _noise(img.shape, seed, noise)
    img[u**2 + v**2 > 1.0] = np.nan  # outside the reconstruction circle
    return img


def _ct_abdomen_hu(size: int, z: float, seed: int) -> np.ndarray:
    u, v = _grid(size)
    img = np.full(u.shape, -1000.0)
    img[(np.abs(u) < 0.8) & (v > 0.74) & (v < 0.8)] = 150.0
    img[_ellipse(u, v, 0, 0.05, 0.9, 0.64)] = -100.0
    img[_ellipse(u, v, 0, 0.05, 0.82, 0.56)] = 35.0
    liver = max(0.0, 1.0 - z * 1.1)
    img[_ellipse(u, v, -0.35, -0.02, 0.38 * liver, 0.36 * liver)] = 62.0
    spleen = max(0.0, 0.8 - z)
    img[_ellipse(u, v, 0.5, 0.15, 0.16 * spleen, 0.22 * spleen)] = 50.0
    kidney = max(0.0, np.sin(np.pi * z))
    for side in (-1, 1):
        img[_ellipse(u, v, side * 0.32, 0.3, 0.11 * kidney, 0.16 * kidney)] = 32.0
    img[_ellipse(u, v, -0.06, 0.22, 0.06, 0.06)] = 40.0  # aorta
    for k in range(5):  # bowel gas, wandering with z
        cu = -0.2 + 0.12 * k + 0.05 * np.sin(7 * z + k)
        cv = -0.25 + 0.08 * np.cos(5 * z + 2 * k)
        img[_ellipse(u, v, cu, cv, 0.05, 0.04)] = -900.0
    img[_ellipse(u, v, 0, 0.42, 0.11, 0.09)] = 850.0
    img[_ellipse(u, v, 0, 0.42, 0.095, 0.075)] = 280.0
    img[_ellipse(u, v, 0, 0.55, 0.035, 0.03)] = 20.0
    img += _noise(img.shape, seed, 14)
    img[u**2 + v**2 > 1.0] = np.nan
    return img


def _ct_stored(hu: np.ndarray) -> np.ndarray:
    """HU -> stored values for RescaleIntercept -1024, with -2000 padding outside the FOV."""
    stored = np.where(np.isnan(hu), -2000.0, np.clip(np.nan_to_num(hu) + 1024.0, 0, 4095))
    return np.rint(stored).astype(np.int16)


def _ct_topogram(size: int) -> np.ndarray:
    """Coronal projection of the chest phantom (rows = head to feet) as stored CT values."""
    rows = []
    for r in range(size):
        z = -0.35 + 1.7 * r / (size - 1)
        hu = np.nan_to_num(_ct_chest_hu(size, z, seed=0, noise=0), nan=-1000.0)
        rows.append(np.clip(hu + 1000.0, 0, None).sum(axis=0) / size)
    proj = np.array(rows)
    proj = proj / max(float(proj.max()), 1.0) * 2600.0 - 1000.0 + _noise(proj.shape, 7, 8)
    return _ct_stored(proj)


def _mr_brain(size: int, z: float, weighting: str, seed: int) -> np.ndarray:
    """Axial brain slice, z=0 skull base, z=1 vertex. T1: fat bright, CSF dark; T2 the reverse."""
    t = {
        "T1": {"scalp": 950, "skull": 40, "csf": 180, "gm": 560, "wm": 760, "lesion": 420},
        "T2": {"scalp": 620, "skull": 30, "csf": 1500, "gm": 820, "wm": 560, "lesion": 1250},
    }[weighting]
    u, v = _grid(size)
    img = np.zeros(u.shape)
    s = np.sqrt(max(0.0, 1.0 - ((z - 0.35) / 0.75) ** 2))
    layers = (("scalp", 1.0), ("skull", 0.95), ("csf", 0.89), ("gm", 0.86), ("wm", 0.7))
    for name, k in layers:
        img[_ellipse(u, v, 0, 0.02, 0.72 * s * k, 0.88 * s * k)] = t[name]
    img[(np.abs(u) < 0.012) & _ellipse(u, v, 0, 0.02, 0.7 * s, 0.86 * s)] = t["csf"]  # falx
    vent = max(0.0, np.sin(np.pi * (z - 0.3) / 0.45)) if 0.3 < z < 0.75 else 0.0
    for side in (-1, 1):
        img[_ellipse(u, v, side * 0.09, -0.05, 0.06 * vent, 0.3 * vent)] = t["csf"]
    if 0.5 < z < 0.75:
        img[_ellipse(u, v, 0.32, -0.25, 0.08, 0.07)] = t["lesion"]
    img += np.where(img > 0, _noise(img.shape, seed, 15), 0) + np.abs(_noise(img.shape, seed + 1, 6))
    return _unsigned(img, 4095)


def _pet(size: int, z: float, seed: int) -> np.ndarray:
    """Activity (kBq/ml x 100): body background, myocardium, a hot lesion in the right lung."""
    u, v = _grid(size)
    img = np.zeros(u.shape)
    img[_ellipse(u, v, 0, 0.05, 0.86, 0.62)] = 250.0
    lung = max(0.0, np.sin(np.pi * min(max(z * 0.9 + 0.08, 0.0), 1.0)))
    for side in (-1, 1):
        img[_ellipse(u, v, side * 0.37, 0.02, 0.27 * lung, 0.42 * lung)] = 60.0
    heart = max(0.0, min(1.0, (z - 0.35) * 2.0))
    img[_ellipse(u, v, 0.12, 0.0, 0.24 * heart, 0.2 * heart)] = 1400.0
    img[_ellipse(u, v, 0.12, 0.0, 0.15 * heart, 0.12 * heart)] = 300.0
    if 0.3 < z < 0.6:
        img[_ellipse(u, v, -0.4, -0.1, 0.07, 0.07)] = 3200.0
    img += np.where(img > 0, _noise(img.shape, seed, 40), 0)
    return _unsigned(img, 65535)


def _cr_chest(size: int, lateral: bool, seed: int) -> np.ndarray:
    """Detector exposure (MONOCHROME1: high = dark on display): lungs high, bone low."""
    u, v = _grid(size)
    img = np.full(u.shape, 3900.0)
    if lateral:
        img[_ellipse(u, v, 0.0, 0.1, 0.55, 0.85)] = 1900.0
        img[_ellipse(u, v, -0.05, -0.05, 0.4, 0.55)] = 3000.0
        img[_ellipse(u, v, 0.25, 0.1, 0.18, 0.22)] = 1700.0
        img[(u > 0.42) & (u < 0.5) & (np.abs(v) < 0.8)] = 800.0  # spine
    else:
        img[_ellipse(u, v, 0, 0.1, 0.8, 0.9)] = 1900.0
        for side in (-1, 1):
            img[_ellipse(u, v, side * 0.36, -0.05, 0.25, 0.55)] = 3100.0
        img[_ellipse(u, v, 0.12, 0.3, 0.28, 0.22)] = 1600.0  # heart
        img[(np.abs(u) < 0.06) & (np.abs(v) < 0.9)] = 900.0  # spine
        for k in range(8):
            rib = np.abs(v - (-0.55 + 0.13 * k) - 0.12 * u**2) < 0.015
            img[rib & _ellipse(u, v, 0, -0.05, 0.62, 0.6)] -= 700.0
    img += _noise(img.shape, seed, 20)
    return _unsigned(img, 4095)


def _dx_knee(size: int, lateral: bool, seed: int) -> np.ndarray:
    u, v = _grid(size)
    img = np.full(u.shape, 120.0)
    img[np.abs(u) < (0.5 if not lateral else 0.55)] = 900.0  # soft tissue
    femur = (np.abs(u) < 0.22) & (v < -0.05)
    tibia = (np.abs(u - (0.03 if lateral else 0.0)) < 0.2) & (v > 0.05)
    img[femur | _ellipse(u, v, 0, -0.12, 0.3, 0.12)] = 2600.0
    img[tibia | _ellipse(u, v, 0, 0.12, 0.3, 0.08)] = 2500.0
    if lateral:
        img[_ellipse(u, v, -0.36, -0.1, 0.07, 0.12)] = 2700.0  # patella
    else:
        img[(np.abs(u - 0.26) < 0.05) & (v > 0.2)] = 2300.0  # fibula
    img += _noise(img.shape, seed, 25)
    return _unsigned(img, 4095)


def _cine(size: int, frames: int) -> np.ndarray:
    """A beating left ventricle: the cavity contracts and relaxes once over the loop."""
    u, v = _grid(size)
    out = np.empty((frames, size, size), dtype=np.uint16)
    for f in range(frames):
        beat = 0.75 + 0.25 * np.cos(2 * np.pi * f / frames)
        img = np.full(u.shape, 80.0)
        img[_ellipse(u, v, 0, 0, 0.75, 0.85)] = 500.0
        img[_ellipse(u, v, 0.05, 0.0, 0.5 * beat + 0.12, 0.62 * beat + 0.12)] = 1800.0  # myocardium
        img[_ellipse(u, v, 0.05, 0.0, 0.5 * beat, 0.62 * beat)] = 300.0  # blood pool
        img += _noise(img.shape, 500 + f, 30)
        out[f] = _unsigned(img, 4095)
    return out
