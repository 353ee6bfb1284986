"""The world's exact, non-differentiable evaluator (GenEval for shapes).

Per image: each pixel is read as a mix of the background and one palette colour (blur at an edge is
exactly such a mix): it takes the colour whose mixing line passes nearest to it, if that line passes within
`COLOUR_TOLERANCE` and the pixel is at least half that colour; pixels close to no line (garbage, noise)
take none. Each colour's mask is split into connected components, and components smaller than a
fraction of the smallest real object are dropped. A component whose top half holds much less than its
bottom half is a triangle (apex up: 1/3 of it); otherwise its bounding box's corners separate squares
(filled) from circles (empty). Blobs with a lopsided box or a tiny fill stay unrecognised. Then every
claim of the caption is checked: exact counts, no objects beyond those described (the world is closed),
and relative positions by centroids.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from rlfew.world.prompts import BACKGROUND_RGB, CANVAS, COLOURS, MIN_SIZE, Claims, ObjectSpec, parse_prompt, relation_holds

COLOUR_TOLERANCE = 70.0  # max RGB distance (0-255 scale) of a pixel from a colour's background mixing line
MAX_MIX = 1.5  # a pixel may overshoot its colour (darker or more saturated) up to this mixing weight
MIN_AREA_FRACTION = 0.4  # components under this share of the smallest triangle's area are noise
POSITION_MARGIN = 3.0  # centroid offset (canvas pixels) a relation needs to hold
TRIANGLE_TOP_SHARE = 0.6  # top-half / bottom-half area below this is a triangle (ideal 1/3, others 1)
CORNER_REACH = 0.75  # corner regions: |dx| + |dy| > this x box side from the box centre (a circle reaches 0.71)
SQUARE_CORNER_SHARE = 0.35  # share of the corner regions covered above which a shape is a square (ideal 1)
FILL_MIN, MAX_ASPECT = 0.35, 1.5  # outside these a component is not a recognisable shape

_PALETTE_NAMES = list(COLOURS)
_BACKGROUND = np.array(BACKGROUND_RGB, dtype=np.float32)
_DIRECTIONS = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float32) - _BACKGROUND  # (C, 3)


@dataclass(frozen=True)
class DetectedObject:
    shape: str | None  # None: a coloured blob that is no recognisable shape
    colour: str
    centroid: tuple[float, float]  # (x, y) in canvas pixels
    area: float  # canvas pixels
    fill: float  # share of its bounding box it covers

    def describe(self) -> str:
        return f"{self.colour} {self.shape or 'blob'} at ({self.centroid[0]:.0f}, {self.centroid[1]:.0f})"


@dataclass(frozen=True)
class CheckResult:
    name: str  # e.g. "count(red circle)=1", "no extra objects", "red circle left of blue square"
    kind: str  # "count", "extra" or "relation"
    passed: bool
    detail: str


@dataclass
class EvalResult:
    prompt: str
    category: str
    correct: bool
    checks: list[CheckResult] = field(default_factory=list)
    objects: list[DetectedObject] = field(default_factory=list)


def _as_hwc_float(image) -> np.ndarray:
    """uint8 HWC, or float CHW / HWC in [0, 1] (tensor or array) -> float32 HWC on the 0-255 scale."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise ValueError(f"expected one RGB image (3,H,W) or (H,W,3), got shape {array.shape}")
    if array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    return np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0


def _classify(component: np.ndarray) -> tuple[str | None, float]:
    """Shape and fill ratio of one component, given as its boolean mask cropped to its bounding box."""
    box_h, box_w = component.shape
    fill = component.sum() / (box_h * box_w)
    if max(box_h, box_w) / min(box_h, box_w) > MAX_ASPECT or fill < FILL_MIN:
        return None, fill
    top, bottom = component[: box_h // 2].sum(), component[(box_h + 1) // 2:].sum()
    if top < TRIANGLE_TOP_SHARE * bottom:
        return "triangle", fill
    ys, xs = np.ogrid[:box_h, :box_w]
    reach = np.abs(ys - (box_h - 1) / 2) + np.abs(xs - (box_w - 1) / 2)
    corners = reach > CORNER_REACH * (box_h + box_w) / 2
    share = component[corners].mean() if corners.any() else 0.0
    return ("square" if share > SQUARE_CORNER_SHARE else "circle"), fill


def detect_objects(image) -> list[DetectedObject]:
    """The coloured objects in one image, with their colours, shapes, centroids and areas."""
    pixels = _as_hwc_float(image)
    height, width = pixels.shape[:2]
    scale = CANVAS / width  # image pixels -> canvas pixels
    offset = (pixels - _BACKGROUND).reshape(-1, 3)
    mix = offset @ _DIRECTIONS.T / (_DIRECTIONS ** 2).sum(-1)  # (P, C): weight of each colour vs background
    residual = ((offset[:, None, :] - mix[..., None] * _DIRECTIONS) ** 2).sum(-1)
    residual[(mix < 0.5) | (mix > MAX_MIX)] = np.inf
    nearest = residual.argmin(-1)
    nearest[residual.min(-1) > COLOUR_TOLERANCE ** 2] = -1
    nearest = nearest.reshape(height, width)
    min_area = MIN_AREA_FRACTION * 0.5 * MIN_SIZE ** 2 / scale ** 2
    objects = []
    for index, colour in enumerate(_PALETTE_NAMES):
        mask = nearest == index
        if mask.sum() < min_area:
            continue
        labels, count = ndimage.label(mask)
        if count == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            if areas[label] < min_area:
                continue
            component = labels[box] == label
            ys, xs = np.nonzero(component)
            centroid = ((xs.mean() + box[1].start + 0.5) * scale, (ys.mean() + box[0].start + 0.5) * scale)
            shape, fill = _classify(component)
            objects.append(DetectedObject(shape, colour, centroid, float(areas[label]) * scale ** 2, float(fill)))
    return objects


def check_claims(claims: Claims, objects: list[DetectedObject]) -> EvalResult:
    """Check every claim of a caption against the detected objects."""
    checks = []
    for claim in claims.counts:
        found = [o for o in objects if claim.spec.matches(o.shape, o.colour)]
        checks.append(CheckResult(
            f"count({claim.spec.describe()})={claim.count}", "count", len(found) == claim.count,
            f"found {len(found)}",
        ))
    extras = [o for o in objects if not any(c.spec.matches(o.shape, o.colour) for c in claims.counts)]
    checks.append(CheckResult(
        "no extra objects", "extra", not extras,
        "extra: " + ", ".join(o.describe() for o in extras) if extras else "none",
    ))

    def single(spec: ObjectSpec) -> DetectedObject | None:
        found = [o for o in objects if spec.matches(o.shape, o.colour)]
        return found[0] if len(found) == 1 else None

    for relation in claims.relations:
        name = f"{relation.subject.describe()} {relation.relation} {relation.reference.describe()}"
        subject, reference = single(relation.subject), single(relation.reference)
        if subject is None or reference is None:
            checks.append(CheckResult(name, "relation", False, "subject or reference not found exactly once"))
            continue
        holds = relation_holds(subject.centroid, relation.relation, reference.centroid, POSITION_MARGIN)
        checks.append(CheckResult(name, "relation", holds, f"{subject.describe()} vs {reference.describe()}"))
    return EvalResult(claims.prompt, claims.category, all(c.passed for c in checks), checks, objects)


def evaluate(images, prompts: list[str]) -> list[EvalResult]:
    """Score images against their captions. `images`: a (B,3,H,W) float tensor in [0,1], a (B,H,W,3)
    uint8 array, or a list of single images in either layout. Raises UsageError for a caption outside the
    world grammar."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return [check_claims(parse_prompt(prompt), detect_objects(image)) for image, prompt in zip(images, prompts)]


def accuracy_report(results: list[EvalResult]) -> dict:
    """`accuracy`: GenEval's overall score, the mean over the categories present of each category's share of
    images whose every claim holds (so a category's weight does not depend on how many prompts it has);
    `image_accuracy`: the share over all images; `accuracy_by_category`; `check_accuracy` (pass rate per kind of
    check); and the counts they come from."""
    by_category: dict[str, list[bool]] = defaultdict(list)
    by_check: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        by_category[result.category].append(result.correct)
        for check in result.checks:
            by_check[check.kind].append(check.passed)
    accuracy_by_category = {c: float(np.mean(v)) for c, v in by_category.items()}
    return {
        "accuracy": float(np.mean(list(accuracy_by_category.values()))) if results else float("nan"),
        "image_accuracy": float(np.mean([r.correct for r in results])) if results else float("nan"),
        "accuracy_by_category": accuracy_by_category,
        "check_accuracy": {k: float(np.mean(v)) for k, v in by_check.items()},
        "count": len(results),
        "count_by_category": {c: len(v) for c, v in by_category.items()},
    }
