"""U-Net on Oxford-IIIT Pet (tfds `oxford_iiit_pet`), the TensorFlow segmentation
tutorial's setting: 128x128 images, 3 classes (pet, background, border), Adam 1e-3,
batch 64, about 20 epochs of the 3,680 training images.

The dataset must be prepared beforehand (no download at train time); see
`python -m flaxseg.data check oxford_iiit_pet` for how.
"""

import ml_collections

from flaxseg.data.config import augment_config, dataset_config
from flaxseg.run_config import base_config, optimizer_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = ml_collections.ConfigDict(
        dict(name="unet", features=32, depth=4, norm="batch", dropout_rate=0.3)
    )
    config.dataset = dataset_config("oxford_iiit_pet", image_size=(128, 128))
    config.augment = augment_config(scale_range=(1.0, 1.0), hflip=True, eval_resize="resize")
    config.optimizer = optimizer_config(name="adam", learning_rate=1e-3)
    config.batch_size = 64
    config.num_train_steps = 1150  # 20 epochs of 3,680 images
    config.eval_every_steps = 230
    config.checkpoint_every_steps = 230
    config.log_every_steps = 25
    return config
