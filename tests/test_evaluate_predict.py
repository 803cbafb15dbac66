import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import file_mtimes
from PIL import Image

from flaxseg import evaluate, inference, metrics, visualize
from flaxseg.data.base import SourceInfo
from flaxseg.models import Geometry


class ConvNet(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(self.num_classes, (3, 3))(nn.relu(nn.Conv(4, (3, 3))(x)))


class CentreNet(nn.Module):
    """Predicts the centre of its input (two VALID 3x3 convolutions), like the VALID U-Net."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
        return nn.Conv(self.num_classes, (3, 3), padding="VALID")(x)


class ListSource:
    """A data source over in-memory examples, with the `flaxseg.data` interface."""

    def __init__(self, examples, num_classes=3):
        self.examples = examples
        self.info = SourceInfo(
            num_classes=num_classes,
            class_names=tuple(f"c{i}" for i in range(num_classes)),
            num_channels=examples[0]["image"].shape[-1],
        )

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def _examples(sizes, seed=0, num_classes=3):
    rng = np.random.default_rng(seed)
    out = []
    for height, width in sizes:
        label = rng.integers(0, num_classes, (height, width)).astype(np.uint8)
        label[0, :3] = 255  # some void pixels
        image = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
        out.append({"image": image, "label": label})
    return out


def _oracle_scores(model, variables, examples, crop=0):
    """Pixel accuracy and mean IoU from NumPy, one image at a time."""
    truth, predicted = [], []
    for example in examples:
        image = example["image"][None].astype(np.float32) / 255.0
        pred = np.asarray(model.apply(variables, jnp.asarray(image))).argmax(-1)[0]
        label = example["label"].astype(np.int64)
        if crop:
            label = label[crop:-crop, crop:-crop]
        keep = label != 255
        truth.append(label[keep])
        predicted.append(pred[keep])
    truth, predicted = np.concatenate(truth), np.concatenate(predicted)
    ious = []
    for c in range(3):
        union = np.sum((truth == c) | (predicted == c))
        if union:
            ious.append(np.sum((truth == c) & (predicted == c)) / union)
    return np.mean(truth == predicted), np.mean(ious), truth.size


@pytest.mark.parametrize("model, crop", [(ConvNet(), 0), (CentreNet(), 2)])
def test_evaluate_matches_a_numpy_oracle_over_mixed_sizes(model, crop):
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    examples = _examples([(8, 8), (8, 8), (8, 8), (10, 6), (8, 8)])
    progress = []
    scores = evaluate.evaluate(
        model,
        variables,
        ListSource(examples),
        batch_size=2,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    pixel_accuracy, mean_iou, num_pixels = _oracle_scores(model, variables, examples, crop)
    assert scores["num_images"] == 5 and scores["num_pixels"] == num_pixels
    assert scores["pixel_accuracy"] == pytest.approx(pixel_accuracy, abs=1e-12)
    assert scores["mean_iou"] == pytest.approx(mean_iou, abs=1e-12)
    # Batches: two 8x8, one 8x8 (a new size follows), the 10x6, the last 8x8.
    assert progress == [(2, 5), (3, 5), (4, 5), (5, 5)]
    limited = evaluate.evaluate(model, variables, ListSource(examples), limit=2)
    assert limited["num_images"] == 2


def test_evaluate_adds_the_isbi_errors_for_membrane_maps():
    model = ConvNet(num_classes=2)
    variables = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
    examples = _examples([(8, 8), (8, 8), (8, 8)], num_classes=2)
    source = ListSource(examples, num_classes=2)
    scores = evaluate.evaluate(model, variables, source, batch_size=2, membrane_class=0)
    confusion, counts = np.zeros((2, 2), np.int64), np.zeros(4, np.int64)
    for example in examples:  # one image at a time
        image = jnp.asarray(example["image"][None] / 255.0, jnp.float32)
        pred = np.asarray(model.apply(variables, image)).argmax(-1)[0]
        label = example["label"].astype(np.int32)
        confusion += np.asarray(metrics.confusion_matrix(label, pred.astype(np.int32), 2))
        counts += metrics.rand_pair_counts(label, pred, membrane_class=0)
    want = metrics.isbi_errors(confusion, counts, membrane_class=0)
    assert scores["pixel_error"] == pytest.approx(want["pixel_error"], rel=1e-12)
    assert scores["rand_error"] == pytest.approx(want["rand_error"], rel=1e-12)
    assert "rand_error" not in evaluate.evaluate(model, variables, source)
    with pytest.raises(ValueError, match="membrane_class"):
        evaluate.evaluate(model, variables, source, membrane_class=2)


def test_the_membrane_class_comes_from_the_dataset_config():
    import ml_collections

    from flaxseg.data import dataset_config

    assert evaluate.membrane_class_of(dataset_config("isbi2012")) == 0
    assert evaluate.membrane_class_of(dataset_config("synthetic")) is None
    assert evaluate.membrane_class_of(dataset_config("folder", membrane_class=1)) == 1
    # A run saved before the key existed: its preset's value; an unknown tfds name: none.
    saved = dataset_config("isbi2012").to_dict()
    del saved["membrane_class"]
    assert evaluate.membrane_class_of(ml_collections.ConfigDict(saved)) == 0
    assert evaluate.membrane_class_of(ml_collections.ConfigDict({"name": "my_tfds"})) is None


def test_evaluate_rejects_a_model_of_another_class_count():
    model = ConvNet(num_classes=2)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="predicts 2 classes but the dataset has 3"):
        evaluate.evaluate(model, variables, ListSource(_examples([(8, 8)])))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate.evaluate(model, variables, ListSource(_examples([(8, 8)])), limit=0)


def test_default_mode_follows_the_architecture():
    class Same(nn.Module):
        depth: int = 3

        @nn.nowrap
        def geometry(self):
            return Geometry(stride=2**self.depth)

    class Valid(nn.Module):
        depth: int = 3
        padding: str = "SAME"  # field names say nothing: the declared geometry decides

        @nn.nowrap
        def geometry(self):
            return Geometry(stride=8, output_size=lambda size: size - 4)

    assert inference.default_mode(Same()) == "pad"
    assert inference.default_mode(Valid()) == "overlap_tile"
    assert inference.default_mode(ConvNet()) == "whole"


# -- the command lines, end to end on a tiny trained run -----------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from flaxseg.configs import get_config
    from flaxseg.train.loop import train_and_evaluate

    config = get_config("test")  # 32 px synthetic scenes, U-Net of width 4, depth 1
    config.parallel = "jit"
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    workdir = tmp_path_factory.mktemp("run")
    summary = train_and_evaluate(config, str(workdir))
    return str(workdir), summary


def _cli(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_evaluate_cli_reproduces_the_loops_final_evaluation(trained_run, tmp_path):
    workdir, summary = trained_run
    scores_path = tmp_path / "scores.json"
    result = _cli("flaxseg.evaluate", f"--workdir={workdir}", "--mode=whole",
                  f"--output_json={scores_path}")
    assert result.returncode == 0, result.stderr
    assert "pixel acc  mean acc  mean IU  f.w. IU" in result.stdout
    assert "input_size=config; the training loop's evaluation)" in result.stdout
    assert "Given directory is read only" not in result.stderr  # orbax's notice, dropped
    scores = json.loads(scores_path.read_text())
    assert scores["mode"] == "whole" and scores["input_size"] == "config"
    # The same checkpoint, split and eval transform as the loop's last evaluation.
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert scores[key] == pytest.approx(summary[key], abs=1e-9), key

    result = _cli("flaxseg.evaluate", f"--workdir={workdir}", "--mode=gaussian",
                  "--tile_size=auto", "--memory_budget_gb=0.001", "--max_tile=32", "--limit=2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"--tile_size=auto chose (\d+)x\1: .* of the 1.0 MiB budget", result.stdout)

    result = _cli("flaxseg.evaluate", f"--workdir={workdir}", "--mode=tiles")
    assert result.returncode != 0 and "tiles" in result.stderr
    result = _cli("flaxseg.evaluate", f"--workdir={tmp_path / 'none'}")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_every_evaluate_option_is_applied_or_refused_and_named(trained_run, tmp_path):
    # --scales in the default mode once went to the loop's evaluation, which ignored them.
    from flaxseg.data import create_source
    from flaxseg.train.checkpoint import load_for_inference

    workdir, _ = trained_run
    before = file_mtimes(workdir)
    scores_path = tmp_path / "scores.json"
    result = _cli("flaxseg.evaluate", f"--workdir={workdir}", "--split=test",
                  "--scales=0.75,1,1.25", f"--output_json={scores_path}", "--trimap=1,2")
    assert result.returncode == 0, result.stderr
    # One default mode for evaluate, predict and export: auto (pad for this U-Net).
    assert "mode=pad (auto: from the model's geometry), flip=False, batch_size=4, " \
           "scales=(0.75, 1.0, 1.25), input_size=native, trimap=(1, 2))" \
           in result.stdout.splitlines()[0]
    assert "trimap: pixels within w px of a label boundary" in result.stdout
    model, variables, config = load_for_inference(workdir)
    source = create_source(config.dataset, "test")
    preprocess = evaluate.eval_preprocess(config, "native")
    scaled, plain = (evaluate.evaluate(model, variables, source, mode="pad", scales=scales,
                                       preprocess=preprocess)["mean_iou"]
                     for scales in ((0.75, 1.0, 1.25), None))
    assert scaled != plain  # the scales change the scores, so the check below means something
    saved = json.loads(scores_path.read_text())
    assert saved["mean_iou"] == pytest.approx(scaled, abs=1e-9)
    # The trimap splits the scored pixels in two, for each width.
    for width in ("1", "2"):
        band, outside = saved["trimap"][width]["band"], saved["trimap"][width]["outside"]
        assert band["num_pixels"] + outside["num_pixels"] == saved["num_pixels"]
        assert 0 < band["num_pixels"] < saved["num_pixels"]
    assert saved["trimap"]["1"]["band"]["num_pixels"] < saved["trimap"]["2"]["band"]["num_pixels"]

    result = _cli("flaxseg.evaluate", f"--workdir={workdir}", "--trimap=0,x")
    assert result.returncode == 2 and result.stderr.strip() == (
        "Error: --trimap takes distinct positive band widths in pixels, e.g. --trimap=1,2,4; "
        "got 0,x")

    result = _cli("flaxseg.evaluate", f"--workdir={workdir}", "--mode=pad", "--tile_size=16")
    assert result.returncode == 2 and result.stderr.strip() == (
        "Error: --tile_size applies to the tiled modes (sliding, gaussian, overlap_tile), not "
        "to mode 'pad'; drop it or pick such a --mode (--mode=auto picks one when "
        "--tile_size is given).")
    assert file_mtimes(workdir) == before  # the run is read, never written


def test_predict_cli_writes_masks_and_names_the_files_it_cannot_take(trained_run, tmp_path):
    workdir, _ = trained_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(inputs / "a.png")
    Image.fromarray(rng.integers(0, 256, (45, 37, 3), dtype=np.uint8)).save(inputs / "b.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(inputs / "grey.png")
    out = tmp_path / "out"
    result = _cli("flaxseg.predict", f"--workdir={workdir}", f"--input={inputs}", f"--output={out}")
    assert result.returncode == 1, result.stderr
    assert "Segmented 2 of 3 images (mode=pad" in result.stdout
    assert "grey.png: it has 1 channel(s) but the model takes 3" in result.stderr
    for name, shape in (("a.png", (32, 32)), ("b.png", (45, 37))):
        mask = np.asarray(Image.open(out / "masks" / name))
        assert mask.shape == shape and mask.dtype == np.uint8 and mask.max() < 4
        assert np.asarray(Image.open(out / "overlays" / name)).shape == (*shape, 3)
    assert not (out / "masks" / "grey.png").exists()

    # --mode=auto: one pass over the largest image (160x160) needs more than the budget, so
    # every image is tiled (gaussian, --tile_size=auto), and the output says why.
    Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(inputs / "c.png")
    (inputs / "grey.png").unlink()
    result = _cli("flaxseg.predict", f"--workdir={workdir}", f"--input={inputs}",
                  f"--output={tmp_path / 'tiled'}", "--memory_budget_gb=0.001", "--max_tile=32")
    assert result.returncode == 0, result.stderr
    assert re.search(r"--mode=auto: one pad pass over the largest image \(160x160\) needs "
                     r"[\d.]+ MiB of the 1.0 MiB budget \(memory_budget_gb=0.001\); it is "
                     r"segmented in tiles instead", result.stdout), result.stdout
    assert re.search(r"--tile_size=auto chose (\d+)x\1", result.stdout), result.stdout
    assert ("mode=gaussian (auto: an image too large for one pass: gaussian tiles, streamed "
            "in bands)") in result.stdout, result.stdout
    for name, shape in (("a.png", (32, 32)), ("b.png", (45, 37)), ("c.png", (160, 160))):
        assert np.asarray(Image.open(tmp_path / "tiled" / "masks" / name)).shape == shape


def test_an_auto_export_tiles_images_too_large_for_one_pass(trained_run, tmp_path):
    # --mode=auto exports this U-Net's pad pass and, beside it, its gaussian tiles (sized
    # by --memory_budget_gb / --max_tile); predict --exported switches to the tiles when one
    # pad pass over the largest input would not fit its own budget, and says so.
    from flaxseg import exported
    from flaxseg.train.checkpoint import load_for_inference

    workdir, _ = trained_run
    out = tmp_path / "model.jax"
    result = _cli("flaxseg.export", f"--workdir={workdir}", f"--out={out}", "--max_tile=24")
    assert result.returncode == 0, result.stderr
    assert re.search(r"model.jax.bands \([\d.]+ MiB, gaussian tiles of 24x24, streamed: "
                     r"predict --exported switches to them for images too large for one pad "
                     r"pass\)", result.stdout), result.stdout
    artifact = exported.load(out)
    assert artifact.has_fallback and not artifact.streams
    assert artifact.info["bands"]["procedure"]["tile"] == [24, 24]
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    images = {"a": rng.integers(0, 256, (45, 37, 3), dtype=np.uint8),
              "b": rng.integers(0, 256, (70, 52, 3), dtype=np.uint8)}
    for name, image in images.items():
        Image.fromarray(image).save(inputs / f"{name}.png")
    result = _cli_without(("flax", "optax", "orbax", "ml_collections", "absl"),
                          "flaxseg.predict", f"--exported={out}", f"--input={inputs}",
                          f"--output={tmp_path / 'out'}", "--memory_budget_gb=0.0001")
    assert result.returncode == 0, result.stderr
    assert re.search(r"predict --exported: one pad pass over the largest image \(70x52\) "
                     r"needs [\d.]+ MiB of the 0.1 MiB budget \(memory_budget_gb=0.0001\); it "
                     r"is segmented in the artifact's gaussian tiles of 24x24, streamed\.",
                     result.stdout), result.stdout
    assert "Segmented 2 of 2 images with" in result.stdout
    assert "(streamed in tiles)" in result.stdout
    # The same labels as the in-process stream of those tiles; at the default budget (half
    # of this host's memory), one pad pass, as in process.
    model, variables, config = load_for_inference(workdir)
    normalize = evaluate.image_normalizer(config)
    for name, image in images.items():
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "out" / "masks" / f"{name}.png")),
            inference.predict_labels(model, variables, image, mode="gaussian",
                                     tile_size=24, preprocess=normalize))
    assert not exported.fit_to_images(artifact, [(70, 52)])
    np.testing.assert_array_equal(
        artifact.segment(images["b"]),
        np.argmax(inference.predict_logits(model, variables, normalize(images["b"]),
                                           mode="pad"), axis=-1))
    # The budget flag on an artifact that has no choice to make (as --mode=pad exports
    # it: no band program) is refused.
    info = json.loads((tmp_path / "model.jax.json").read_text())
    del info["bands"]
    (tmp_path / "pad.jax").write_bytes(out.read_bytes())
    (tmp_path / "pad.jax.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"--memory_budget_gb chooses between one pass and the "
                       r"tiles of an artifact exported with --mode=auto; \S+pad.jax has no "
                       r"tiles. Drop the flag."):
        exported.main([f"--exported={tmp_path / 'pad.jax'}", f"--input={inputs}",
                       f"--output={tmp_path / 'out2'}", "--memory_budget_gb=1"])


def test_auto_tile_needs_a_budget_where_the_device_reports_none():
    from flaxseg.models import create_model

    model = create_model("unet", num_classes=2, features=4, depth=2)
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"--tile_size=auto needs a memory budget.*"
                                         r"set --memory_budget_gb .*or give --tile_size"):
        evaluate.auto_tile_size(model, variables, 3, tile_batch=2, budget_gb=0.0, max_tile=64)


def _cli_without(blocked, module, *args):
    """`python -m module args` with the modules `blocked` made unimportable."""
    code = ("import runpy, sys\n"
            f"for name in {tuple(blocked)!r}:\n    sys.modules[name] = None\n"
            f"sys.argv = [{module!r}, *sys.argv[1:]]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_export_then_predict_with_the_artifact_alone(trained_run, tmp_path):
    # A tile size is never ignored: with --mode=auto it picks the tiled mode (gaussian for
    # this U-Net), whose band program flaxseg.export writes beside the artifact;
    # predict --exported streams PNGs through it where flax, optax, orbax, ml_collections
    # and absl cannot be imported. (Every mode's artifact: tests/test_export.py.)
    from flaxseg.train.checkpoint import load_for_inference

    workdir, _ = trained_run
    out = tmp_path / "model.jax"
    result = _cli("flaxseg.export", f"--workdir={workdir}", f"--out={out}", "--tile_size=16")
    assert result.returncode == 0, result.stderr
    assert "mode gaussian" in result.stdout and "any height and width" in result.stdout
    assert re.search(r"model.jax.bands \([\d.]+ MiB, the band program", result.stdout)
    assert "Given directory is read only" not in result.stderr
    # The synthetic dataset has no palette: the sidecar's colours say they are no dataset's.
    assert "palette: generated (the dataset gives none; these colours are no dataset's)." \
        in result.stdout
    info = json.loads((tmp_path / "model.jax.json").read_text())
    assert info["palette_source"] == "generated"
    assert info["palette"] == visualize.generated_palette(4).tolist()
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 37, 3), dtype=np.uint8)).save(inputs / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 64, 3), dtype=np.uint8)).save(inputs / "b.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(inputs / "grey.png")
    result = _cli_without(("flax", "optax", "orbax", "ml_collections", "absl"),
                          "flaxseg.predict", f"--exported={out}", f"--input={inputs}",
                          f"--output={tmp_path / 'out'}")
    assert result.returncode == 1, result.stderr
    assert "Segmented 2 of 3 images" in result.stdout
    assert "grey.png: it has 1 channel(s) but the model takes 3" in result.stderr
    model, variables, config = load_for_inference(workdir)
    expected = inference.predict(model, variables, [inputs / "a.png", inputs / "b.png"],
                                 tmp_path / "ref", mode="gaussian", tile_size=16,
                                 preprocess=evaluate.image_normalizer(config))
    for ref in expected:
        name = os.path.basename(ref.mask_path)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "masks" / name)),
                                      np.asarray(Image.open(ref.mask_path)))
    result = _cli("flaxseg.predict", f"--exported={tmp_path / 'missing.jax'}",
                  f"--input={inputs}", f"--output={tmp_path / 'out'}")
    assert result.returncode == 2 and "Error: " in result.stderr
