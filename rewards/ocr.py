"""OCR reward: does the image show the text the prompt quotes? (the text-rendering task of Flow-GRPO)

Needs the `ocr` extra (`pip install rlfew[ocr]`: rapidocr + onnxruntime, which ship their own PP-OCR
weights, so it runs offline).
"""

from __future__ import annotations

import re

from rlfew.errors import UsageError
from rlfew.images import to_uint8
from rlfew.rewards.api import Reward

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def quoted_text(prompt: str) -> str:
    """The first double-quoted span of a prompt, e.g. 'a sign saying "OPEN"' -> 'OPEN'."""
    match = _QUOTED.search(prompt)
    if match is None:
        raise UsageError(f"OCR reward needs the target text in double quotes in the prompt, got {prompt!r}")
    return match.group(1) or match.group(2)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def text_similarity(recognised: str, target: str) -> float:
    """1 - edit distance / target length, clipped to [0, 1], comparing lowercase text without spaces;
    1 when the target appears anywhere in the recognised text (as in Flow-GRPO's OCR reward)."""
    recognised, target = (re.sub(r"\s+", "", s).lower() for s in (recognised, target))
    if not target:
        raise UsageError("OCR reward: the quoted target text is empty")
    if target in recognised:
        return 1.0
    return 1.0 - min(edit_distance(recognised, target), len(target)) / len(target)


class OcrReward(Reward):
    """Similarity in [0, 1] between the text rapidocr reads in the image and the prompt's quoted text.
    Detections below `min_confidence` are ignored."""

    name = "ocr"
    differentiable = False

    def __init__(self, min_confidence: float = 0.0):
        try:
            from rapidocr import RapidOCR
        except ImportError as err:
            raise UsageError("the 'ocr' reward needs the ocr extra: pip install 'rlfew[ocr]' "
                             f"(rapidocr and onnxruntime); import failed: {err}") from err
        self.engine = RapidOCR()
        self.min_confidence = float(min_confidence)

    def read_text(self, image_hwc_uint8) -> str:
        result = self.engine(image_hwc_uint8)
        texts, confidences = result.txts or (), result.scores or ()
        return " ".join(text for text, confidence in zip(texts, confidences) if confidence >= self.min_confidence)

    def compute(self, images, prompts, **meta):
        targets = [quoted_text(prompt) for prompt in prompts]  # fail before spending OCR time
        return [text_similarity(self.read_text(array), target) for array, target in zip(to_uint8(images), targets)]
