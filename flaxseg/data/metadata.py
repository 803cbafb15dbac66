"""A dataset's `dataset.json` read as data: every label key checked for type and range.

The file comes with a dataset, possibly from someone else, so nothing in it is trusted to
be sane: a count of a billion classes would make the label table, the class-balance
arrays and the confusion matrix take gigabytes before anything is said. `validate`
raises one `ValueError` naming the file and the key, before any of that is allocated.
"""

from __future__ import annotations

from typing import Any

from flaxseg.data.base import MAX_CLASSES, MAX_MASK_VALUE


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no count


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_range(value: Any, low: int, high: int) -> bool:
    return _is_int(value) and low <= value <= high


def _colour(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(
        _in_range(v, 0, 255) for v in value)


def _problem(meta: dict[str, Any]) -> tuple[str, str] | None:
    """(key, what it must be) for the first label key that is wrong, else None."""
    checks = {
        "num_classes": (lambda v: _in_range(v, 1, MAX_CLASSES),
                        f"an integer from 1 to {MAX_CLASSES} (the most classes flaxseg trains)"),
        "class_names": (lambda v: isinstance(v, list) and 0 < len(v) <= MAX_CLASSES
                        and all(isinstance(n, str) for n in v),
                        f"a list of 1 to {MAX_CLASSES} strings, one per class"),
        "palette": (lambda v: isinstance(v, list) and 0 < len(v) <= MAX_CLASSES
                    and all(_colour(c) for c in v),
                    "a list of [R, G, B] triples of integers 0..255, one per class"),
        "value_map": (lambda v: isinstance(v, dict) and all(
                          k.strip().isdigit() and int(k) <= MAX_MASK_VALUE
                          and _in_range(c, 0, MAX_MASK_VALUE) for k, c in v.items()),
                      f"an object {{\"raw mask value\": class index}} of integers 0.."
                      f"{MAX_MASK_VALUE}"),
        "void_values": (lambda v: isinstance(v, list) and all(
                            _in_range(x, 0, MAX_MASK_VALUE) or _colour(x) for x in v),
                        f"a list of mask values (integers 0..{MAX_MASK_VALUE}) or [R, G, B] "
                        "triples"),
        "reduce_zero_label": (lambda v: isinstance(v, bool), "true or false"),
    }
    for key, (ok, want) in checks.items():
        if key in meta and meta[key] is not None and not ok(meta[key]):
            return key, want
    return None


def validate(meta: dict[str, Any], path: str) -> None:
    """Raises ValueError, naming `path` and the key, for a label key of a flaxseg
    `dataset.json` with the wrong type or an absurd value, or for class lists whose
    lengths disagree with `num_classes` or each other."""
    problem = _problem(meta)
    if problem is not None:
        key, want = problem
        raise ValueError(f"{path}: {key!r} must be {want}; got {_shown(meta[key])}. Fix the "
                         "file (it is read as data, never run).")
    counts = {key: len(meta[key]) for key in ("class_names", "palette") if meta.get(key)}
    if meta.get("num_classes") is not None:
        counts = {"num_classes": meta["num_classes"], **counts}
    if len(set(counts.values())) > 1:
        stated = ", ".join(f"{key} {n}" for key, n in counts.items())
        raise ValueError(f"{path}: the class counts disagree ({stated}); give one name and "
                         "one colour per class.")
