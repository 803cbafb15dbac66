"""FCN-8s on PASCAL VOC, initialised from a trained FCN-16s (the FCN paper's staged
training; score_pool3 starts at zero).

    python -m flaxseg.train --config=flaxseg/configs/fcn8s_voc.py --workdir=runs/fcn8s \
        --config.dataset.path=/data/voc2011 --config.init_from=runs/fcn16s
"""

import ml_collections

from flaxseg.configs.fcn32s_voc import voc_config


def get_config() -> ml_collections.ConfigDict:
    return voc_config("fcn8s", init_from="runs/fcn16s")
