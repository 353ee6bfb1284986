"""Print the DMDR evidence table (markdown) from the eval JSONs that scripts/world_evidence.sh writes: one row per
model; a trained row is the mean over its seeds (`<run>-s<seed>.json`), with each seed's accuracy listed."""

import json
import sys
from pathlib import Path

import numpy as np

ROWS = [("teacher-50", "world:teacher, 50 steps, CFG 3"), ("teacher-4", "world:teacher, 4 steps, CFG 3"),
        ("student-4", "world:student, 4 steps"), ("student-2", "world:student, 2 steps"),
        ("student-1", "world:student, 1 step"), ("dmd-only", "student + DMD only (λ=0)"),
        ("dmd-gan", "student + DMD + GAN head (λ_G=5e-3)"),
        ("reward-only", "student + reward only (no DMD)"), ("dmdr", "student + DMDR (λ=0.05)")]
CATEGORIES = ["single_object", "colour", "counting", "two_objects", "colour_binding", "position"]


def load_reports(folder: Path, key: str) -> list[dict]:
    single = folder / f"{key}.json"
    paths = [single] if single.exists() else sorted(folder.glob(f"{key}-s*.json"))
    return [json.loads(path.read_text()) for path in paths]


def main(folder: str) -> None:
    print("| model | seeds: accuracy | world-clip | accuracy | image accuracy | " + " | ".join(CATEGORIES)
          + " | fd | diversity |")
    print("|---" * (len(CATEGORIES) + 7) + "|")
    for key, label in ROWS:
        reports = load_reports(Path(folder), key)
        if not reports:
            continue
        mean = lambda pick: float(np.mean([pick(r) for r in reports]))  # noqa: E731
        seeds = ", ".join(f"{r['accuracy']:.3f}" for r in reports) if len(reports) > 1 else "–"
        cells = [seeds, f"{mean(lambda r: r['clip_score']):.1f}", f"{mean(lambda r: r['accuracy']):.3f}",
                 f"{mean(lambda r: r['image_accuracy']):.3f}",
                 *[f"{mean(lambda r, c=c: r['accuracy_by_category'].get(c, float('nan'))):.2f}" for c in CATEGORIES],
                 f"{mean(lambda r: r['fd']):.3f}", f"{mean(lambda r: r['diversity']):.3f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
