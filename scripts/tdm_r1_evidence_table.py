"""Print the TDM-R1 evidence table (markdown) from the files scripts/tdm_r1_evidence.sh writes, and draw accuracy
against images scored (`tdm_r1_images.png` in the same folder; needs matplotlib, `pip install rlfew[plot]`).
A trained row is its final checkpoint, the mean over its seeds (`<run>-s<seed>@<step>.json`), with each seed's
accuracy listed; the plot has every checkpoint."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import yaml
from grpo_evidence_table import train_reward  # scripts/ is on the path of a script run from it

ROWS = [("student", "world:student (no training)"), ("tdm_r1", "TDM-R1 (λ = 0.3, surrogate on `world`)"),
        ("grpo-dmd", "GRPO + DMD (λ = 1)"), ("tdm", "TDM, λ = 1, no surrogate (control)"),
        ("tdm_r1-warmup", "TDM-R1, critic warm-up 10 iterations"), ("tdm_r1-long", "TDM-R1, longer run"),
        ("grpo-dmd-long", "GRPO + DMD, longer run")]
CATEGORIES = ["single_object", "colour", "counting", "two_objects", "colour_binding", "position"]


def checkpoints(folder: Path, key: str) -> dict[int, dict[int, tuple[dict, dict]]]:
    """{seed: {step: (world:eval report, drawn-prompt report)}} of a run's evaluated checkpoints."""
    found: dict[int, dict[int, tuple[dict, dict]]] = {}
    for path in folder.glob(f"{key}-s[0-9]@*.json"):
        match = re.fullmatch(rf"{re.escape(key)}-s(\d)@(\d+)\.json", path.name)
        drawn = path.with_name(path.name[:-5] + ".drawn.json")
        if match and drawn.exists():
            found.setdefault(int(match[1]), {})[int(match[2])] = (json.loads(path.read_text()),
                                                                   json.loads(drawn.read_text()))
    return found


def images_per_iteration(folder: Path, key: str) -> int:
    configs = sorted(folder.glob(f"{key}-s[0-9]/config.yaml"))
    train = yaml.safe_load(configs[0].read_text())["train"]
    return train["prompts_per_step"] * train["group_size"]


def scores_images(folder: Path, key: str) -> bool:
    configs = sorted(folder.glob(f"{key}-s[0-9]/config.yaml"))
    return bool(yaml.safe_load(configs[0].read_text()).get("reward"))


def surrogate_auc(folder: Path, key: str) -> str:
    """The surrogate's within-group AUC against the reward, mean over the last half of the run and the seeds."""
    values = []
    for metrics in sorted(folder.glob(f"{key}-s[0-9]/metrics.jsonl")):
        aucs = [r["surrogate/auc"] for r in map(json.loads, metrics.read_text().splitlines()) if "surrogate/auc" in r]
        values.extend(aucs[len(aucs) // 2:])
    return f"{np.mean(values):.2f}" if values else "–"


def minutes(folder: Path, key: str) -> str:
    values = [float(p.read_text()) for p in sorted(folder.glob(f"{key}-s[0-9].seconds"))]
    return f"{np.mean(values) / 60:.1f}" if values else "–"


def row(label: str, reports: list[dict], drawn: list[dict], extra: list[str]) -> str:
    mean = lambda pick, rs=reports: float(np.mean([pick(r) for r in rs]))  # noqa: E731
    seeds = ", ".join(f"{r['accuracy']:.3f}" for r in reports) if len(reports) > 1 else "–"
    cells = [seeds, extra[0], f"{mean(lambda r: r['accuracy']):.3f}", f"{mean(lambda r: r['accuracy'], drawn):.3f}",
             *[f"{mean(lambda r, c=c: r['accuracy_by_category'].get(c, float('nan'))):.2f}" for c in CATEGORIES],
             f"{mean(lambda r: r['fd']):.3f}", f"{mean(lambda r: r['diversity']):.3f}", *extra[1:]]
    return f"| {label} | " + " | ".join(cells) + " |"


def main(folder: str) -> None:
    root = Path(folder)
    print("| model | seeds: accuracy | world reward (training) | accuracy | drawn-prompt accuracy | "
          + " | ".join(CATEGORIES) + " | fd | diversity | surrogate AUC | images scored | train min |")
    print("|---" * (len(CATEGORIES) + 11) + "|")
    student = (json.loads((root / "student.json").read_text()), json.loads((root / "student.drawn.json").read_text()))
    print(row(ROWS[0][1], [student[0]], [student[1]], ["–", "–", "0", "–"]))
    curves = {}
    for key, label in ROWS[1:]:
        runs = checkpoints(root, key)
        if not runs:
            continue
        per_image = images_per_iteration(root, key)
        scored = scores_images(root, key)
        final = [runs[seed][max(runs[seed])] for seed in sorted(runs)]
        last_step = max(max(steps) for steps in runs.values())
        print(row(label, [f[0] for f in final], [f[1] for f in final],
                  [train_reward(root, key), surrogate_auc(root, key),
                   str(last_step * per_image) if scored else f"0 ({last_step * per_image} drawn)",
                   minutes(root, key)]))
        steps = sorted(set.intersection(*(set(s) for s in runs.values())))
        curves[label] = ([0] + [step * per_image for step in steps],
                         [student[0]["accuracy"]] + [float(np.mean([runs[seed][step][0]["accuracy"] for seed in runs]))
                                                     for step in steps],
                         [student[1]["accuracy"]] + [float(np.mean([runs[seed][step][1]["accuracy"] for seed in runs]))
                                                     for step in steps], scored)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install 'rlfew[plot]')", file=sys.stderr)
        return
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for index, (label, (images, accuracy, drawn, scored)) in enumerate(curves.items()):
        colour = f"C{index}"
        name = label if scored else f"{label}: scores none, x = images drawn"
        axes.plot(images, accuracy, "o-" if scored else "o--", color=colour, label=f"{name} (world:eval)")
        axes.plot(images, drawn, "s:", color=colour, alpha=0.6, label="  same, drawn prompts")
    axes.axhline(0.78, color="grey", linewidth=0.8, linestyle="--")
    axes.text(0, 0.785, "claim: 0.78", fontsize=7, color="grey")
    axes.set_xlabel("images scored by the reward (8 prompts × 8 images per iteration)")
    axes.set_ylabel("GenEval accuracy (4 steps)")
    axes.set_title("TDM-R1 vs GRPO + DMD on world:student (mean over seeds)")
    axes.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(root / "tdm_r1_images.png", dpi=120)
    print(f"wrote {root / 'tdm_r1_images.png'}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tdm-evidence")
