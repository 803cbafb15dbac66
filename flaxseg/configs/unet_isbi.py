"""The U-Net paper's setting on the ISBI 2012 membranes (Ronneberger et al. 2015).

The VALID (unpadded) U-Net, 64 base features, depth 4, one input channel, two classes
(membrane, interior); SGD with momentum 0.99 and batch 1 of large tiles, as the paper
trains; the paper's elastic deformations (3x3 control points, 10 px standard deviation,
bicubic displacement field; `--config.augment.elastic=False` turns them off), then
flips, 90-degree rotations, scaling and a little brightness/contrast jitter. The data
path comes from --config.dataset.path or $FLAXSEG_ISBI_DIR:

    python -m flaxseg.train --config=flaxseg/configs/unet_isbi.py --workdir=runs/isbi \
        --config.dataset.path=/path/to/isbi2012_membrane

The VALID net maps a 572 px tile to 388 px logits; the labels are centre-cropped to match.
"""

import ml_collections

from flaxseg.data.config import augment_config, dataset_config
from flaxseg.run_config import base_config, optimizer_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = ml_collections.ConfigDict(
        dict(name="unet_valid", features=64, depth=4, norm=None, dropout_rate=0.3)
    )
    config.dataset = dataset_config("isbi2012", image_size=(572, 572))
    config.augment = augment_config(
        scale_range=(0.8, 1.25), hflip=True, vflip=True, rot90=True,
        brightness=0.1, contrast=0.1, saturation=0.0, elastic=True,
    )
    config.optimizer = optimizer_config(name="sgd", learning_rate=1e-2, momentum=0.99)
    config.batch_size = 1
    config.parallel = "jit"
    config.num_train_steps = 10000
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 50
    config.num_grid_images = 2
    return config
