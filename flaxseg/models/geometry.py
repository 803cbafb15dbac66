"""How a model's output relates to its input: part of the model contract.

Every model may define `geometry(self) -> Geometry`; `model_geometry(model)` reads it
(a model without one: any input size, output of the input's size). The config check,
`python -m flaxseg.models` and the tests read it instead of guessing from field names.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import flax.linen as nn
import jax


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A model's input/output sizes.

    stride: the total downsampling; an input padded to a multiple of it sees the same
      pooling grid everywhere (what tiled and padded inference align to).
    min_size: the smallest input H and W.
    output_size: `size -> output size` along H or W, raising ValueError (naming valid
      sizes) for a size the model cannot take; None: the output has the input's size.
    """

    stride: int = 1
    min_size: int = 1
    output_size: Callable[[int], int] | None = None

    def output_shape(self, height: int, width: int, model: str = "the model"
                     ) -> tuple[int, int]:
        """`(H', W')` of the logits for an input of `height x width`; ValueError if the
        model cannot take that size."""
        # Symbolic sizes (jax.export) are not compared: the exported size rule covers them.
        concrete = not any(map(jax.export.is_symbolic_dim, (height, width)))
        if concrete and min(height, width) < self.min_size:
            raise ValueError(
                f"{model} needs inputs of at least {self.min_size}x{self.min_size}; got "
                f"{height}x{width}. Pad or resize the images.")
        if self.output_size is None:
            return height, width
        return self.output_size(height), self.output_size(width)

    def accepts(self, size: int) -> bool:
        """Whether a `size x size` input is one the model takes."""
        try:
            self.output_shape(size, size)
        except ValueError:
            return False
        return True

    def smallest_input(self, at_least: int) -> int:
        """The smallest input size >= `at_least` the model takes (the VALID U-Net's
        sizes repeat every `2**depth` pixels, so the search ends)."""
        return next(s for s in itertools.count(max(at_least, self.min_size)) if self.accepts(s))


def model_geometry(model: nn.Module) -> Geometry:
    """`model.geometry()`, or the contract's default (any size, same-size output)."""
    geometry = getattr(model, "geometry", None)
    return geometry() if callable(geometry) else Geometry()
