"""Scans a dataset and reports what training would trip over, before it starts.

`check_dataset(config)` reads every example of every split (nothing is written)
and returns a `DatasetReport`: per split the example count, image sizes and
channels; the class histogram (pixels per class, void share); and every problem
with the file(s) it concerns. `format_report` prints it; `python -m flaxseg.data
check` is the command-line front end.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
from PIL import UnidentifiedImageError

from flaxseg.data import folder
from flaxseg.data.tfds import DatasetNotPreparedError, MissingSplitError

Loader = Callable[[], dict[str, np.ndarray]]


@dataclasses.dataclass
class SplitReport:
    name: str
    count: int = 0
    sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    channels: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class DatasetReport:
    description: str
    num_classes: int | None
    class_names: tuple[str, ...]
    ignore_index: int
    splits: list[SplitReport]
    class_pixels: np.ndarray  # int64 [num_classes]
    void_pixels: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    # Raw mask values seen when no class mapping is known (to help write one).
    raw_values: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def num_examples(self) -> int:
        return sum(s.count for s in self.splits)


def _scan(
    report: DatasetReport,
    split: SplitReport,
    items: Iterator[tuple[str, Loader]],
    num_channels: int,
    max_examples: int | None,
) -> None:
    """Loads each item, tallying sizes, channels and class pixels, recording problems."""
    wrong_channels: dict[int, list[str]] = collections.defaultdict(list)
    for n, (name, load) in enumerate(items):
        if max_examples is not None and n >= max_examples:
            break
        try:
            example = load()
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            report.problems.append(f"unreadable or truncated file {name}: {e}")
            continue
        except ValueError as e:
            report.problems.append(str(e))
            continue
        image, label = example["image"], example["label"]
        split.count += 1
        split.sizes[image.shape[:2]] += 1
        split.channels[image.shape[-1]] += 1
        if image.shape[-1] != num_channels:
            wrong_channels[image.shape[-1]].append(name)
        if label.ndim == 3:  # raw RGB values only arise when no mapping is known
            continue
        if report.num_classes is None:
            values, counts = np.unique(label, return_counts=True)
            report.raw_values.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))
            continue
        counts = np.bincount(
            label.ravel(), minlength=max(report.num_classes, report.ignore_index + 1)
        )
        report.class_pixels += counts[: report.num_classes]
        report.void_pixels += int(counts[report.ignore_index])
    for channels, names in sorted(wrong_channels.items()):
        report.problems.append(
            f"{len(names)} image(s) of split {split.name!r} have {channels} channel(s) but the "
            f"config says num_channels={num_channels} (set dataset.num_channels / "
            f"--num-channels {channels}, or convert them): {folder.listing(names)}"
        )


def _folder_items(config, pairs: list[folder.Pair], decoder) -> Iterator[tuple[str, Loader]]:
    for pair in pairs:

        def load(pair=pair):
            image = folder.load_image(pair.image)
            raw = folder.load_mask(pair.mask)
            if image.shape[:2] != raw.shape[:2]:
                raise ValueError(
                    f"size mismatch: {pair.image} is {image.shape[1]}x{image.shape[0]} (WxH) "
                    f"but {pair.mask} is {raw.shape[1]}x{raw.shape[0]}"
                )
            if decoder is None:
                return {"image": image, "label": raw}
            try:
                label = decoder(raw)
            except ValueError as e:
                raise ValueError(f"{pair.mask}: {e}") from None
            return {"image": image, "label": label}

        yield pair.image, load


def _check_folder(config: ml_collections.ConfigDict, max_examples: int | None) -> DatasetReport:
    root = config.path
    if not root or not os.path.isdir(root):
        raise ValueError(f"{root!r} is not a folder; give the dataset's root folder.")
    problems, decoder, labels = [], None, None
    try:
        labels = folder.resolve_labels(config, folder.read_metadata(root))
        decoder = folder.MaskDecoder(
            labels["num_classes"],
            config.ignore_index,
            labels["palette"],
            labels["value_map"],
            labels["void_values"],
        )
    except ValueError as e:
        problems.append(
            f"no class mapping: {e} (e.g. --num-classes 2 --value-map 0:0,255:1, "
            "or --preset isbi2012)"
        )
    num_classes = labels["num_classes"] if labels else None
    report = DatasetReport(
        description=f"{config.name} (folder {root})",
        num_classes=num_classes,
        class_names=labels["class_names"] if labels else (),
        ignore_index=config.ignore_index,
        splits=[],
        class_pixels=np.zeros((num_classes or 0,), np.int64),
        problems=problems,
    )
    layout = folder.split_layout(root, config.images_dir)
    for split in folder.SPLITS:
        pairs, split_problems = folder.split_pairs(config, split)
        # A pooled split with a zero fraction is empty by design; a present folder is not.
        expected = (
            split == "train"
            or (layout == "subfolders" and os.path.isdir(os.path.join(root, split)))
            or (layout == "pooled" and config[f"{split}_fraction"] > 0)
        )
        if not expected:
            continue
        report.problems.extend(split_problems)
        split_report = SplitReport(split)
        report.splits.append(split_report)
        _scan(
            report,
            split_report,
            _folder_items(config, pairs, decoder),
            config.num_channels,
            max_examples,
        )
        if not pairs and not split_problems:
            report.problems.append(f"split {split!r} is empty")
    return report


def _check_source(config: ml_collections.ConfigDict, max_examples: int | None) -> DatasetReport:
    from flaxseg.data import create_source

    splits = list((config.get("splits") or {"train": 0, "val": 0, "test": 0}).keys())
    sources, problems = {}, []
    for split in splits:
        try:
            sources[split] = create_source(config, split)
        except MissingSplitError as e:
            if split == "train":
                problems.append(str(e))
        except DatasetNotPreparedError as e:
            problems.append(str(e))
            break  # the same for every split
        except ValueError as e:
            problems.append(f"split {split!r}: {e}")
    info = next(iter(sources.values())).info if sources else None
    report = DatasetReport(
        description=f"{config.name} ({config.source})",
        num_classes=info.num_classes if info else None,
        class_names=info.class_names if info else (),
        ignore_index=config.ignore_index,
        splits=[],
        class_pixels=np.zeros((info.num_classes if info else 0,), np.int64),
        problems=problems,
    )
    for split, source in sources.items():
        split_report = SplitReport(split)
        report.splits.append(split_report)
        items = ((f"{split}[{i}]", lambda i=i, s=source: s[i]) for i in range(len(source)))
        _scan(report, split_report, items, config.num_channels, max_examples)
    return report


def check_dataset(
    config: ml_collections.ConfigDict, max_examples: int | None = None
) -> DatasetReport:
    """Reads every example (or the first `max_examples` per split) and reports on them."""
    if config.source == "folder":
        return _check_folder(config, max_examples)
    return _check_source(config, max_examples)


def format_report(report: DatasetReport) -> str:
    """A human-readable summary of a `DatasetReport`."""
    lines = [f"Dataset {report.description}"]
    if report.num_classes is not None:
        lines[0] += f": {report.num_classes} classes, ignore_index {report.ignore_index}"
    lines.append(f"{'split':<8}{'images':>8}  {'sizes (HxW: count)':<32}channels")
    for s in report.splits:
        sizes = ", ".join(f"{h}x{w}: {n}" for (h, w), n in s.sizes.most_common(4))
        if len(s.sizes) > 4:
            sizes += f", ... ({len(s.sizes)} sizes)"
        channels = ", ".join(f"{c}: {n}" for c, n in sorted(s.channels.items()))
        lines.append(f"{s.name:<8}{s.count:>8}  {sizes or '-':<32}{channels or '-'}")
    lines.append(f"{'total':<8}{report.num_examples:>8}")
    total = int(report.class_pixels.sum()) + report.void_pixels
    if report.num_classes is not None and total:
        lines.append("Class histogram (pixels, share of all pixels):")
        for i, (name, count) in enumerate(
            zip(report.class_names, report.class_pixels, strict=True)
        ):
            lines.append(f"  {i:>3} {name:<20}{int(count):>14,}  {100 * count / total:6.2f}%")
        void_share = 100 * report.void_pixels / total
        lines.append(
            f"  void ({report.ignore_index}){'':<14}{report.void_pixels:>14,}  {void_share:6.2f}%"
        )
        absent = [n for n, c in zip(report.class_names, report.class_pixels, strict=True) if c == 0]
        if absent:
            lines.append(f"  classes with no pixels: {', '.join(absent)}")
    if report.raw_values:
        raw = ", ".join(f"{v}: {c:,}" for v, c in sorted(report.raw_values.items())[:20])
        lines.append(f"Raw mask values (value: pixels): {raw}")
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s):")
        lines.extend(f"  - {p}" for p in report.problems)
    else:
        lines.append("No problems found.")
    return "\n".join(lines)
