"""The encoder-decoder baseline: the U-Net's stages without skip connections.

The same contracting and expanding paths as `UNet` (same fields, same layer names,
same SAME/VALID behaviour), but each expanding stage sees only the upsampled
coarser map. Comparing it with `UNet` at equal width and depth measures what the
skips buy.
"""

from __future__ import annotations

from typing import ClassVar

from flaxseg.models.registry import register_model
from flaxseg.models.unet import UNet


class EncoderDecoder(UNet):
    """`UNet` without the skips: `[B, H, W, C]` -> float32 logits `[B, H', W', num_classes]`."""

    skip_connections: ClassVar[bool] = False


register_model("encoder_decoder", EncoderDecoder, paper="U-Net without skips (baseline)",
               tiny={"features": 4, "depth": 2})
