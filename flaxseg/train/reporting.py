"""What a training run shows and writes: console progress, metric tables and log files.

`Reporter` is the loop's only channel to the outside. In the process with
`jax.process_index() == 0` (the chief) it writes, under the workdir:

  metrics.jsonl   one JSON object per logged step: `{"step", "split", "loss", ...}`
                  (split 'train' every `log_every_steps`, the eval split at each
                  evaluation). Only values that are a function of the run's seed go
                  here, so a resumed run writes the same lines as an uninterrupted one;
                  timings go to the console and TensorBoard.
  tensorboard/    TensorBoard event files: the same scalars, img/s, and the grids.
  predictions/    `step_<N>.png`: image | truth | prediction, one row per example.
  summary.json    at the end: the final evaluation, steps, wall time, img/s (end to end
                  and the step's own) and the share of time spent waiting for data.

The console gets a progress bar (loss, mIoU, the step's img/s with the end-to-end figure
beside it, the data-wait share, ETA) on an interactive terminal
and plain periodic lines otherwise (CI, log files); evaluations print the FCN metric
table. Other processes write nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from absl import flags, logging

from flaxseg.streaming import format_duration

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
PREDICTIONS_DIR = "predictions"

_BAR_WIDTH = 24
# A log interval that waited longer than this share of its time for data is input-bound.
DATA_WAIT_WARNING = 0.2


@contextlib.contextmanager
def _writing(path: Path, partial: Path | None = None):
    """An OSError while writing `path` names the file (and removes the half-written
    `partial`), so the run stops with one line that says what failed where."""
    try:
        yield
    except OSError as e:
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e


def json_safe(value: Any) -> Any:
    """NaN / inf -> None and NumPy scalars -> Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl`, in order ([] if there is none)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch when it is installed (only to accept torch tensors), which
    costs about 6 s of CPU in every training process of an environment with the `torch`
    extra. The writer is only given NumPy values here, so torch is hidden during the import
    (a `None` entry in sys.modules makes `import torch` raise ImportError, which
    tensorboardX handles) unless something has imported it already.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class Reporter:
    """Console output and log files of one run (see the module docstring).

    Args:
      workdir: the run's directory.
      num_train_steps: the last step, for the bar and the ETA.
      start_step: the step the run starts from (0, or the restored checkpoint's step);
        `metrics.jsonl` lines and TensorBoard events after it are dropped, since the
        resumed run writes them again.
      is_chief: whether this process writes (default: `jax.process_index() == 0`).
      stream: where the console output goes (default: stdout).
      interactive: progress bar (True) or plain lines (False); default: `stream.isatty()`.
    """

    def __init__(self, workdir: str | os.PathLike, *, num_train_steps: int, start_step: int = 0,
                 is_chief: bool | None = None, stream: TextIO | None = None,
                 interactive: bool | None = None):
        if is_chief is None:
            import jax

            is_chief = jax.process_index() == 0
        self.workdir = Path(workdir)
        self.num_train_steps = int(num_train_steps)
        self.start_step = int(start_step)
        self.is_chief = is_chief
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = (self.stream.isatty() if interactive is None else interactive)
        self._bar_visible = False
        self._writer = None
        self._metrics_file = None
        self._timer_step: int | None = None
        self._timer_start = 0.0
        self._warned_data_wait = False
        if not is_chief:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics(self.start_step)
        # purge_step makes TensorBoard drop the events a killed run wrote after the
        # checkpoint it resumes from.
        self._writer = _summary_writer_class()(
            str(self.workdir / TENSORBOARD_DIR),
            purge_step=self.start_step + 1 if self.start_step else None,
        )
        self._metrics_file = (self.workdir / METRICS_FILE).open("a")

    # -- console ------------------------------------------------------------------------
    def message(self, text: str) -> None:
        """A line on the console (chief only), above the progress bar."""
        if not self.is_chief:
            return
        self._clear_bar()
        print(text, file=self.stream, flush=True)

    def _clear_bar(self) -> None:
        if self._bar_visible:
            self.stream.write("\r\033[K")
            self._bar_visible = False

    def start_timer(self, step: int) -> None:
        """Marks the step after which throughput and ETA are measured (after compiling)."""
        self._timer_step = int(step)
        self._timer_start = time.perf_counter()

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left at the rate since `start_timer`, or None before it is known."""
        if self._timer_step is None or step <= self._timer_step:
            return None
        rate = (time.perf_counter() - self._timer_start) / (step - self._timer_step)
        return rate * (self.num_train_steps - step)

    def progress(self, step: int, *, loss: float, mean_iou: float, images_per_sec: float | None,
                 end_to_end: float | None = None, data_wait: float | None = None) -> None:
        """The progress bar (interactive) or one plain line (not interactive).

        `images_per_sec` is the step's own rate, `end_to_end` the loop's (waiting for data
        included), `data_wait` the share of the interval spent waiting for data.
        """
        if not self.is_chief:
            return
        eta = self.eta_seconds(step)
        fields = [f"loss {loss:.4f}", f"mIoU {mean_iou:.3f}"]
        if images_per_sec is not None:
            fields.append(f"{images_per_sec:.1f} img/s"
                          + (f" ({end_to_end:.1f} end to end)" if end_to_end is not None
                             else ""))
        if data_wait is not None:
            fields.append(f"data wait {100 * data_wait:.0f}%")
        if eta is not None:
            fields.append(f"ETA {format_duration(eta)}")
        width = len(str(self.num_train_steps))
        head = f"step {step:>{width}}/{self.num_train_steps}"
        if self.interactive:
            done = int(_BAR_WIDTH * step / max(self.num_train_steps, 1))
            bar = "#" * done + "." * (_BAR_WIDTH - done)
            self.stream.write(f"\r\033[K{head} [{bar}] " + "  ".join(fields))
            self.stream.flush()
            self._bar_visible = True
        else:
            print(f"{head}  " + "  ".join(fields), file=self.stream, flush=True)

    # -- logs ---------------------------------------------------------------------------
    def _truncate_metrics(self, step: int) -> None:
        path = self.workdir / METRICS_FILE
        if not path.exists():
            return
        kept = [r for r in read_metrics(self.workdir) if r["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for record in kept:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def write_metrics(self, step: int, split: str, metrics: dict[str, float],
                      extra_scalars: dict[str, float] | None = None) -> None:
        """Appends `{"step", "split", **metrics}` to metrics.jsonl and writes the scalars
        (plus `extra_scalars`, e.g. timings, which stay out of the JSON) to TensorBoard."""
        if not self.is_chief:
            return
        record = json_safe({"step": int(step), "split": split, **metrics})
        with _writing(self.workdir / METRICS_FILE):
            self._metrics_file.write(json.dumps(record, sort_keys=True) + "\n")
            self._metrics_file.flush()
        for name, value in {**metrics, **(extra_scalars or {})}.items():
            if isinstance(value, int | float | np.number) and math.isfinite(value):
                self._writer.add_scalar(f"{split}/{name}", float(value), int(step))

    def train_log(self, step: int, sums: Any, rates: Rates | None,
                  learning_rate: float, skipped_steps: int = 0) -> None:
        """The log of a training interval: a metrics.jsonl record (loss, pixel accuracy,
        mIoU, learning rate, skipped steps if any), TensorBoard, and the progress line.

        `sums` is the interval's `flaxseg.metrics.MetricSums`; `rates` its
        `Throughput.interval` (None before the first is timed). An interval that waited for
        data more than `DATA_WAIT_WARNING` of its time says so, once per run.
        """
        if not self.is_chief:
            return
        scores = sums.scores()
        record = {"loss": sums.loss, "pixel_accuracy": scores["pixel_accuracy"],
                  "mean_iou": scores["mean_iou"], "learning_rate": learning_rate}
        if skipped_steps:
            record["skipped_steps"] = skipped_steps
        timings = None if rates is None else {
            "images_per_sec": rates.step, "images_per_sec_end_to_end": rates.end_to_end,
            "data_wait_share": rates.data_wait}
        self.write_metrics(step, "train", record, extra_scalars=timings)
        self.progress(step, loss=sums.loss, mean_iou=scores["mean_iou"],
                      images_per_sec=rates and rates.step,
                      end_to_end=rates and rates.end_to_end, data_wait=rates and rates.data_wait)
        if rates and rates.data_wait > DATA_WAIT_WARNING and not self._warned_data_wait:
            self._warned_data_wait = True
            self.message(
                f"WARNING: the loop waited for data {100 * rates.data_wait:.0f}% of the time up "
                f"to step {step}: the input pipeline is the bottleneck. Raise "
                "config.data_workers (worker processes), set config.dataset.cache=True (a "
                "dataset that fits in memory), or prepare the dataset once (python -m "
                "flaxseg.data prepare) so that the host only reads.")

    def skipped_step(self, step: int, skipped: int) -> None:
        """Says that a step's update was skipped (non-finite loss or gradient)."""
        self.message(f"step {step}: non-finite loss or gradient; the update was skipped "
                     f"({skipped} skipped so far, nan_policy='skip').")

    def evaluation(self, step: int, split: str, result: dict[str, Any]) -> None:
        """Prints the FCN metric table of an evaluation and logs its scores (per-class IoU
        as `iou/<class>`). `result`: `segmentation_scores` plus `loss`."""
        if not self.is_chief:
            return
        from flaxseg.metrics import format_scores_table

        self.message(f"\nEvaluation at step {step} on '{split}' "
                     f"({result.get('num_pixels', 0):,} pixels):\n"
                     f"{format_scores_table(result)}\n")
        flat = {"loss": result["loss"]}
        flat.update({k: result[k] for k in ("pixel_accuracy", "mean_accuracy", "mean_iou",
                                            "fw_iou") if k in result})
        for name, values in result.get("per_class", {}).items():
            flat[f"iou/{name}"] = values["iou"]
        self.write_metrics(step, split, flat)

    def prediction_grid(self, step: int, grid: np.ndarray | None) -> Path | None:
        """Saves the uint8 `[H, W, 3]` grid as `predictions/step_<N>.png` and to TensorBoard."""
        if not self.is_chief or grid is None:
            return None
        from flaxseg.visualize import save_png

        path = self.workdir / PREDICTIONS_DIR / f"step_{step:07d}.png"
        with _writing(path):
            save_png(path, grid)
        self._writer.add_image("predictions", grid, int(step), dataformats="HWC")
        return path

    def summary(self, summary: dict[str, Any]) -> Path | None:
        """Writes summary.json (atomically), says so with the final numbers; returns its path."""
        if not self.is_chief:
            return None
        path = self.workdir / SUMMARY_FILE
        tmp = path.with_suffix(".json.tmp")
        with _writing(path, tmp):
            tmp.write_text(json.dumps(json_safe(summary), indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
        if summary.get("mean_iou") is not None:
            skipped = summary.get("skipped_steps")
            self.message(
                f"Done: {summary['steps']} steps in {summary['wall_time_s']:.1f} s"
                + (f" ({skipped} skipped: non-finite)" if skipped else "")
                + f"; {summary['eval_split']} mIoU {summary['mean_iou']:.4f}, pixel accuracy "
                f"{summary['pixel_accuracy']:.4f}. Wrote {path}.")
        return path

    def close(self) -> None:
        self._clear_bar()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None


@dataclasses.dataclass(frozen=True)
class Rates:
    """One log interval's throughput: `step` images/s (the time spent waiting for data
    left out), `end_to_end` images/s (wall time), `data_wait` (the share of the wall time
    the loop waited for data, 0-1)."""

    step: float
    end_to_end: float
    data_wait: float


class Throughput:
    """Training images/s: timed from the end of the first (compiling) step, leaving out
    the time spent evaluating and saving (call `mark` after those). The loop reports the
    time it waits for data with `waited`; rates come out both with and without it."""

    def __init__(self, batch_size: int):
        self.batch_size = int(batch_size)
        self.train_time = 0.0
        self.wait_time = 0.0
        self.train_images = 0
        self._mark: tuple[float, int] | None = None
        self._waited = 0.0

    def mark(self, step: int) -> None:
        """(Re)starts the clock after `step`."""
        self._mark = (time.perf_counter(), int(step))
        self._waited = 0.0

    def waited(self, seconds: float) -> None:
        """Adds time the loop spent waiting for the next batch."""
        self._waited += float(seconds)

    def interval(self, step: int) -> Rates | None:
        """The rates since the last mark (None before the first), adding to the totals."""
        if self._mark is None or step <= self._mark[1]:
            return None
        start, start_step = self._mark
        elapsed = time.perf_counter() - start
        waited = min(self._waited, elapsed)
        images = (step - start_step) * self.batch_size
        self.train_time += elapsed
        self.wait_time += waited
        self.train_images += images
        self.mark(step)
        if elapsed <= 0:
            return None
        return Rates(images / max(elapsed - waited, 1e-9), images / elapsed, waited / elapsed)

    @property
    def images_per_sec(self) -> float | None:
        """End to end: images over the training wall time."""
        return self.train_images / self.train_time if self.train_time > 0 else None

    @property
    def step_images_per_sec(self) -> float | None:
        """The steps' own: images over the training time not spent waiting for data."""
        busy = self.train_time - self.wait_time
        return self.train_images / busy if busy > 0 else None

    @property
    def data_wait_share(self) -> float | None:
        """The share of the training wall time spent waiting for data."""
        return self.wait_time / self.train_time if self.train_time > 0 else None


def _not_a_read_only_notice(record: Any) -> bool:
    # orbax warns `Given directory is read only=...` whenever a checkpoint directory is
    # opened for reading, which is what evaluate, predict and export mean to do.
    return not str(record.msg).startswith("Given directory is read only")


def quiet_library_logs() -> None:
    """Sets absl logging to WARNING, and drops orbax's read-only notice, unless the user
    passed `--verbosity`.

    orbax logs every checkpoint save and restore at INFO; a command's own output (the
    progress, the tables) is what its user reads. For the entry points, after flag parsing.
    """
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        absl_logger = logging.get_absl_logger()
        if _not_a_read_only_notice not in absl_logger.filters:
            absl_logger.addFilter(_not_a_read_only_notice)

