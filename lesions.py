"""Synthetic lesions pasted into clean images: the out-of-distribution inputs of the OOD experiment
(docs/PROTOCOL.md §11; the TMI paper's lesion generator).

A lesion is an ellipse with random axes and orientation, deformed by torchvision's elastic
transform (a smoothed random displacement field), with soft edges and a noise texture, painted
brighter or darker than the tissue under it (an exudate- or opacity-like spot, or a
haemorrhage-like one). Each image gets 1–6 lesions whose centres lie on the image's foreground
(the fundus disc, the chest), not on the black border. Radii are given at 256 px and scaled to
the image size. Everything is drawn from one seeded NumPy generator plus a seeded torch
generator for the displacement fields, so the same seed gives the same lesions.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

RADII_256 = (4, 8, 16, 32)
REFERENCE_SIZE = 256
MAX_LESIONS = 6
FOREGROUND = 0.08   # a pixel with mean intensity above this is tissue, not the black border


def _ellipse(size: int, centre: tuple[float, float], axes: tuple[float, float], angle: float) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
    dy, dx = rows - centre[0], cols - centre[1]
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    return ((u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0).float()


def lesion_mask(size: int, radius: float, centre: tuple[float, float], rng: np.random.Generator,
                gen: torch.Generator) -> torch.Tensor:
    """One lesion's soft mask (H×W in [0, 1]): an ellipse (axes 0.6–1.0 × radius), elastically
    deformed (torchvision's ElasticTransform, α = 4 × radius, σ = radius / 2), its edge blurred."""
    axes = (radius * rng.uniform(0.6, 1.0), radius * rng.uniform(0.6, 1.0))
    mask = _ellipse(size, centre, axes, rng.uniform(0, np.pi))[None]
    # torchvision's elastic transform draws its displacement field from torch's global generator:
    # seed it from ``gen`` inside a forked state, so the lesion is reproducible and nothing else moves.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
        mask = v2.ElasticTransform(alpha=4.0 * radius, sigma=max(1.0, radius / 2))(mask)
    blur = max(0.5, radius / 6)
    size_k = int(2 * round(3 * blur) + 1)
    return TF.gaussian_blur(mask, [size_k, size_k], [blur, blur])[0].clamp_(0, 1)


def add_lesions(images: torch.Tensor, radius_256: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Paste 1–6 lesions of radius ``radius_256`` (at 256 px; scaled to the images) into each of
    ``images`` (float N×3×H×W in [0, 1]). Returns the lesioned images and the lesions per image."""
    rng = np.random.default_rng([seed, int(round(radius_256 * 1000))])
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    out = images.clone()
    size = images.shape[-1]
    radius = radius_256 * size / REFERENCE_SIZE
    counts = rng.integers(1, MAX_LESIONS + 1, size=len(images))
    for i, image in enumerate(images):
        tissue = image.mean(0) > FOREGROUND
        margin = int(np.ceil(radius))
        inner = torch.zeros_like(tissue)
        inner[margin:size - margin, margin:size - margin] = True
        candidates = torch.nonzero(tissue & inner)
        if len(candidates) == 0:
            candidates = torch.nonzero(inner)
        for _ in range(counts[i]):
            centre = candidates[int(rng.integers(len(candidates)))].tolist()
            mask = lesion_mask(size, radius, (centre[0], centre[1]), rng, gen)
            region = mask > 0.5
            base = out[i][:, region].mean(1) if bool(region.any()) else out[i].mean((1, 2))
            contrast = rng.uniform(0.3, 0.6) * (1 if rng.random() < 0.5 else -1)
            texture = TF.gaussian_blur(torch.randn((1, size, size), generator=gen), [5, 5], [1.0, 1.0]) * 0.04
            colour = (base[:, None, None] * (1 + contrast) + texture).clamp(0, 1)
            out[i] = out[i] * (1 - mask) + colour * mask
    return out.clamp_(0, 1), counts

