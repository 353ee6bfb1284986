"""The embedded world's caption grammar, scenes and prompt sets.

The world is a 64x64 white canvas holding 1-4 axis-aligned shapes (circle, square, triangle with its
apex up) in five colours that sit far apart in RGB, so the exact evaluator can segment them.

Captions follow GenEval's categories:

==============  ======================================  ==============================================
category        example                                 claims
==============  ======================================  ==============================================
single_object   "a circle"                              exactly one circle (any colour)
colour          "a red circle"                          exactly one red circle; names the colour, which
                                                        is what separates it from single_object
counting        "three squares" (one .. four)           exactly three squares (any colours)
two_objects     "a circle and a triangle"               one circle and one triangle (distinct shapes)
colour_binding  "a red circle and a blue square"        one red circle and one blue square (distinct
                                                        colours; the shapes may repeat)
position        "a red circle left of a blue square"    as colour_binding, plus the first object's
                                                        centre lies left of / right of / above / below
                                                        the second's
==============  ======================================  ==============================================

The world is closed: a caption describes everything in the image, so an image with an extra object
does not satisfy it (an RL reward cannot be gamed by drawing more shapes).

Held-out compositions: the colour-shape pairs in `HELD_OUT_PAIRS` never occur in `world:train`
captions; every colour-naming `world:eval` caption (categories colour, colour_binding, position) holds
at least one of them. The colour-free categories (single_object, counting, two_objects) are too small to
hold anything out, so `world:eval` repeats their captions as in-distribution controls.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlfew.errors import UsageError

CANVAS = 64  # scene coordinates are in pixels of a 64x64 canvas; render() rescales to other sizes
BACKGROUND_RGB = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (150, 40, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS = {shape: shape + "s" for shape in SHAPES}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {count: word for word, count in NUMBERS.items()}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "colour", "counting", "two_objects", "colour_binding", "position")
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("yellow", "circle"), ("green", "square")})

# Every word the grammar can produce (tokenizers are built from this list, so keep it complete).
VOCABULARY: tuple[str, ...] = tuple(
    ["a", "and", "of", "left", "right", "above", "below"]
    + list(COLOURS) + list(SHAPES) + list(PLURALS.values()) + list(NUMBERS)
)

# Object sizes (bounding-box side, px on the 64 canvas) and layout margins.
MIN_SIZE, MAX_SIZE = 12, 20
GAP = 3  # minimum empty pixels between two objects' bounding boxes, so segments never touch
BORDER = 2  # minimum empty pixels between an object and the canvas edge


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one kind of object; colour None means any colour."""

    shape: str
    colour: str | None = None

    def matches(self, shape: str | None, colour: str) -> bool:
        return shape == self.shape and (self.colour is None or colour == self.colour)

    def describe(self) -> str:
        return f"{self.colour} {self.shape}" if self.colour else self.shape


@dataclass(frozen=True)
class CountClaim:
    """Exactly `count` objects match `spec`."""

    spec: ObjectSpec
    count: int


@dataclass(frozen=True)
class RelationClaim:
    """The (single) `subject` object's centre lies `relation` the (single) `reference` object's centre."""

    subject: ObjectSpec
    relation: str
    reference: ObjectSpec


@dataclass(frozen=True)
class Claims:
    """Everything a caption asserts. The specs of `counts` are disjoint and, the world being closed, their
    counts add up to the number of objects in a matching image."""

    prompt: str
    category: str
    counts: tuple[CountClaim, ...]
    relations: tuple[RelationClaim, ...] = ()

    @property
    def total_objects(self) -> int:
        return sum(claim.count for claim in self.counts)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    centre: tuple[float, float]  # (x, y) in canvas pixels, y pointing down
    size: float  # side of the object's square bounding box, canvas pixels

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom)."""
        half = self.size / 2
        return (self.centre[0] - half, self.centre[1] - half, self.centre[0] + half, self.centre[1] + half)


@dataclass
class Scene:
    objects: list[SceneObject] = field(default_factory=list)
    canvas: int = CANVAS


def normalise_prompt(prompt: str) -> str:
    """Lower case, single spaces, no trailing full stop: the form captions are compared in."""
    return " ".join(str(prompt).lower().strip().rstrip(".").split())


def _grammar_error(prompt: str, reason: str) -> UsageError:
    return UsageError(
        f"prompt {prompt!r} is outside the world grammar ({reason}); expected e.g. 'a circle', 'a red circle', "
        "'three squares', 'a circle and a triangle', 'a red circle and a blue square' or "
        f"'a red circle left of a blue square' with colours {', '.join(COLOURS)} and shapes {', '.join(SHAPES)}"
    )


def _parse_object(prompt: str, words: list[str], with_colour: bool) -> ObjectSpec:
    """Parse 'a [colour] shape'."""
    expected = 3 if with_colour else 2
    if len(words) != expected or words[0] != "a":
        raise _grammar_error(prompt, f"cannot read {' '.join(words)!r} as an object")
    if with_colour and words[1] not in COLOURS:
        raise _grammar_error(prompt, f"unknown colour {words[1]!r}")
    if words[-1] not in SHAPES:
        raise _grammar_error(prompt, f"unknown shape {words[-1]!r}")
    return ObjectSpec(words[-1], words[1] if with_colour else None)


def parse_prompt(prompt: str) -> Claims:
    """Read a caption into the claims it makes; raises UsageError naming the prompt if it is not in the grammar."""
    text = normalise_prompt(prompt)
    words = text.split()
    if not words:
        raise _grammar_error(prompt, "empty")
    if words[0] in NUMBERS:
        count = NUMBERS[words[0]]
        if len(words) != 2:
            raise _grammar_error(prompt, "counting captions are '<number> <shapes>'")
        noun = words[1]
        expected = {PLURALS[s] if count > 1 else s: s for s in SHAPES}
        if noun not in expected:
            raise _grammar_error(prompt, f"{noun!r} is not a shape in the right number after {words[0]!r}")
        return Claims(text, "counting", (CountClaim(ObjectSpec(expected[noun]), count),))
    relation = next((r for r in RELATIONS if f" {r} a " in f" {text} "), None)
    if relation is not None or "and" in words:
        separator = relation.split() if relation else ["and"]
        for start in range(len(words)):
            if words[start:start + len(separator)] == separator:
                first, second = words[:start], words[start + len(separator):]
                break
        with_colour = len(first) == 3
        if relation and not with_colour:
            raise _grammar_error(prompt, "position captions name the colour of both objects")
        a, b = _parse_object(prompt, first, with_colour), _parse_object(prompt, second, with_colour)
        if with_colour and a.colour == b.colour:
            raise _grammar_error(prompt, "the two objects must have different colours")
        if not with_colour and a.shape == b.shape:
            raise _grammar_error(prompt, "the two objects must be different shapes (use counting, e.g. 'two circles')")
        counts = (CountClaim(a, 1), CountClaim(b, 1))
        if relation:
            return Claims(text, "position", counts, (RelationClaim(a, relation, b),))
        return Claims(text, "colour_binding" if with_colour else "two_objects", counts)
    with_colour = len(words) == 3
    spec = _parse_object(prompt, words, with_colour)
    return Claims(text, "colour" if with_colour else "single_object", (CountClaim(spec, 1),))


def caption_pairs(prompt: str) -> set[tuple[str, str]]:
    """The colour-shape pairs a caption names (empty for colour-free captions)."""
    claims = parse_prompt(prompt)
    return {(c.spec.colour, c.spec.shape) for c in claims.counts if c.spec.colour is not None}


# ---------------------------------------------------------------------------------------------------
# Enumerating captions


def _enumerate_category(category: str) -> list[str]:
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    if category == "single_object":
        return [f"a {shape}" for shape in SHAPES]
    if category == "colour":
        return [f"a {colour} {shape}" for colour, shape in pairs]
    if category == "counting":
        return [f"{NUMBER_WORDS[n]} {PLURALS[s] if n > 1 else s}" for n in NUMBERS.values() for s in SHAPES]
    if category == "two_objects":
        return [f"a {a} and a {b}" for a, b in itertools.permutations(SHAPES, 2)]
    bound = [(a, b) for a, b in itertools.permutations(pairs, 2) if a[0] != b[0]]
    if category == "colour_binding":
        return [f"a {a[0]} {a[1]} and a {b[0]} {b[1]}" for a, b in bound]
    if category == "position":
        return [f"a {a[0]} {a[1]} {r} a {b[0]} {b[1]}" for a, b in bound for r in RELATIONS]
    raise UsageError(f"unknown world prompt category {category!r}; choose from {', '.join(CATEGORIES)}")


@functools.lru_cache(maxsize=None)  # random_prompt draws from these lists at every training step
def category_captions(category: str, split: str = "train") -> tuple[str, ...]:
    """Every caption of `category` allowed in `split` ('train': no held-out pair; 'eval': colour-naming
    captions with at least one held-out pair, colour-free captions unchanged)."""
    if split not in ("train", "eval"):
        raise UsageError(f"unknown world prompt split {split!r}; choose 'train' or 'eval'")
    captions = _enumerate_category(category)
    if category in ("single_object", "counting", "two_objects"):
        return tuple(captions)
    return tuple(c for c in captions if bool(caption_pairs(c) & HELD_OUT_PAIRS) == (split == "eval"))


EVAL_PROMPTS_PER_CATEGORY = 24  # world:eval caps large categories at this many captions (fixed sample)


def prompt_set(name: str) -> list[str]:
    """The deterministic prompt lists `train` (every training caption) and `eval` (held-out compositions,
    at most EVAL_PROMPTS_PER_CATEGORY per category, in category order)."""
    if name == "train":
        return [c for category in CATEGORIES for c in category_captions(category, "train")]
    if name == "eval":
        rng = np.random.default_rng(20240611)
        prompts: list[str] = []
        for category in CATEGORIES:
            captions = list(category_captions(category, "eval"))
            if len(captions) > EVAL_PROMPTS_PER_CATEGORY:
                chosen = sorted(rng.choice(len(captions), EVAL_PROMPTS_PER_CATEGORY, replace=False))
                captions = [captions[i] for i in chosen]
            prompts.extend(captions)
        return prompts
    raise UsageError(f"unknown world prompt set {name!r}; choose 'train' or 'eval'")


def load_prompts(spec: str) -> list[str]:
    """`world:train`, `world:eval`, or a text file with one prompt per line (blank lines skipped)."""
    if spec.startswith("world:"):
        name = spec.split(":", 1)[1]
        if name not in ("train", "eval"):
            raise UsageError(f"unknown prompt set {spec!r}; choose world:train or world:eval")
        return prompt_set(name)
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"prompt file {spec!r} does not exist (expected world:train, world:eval or a text file)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {spec!r} holds no prompts")
    return prompts


def random_prompt(rng: np.random.Generator, category: str | None = None, split: str = "train",
                  category_weights: tuple[float, ...] = ()) -> str:
    """A caption drawn uniformly from `category` (or from a category drawn uniformly, or in proportion to
    `category_weights`, one weight per entry of CATEGORIES) of `split`."""
    if category is None and category_weights:
        if len(category_weights) != len(CATEGORIES) or min(category_weights) < 0 or sum(category_weights) <= 0:
            raise UsageError(f"category_weights {category_weights} must be {len(CATEGORIES)} non-negative numbers "
                             f"(one per category: {', '.join(CATEGORIES)}) with a positive sum")
        p = np.asarray(category_weights, dtype=float)
        category = CATEGORIES[rng.choice(len(CATEGORIES), p=p / p.sum())]
    elif category is None:
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
    captions = category_captions(category, split)
    return captions[rng.integers(len(captions))]


def perturb_prompt(prompt: str, rng: np.random.Generator) -> str:
    """A caption of the same category that differs in one colour, shape, number or relation, and is therefore
    false for every scene that satisfies `prompt` (a hard negative)."""
    claims = parse_prompt(prompt)
    category = claims.category
    specs = [c.spec for c in claims.counts]
    choices = []
    if category == "counting":
        count, shape = claims.counts[0].count, specs[0].shape
        choices += [(n, shape) for n in NUMBERS.values() if n != count]
        choices += [(count, s) for s in SHAPES if s != shape]
        n, s = choices[rng.integers(len(choices))]
        return f"{NUMBER_WORDS[n]} {PLURALS[s] if n > 1 else s}"
    if category == "position":
        relation = claims.relations[0].relation
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
        choices.append((specs, opposite))  # the same objects, the opposite relation
        choices.append(([specs[1], specs[0]], relation))  # the objects swapped
    for index, spec in enumerate(specs):
        for shape in SHAPES:
            if shape != spec.shape:
                changed = list(specs)
                changed[index] = ObjectSpec(shape, spec.colour)
                choices.append((changed, None))
        if spec.colour is not None:
            for colour in COLOURS:
                if colour != spec.colour:
                    changed = list(specs)
                    changed[index] = ObjectSpec(spec.shape, colour)
                    choices.append((changed, None))
    while True:
        changed, relation = choices[rng.integers(len(choices))]
        relation = relation or (claims.relations[0].relation if claims.relations else None)
        words = [f"a {s.describe()}" for s in changed]
        candidate = f"{words[0]} {relation} {words[1]}" if relation else " and ".join(words)
        try:
            parse_prompt(candidate)  # rejects e.g. two objects that now share a colour
        except UsageError:
            continue
        return candidate


# ---------------------------------------------------------------------------------------------------
# Scenes


def scene_satisfies(scene: Scene, prompt: str | Claims) -> bool:
    """Whether a scene makes a caption true (symbolic: from the scene's objects, not from pixels)."""
    claims = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if len(scene.objects) != claims.total_objects:
        return False
    for claim in claims.counts:
        if sum(claim.spec.matches(o.shape, o.colour) for o in scene.objects) != claim.count:
            return False
    for relation in claims.relations:
        subject = next(o for o in scene.objects if relation.subject.matches(o.shape, o.colour))
        reference = next(o for o in scene.objects if relation.reference.matches(o.shape, o.colour))
        if not relation_holds(subject.centre, relation.relation, reference.centre, margin=1.0):
            return False
    return True


def relation_holds(subject: tuple[float, float], relation: str, reference: tuple[float, float], margin: float) -> bool:
    """Whether centre `subject` lies `relation` centre `reference` by more than `margin` pixels."""
    dx, dy = subject[0] - reference[0], subject[1] - reference[1]
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation] > margin


def _boxes_clear(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _separated_along(subject: SceneObject, relation: str, reference: SceneObject) -> bool:
    """The relation holds with a clear margin: the two boxes lie on either side of a line, GAP apart."""
    s, r = subject.box, reference.box
    if relation == "left of":
        return s[2] + GAP <= r[0]
    if relation == "right of":
        return r[2] + GAP <= s[0]
    if relation == "above":
        return s[3] + GAP <= r[1]
    return r[3] + GAP <= s[1]


def _place(rng: np.random.Generator, shape: str, colour: str) -> SceneObject:
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    # Whole-pixel box edges: a square covers exactly size x size pixels, at any render size that is a multiple.
    left, top = rng.integers(BORDER, CANVAS - BORDER - size + 1, size=2)
    return SceneObject(shape, colour, (float(left + size / 2), float(top + size / 2)), float(size))


def sample_scene(prompt: str, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies `prompt`: random sizes and places, no overlaps, relations with a margin."""
    claims = parse_prompt(prompt)
    colour_names = list(COLOURS)
    wanted: list[tuple[str, str]] = []
    for claim in claims.counts:
        for _ in range(claim.count):
            colour = claim.spec.colour or colour_names[rng.integers(len(colour_names))]
            wanted.append((claim.spec.shape, colour))
    for _attempt in range(1000):
        objects: list[SceneObject] = []
        for shape, colour in wanted:
            for _try in range(100):
                candidate = _place(rng, shape, colour)
                if all(_boxes_clear(candidate.box, other.box) for other in objects):
                    objects.append(candidate)
                    break
            else:
                break
        if len(objects) != len(wanted):
            continue
        if all(_separated_along(objects[0], r.relation, objects[1]) for r in claims.relations):
            return Scene(objects)
    raise RuntimeError(f"could not lay out a scene for {prompt!r}")  # unreachable with the sizes above
