"""FCN-16s on PASCAL VOC, initialised from a trained FCN-32s (the FCN paper's staged
training): every parameter the two nets share is copied, the new score_pool4 layer
starts at zero, so training starts exactly where FCN-32s ended.

    python -m flaxseg.train --config=flaxseg/configs/fcn16s_voc.py --workdir=runs/fcn16s \
        --config.dataset.path=/data/voc2011 --config.init_from=runs/fcn32s
"""

import ml_collections

from flaxseg.configs.fcn32s_voc import voc_config


def get_config() -> ml_collections.ConfigDict:
    return voc_config("fcn16s", init_from="runs/fcn32s")
