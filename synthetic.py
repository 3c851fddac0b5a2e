"""The embedded synthetic fundus set: fundus-like images rendered from a seed.

Every image depends only on (seed, pool, index, label), so the same seed always gives the same
pictures; ``SYNTHETIC_VERSION`` names the generator in split.json. ``datasets.py`` serves it as
the "synthetic" data set through ``synthetic_pool`` (the ids and labels of a pool) and
``synthetic_images`` (the pictures).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from utils import UserError

SYNTHETIC_VERSION = 2
SYNTHETIC_TRAIN = 1000   # default training-pool size (validation is carved from it)
SYNTHETIC_TEST = 250
_POOL_CODE = {"train": 1, "test": 2}
_MA_COLOUR = np.array([0.38, 0.04, 0.04])
_HAEM_COLOUR = np.array([0.42, 0.06, 0.05])
_EXUDATE_COLOUR = np.array([0.98, 0.88, 0.38])


def synthetic_pool(part: str, n: int, seed: int):
    """The "train" or "test" pool of n images: (ids "<part>/<i>", labels, strata = labels)."""
    if n < 2:
        raise UserError(f"the synthetic {part} set needs at least 2 images (got {n})")
    # Balanced classes: exactly half of each pool (rounded down) has lesions.
    labels = (np.random.default_rng([seed, _POOL_CODE[part], 7]).permutation(n) < n // 2).astype(np.int64)
    return np.array([f"{part}/{i}" for i in range(n)]), labels, labels


def _synthetic_params(seed: int, pool: int, index: int, label: int) -> dict[str, Any]:
    """Everything random about one image, from its own generator (seed, pool, index)."""
    rng = np.random.default_rng([seed, pool, index])
    noise_seed = [seed, pool, index, 1]
    side = rng.choice([-1.0, 1.0])                     # left or right eye: side of the optic disc
    p: dict[str, Any] = {
        "centre": rng.uniform(-0.04, 0.04, 2), "radius": rng.uniform(0.86, 0.96),
        "base": np.array([rng.uniform(0.62, 0.85), rng.uniform(0.26, 0.38), rng.uniform(0.08, 0.16)]),
        "gradient": rng.uniform(0.05, 0.3) * np.array([math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a)]),
        "vignette": rng.uniform(0.25, 0.55), "texture": rng.uniform(0.03, 0.08), "noise": rng.uniform(0.01, 0.03),
        "disc": np.array([side * rng.uniform(0.3, 0.42), rng.uniform(-0.1, 0.1)]), "disc_r": rng.uniform(0.09, 0.13),
        "macula": np.array([-side * rng.uniform(0.12, 0.22), rng.uniform(-0.06, 0.06)]),
        "vessel_contrast": rng.uniform(0.45, 0.7), "noise_seed": noise_seed,
    }
    # Vessels: four trunks leave the disc (two arcades bending around the macula, two nasal
    # ones), each with a few thinner branches; heading angles in radians.
    toward_macula = math.pi if side > 0 else 0.0
    away = toward_macula + math.pi
    trunks = [(math.pi / 2 + rng.normal(0, 0.2), 1), (-math.pi / 2 + rng.normal(0, 0.2), -1),
              (away + 0.5 + rng.normal(0, 0.2), 0), (away - 0.5 + rng.normal(0, 0.2), 0)]
    walks = []
    for heading, arcade in trunks:
        # Arcades curve toward the macula side; nasal trunks wander.
        bend = arcade * side * rng.uniform(0.025, 0.04) if arcade else 0.0
        turn = bend + rng.normal(0, 0.05, 48)
        walks.append((p["disc"], heading + np.cumsum(turn), 0.03, 1.0))
    branches = []
    for start, angles, step, _ in walks:
        points = start + np.cumsum(step * np.stack([np.cos(angles), np.sin(angles)], 1), 0)
        for at in rng.choice(np.arange(6, 40), size=3, replace=False):
            heading = angles[at] + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
            branches.append((points[at], heading + np.cumsum(rng.normal(0, 0.08, 20)), 0.025, 0.0))
    p["vessels"] = walks + branches
    # Lesions (class 1 only): (x, y, radius, colour index 0 MA / 1 haemorrhage / 2 exudate).
    lesions = []
    if label == 1:
        severity = rng.uniform(0, 1)
        # Mild cases show a blot and a few microaneurysms; severe ones many more, with exudates.
        n_ma = rng.integers(4, 7 + int(12 * severity))
        n_haem = rng.integers(2, 4 + int(5 * severity))
        n_ex = rng.integers(0, 2 + int(4 * severity))
        for kind, count in ((0, n_ma), (1, n_haem), (2, n_ex)):
            for _ in range(count):
                xy = _lesion_site(rng, p)
                if kind == 0:
                    lesions.append((*xy, rng.uniform(0.028, 0.045), 0))
                elif kind == 1:   # a blot: two or three overlapping discs
                    r = rng.uniform(0.05, 0.09)
                    for _ in range(rng.integers(2, 4)):
                        lesions.append((*(xy + rng.normal(0, r / 2, 2)), r * rng.uniform(0.6, 1.0), 1))
                else:             # a cluster of hard exudates
                    for _ in range(rng.integers(2, 6)):
                        lesions.append((*(xy + rng.normal(0, 0.04, 2)), rng.uniform(0.022, 0.04), 2))
    p["lesions"] = np.array(lesions, dtype=np.float64).reshape(-1, 4)
    return p


def _lesion_site(rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    for _ in range(20):
        xy = p["centre"] + rng.uniform(-0.7, 0.7, 2) * p["radius"]
        if np.hypot(*(xy - p["centre"])) < 0.75 * p["radius"] and np.hypot(*(xy - p["disc"])) > 1.6 * p["disc_r"]:
            return xy
    return p["macula"] + rng.normal(0, 0.1, 2)


def _blend(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-blend a colour (3,) into images N×H×W×3 with alpha N×H×W."""
    return image * (1 - alpha[..., None]) + colour * alpha[..., None]


def synthetic_images(ids: list[str], labels: np.ndarray, seed: int, size: int) -> np.ndarray:
    """Render fundus-like images (uint8 N×size×size×3) for ids "train/<i>" or "test/<i>".

    Every image depends only on (seed, pool, index, label), so the same seed always gives the
    same pictures. Rendering is vectorised over the batch.
    """
    n = len(ids)
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, 256):
        chunk = slice(start, min(start + 256, n))
        params = []
        for id_, label in zip(ids[chunk], labels[chunk]):
            pool, _, index = str(id_).partition("/")
            if pool not in _POOL_CODE or not index.isdigit():
                raise UserError(f"bad synthetic image id {id_!r} in the split; re-run train.py")
            params.append(_synthetic_params(seed, _POOL_CODE[pool], int(index), int(label)))
        out[chunk] = _render(params, size)
    return out


def _render(params: list[dict[str, Any]], size: int) -> np.ndarray:
    n = len(params)
    # Texture and pixel noise come from each image's own stream too (not the batch's).
    streams = [np.random.default_rng(p["noise_seed"]) for p in params]
    white = np.stack([s.standard_normal((size, size, 4), dtype=np.float32) for s in streams])
    pixel = 2.0 / size
    axis = (np.arange(size) + 0.5) * pixel - 1.0
    x, y = axis[None, None, :], axis[None, :, None]            # x: columns, y: rows (down)

    def stack(key):
        return np.stack([p[key] for p in params])

    def dist(centres):                                          # centres N×2 -> N×H×W
        return np.hypot(x - centres[:, 0, None, None], y - centres[:, 1, None, None])

    centre, radius = stack("centre"), stack("radius")[:, None, None]
    r = dist(centre) / radius
    retina = np.clip((1 - r) / (pixel / radius) + 0.5, 0, 1)     # soft edge one pixel wide
    gradient = stack("gradient")
    light = (1 + gradient[:, 0, None, None] * x + gradient[:, 1, None, None] * y) \
        * (1 - stack("vignette")[:, None, None] * r ** 2)
    texture = gaussian_filter(white[..., 3], sigma=(0, size / 20, size / 20))
    texture *= stack("texture")[:, None, None] / (texture.std(axis=(1, 2), keepdims=True) + 1e-8)
    image = stack("base")[:, None, None, :] * (light + texture)[..., None]
    # Macula: a darker, redder patch; optic disc: a bright pale-yellow disc with a soft rim.
    macula = np.exp(-(dist(stack("macula")) / 0.14) ** 2)
    image *= 1 - 0.35 * macula[..., None]
    disc_r = stack("disc_r")[:, None, None]
    disc = np.clip((disc_r - dist(stack("disc"))) / (0.4 * disc_r) + 0.5, 0, 1)
    image = _blend(image, 0.85 * disc, np.array([0.98, 0.86, 0.6]))
    image = _vessels(image, params, size, retina)
    # Lesions: per kind, the union (max) of soft-edged discs, then one blend per kind.
    for kind, colour in enumerate((_MA_COLOUR, _HAEM_COLOUR, _EXUDATE_COLOUR)):
        mine = [p["lesions"][p["lesions"][:, 3] == kind] for p in params]
        most = max(len(m) for m in mine)
        if most == 0:
            continue
        alpha = np.zeros((n, size, size))
        for k in range(most):
            lesion = np.array([m[k] if k < len(m) else (9.0, 9.0, 0.01, kind) for m in mine])
            np.maximum(alpha, np.clip((lesion[:, 2, None, None] - dist(lesion[:, :2])) / pixel + 0.5, 0, 1), out=alpha)
        image = _blend(image, 0.9 * alpha, colour)
    image += white[..., :3] * stack("noise")[:, None, None, None]
    image *= retina[..., None]
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def _vessels(image: np.ndarray, params: list[dict[str, Any]], size: int, retina: np.ndarray) -> np.ndarray:
    """Darken along every vessel: points splatted on the grid, then blurred to a line."""
    n = len(params)
    half_pixel = 1.0 / size
    for trunk in (1.0, 0.0):
        acc = np.zeros(n * size * size)
        for i, p in enumerate(params):
            for start, angles, step, is_trunk in p["vessels"]:
                if is_trunk != trunk:
                    continue
                # Densify so that consecutive points are half a pixel apart.
                repeat = max(1, int(math.ceil(step / half_pixel)))
                fine_angles = np.repeat(angles, repeat)
                points = start + np.cumsum((step / repeat) * np.stack([np.cos(fine_angles), np.sin(fine_angles)], 1), 0)
                cols = (points[:, 0] + 1) / 2 * size - 0.5
                rows = (points[:, 1] + 1) / 2 * size - 0.5
                inside = (cols >= 0) & (cols < size - 1) & (rows >= 0) & (rows < size - 1)
                cols, rows = cols[inside], rows[inside]
                taper = np.linspace(1.0, 0.5, len(points))[inside]   # vessels thin out
                c0, r0 = np.floor(cols).astype(int), np.floor(rows).astype(int)
                fc, fr = cols - c0, rows - r0
                base = i * size * size
                for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                                  (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
                    np.add.at(acc, base + (r0 + dr) * size + c0 + dc, w * taper)
        sigma = max(0.5, size / 90) * (1.0 if trunk else 0.7)
        density = gaussian_filter(acc.reshape(n, size, size), sigma=(0, sigma, sigma))
        # A line of points half a pixel apart, blurred by sigma, peaks near 1 / (0.5 sqrt(2 pi) sigma).
        strength = 0.5 * math.sqrt(2 * math.pi) * sigma * 1.2
        alpha = (1 - np.exp(-density * strength)) * retina
        contrast = np.array([p["vessel_contrast"] for p in params])[:, None, None, None]
        image = image * (1 - alpha[..., None] * contrast * np.array([0.45, 0.75, 0.6]))
    return image
