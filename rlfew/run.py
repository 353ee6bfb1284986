"""The run directory `<output_dir>/<name>/` and the metrics logger that writes into it.

Layout: `config.yaml` (the resolved config), `metrics.jsonl` (one JSON object per log call),
TensorBoard event files (in the run directory itself, so `tensorboard --logdir runs` lists runs by
name), `samples/step_N.png` captioned grids, and `checkpoints/step_N/` (see rlfew.checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlfew import checkpoint as checkpoints
from rlfew.config import save_config
from rlfew.errors import UsageError
from rlfew.images import save_grid, to_uint8

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {key!r} is a tensor of shape {tuple(value.shape)}; log a scalar")
        return float(value.item())
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")


def _truncate_metrics(path: Path, last_step: int | None) -> None:
    """Keep only records with step <= last_step (all dropped when None); a torn last line is dropped too."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed process
            dropped += 1
            continue
        if last_step is not None and record.get("step", math.inf) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        log.info("%s: dropping %d records logged after step %s", path, dropped, last_step)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(f"{line}\n" for line in kept))
    os.replace(partial, path)


class MetricsLogger:
    """Scalars to `metrics.jsonl` and TensorBoard, sample grids to `samples/` and TensorBoard.

    `resumed_step`: the step of the checkpoint a resumed run starts from; records logged after it by the
    interrupted run are removed (from the JSONL, and hidden in TensorBoard) so the curves stay consistent.
    `fresh=True` discards earlier records entirely (a resume that found no checkpoint).
    """

    def __init__(self, run_dir: str | Path, resumed_step: int | None = None, fresh: bool = False):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard; only needed once logging starts

        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.samples_dir = self.run_dir / SAMPLES_DIR
        if fresh or resumed_step is not None:
            _truncate_metrics(self.metrics_path, None if fresh else resumed_step)
        purge_step = 0 if fresh else (resumed_step + 1 if resumed_step is not None else None)
        self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one record; non-finite values become null in the JSONL (with a warning)."""
        record: dict[str, Any] = {"step": int(step)}
        nonfinite = []
        for key, value in metrics.items():
            number = _as_float(key, value)
            self._writer.add_scalar(key, number, step)
            if math.isfinite(number):
                record[key] = number
            else:
                record[key] = None
                nonfinite.append(f"{key}={number}")
        if nonfinite:
            log.warning("step %d: non-finite metrics logged as null: %s", step, ", ".join(nonfinite))
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()  # a killed run keeps every completed line

    def log_samples(self, step: int, images: torch.Tensor | np.ndarray, captions: list[str] | None = None,
                    tag: str = "samples") -> Path:
        """Save `samples/step_N.png` (a captioned grid; images float (B,3,H,W) in [0,1] or uint8 (B,H,W,3))."""
        path = save_grid(self.samples_dir / f"step_{step}.png", images, captions)
        pixels = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
        self._writer.add_images(tag, pixels, step, dataformats="NHWC")
        return path

    def close(self) -> None:
        self._writer.close()
        self._metrics_file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclasses.dataclass
class RunDir:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return checkpoints.checkpoints_dir(self.path)

    @classmethod
    def create(cls, output_dir: str | Path, name: str, config: Any, resume: bool = False) -> RunDir:
        """Make `<output_dir>/<name>/` and write the resolved config.

        An existing non-empty directory is only reused when resuming; the config is rewritten then, since a
        resumed run may change e.g. train.steps. `run.name` / `run.output_dir` are filled in the saved copy.
        """
        path = Path(output_dir) / name
        if path.is_dir() and any(path.iterdir()) and not resume:
            raise UsageError(f"run directory {path} already exists and is not empty; choose another run.name, "
                             "or set run.resume=auto to continue that run")
        if path.exists() and not path.is_dir():
            raise UsageError(f"run directory {path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        (path / SAMPLES_DIR).mkdir(exist_ok=True)
        checkpoints.checkpoints_dir(path).mkdir(exist_ok=True)
        if hasattr(config, "run"):
            config = dataclasses.replace(config, run=dataclasses.replace(config.run, name=name,
                                                                         output_dir=str(output_dir)))
        save_config(config, path / CONFIG_FILE)
        return cls(path)

    def resume_checkpoint(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None for a fresh start, "auto" for the newest here, or a path.

        A path may be a checkpoint (`.../step_N`) or a run directory (its newest checkpoint). "auto" with
        no checkpoint yet returns None, so a preemptible job can always pass run.resume=auto.
        """
        if resume is None:
            return None
        if resume == "auto":
            return checkpoints.latest_checkpoint(self.path)
        target = Path(resume)
        if (target / checkpoints.MANIFEST).is_file():
            return target
        latest = checkpoints.latest_checkpoint(target)
        if latest is None:
            raise UsageError(f"run.resume: {resume!r} is neither a checkpoint directory nor a run directory "
                             "with checkpoints")
        return latest

    def metrics_logger(self, resumed_step: int | None = None, fresh: bool = False) -> MetricsLogger:
        return MetricsLogger(self.path, resumed_step=resumed_step, fresh=fresh)

    def save_checkpoint(self, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                        keep: int | None = None) -> Path:
        """Save `checkpoints/step_N/`; with `keep`, prune to the newest `keep` afterwards."""
        path = checkpoints.save_checkpoint(self.path, step, tensors, state)
        if keep is not None:
            checkpoints.prune_checkpoints(self.path, keep)
        return path
