"""What every data source shares: its `SourceInfo` and the value-mapping helper.

A source is any object with `len(source)`, `source[i] -> {'image': uint8 [H, W, C],
'label': uint8 | int32 [H, W]}` (random access, so grain can shuffle and shard it)
and `source.info` (a `SourceInfo`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

DEFAULT_IGNORE_INDEX = 255
# The most classes a dataset may have: the confusion matrix holds MAX_CLASSES**2 int64
# counts (128 MiB at 4096) and the logits MAX_CLASSES floats a pixel. Far above any public
# benchmark (ADE20K-full: 3688 classes).
MAX_CLASSES = 4096
# The largest raw mask value: masks are 8-bit or 16-bit index images.
MAX_MASK_VALUE = 65535


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Static facts about a source's labels and images.

    `palette` is one RGB triple per class (for colour-coded masks and visualisation),
    or None.
    """

    num_classes: int
    class_names: tuple[str, ...]
    num_channels: int
    ignore_index: int = DEFAULT_IGNORE_INDEX
    palette: tuple[tuple[int, int, int], ...] | None = None

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}.")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"Got {len(self.class_names)} class names for {self.num_classes} classes; "
                "give exactly one name per class."
            )
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"ignore_index={self.ignore_index} collides with a class index "
                f"(num_classes={self.num_classes}); use a value >= num_classes, e.g. 255."
            )
        if self.palette is not None and len(self.palette) != self.num_classes:
            raise ValueError(
                f"Got {len(self.palette)} palette colours for {self.num_classes} classes; "
                "give one RGB triple per class."
            )


class Source(Protocol):
    """The random-access interface every flaxseg data source implements."""

    info: SourceInfo

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def default_class_names(num_classes: int) -> tuple[str, ...]:
    return tuple(f"class_{i}" for i in range(num_classes))


def parse_value_map(value_map: Any) -> dict[int, int]:
    """Normalises a raw-value -> class mapping given as a dict or as (raw, class) pairs.

    Keys may be strings (a config saved as JSON turns int keys into strings).
    """
    if value_map is None:
        return {}
    items = value_map.items() if hasattr(value_map, "items") else value_map
    out = {}
    try:
        for raw, cls in items:
            out[int(raw)] = int(cls)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"value_map must map integer mask values to class indices, e.g. {{0: 0, 255: 1}}; "
            f"got {value_map!r} ({e})."
        ) from None
    return out


class LabelMapper:
    """Turns raw mask values into class indices with one table lookup.

    Raw values listed in `value_map` map to their class; `void_values` map to
    `ignore_index`; with no `value_map`, values below `num_classes` (and
    `ignore_index` itself) map to themselves, or with `reduce_zero_label` 0 is void and
    1..num_classes map to 0..num_classes-1. Any other value is an error (see
    `unknown_values`).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        value_map: Mapping[int, int] | None = None,
        void_values: Sequence[int] | None = (),
        reduce_zero_label: bool = False,
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero_label = bool(reduce_zero_label)
        self.void_values = tuple(int(v) for v in void_values or ())
        value_map = dict(value_map or {})
        if value_map and self.reduce_zero_label:
            raise ValueError(
                "reduce_zero_label and value_map both map the mask values; give one: "
                "reduce_zero_label is the map {0: void, 1: 0, 2: 1, ...}."
            )
        self.identity = not value_map and not self.reduce_zero_label
        for raw, cls in value_map.items():
            if not (0 <= cls < num_classes or cls == ignore_index):
                raise ValueError(
                    f"value_map sends mask value {raw} to {cls}, which is neither a class index "
                    f"(0..{num_classes - 1}) nor ignore_index ({ignore_index})."
                )
        if not value_map:
            # Class-index masks: values are classes (or, with mmsegmentation's
            # reduce_zero_label, 0 = "other" is void and v is class v - 1), and
            # ignore_index already means void.
            shift = int(self.reduce_zero_label)
            value_map = {v + shift: v for v in range(num_classes)}
            if shift:
                value_map[0] = ignore_index
            if ignore_index >= 0:
                value_map.setdefault(ignore_index, ignore_index)
        for v in self.void_values:
            value_map[v] = ignore_index
        # -1 marks an unmapped value; a lookup table over 0..max raw value.
        size = max(max(value_map) + 1, 256)
        self.table = np.full((size,), -1, np.int32)
        for raw, cls in value_map.items():
            if raw < 0:
                raise ValueError(f"Mask values are non-negative; value_map has key {raw}.")
            self.table[raw] = cls

    def unknown_values(self, raw: np.ndarray) -> np.ndarray:
        """The sorted raw values in `raw` that the mapping does not know."""
        values = np.unique(raw)
        known = values < self.table.shape[0]
        known[known] = self.table[values[known]] >= 0
        return values[~known]

    def _unknown_error(self, raw: np.ndarray) -> ValueError:
        bad = self.unknown_values(raw).tolist()[:10]
        if self.identity:
            void = f", void values {self.void_values}" if self.void_values else ""
            return ValueError(
                f"mask values {bad} are not class indices 0..{self.num_classes - 1}{void} nor "
                f"ignore_index {self.ignore_index} (a value map may be missing)"
            )
        if self.reduce_zero_label:
            return ValueError(
                f"mask values {bad} are not 0 (void) nor 1..{self.num_classes} (the classes, "
                "with reduce_zero_label)"
            )
        return ValueError(f"mask values {bad} are not in the value mapping")

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Maps raw mask values `[H, W]` to class indices (uint8 if they fit, else int32).

        Raises ValueError listing the unknown values; callers add the file name.
        """
        raw = np.asarray(raw)
        if raw.size and (raw.min() < 0 or raw.max() >= self.table.shape[0]):
            raise self._unknown_error(raw)
        mapped = self.table[raw]
        if mapped.size and mapped.min() < 0:
            raise self._unknown_error(raw)
        dtype = np.uint8 if max(self.num_classes - 1, self.ignore_index) < 256 else np.int32
        return mapped.astype(dtype)


def suggest_classes(values: Iterable[int], ignore_index: int = DEFAULT_IGNORE_INDEX
                    ) -> dict[str, Any]:
    """The class keys that would read masks holding raw `values` (none of them known).

    Values 0..K-1 (and `ignore_index`) are class indices already: `num_classes` K. Other
    values get a `value_map` onto 0..n-1 in sorted order; `ignore_index` stays void.
    Masks of only 0 and `ignore_index` (a binary dataset saved as 0/255) get the map
    {0: 0, 255: 1}: read as indices they would train a single class.
    """
    found = sorted(int(v) for v in values)
    classes_found = [v for v in found if v != ignore_index]
    if classes_found == [0] and ignore_index in found:
        return {"num_classes": 2, "value_map": {0: 0, ignore_index: 1}}
    if classes_found == list(range(len(classes_found))):
        return {"num_classes": len(classes_found), "value_map": None}
    return {"num_classes": len(classes_found),
            "value_map": {v: i for i, v in enumerate(classes_found)}}


def void_proposal(pixels: Mapping[int, int], masks_with: Mapping[int, int], num_masks: int,
                  ignore_index: int = DEFAULT_IGNORE_INDEX) -> tuple[str, dict[str, Any]] | None:
    """Which raw values look like void rather than a class, and the keys reading the likeliest
    one as void: `(text, suggestion)`, or None with fewer than two candidate classes.

    A count of classes from the values alone would make a void label a class (CamVid's 11).
    The signs: 255 (the usual void label) when it is not already `ignore_index`; the largest
    value; a value absent from most masks (at most the three rarest are named). The
    proposal takes 255 if present, else the largest value.
    """
    found = sorted(int(v) for v in pixels if v != ignore_index)
    if len(found) < 2:
        return None
    reasons: dict[int, list[str]] = {v: [] for v in found}
    if 255 in reasons:
        reasons[255].append("the usual void label")
    reasons[found[-1]].append("the largest value")
    rare = sorted((masks_with.get(v, 0), v) for v in found
                  if num_masks >= 2 and masks_with.get(v, 0) * 2 <= num_masks)
    for count, v in rare[:3]:
        reasons[v].append(f"in only {count} of {num_masks} masks")
    void = 255 if 255 in reasons else found[-1]
    suggestion = {**suggest_classes([v for v in pixels if v != void], ignore_index),
                  "void_values": (void,)}
    text = ", ".join(f"{v} ({'; '.join(why)})" for v, why in reasons.items() if why)
    return text, suggestion


def suggestion_flags(suggestion: dict[str, Any], style: str) -> str:
    """`suggest_classes`' (or `void_proposal`'s) keys as `python -m flaxseg.data check`
    flags (`style='check'`) or as `python -m flaxseg.train` config overrides
    (`style='train'`)."""
    value_map, void = suggestion["value_map"], suggestion.get("void_values")
    if style == "check":
        out = f"--num-classes {suggestion['num_classes']}"
        if value_map:
            out += " --value-map " + ",".join(f"{k}:{v}" for k, v in value_map.items())
        if void:
            out += " --void-values " + ",".join(str(v) for v in void)
        return out
    out = f"--config.dataset.num_classes={suggestion['num_classes']}"
    if value_map:
        out += f" --config.dataset.value_map='{value_map}'"
    if void:
        out += f" --config.dataset.void_values='{tuple(void)}'"
    return out
