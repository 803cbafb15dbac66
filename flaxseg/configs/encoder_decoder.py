"""The no-skip baseline on the default data: the default run with `encoder_decoder`
instead of `unet`, so `summary.json` of the two runs shows what the skips buy."""

import ml_collections

from flaxseg.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = ml_collections.ConfigDict(
        dict(name="encoder_decoder", features=8, depth=3, norm="batch", dropout_rate=0.0)
    )
    return config
