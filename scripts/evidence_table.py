"""Print the DMDR evidence table (markdown) from the eval JSONs that scripts/world_evidence.sh writes."""

import json
import sys
from pathlib import Path

ROWS = [("teacher-50", "world:teacher, 50 steps, CFG 3"), ("teacher-4", "world:teacher, 4 steps, CFG 3"),
        ("student-4", "world:student, 4 steps"), ("student-2", "world:student, 2 steps"),
        ("student-1", "world:student, 1 step"), ("dmd-only", "student + DMD only (λ=0)"),
        ("dmd-gan", "student + DMD + GAN head (λ_G=5e-3)"),
        ("reward-only", "student + reward only (no DMD)"), ("dmdr", "student + DMDR (λ=0.05)")]
CATEGORIES = ["single_object", "colour", "counting", "two_objects", "colour_binding", "position"]


def main(folder: str) -> None:
    print("| model | world-clip | accuracy | image accuracy | " + " | ".join(CATEGORIES) + " | fd | diversity |")
    print("|---" * (len(CATEGORIES) + 6) + "|")
    for key, label in ROWS:
        path = Path(folder) / f"{key}.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        cells = [f"{m['clip_score']:.1f}", f"{m['accuracy']:.3f}", f"{m['image_accuracy']:.3f}",
                 *[f"{m['accuracy_by_category'].get(c, float('nan')):.2f}" for c in CATEGORIES],
                 f"{m['fd']:.3f}", f"{m['diversity']:.3f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
