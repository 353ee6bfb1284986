"""Print the GRPO evidence table (markdown) from the files scripts/grpo_evidence.sh writes, and draw accuracy
against diversity per regulariser (`grpo_frontier.png` in the same folder; needs matplotlib, `pip install
rlfew[plot]`). A trained row is the mean over its seeds (`<run>-s<seed>.json`), with each seed's accuracy listed."""

import json
import sys
from pathlib import Path

import numpy as np

ROWS = [("student", "world:student (no training)"), ("grpo-none", "GRPO, reg none"),
        ("grpo-kl0.04", "GRPO + KL, β = 0.04"), ("grpo-kl1", "GRPO + KL, β = 1"),
        ("grpo-dmd0.1", "GRPO + DMD, λ = 0.1"), ("grpo-dmd1", "GRPO + DMD, λ = 1"),
        ("dmdr", "DMDR (world-clip, differentiable), reference")]
CATEGORIES = ["single_object", "colour", "counting", "two_objects", "colour_binding", "position"]


def load(folder: Path, key: str, suffix: str = "") -> list[dict]:
    single = folder / f"{key}{suffix}.json"
    paths = [single] if single.exists() else sorted(folder.glob(f"{key}-s[0-9]{suffix}.json"))
    return [json.loads(path.read_text()) for path in paths]


def seconds(folder: Path, key: str) -> str:
    values = [float(p.read_text()) for p in sorted(folder.glob(f"{key}-s[0-9].seconds"))]
    return f"{np.mean(values) / 60:.1f}" if values else "–"


def images_scored(folder: Path, key: str) -> str:
    """Images the run's reward scored: iterations × prompts per step × group size, from its saved config."""
    import yaml

    configs = sorted(folder.glob(f"{key}-s[0-9]/config.yaml"))
    if not configs:
        return "0"
    train = yaml.safe_load(configs[0].read_text())["train"]
    return str(train["steps"] * train["prompts_per_step"] * train["group_size"])


def train_reward(folder: Path, key: str) -> str:
    """The `world` reward the run trained on, first logged iteration → mean of the last two logged, over seeds."""
    firsts, lasts = [], []
    for metrics in sorted(folder.glob(f"{key}-s[0-9]/metrics.jsonl")):
        values = [r["reward/world"] for r in map(json.loads, metrics.read_text().splitlines()) if "reward/world" in r]
        if values:
            firsts.append(values[0])
            lasts.append(np.mean(values[-2:]))
    return f"{np.mean(firsts):.2f} → {np.mean(lasts):.2f}" if firsts else "–"


def main(folder: str) -> None:
    root = Path(folder)
    print("| model | seeds: accuracy | world reward (training) | accuracy | drawn-prompt accuracy | image accuracy | "
          + " | ".join(CATEGORIES) + " | world-clip | fd | diversity | images scored | train min |")
    print("|---" * (len(CATEGORIES) + 11) + "|")
    points = {}
    for key, label in ROWS:
        reports, drawn = load(root, key), load(root, key, ".drawn")
        if not reports:
            continue
        mean = lambda pick, rs=reports: float(np.mean([pick(r) for r in rs]))  # noqa: E731
        seeds = ", ".join(f"{r['accuracy']:.3f}" for r in reports) if len(reports) > 1 else "–"
        cells = [seeds, train_reward(root, key), f"{mean(lambda r: r['accuracy']):.3f}",
                 f"{mean(lambda r: r['accuracy'], drawn):.3f}" if drawn else "–",
                 f"{mean(lambda r: r['image_accuracy']):.3f}",
                 *[f"{mean(lambda r, c=c: r['accuracy_by_category'].get(c, float('nan'))):.2f}" for c in CATEGORIES],
                 f"{mean(lambda r: r['clip_score']):.1f}", f"{mean(lambda r: r['fd']):.3f}",
                 f"{mean(lambda r: r['diversity']):.3f}", images_scored(root, key), seconds(root, key)]
        print(f"| {label} | " + " | ".join(cells) + " |")
        points[label] = [(r["diversity"], r["accuracy"]) for r in reports]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install 'rlfew[plot]')", file=sys.stderr)
        return
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for label, xy in points.items():
        xy = np.array(xy)
        axes.scatter(xy[:, 0], xy[:, 1], label=label, marker="*" if label.startswith("world:student") else "o", s=60)
    axes.set_xlabel("diversity (world:eval, mean pairwise feature distance)")
    axes.set_ylabel("GenEval accuracy (world:eval, 4 steps)")
    axes.set_title("GRPO regularisers on world:student: one point per training seed")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(root / "grpo_frontier.png", dpi=120)
    print(f"wrote {root / 'grpo_frontier.png'}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/grpo-evidence")
