"""Synthetic faces written in the Kaggle facial-keypoints ``training.csv`` format.

The embedded default for the keypoints case study (AppealNet App. D), since the Kaggle
images cannot be downloaded on every machine: the same loader
(:func:`tasks.keypoints.read_keypoints_csv`) reads this file and the real one.

Each face is drawn in a face-centred frame (a cartoon face: skin ellipse, hair, eyes with
irises, eyebrows, nose, lips) and mapped into the 96x96 image by a similarity transform
(position, scale, in-plane rotation) plus a mild yaw. The 15 keypoints are the points the
drawing is built from, so they are exactly where they are drawn. Identity (feature sizes
and spacing), expression (smile, open mouth, raised eyebrows, eye openness, gaze) and
lighting (brightness, directional shading, background) vary per face. A per-face
difficulty draws the degradations that make some faces hard: wider poses, noise, blur,
low contrast and partial occlusion (the keypoints under an occluder stay labelled, as in
Kaggle's data).

Everything is a function of ``(seed, face index)``: faces are drawn in fixed chunks, each
from its own generator, so the first ``k`` faces are the same whatever the total size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cascade.core.files import atomic_path

#: Kaggle's 15 keypoints in its column order; "left" is the subject's left (image right)
KEYPOINT_NAMES = (
    "left_eye_center", "right_eye_center", "left_eye_inner_corner", "left_eye_outer_corner",
    "right_eye_inner_corner", "right_eye_outer_corner", "left_eyebrow_inner_end", "left_eyebrow_outer_end",
    "right_eyebrow_inner_end", "right_eyebrow_outer_end", "nose_tip", "mouth_left_corner",
    "mouth_right_corner", "mouth_center_top_lip", "mouth_center_bottom_lip",
)
#: the 30 target columns of ``training.csv``, ``<keypoint>_x, <keypoint>_y`` in Kaggle's order
KEYPOINT_COLUMNS = tuple(f"{name}_{axis}" for name in KEYPOINT_NAMES for axis in ("x", "y"))
IMAGE_COLUMN = "Image"
IMAGE_SIZE = 96
#: the keypoints labelled on most of Kaggle's incomplete rows (its 4-keypoint subset)
PARTIAL_KEYPOINTS = ("left_eye_center", "right_eye_center", "nose_tip", "mouth_center_bottom_lip")
#: bump when the drawing changes, so that cached files are regenerated
GENERATOR_VERSION = 2

_CHUNK = 64  # faces drawn together, each chunk from its own generator
_KP = {name: i for i, name in enumerate(KEYPOINT_NAMES)}


@dataclass(frozen=True)
class FaceBatch:
    """Faces drawn together.

    Attributes:
        images: ``[N, 96, 96]`` uint8 grey levels, row-major (Kaggle's ``Image``).
        keypoints: ``[N, 30]`` float, Kaggle's column order; NaN where unlabelled.
        difficulty: ``[N]`` in [0, 1], the per-face degradation level (not written).
    """

    images: np.ndarray
    keypoints: np.ndarray
    difficulty: np.ndarray


def _soft(signed_distance: np.ndarray) -> np.ndarray:
    """Coverage of a pixel by a shape, from its signed distance in pixels (1-px ramp)."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _ellipse_sd(u: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Approximate signed distance (in the frame's units) to an axis-aligned ellipse."""
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return (r - 1.0) * np.minimum(a, b)


def _segment_distance(u, v, ax, ay, bx, by) -> np.ndarray:
    """Distance from points ``(u, v)`` to the segments ``(ax, ay)-(bx, by)``."""
    dx, dy = bx - ax, by - ay
    t = np.clip(((u - ax) * dx + (v - ay) * dy) / (dx * dx + dy * dy + 1e-9), 0.0, 1.0)
    return np.hypot(u - ax - t * dx, v - ay - t * dy)


def _through3(x, x0, y0, x1, y1, x2, y2):
    """The parabola through three points ``(x_i, y_i)`` (distinct ``x_i``), evaluated at ``x``."""
    return (
        y0 * (x - x1) * (x - x2) / ((x0 - x1) * (x0 - x2))
        + y1 * (x - x0) * (x - x2) / ((x1 - x0) * (x1 - x2))
        + y2 * (x - x0) * (x - x1) / ((x2 - x0) * (x2 - x1))
    )


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma, mode="nearest") if sigma > 0.3 else img


def _draw_chunk(rng: np.random.Generator, n: int, partial_fraction: float) -> FaceBatch:
    """Draw ``n`` faces; every random number comes from ``rng``, in a fixed order."""
    S = IMAGE_SIZE

    def col(x):  # [n] -> [n, 1, 1], to broadcast against the pixel grid
        return np.asarray(x, dtype=np.float64)[:, None, None]

    U = rng.uniform
    # most faces easy, a tail of hard ones
    difficulty = rng.beta(0.8, 2.2, n)

    # ---- identity and expression, in the face frame (pixels at scale 1, origin mid-face);
    # the template is the mean of Kaggle's labels, made symmetric
    eye_dx = 18.0 * U(0.88, 1.12, n)  # half the distance between the eye centres
    eye_y = -14.0 + U(-2.0, 2.0, n)
    eye_half = 7.0 * U(0.85, 1.15, n)  # half the eye's width (centre to corner)
    eye_open = U(1.3, 3.6, n)  # half-height of the eye opening
    gaze = U(-0.25, 0.25, (n, 2)) * np.stack([eye_half, eye_open], axis=1)  # iris offset in the eye
    brow_raise = U(0.0, 4.0, n)
    brow_gap = 8.0 + U(-2.0, 2.0, n)
    brow_y = eye_y - 8.5 - brow_raise
    nose_y = 10.5 * U(0.85, 1.15, n)
    mouth_y = 24.0 + U(-2.0, 2.0, n)
    mouth_half = 15.0 * U(0.8, 1.15, n)
    smile = U(-1.5, 4.5, n)  # corners up (positive) or down
    mouth_open = np.where(U(0, 1, n) < 0.35, U(1.0, 9.0, n), 0.0)
    lip = U(2.2, 3.8, n)  # lip thickness
    face_a = U(33.0, 40.0, n)
    face_b = U(42.0, 50.0, n)

    kp = np.zeros((n, 15, 2))
    for side, sign in (("left", 1.0), ("right", -1.0)):  # subject's left is image right (+x)
        cx = sign * eye_dx
        kp[:, _KP[f"{side}_eye_inner_corner"]] = np.stack([cx - sign * eye_half, eye_y], 1)
        kp[:, _KP[f"{side}_eye_outer_corner"]] = np.stack([cx + sign * eye_half, eye_y], 1)
        kp[:, _KP[f"{side}_eye_center"]] = np.stack([cx + gaze[:, 0], eye_y + gaze[:, 1]], 1)
        kp[:, _KP[f"{side}_eyebrow_inner_end"]] = np.stack([sign * brow_gap, brow_y + U(-1, 1, n)], 1)
        kp[:, _KP[f"{side}_eyebrow_outer_end"]] = np.stack([sign * (eye_dx + eye_half + 6.5), brow_y + U(-1, 2, n)], 1)
    kp[:, _KP["nose_tip"]] = np.stack([U(-1, 1, n), nose_y], 1)
    kp[:, _KP["mouth_left_corner"]] = np.stack([mouth_half, mouth_y - smile + U(-1, 1, n)], 1)
    kp[:, _KP["mouth_right_corner"]] = np.stack([-mouth_half, mouth_y - smile + U(-1, 1, n)], 1)
    kp[:, _KP["mouth_center_top_lip"]] = np.stack([U(-1, 1, n), mouth_y - lip - 0.3 * smile], 1)
    kp[:, _KP["mouth_center_bottom_lip"]] = np.stack([U(-1, 1, n), mouth_y + lip + mouth_open], 1)

    # ---- pose: yaw shifts and squeezes the inner features; then a similarity into the image
    yaw = rng.normal(0, 0.12 + 0.25 * difficulty)
    yaw = np.clip(yaw, -0.5, 0.5)
    feat = kp.copy()
    feat[..., 0] = kp[..., 0] * (1 - 0.2 * np.abs(yaw)[:, None]) + 10.0 * yaw[:, None]
    scale = U(0.78, 1.05, n) * (1 - 0.15 * difficulty * U(0, 1, n))
    theta = np.clip(rng.normal(0, np.radians(5 + 15 * difficulty)), -np.radians(35), np.radians(35))
    cos, sin = np.cos(theta), np.sin(theta)
    centre = np.stack([48.0 + U(-6, 6, n), 50.0 + U(-6, 6, n)], 1) + rng.normal(0, 4 * difficulty[:, None], (n, 2))

    def to_image(p):  # [n, k, 2] face frame -> image
        x, y = p[..., 0] * scale[:, None], p[..., 1] * scale[:, None]
        return np.stack([cos[:, None] * x - sin[:, None] * y, sin[:, None] * x + cos[:, None] * y], -1) + centre[:, None]

    pts = to_image(feat)
    # keep every keypoint inside the image, as Kaggle's labels are
    lo, hi = 3.0, S - 4.0
    shift = np.maximum(lo - pts.min(axis=1), 0) - np.maximum(pts.max(axis=1) - hi, 0)  # [n, 2]
    centre = centre + shift
    pts = pts + shift[:, None]

    # ---- render: every pixel mapped back into the face frame
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    gx, gy = xx[None] - col(centre[:, 0]), yy[None] - col(centre[:, 1])
    s = col(scale)
    u = (col(cos) * gx + col(sin) * gy) / s  # [n, S, S]
    v = (-col(sin) * gx + col(cos) * gy) / s
    # the inner features live in the yawed frame: undo the yaw's shift and squeeze
    squeeze = col(1 - 0.2 * np.abs(yaw))
    uf = (u - col(10.0 * yaw)) / squeeze
    px = s  # one face-frame unit is `scale` pixels: distances * px are in pixels

    skin = col(U(105, 205, n))
    bg = col(U(20, 235, n)) + col(U(-40, 40, n)) * (xx[None] / S - 0.5) + col(U(-40, 40, n)) * (yy[None] / S - 0.5)
    phase = U(0, 2 * np.pi, (n, 2))
    bg = bg + col(U(0, 18, n)) * np.sin(xx[None] * col(U(0.05, 0.3, n)) + col(phase[:, 0])) * np.cos(
        yy[None] * col(U(0.05, 0.3, n)) + col(phase[:, 1]))
    img = bg

    # hair: a larger ellipse behind the head, showing above the forehead
    hair_tone = col(np.where(U(0, 1, n) < 0.7, U(15, 70, n), U(120, 220, n)))
    hair = _soft(_ellipse_sd(u - col(10.0 * yaw), v + col(U(4, 10, n)), col(face_a + U(2, 6, n)), col(face_b + U(0, 4, n))) * px)
    img = img + (hair_tone - img) * hair
    # neck, then the face
    neck = _soft((np.maximum(np.abs(u) - col(face_a * 0.45), col(face_b * 0.6) - v)) * px)
    img = img + (0.85 * skin - img) * neck
    face = _soft(_ellipse_sd(u - col(3.0 * yaw), v - 3.0, col(face_a), col(face_b)) * px)
    fringe = np.clip((v + col(face_b * U(0.55, 0.9, n))) * 0.25, 0, 1)  # hair line on the forehead
    img = img + (skin - img) * face * fringe + (hair_tone - img) * face * (1 - fringe)

    # shading of the face by a directional light
    light = U(-0.35, 0.35, (n, 2))
    img = img * (1 + col(light[:, 0]) * np.clip(u / 40, -1, 1) * face + col(light[:, 1]) * np.clip(v / 50, -1, 1) * face)

    # eyebrows: thick strokes between their two keypoints
    brow_tone = np.minimum(hair_tone, skin * 0.45)
    thick = col(U(1.2, 2.4, n))
    for side in ("left", "right"):
        a, b = kp[:, _KP[f"{side}_eyebrow_inner_end"]], kp[:, _KP[f"{side}_eyebrow_outer_end"]]
        d = _segment_distance(uf, v, col(a[:, 0]), col(a[:, 1]), col(b[:, 0]), col(b[:, 1]))
        img = img + (brow_tone - img) * _soft((d - thick) * px) * 0.9

    # eyes: the white between the corners, an iris and a pupil at the eye centre
    iris_tone = col(U(20, 90, n))
    sclera = col(U(190, 245, n)) * (1 + col(light[:, 0]) * 0.2)
    iris_r = col(np.minimum(eye_open * 1.05, U(2.6, 3.4, n)))
    for side in ("left", "right"):
        inner, outer = kp[:, _KP[f"{side}_eye_inner_corner"]], kp[:, _KP[f"{side}_eye_outer_corner"]]
        mid = (inner + outer) / 2
        white = _soft(_ellipse_sd(uf - col(mid[:, 0]), v - col(mid[:, 1]), col(eye_half), col(eye_open)) * px)
        lid = _soft((np.abs(_ellipse_sd(uf - col(mid[:, 0]), v - col(mid[:, 1]), col(eye_half), col(eye_open))) - 0.5) * px)
        c = kp[:, _KP[f"{side}_eye_center"]]
        r = np.hypot(uf - col(c[:, 0]), v - col(c[:, 1]))
        img = img + (sclera - img) * white
        img = img + (iris_tone - img) * white * _soft((r - iris_r) * px)
        img = img + (8.0 - img) * white * _soft((r - iris_r * 0.45) * px)
        img = img + (0.35 * skin - img) * lid * 0.8

    # nose: a shaded bridge, two nostrils either side of the tip
    tip = kp[:, _KP["nose_tip"]]
    bridge = _segment_distance(uf, v, col(tip[:, 0] + 2.5), col(eye_y + 2.0), col(tip[:, 0] + 3.0), col(tip[:, 1] - 2.0))
    img = img * (1 - 0.12 * _soft((bridge - 1.0) * px))
    for sign in (1.0, -1.0):
        r = _ellipse_sd(uf - col(tip[:, 0] + sign * 3.2), v - col(tip[:, 1] + 1.2), 1.7, 1.1)
        img = img + (0.3 * skin - img) * _soft(r * px) * 0.9
    img = img * (1 + 0.1 * _soft((np.hypot(uf - col(tip[:, 0]), v - col(tip[:, 1] - 1.5)) - 2.0) * px))

    # lips: between the curve through the corners and the top lip, and the one through the bottom lip
    ml, mr = kp[:, _KP["mouth_left_corner"]], kp[:, _KP["mouth_right_corner"]]
    top, bottom = kp[:, _KP["mouth_center_top_lip"]], kp[:, _KP["mouth_center_bottom_lip"]]
    args = lambda p: (col(mr[:, 0]), col(mr[:, 1]), col(p[:, 0]), col(p[:, 1]), col(ml[:, 0]), col(ml[:, 1]))
    upper, lower = _through3(uf, *args(top)), _through3(uf, *args(bottom))
    inside_x = _soft((np.abs(uf - col((ml[:, 0] + mr[:, 0]) / 2)) - col(mouth_half)) * px)
    lips = inside_x * _soft((upper - v) * px) * _soft((v - lower) * px)
    lip_tone = skin * col(U(0.45, 0.75, n))
    img = img + (lip_tone - img) * lips
    gap_top, gap_bottom = upper + col(lip) * 0.9, lower - col(lip) * 0.9
    opening = lips * _soft((gap_top - v) * px) * _soft((v - gap_bottom) * px)
    img = img + (col(U(5, 35, n)) - img) * opening

    # ---- degradations, scaled by the per-face difficulty
    # occlusion: a blob (hand, hair, object) over part of the face, for some hard faces
    occluded = U(0, 1, n) < 0.9 * difficulty**1.2
    target = pts[np.arange(n), rng.integers(0, 15, n)]  # centred near a random keypoint
    oc = target + rng.normal(0, 6, (n, 2))
    oa, ob = U(7, 22, n), U(5, 16, n)
    ot = U(0, np.pi, n)
    dx, dy = xx[None] - col(oc[:, 0]), yy[None] - col(oc[:, 1])
    ou = col(np.cos(ot)) * dx + col(np.sin(ot)) * dy
    ov = -col(np.sin(ot)) * dx + col(np.cos(ot)) * dy
    blob = _soft(_ellipse_sd(ou, ov, col(oa), col(ob))) * col(occluded)
    img = img + (col(U(0, 255, n)) - img) * blob

    contrast = 1 - 0.8 * difficulty * U(0.3, 1, n)
    mean = img.mean(axis=(1, 2), keepdims=True)
    img = mean + (img - mean) * col(contrast)
    blur = np.where(U(0, 1, n) < 0.3 + 0.7 * difficulty, 2.8 * difficulty * U(0.2, 1, n), 0.0)
    img = np.stack([_blur(im, b) for im, b in zip(img, blur)])
    noise = 2.0 + 40.0 * difficulty * U(0.2, 1, n)
    img = img + rng.normal(0, 1, img.shape) * col(noise)
    images = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    keypoints = pts.reshape(n, 30)
    partial = U(0, 1, n) < partial_fraction
    keep = np.zeros(15, dtype=bool)
    keep[[_KP[k] for k in PARTIAL_KEYPOINTS]] = True
    keypoints[np.ix_(partial, np.repeat(~keep, 2))] = np.nan
    return FaceBatch(images=images, keypoints=keypoints, difficulty=difficulty)


def generate_faces(n: int, seed: int = 0, partial_fraction: float = 0.3) -> FaceBatch:
    """Draw ``n`` synthetic faces with their keypoints.

    Args:
        n: number of faces.
        seed: fixes every face; face ``i`` depends only on ``(seed, i)``.
        partial_fraction: share of faces labelled with only Kaggle's 4-keypoint subset
            (the other 22 coordinates NaN), as most of Kaggle's incomplete rows are.

    Returns:
        The faces, their keypoints in Kaggle's column order, and their difficulty.

    Raises:
        ValueError: ``n < 0`` or ``partial_fraction`` outside [0, 1].
    """
    if n < 0 or not 0.0 <= partial_fraction <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= partial_fraction <= 1, got n={n}, partial_fraction={partial_fraction}")
    # every chunk is drawn whole (the last one then cut), because the draws inside a chunk
    # depend on its length: this keeps face i the same whatever n
    chunks = [
        _draw_chunk(np.random.default_rng([seed, GENERATOR_VERSION, start]), _CHUNK, partial_fraction)
        for start in range(0, n, _CHUNK)
    ]
    if not chunks:
        return FaceBatch(np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8), np.zeros((0, 30)), np.zeros(0))
    return FaceBatch(*(np.concatenate([getattr(c, f) for c in chunks])[:n] for f in ("images", "keypoints", "difficulty")))


def faces_frame(batch: FaceBatch) -> pd.DataFrame:
    """The faces as Kaggle's ``training.csv`` table: 30 coordinate columns, then ``Image``."""
    frame = pd.DataFrame(batch.keypoints, columns=list(KEYPOINT_COLUMNS))
    frame[IMAGE_COLUMN] = [" ".join(map(str, img.ravel().tolist())) for img in batch.images]
    return frame


def write_faces_csv(path: str | Path, n: int, seed: int = 0, partial_fraction: float = 0.3) -> Path:
    """Write ``n`` synthetic faces to ``path`` in Kaggle's format, atomically.

    The file is written to a temporary name in the same folder and renamed, so an
    interrupted run never leaves a truncated file behind for the cache to trust.

    Args:
        path: the CSV to write (its folder is created).
        n, seed, partial_fraction: see :func:`generate_faces`.

    Returns:
        ``path``.

    Raises:
        CascadeError: the folder cannot be written (one line naming the file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = faces_frame(generate_faces(n, seed, partial_fraction))
    with atomic_path(path) as tmp:  # the umask applies; a failed write leaves no file
        # missing coordinates as empty fields, as in Kaggle's file
        frame.to_csv(tmp, index=False, float_format="%.4f", na_rep="")
    return path
