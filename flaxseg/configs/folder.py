"""A U-Net on a dataset folder in any layout flaxseg reads (`flaxseg.data.layouts`):
VOC, the augmented VOC set, SBD, Cityscapes, ADE20K, CamVid, MMSegmentation-style,
nnU-Net 2D, or images/ + masks/. The layout is detected; the classes come from
`dataset.json`, the layout (datasets with fixed classes) or `--config.dataset.*`:

    python -m flaxseg.data check /data/CamVid                 # what will be read
    python -m flaxseg.train --config=flaxseg/configs/folder.py --workdir=runs/camvid \
        --config.dataset.path=/data/CamVid --config.dataset.image_size=352,480

A same-padded U-Net (width 32, depth 4, BatchNorm), Adam 1e-3 (warmup, cosine decay),
batch 8, the default augmentation (scale 0.5-2, crop, flip, colour jitter).
`--config.loss.class_weights=median_frequency` weights thin classes up (SegNet's
recipe for street scenes).
"""

import ml_collections

from flaxseg.data.config import augment_config, dataset_config
from flaxseg.run_config import base_config, optimizer_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = ml_collections.ConfigDict(
        dict(name="unet", features=32, depth=4, norm="batch", dropout_rate=0.0)
    )
    config.dataset = dataset_config("folder", image_size=(256, 256))
    config.augment = augment_config()
    config.optimizer = optimizer_config(
        name="adam", learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=100,
        end_learning_rate=1e-5,
    )
    config.update(batch_size=8, num_train_steps=5000, eval_every_steps=500,
                  checkpoint_every_steps=500, log_every_steps=50)
    return config
