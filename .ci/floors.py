"""Prints pip constraints that pin flaxseg's runtime dependencies to their lower bounds.

`python .ci/floors.py > floors.txt && pip install -c floors.txt -e .` installs the oldest
versions pyproject.toml allows on this Python (the markers are evaluated here), the way
`uv pip install --resolution lowest-direct` would; pip then resolves the transitive
dependencies as usual. The floors live in pyproject.toml only: this reads them.

A dependency without a lower bound is an error: an untested floor is no floor.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement


def floors(pyproject: Path) -> list[str]:
    """`name==version` for every runtime dependency whose marker holds on this Python."""
    project = tomllib.loads(pyproject.read_text())["project"]
    pins = []
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(lower) != 1:
            raise SystemExit(f"{pyproject}: {line!r} needs exactly one '>=' lower bound.")
        pins.append(f"{requirement.name}=={lower[0]}")
    return pins


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(floors(root / "pyproject.toml")))
