"""Scans a dataset and reports what training would trip over, before it starts.

`check_dataset(config)` reads every example of every split (nothing is written)
and returns a `DatasetReport`: the layout of a folder dataset; per split the example
count, image sizes and channels; each class's pixels and median-frequency weight (from
the train split); without class information, the raw mask values found and the keys
that would fit them; warnings; every problem with the file it concerns. `format_report`
prints it; `python -m flaxseg.data check` is the command-line front end.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np

from flaxseg.data import folder, layouts
from flaxseg.data.balance import ClassBalance
from flaxseg.data.base import suggest_classes, suggestion_flags, void_proposal
from flaxseg.data.tfds import DatasetNotPreparedError, MissingSplitError
from flaxseg.image_files import is_rotated

Loader = Callable[[], dict[str, np.ndarray]]


@dataclasses.dataclass
class SplitReport:
    name: str
    count: int = 0
    sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    channels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    balance: ClassBalance | None = None  # None without class information


@dataclasses.dataclass
class DatasetReport:
    description: str
    num_classes: int | None
    class_names: tuple[str, ...]
    ignore_index: int
    splits: list[SplitReport] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    layout: str | None = None  # folder datasets: the layout read
    # Without class information: the raw mask values (index masks) and colours (RGB
    # masks) found, and the keys that would read the values.
    raw_values: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    raw_colours: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    suggestion: dict[str, Any] | None = None
    # How many masks hold each raw value, and how many masks were tallied.
    raw_masks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    raw_mask_count: int = 0
    rotated_files: int = 0  # files read turned by their EXIF orientation tag
    mask_kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def num_examples(self) -> int:
        return sum(s.count for s in self.splits)

    def _balance(self) -> ClassBalance:
        total = ClassBalance(self.num_classes or 0, self.ignore_index)
        for split in self.splits:
            if split.balance is not None:
                total.merge(split.balance)
        return total

    @property
    def class_pixels(self) -> np.ndarray:
        """int64 `[num_classes]`: pixels of each class over every split."""
        return self._balance().pixels

    @property
    def void_pixels(self) -> int:
        return self._balance().void_pixels

    def train_balance(self) -> ClassBalance | None:
        """The train split's class balance (what `loss.class_weights='median_frequency'`
        computes), or None."""
        return next((s.balance for s in self.splits if s.name == "train"), None)


def _scan(
    report: DatasetReport,
    split: SplitReport,
    items: Iterator[tuple[str, Loader]],
    num_channels: int | None,
    max_examples: int | None,
) -> None:
    """Loads each item, tallying sizes, channels and class pixels, recording problems."""
    wrong_channels: dict[int, list[str]] = collections.defaultdict(list)
    if report.num_classes is not None:
        split.balance = ClassBalance(report.num_classes, report.ignore_index)
    for n, (name, load) in enumerate(items):
        if max_examples is not None and n >= max_examples:
            break
        try:
            example = load()
        except ValueError as e:  # folder files name themselves (folder.DataFileError)
            report.problems.append(str(e))
            continue
        except (OSError, SyntaxError) as e:
            report.problems.append(f"unreadable or truncated {name}: {e}")
            continue
        image, label = example["image"], example["label"]
        split.count += 1
        split.sizes[image.shape[:2]] += 1
        split.channels[image.shape[-1]] += 1
        if image.shape[-1] != num_channels:
            wrong_channels[image.shape[-1]].append(name)
        if split.balance is not None:
            split.balance.add(label)
        elif label.ndim == 3:  # RGB masks with no palette
            found, counts = np.unique(label.reshape(-1, 3), axis=0, return_counts=True)
            report.raw_colours.update(
                {tuple(f): c for f, c in zip(found.tolist(), counts.tolist(), strict=True)})
        else:
            found, counts = np.unique(label, return_counts=True)
            report.raw_values.update(dict(zip(found.tolist(), counts.tolist(), strict=True)))
            report.raw_masks.update(found.tolist())
            report.raw_mask_count += 1
    disagree = folder.channels_cause(split.channels)
    disagree = f"; {disagree}" if disagree else ""
    for channels, names in sorted(wrong_channels.items()):
        report.problems.append(
            f"{len(names)} image(s) of split {split.name!r} have {channels} channel(s) but the "
            f"config says num_channels={num_channels} (set dataset.num_channels / "
            f"--num-channels {channels}, or convert them){disagree}: {layouts.listing(names)}"
        )


def _size_mismatch(pair: layouts.Pair, image: np.ndarray, raw: np.ndarray) -> str:
    """The size-mismatch problem, with its likely cause where one is known."""
    sizes = [(image.shape[1], image.shape[0]), (raw.shape[1], raw.shape[0])]
    return (f"size mismatch: {pair.image} is {sizes[0][0]}x{sizes[0][1]} (WxH) but "
            f"{pair.mask} is {sizes[1][0]}x{sizes[1][1]}{folder.size_cause(sizes)}")


def _folder_items(pairs: list[layouts.Pair], decoder, report: DatasetReport
                  ) -> Iterator[tuple[str, Loader]]:
    for pair in pairs:

        def load(pair=pair):
            # Each loader names its own file when it cannot decode it.
            image, raw = folder.load_pair_image(pair), folder.load_mask(pair.mask)
            files = pair.images + (() if pair.mask.endswith(".mat") else (pair.mask,))
            report.rotated_files += sum(is_rotated(path) for path in files)
            report.mask_kinds["RGB" if raw.ndim == 3 else "class-index"] += 1
            if image.shape[:2] != raw.shape[:2]:
                raise ValueError(_size_mismatch(pair, image, raw))
            if decoder is None:
                return {"image": image, "label": raw}
            try:
                label = decoder(raw)
            except ValueError as e:
                raise ValueError(f"{pair.mask}: {e}{folder.lossy_cause(pair.mask)}") from None
            return {"image": image, "label": label}

        yield pair.image, load


def _check_folder(config: ml_collections.ConfigDict, max_examples: int | None) -> DatasetReport:
    description = f"{config.name} (folder {config.path})"
    try:
        config = folder.resolve_folder_config(config, require_classes=False)
    except ValueError as e:  # no such folder, no layout found, bad metadata file
        return DatasetReport(description, None, (), config.ignore_index, problems=[str(e)])
    known = config.num_classes is not None
    report = DatasetReport(
        description=f"{config.name} (folder {config.path})",
        num_classes=config.num_classes,
        class_names=tuple(config.class_names or ()) or tuple(
            f"class_{i}" for i in range(config.num_classes or 0)),
        ignore_index=config.ignore_index,
        layout=config.layout,
    )
    decoder = folder.MaskDecoder.from_config(config) if known else None
    layout = layouts.get(config.layout)
    for split in layout.splits(config.path, config):
        found = folder.list_split(config, split)
        report.problems.extend(found.problems)
        if not found.pairs and not found.problems:
            report.problems.append(folder.empty_split_message(config, split, found))
        split_report = SplitReport(split)
        report.splits.append(split_report)
        _scan(report, split_report, _folder_items(found.pairs, decoder, report),
              config.num_channels, max_examples)
    if len(report.mask_kinds) > 1:  # the cause of the "RGB but no palette" lines
        kinds = " and ".join(f"{n} {kind}" for kind, n in sorted(report.mask_kinds.items()))
        report.problems.append(
            f"the masks disagree among themselves: {kinds} images; one dataset's masks are "
            "all one kind: convert the RGB ones to class-index PNGs (or give a palette and "
            "convert the others to colours)")
    if not known and report.raw_values:
        report.suggestion = suggest_classes(report.raw_values, config.ignore_index)
    _warn_binary(report, identity=not (config.value_map or config.reduce_zero_label))
    return report


def _warn_binary(report: DatasetReport, identity: bool) -> None:
    """Masks of only 0 and void, read as class indices, would train a single class."""
    void = report.ignore_index
    if report.num_classes is None:
        binary = set(report.raw_values) == {0, void}
    else:
        binary = identity and report.void_pixels > 0 and (
            report.class_pixels[1:].sum() == 0 and report.class_pixels[0] > 0)
    if binary:
        report.warnings.append(
            f"the masks hold only 0 and {void}; {void} is void (ignore_index) by default, so "
            f"read as class indices this dataset trains a single class. For two classes: "
            f"--num-classes 2 --value-map 0:0,{void}:1 (in a config: num_classes=2, "
            f"value_map={{0: 0, {void}: 1}})."
        )


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
        report = _check_folder(config, max_examples)
    else:
        report = _check_source(config, max_examples)
    report.problems = list(dict.fromkeys(report.problems))  # each problem once
    return report


def _class_lines(report: DatasetReport) -> list[str]:
    total = int(report.class_pixels.sum()) + report.void_pixels
    if report.num_classes is None or not total:
        return []
    train = report.train_balance()
    weighted = train is not None and train.pixels.any()
    lines = ["Classes: pixels and share over all splits" + (
        "; frequency and median-frequency weight from the train split" if weighted else "")]
    freqs = train.frequencies() if weighted else None
    weights = train.median_frequency_weights() if weighted else None
    for i, (name, count) in enumerate(zip(report.class_names, report.class_pixels,
                                          strict=True)):
        line = f"  {i:>3} {name:<20}{int(count):>14,}  {100 * count / total:6.2f}%"
        if weighted:
            line += f"  freq {freqs[i]:.4f}  weight {weights[i]:.3f}"
        lines.append(line)
    void_share = 100 * report.void_pixels / total
    lines.append(
        f"  void ({report.ignore_index}){'':<14}{report.void_pixels:>14,}  {void_share:6.2f}%")
    absent = [n for n, c in zip(report.class_names, report.class_pixels, strict=True) if c == 0]
    if absent:
        lines.append(f"  classes with no pixels: {', '.join(absent)}")
    if weighted:
        lines.append("  (train with these weights: --config.loss.class_weights=median_frequency)")
    return lines


def _raw_lines(report: DatasetReport) -> list[str]:
    lines = []
    if report.raw_values:
        raw = ", ".join(f"{v}: {c:,}" for v, c in sorted(report.raw_values.items())[:30])
        more = len(report.raw_values) - 30
        lines.append("No class information (no num_classes / class_names / palette in the "
                     "config or dataset.json, no fixed classes in the layout).")
        lines.append(f"Raw mask values (value: pixels): {raw}"
                     + (f" ... and {more} more" if more > 0 else ""))
    if report.raw_colours:
        colours = ", ".join(f"{c}: {n:,}" for c, n in report.raw_colours.most_common(20))
        lines.append(f"RGB mask colours (colour: pixels): {colours}; give dataset.palette "
                     "(one RGB triple per class, in class order) in a config or dataset.json")
    if report.suggestion:
        lines.append(f"These masks would read with: {suggestion_flags(report.suggestion, 'check')}"
                     f" (in a training config: {suggestion_flags(report.suggestion, 'train')};"
                     f" other void values: --void-values V,...)")
        proposal = void_proposal(report.raw_values, report.raw_masks, report.raw_mask_count,
                                 report.ignore_index)
        if proposal:
            text, void = proposal
            lines.append(f"Values that look like void rather than a class: {text}. If "
                         f"{void['void_values'][0]} is void: {suggestion_flags(void, 'check')} "
                         f"(in a training config: {suggestion_flags(void, 'train')})")
    return lines


def format_report(report: DatasetReport) -> str:
    """A human-readable summary of a `DatasetReport`."""
    lines = [f"Dataset {report.description}"]
    if report.num_classes is not None:
        lines[0] += f": {report.num_classes} classes, ignore_index {report.ignore_index}"
    if report.layout:
        lines.append(f"layout: {report.layout}")
    if report.splits:
        lines.append(f"{'split':<8}{'images':>8}  {'sizes (HxW: count)':<32}channels")
    for s in report.splits:
        sizes = ", ".join(f"{h}x{w}: {n}" for (h, w), n in s.sizes.most_common(4))
        if len(s.sizes) > 4:
            sizes += f", ... ({len(s.sizes)} sizes)"
        channels = ", ".join(f"{c}: {n}" for c, n in sorted(s.channels.items()))
        lines.append(f"{s.name:<8}{s.count:>8}  {sizes or '-':<32}{channels or '-'}")
    if report.splits:
        lines.append(f"{'total':<8}{report.num_examples:>8}")
    if report.rotated_files:
        lines.append(f"EXIF orientation: {report.rotated_files} file(s) carry a rotation tag; "
                     "they are read turned as displayed (as annotation tools show them)")
    lines += _class_lines(report) + _raw_lines(report)
    lines.extend(f"Warning: {w}" for w in report.warnings)
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s):")
        lines.extend(f"  - {p}" for p in report.problems)
    else:
        lines.append("No problems found.")
    return "\n".join(lines)

