"""FCN-32s on PASCAL VOC, with the FCN paper's hyperparameters (Long et al. 2015, 4.3):
SGD, momentum 0.9, weight decay 5e-4 (not on biases), minibatch 20 images, fixed
learning rate 1e-4, 21 classes, void pixels (255) ignored, no augmentation ("we found
no improvement from mirroring and jittering"), dropout 0.5 after fc6 and fc7.

Start from ImageNet VGG-16 weights as the paper does with
`--config.model.backbone_weights=FILE` (torchvision's `vgg16-397923af.pth`, Keras's
`vgg16_weights_tf_dim_ordering_tf_kernels.h5`, or the .npz of `python -m flaxseg.models
convert-vgg16`); the images are then normalised as those weights expect
(`augment.normalize='pretrained'`; ImageNet's mean/std without weights).

The data is PASCAL VOC as the devkit unpacks it (the `voc2012` preset: JPEGImages,
SegmentationClass palette PNGs, 255 = void, ImageSets/Segmentation/{train,val}.txt);
`--config.dataset.layout=voc_aug` (SegmentationClassAug + trainaug.txt) or `sbd`
(benchmark_RELEASE/dataset) trains on the augmented set, as the paper did:

    python -m flaxseg.train --config=flaxseg/configs/fcn32s_voc.py --workdir=runs/fcn32s \
        --config.dataset.path=/data/VOCdevkit

FCN-16s and FCN-8s (fcn16s_voc.py, fcn8s_voc.py) start from this run's checkpoint.
"""

import ml_collections

from flaxseg.data.config import augment_config, dataset_config
from flaxseg.run_config import base_config, optimizer_config


def voc_config(model_name: str, init_from: str = "") -> ml_collections.ConfigDict:
    """The FCN paper's VOC training setup for `model_name` ('fcn32s' | 'fcn16s' | 'fcn8s')."""
    config = base_config()
    config.model = ml_collections.ConfigDict(
        dict(name=model_name, dropout_rate=0.5, backbone_weights=""))
    # 21 classes; VOC images are at most 500x500: padded with void to 512.
    config.dataset = dataset_config("voc2012", image_size=(512, 512))
    config.augment = augment_config(
        scale_range=(1.0, 1.0), hflip=False, brightness=0.0, contrast=0.0, saturation=0.0,
        normalize="pretrained",
    )
    config.optimizer = optimizer_config(
        name="sgd", learning_rate=1e-4, momentum=0.9, weight_decay=5e-4
    )
    config.batch_size = 20
    config.num_train_steps = 10000
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 50
    config.init_from = init_from
    return config


def get_config() -> ml_collections.ConfigDict:
    return voc_config("fcn32s")
