"""DeepLabV3+ on the default data: the default run with `deeplabv3plus` instead of `unet`,
so `summary.json` of the two runs compares the encoder-decoder baseline with the U-Net.

The paper's network (ResNet-50 at output stride 16, ASPP at rates 6, 12, 18, the 48-
channel stride-4 decoder) at a CPU-sized width: ResNet-50's block counts at a quarter of
its width (`base_width=16`) and 64-channel ASPP and decoder (the paper's: 64, 256, 256).
Drop those four keys for the full network.

Measured on the 2-core CPU VM: 2,534,444 parameters; val mIoU 0.863 after the 300 steps,
0.923 after 1200 (`--config.num_train_steps=1200`, 9 minutes on the idle VM), 0.931
with the paper's widths (`aspp_features=256, low_level_features=48,
decoder_features=256`); the default U-Net reaches 0.971 in 300 steps. On 128x128 scenes
(`--config.dataset.image_size=128,128`, 1200 steps, 20 minutes) it reaches 0.967, the
U-Net 0.986 in 300 steps. The stride-4 logits do not cap these numbers: free 16x16 logits
fitted to each 64x64 val mask, resized bilinearly as the decoder's are, score 0.992
(`python -m benchmarks.output_stride`). The gap is how fast a deep network from scratch
learns sharp boundaries, not its output grid. Nor is it the ASPP's rates, though at 64 px
the stride-16 map is 4x4 and rates 6-18 reach past it (the paper's "degenerate" filters):
rates (1, 2, 3) give 0.868 after 300 steps, output stride 8 with rates (2, 4, 6) 0.875
(`--config.model.atrous_rates='(1, 2, 3)'`; None: the paper's for the stride).
"""

import ml_collections
from ml_collections import config_dict

from flaxseg.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = ml_collections.ConfigDict(
        dict(name="deeplabv3plus", backbone="resnet50", output_stride=16,
             atrous_rates=config_dict.placeholder(tuple),
             base_width=16, aspp_features=64, low_level_features=12, decoder_features=64)
    )
    return config
