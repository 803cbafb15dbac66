"""The public API in one place: what users may import, and where moved names went.

`PUBLIC` names, per module, what flaxseg promises to keep importable; tests/test_api.py
imports every one of them, and checks that a package's `__all__` says the same, so a
rename or a move cannot happen unnoticed. A name that moves is listed in `MOVED` for a
release: the old module's `__getattr__` (`moved_attribute`) still returns it, with a
DeprecationWarning naming its new home.

Imports nothing of flaxseg: the modules read these tables lazily.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

PUBLIC: dict[str, tuple[str, ...]] = {
    "flaxseg.models": (
        "DeepLabV3", "DeepLabV3Plus", "EncoderDecoder", "FCN", "FCNResNet", "Geometry",
        "LRASPP", "ModelSpec", "UNet", "WeightsError",
        "available_models", "create_model", "forward_flops", "from_torchvision",
        "linen_variables", "load_variables", "logits_of", "model_geometry", "model_spec",
        "param_count", "register_model", "split_outputs", "to_nnx", "unet_output_size",
        "unet_valid_input_sizes",
    ),
    "flaxseg.models.backbones": (
        "AlexNet", "BACKBONES", "Coords", "MobileNetV3", "ResNet", "VGG16", "backbone_at_stride",
        "create_backbone", "last_per_stride",
    ),
    "flaxseg.train": (
        "DataParallel", "NonFiniteGuard", "NonFiniteLossError", "TrainMetrics", "TrainState",
        "abstract_train_state", "create_learning_rate_schedule", "create_optimizer",
        "create_train_state", "eval_step_fn", "make_eval_step", "make_train_step",
        "train_and_evaluate", "train_step_fn",
    ),
    "flaxseg.data": (
        "Source", "SourceInfo", "augment_config", "available_datasets", "create_source",
        "dataset_config", "pipeline", "resolve_dataset_config", "transforms",
    ),
    "flaxseg.losses": ("LOSS_NAMES", "cross_entropy", "dice_loss", "focal_loss", "get_loss_fn"),
    "flaxseg.metrics": (
        "MetricSums", "boundary_band", "confusion_matrix", "format_scores_table", "isbi_errors",
        "segmentation_scores", "sum_batches", "trimap_confusions", "trimap_scores",
    ),
    "flaxseg.optim": ("create_learning_rate_schedule", "create_optimizer"),
    "flaxseg.inference": ("MODES", "TILED_MODES", "default_mode", "parse_scales", "predict",
                          "predict_labels", "predict_logits", "streams"),
    "flaxseg.streaming": ("Bands", "Progress", "make_bands", "stream", "stream_tta"),
    "flaxseg.export": ("export_bands", "export_procedure", "write"),
    "flaxseg.exported": ("Artifact", "fit_to_images", "load", "segment_files"),
    "flaxseg.normalization": ("CAFFE", "IMAGENET", "IMAGENET_MEAN", "IMAGENET_STD",
                              "Normalization", "UNIT"),
    "flaxseg.visualize": ("colorize", "default_palette", "overlay", "prediction_grid",
                          "save_png"),
    "flaxseg.run_config": ("base_config", "loss_config", "optimizer_config"),
    "flaxseg.configs": ("available_configs", "get_config"),
}

# (old module, name) -> the module that holds it now. Keep an entry for one release.
MOVED: dict[tuple[str, str], str] = {
    ("flaxseg.configs", "base_config"): "flaxseg.run_config",
    ("flaxseg.configs", "optimizer_config"): "flaxseg.run_config",
    ("flaxseg.configs", "loss_config"): "flaxseg.run_config",
    ("flaxseg.configs", "validate_config"): "flaxseg.train.config",
    ("flaxseg.configs", "build_model"): "flaxseg.train.config",
}


def moved_attribute(module: str, name: str) -> Any:
    """`module.name` from its new home, with a DeprecationWarning; AttributeError if the
    name never lived in `module` (a module's `__getattr__` calls this)."""
    new_home = MOVED.get((module, name))
    if new_home is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} moved to {new_home}.{name}; import it from there "
        f"(the old name goes away in the next release).", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new_home), name)


def load_lazily(namespace: dict[str, Any], name: str, homes: dict[str, str]) -> Any:
    """A package's `__getattr__` for names that load on first use: `name` from the module
    `homes[name]` (the module itself when it is the submodule `<package>.<name>`), kept in
    the package's `namespace` (its `globals()`) so it loads once; AttributeError for a name
    not in `homes`."""
    package = namespace["__name__"]
    if name not in homes:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = importlib.import_module(homes[name])
    value = module if homes[name] == f"{package}.{name}" else getattr(module, name)
    namespace[name] = value
    return value
