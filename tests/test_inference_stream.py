"""Streamed tiled inference (flaxseg.streaming, inference.predict_labels): the bands'
bookkeeping on a fake band program, then the labels against the in-memory path, bitwise,
on a tiny U-Net (one device and four), progress, and large files (TIFF in and out)."""

import io

import jax
import numpy as np
import pytest
from conftest import random_variables
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from flaxseg import inference, streaming, tiling
from flaxseg.image_files import load_image
from flaxseg.models import create_model


def _bands(height, width, tile=(16, 16), step=(8, 8), tile_batch=4):
    layout = tiling.sliding_layout(height, width, tile, step)
    return streaming.make_bands(layout, tile, tile, tile_batch)


@pytest.mark.parametrize("size, tile_batch", [((61, 45), 4), ((12, 100), 3), ((300, 9), 4)])
def test_every_row_is_written_once_from_its_own_canvas_row(size, tile_batch):
    # A fake band program whose labels are the canvas row index: each output row must come
    # from its canvas row, and the reads stay within one window of input rows.
    height, width = size
    bands = _bands(height, width, tile_batch=tile_batch)
    reads = []

    class Image2D:
        shape = (height, width, 1)

        def __getitem__(self, rows):
            reads.append(rows.stop - rows.start)
            return np.zeros((rows.stop - rows.start, width, 1), np.uint8)

    def run_band(rows, carry, first_pass, num_passes, origin, shift, rows_count, rows_last):
        assert rows.shape[1] == bands.window_in
        assert 0 <= shift <= bands.window_out and num_passes == bands.passes_per_band
        canvas_rows = origin + np.arange(bands.window_out)
        labels = np.broadcast_to(canvas_rows[:, None] % 251, (bands.window_out,
                                                               bands.layout.canvas[1]))
        return labels[None].astype(np.uint8), carry

    out = np.full((height, width), 255, np.uint8)
    progress = []
    streaming.stream(run_band, bands, Image2D(), None, out, lambda x: x,
                     lambda done, total: progress.append((done, total)))
    top = bands.layout.crop[0]
    np.testing.assert_array_equal(out, np.broadcast_to(
        ((np.arange(height) + top) % 251)[:, None], (height, width)))
    assert max(reads) <= bands.window_in
    assert progress[-1] == (bands.num_tiles, bands.num_tiles) and len(progress) == bands.num_bands


def test_a_band_holds_a_few_tile_rows_whatever_the_image_height():
    bands = _bands(12000, 12000, tile=(256, 256), step=(128, 128))
    assert bands.window_rows == 2 and bands.window_out == 384
    assert bands.num_tiles == 93 * 93 and bands.num_bands == 95  # 23 passes of 4 tiles


def test_progress_shows_tiles_rate_and_eta_only_for_long_predictions():
    now = [0.0]
    text = io.StringIO()
    progress = streaming.Progress("big.tif", stream=text, after=2.0, every=5.0,
                                  clock=lambda: now[0])
    progress(10, 100)  # 0 s: too early to say anything
    now[0] = 3.0
    progress(30, 100)
    now[0] = 4.0
    progress(40, 100)  # within 5 s of the last line
    now[0] = 10.0
    progress(100, 100)
    lines = text.getvalue().splitlines()
    assert lines == ["  big.tif: tiles 30/100 (30%), 10.0 tiles/s, ETA 0:07",
                     "  big.tif: tiles 100/100 (100%), 10.0 tiles/s, 0:10"]


# -- the real band program against the in-memory path ----------------------------------------


@pytest.fixture(scope="module")
def unet():
    model = create_model("unet", num_classes=4, features=4, depth=2)
    return model, random_variables(model, (1, 16, 16, 3))


@pytest.fixture(scope="module")
def valid_unet():
    model = create_model("unet_valid", num_classes=3, features=4, depth=2, dropout_rate=0.0)
    return model, random_variables(model, (1, 60, 60, 1), seed=1)


def _image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


# One image and options shared by the tests below, so they share compiled programs.
GAUSSIAN = dict(mode="gaussian", tile_size=(16, 24), overlap=0.25, flip=True)


@pytest.mark.parametrize("shape, options", [
    ((61, 45, 3), GAUSSIAN),  # 5 x 3 tiles of 16 x 24 every 12 x 18: 4 passes, 4 bands
    ((10, 45, 3), dict(mode="sliding", tile_size=16, tile_batch=3)),  # shorter than a tile
    # Multi-scale TTA: each scale streams the image resized to it (0.5: 31 x 23, smaller
    # than two tiles; 1.5: 92 x 68), its logits resized back a chunk of rows at a time.
    ((61, 45, 3), {**GAUSSIAN, "scales": (0.5, 1, 1.5)}),
    ((70, 52, 3), dict(mode="sliding", tile_size=16, scales=(1.25, 0.75))),  # no scale 1
])
def test_streamed_labels_are_bitwise_the_in_memory_ones(unet, shape, options):
    model, variables = unet
    image = _image(shape)
    logits = inference.predict_logits(model, variables, inference.normalizer()(image),
                                      **options)
    progress = []
    labels = inference.predict_labels(model, variables, image, **options,
                                      on_progress=lambda *p: progress.append(p))
    assert labels.dtype == np.uint8 and labels.shape == shape[:2]
    np.testing.assert_array_equal(labels, np.argmax(logits, axis=-1))
    done, total = zip(*progress, strict=True)  # one count over every scale's tiles
    assert list(done) == sorted(done) and set(total) == {total[0]} and done[-1] == total[0]


def test_predict_streams_multi_scale_tta_into_its_masks(unet, tmp_path):
    # The files' path (what `python -m flaxseg.predict --scales` runs) streams a tiled mode
    # with multi-scale TTA too; the same image and options as above: compiled once.
    model, variables = unet
    options = {**GAUSSIAN, "scales": (0.5, 1, 1.5)}
    image = _image((61, 45, 3))
    Image.fromarray(image).save(tmp_path / "scene.png")
    [result] = inference.predict(model, variables, tmp_path / "scene.png", tmp_path / "out",
                                 **options)
    logits = inference.predict_logits(model, variables, inference.normalizer()(image),
                                      **options)
    np.testing.assert_array_equal(np.asarray(Image.open(result.mask_path)),
                                  np.argmax(logits, axis=-1))


def test_streamed_overlap_tile_is_bitwise_the_in_memory_one(valid_unet):
    model, variables = valid_unet
    image = _image((101, 77, 1))
    for options in (dict(mode="overlap_tile", tile_size=60, flip=True),
                    dict(mode="overlap_tile", tile_size=60, scales=(0.8, 1))):
        logits = inference.predict_logits(model, variables, image / np.float32(255),
                                          **options)
        np.testing.assert_array_equal(
            inference.predict_labels(model, variables, image, **options),
            np.argmax(logits, axis=-1))


def test_rows_are_buffered_only_until_read():
    # A stream of (top, rows) in bands of 3, read in chunks of 4 that overlap by 1 (the
    # taps of a resize): every chunk is right, and the buffer never holds a row below the
    # last chunk's start.
    rows = np.arange(20)[:, None]
    buffer = streaming.RowBuffer((top, rows[top : top + 3]) for top in range(0, 20, 3))
    for start in range(0, 19, 3):
        np.testing.assert_array_equal(buffer.take(start, min(start + 4, 20)),
                                      rows[start : start + 4])
        assert buffer.top == start


def test_tiles_spread_over_four_devices_stitch_exactly(unet, num_devices):
    # Each pass of 4 tiles is split 1 per device; a tile's logits may differ from one
    # device's in the last bits (XLA's reduction order), the stitching itself is exact: the
    # labels agree wherever the top two classes are not a near-tie.
    model, variables = unet
    mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    over_data = NamedSharding(mesh, PartitionSpec("data"))
    image = _image((61, 45, 3))
    labels = inference.predict_labels(
        model, jax.device_put(variables, NamedSharding(mesh, PartitionSpec())), image,
        tile_sharding=over_data, **GAUSSIAN)
    logits = inference.predict_logits(model, variables, inference.normalizer()(image),
                                      **GAUSSIAN)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(labels[clear], np.argmax(logits, axis=-1)[clear])
    with pytest.raises(ValueError, match=r"tile_batch=6 cannot be split over 4 devices; use "
                                         r"a multiple of 4 \(e.g. 8\)"):
        inference.predict_labels(model, variables, image, **{**GAUSSIAN, "tile_batch": 6},
                                 tile_sharding=over_data)


def test_whole_image_modes_are_not_streamed(unet):
    model, variables = unet
    with pytest.raises(ValueError, match="predict_labels streams the tiled modes"):
        inference.predict_labels(model, variables, _image((16, 16, 3)), mode="pad",
                                 tile_size=16)
    assert inference.streams("gaussian") and not inference.streams("pad")
    with pytest.warns(DeprecationWarning, match=r"call streams\(mode\)"):
        assert inference.streams("gaussian", (0.5, 1))  # multi-scale TTA streams too
    assert inference.default_mode(model, tiled=True) == "gaussian"


# -- files: a 4-band TIFF in, a tiled TIFF out past Pillow's limit -----------------------------


def test_a_four_band_tiff_streams_from_a_memory_map_to_a_tiled_tiff(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    model = create_model("unet", num_classes=3, features=4, depth=2)
    variables = random_variables(model, (1, 16, 16, 4))
    image = _image((40, 52, 4), seed=3)
    tifffile.imwrite(tmp_path / "scene.tif", image)  # uncompressed: memory-mappable
    loaded = load_image(str(tmp_path / "scene.tif"))
    assert isinstance(loaded, np.memmap) and loaded.shape == (40, 52, 4)
    options = dict(mode="gaussian", tile_size=16)
    expected = inference.predict_labels(model, variables, image, **options)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 52 is then "past PNG's size"
    [result] = inference.predict(model, variables, tmp_path / "scene.tif", tmp_path / "out",
                                 num_channels=4, **options)
    assert result.ok and result.mask_path.endswith("masks/scene.tif")
    with tifffile.TiffFile(result.mask_path) as tif:
        assert tif.pages[0].is_tiled
        np.testing.assert_array_equal(tif.asarray(), expected)
    assert tifffile.imread(result.overlay_path).shape == (40, 52, 3)

    tifffile.imwrite(tmp_path / "deep.tif", image.astype(np.uint16))
    [result] = inference.predict(model, variables, tmp_path / "deep.tif", tmp_path / "out",
                                 **options)
    assert "it is a uint16 TIFF; flaxseg takes 8-bit images" in result.error


# -- the exported artifact streams the same bands ---------------------------------------------


@pytest.mark.parametrize("options", [GAUSSIAN, {**GAUSSIAN, "scales": (0.5, 1, 1.5)}])
def test_the_artifacts_band_program_streams_the_same_labels(unet, tmp_path, options):
    # One scale: uint8 rows in, labels out. Multi-scale TTA: the same program takes the
    # rows normalised and resized on the host and returns logits, for every scale.
    from flaxseg import export, exported
    from flaxseg.normalization import UNIT

    model, variables = unet
    plan = inference.make_plan(model, variables, 3, **options)
    whole, rule = export.export_procedure(model, variables, plan, normalization=UNIT,
                                          channels=3)
    bands = export.export_bands(model, variables, plan, normalization=UNIT, channels=3)
    # Any window, any width.
    assert str(bands.in_avals[0]) == ("uint8[1,12*n + 4,w,3]" if plan.scales == (1,)
                                      else "float32[1,12*n + 4,w,3]")
    path = tmp_path / "model.jax"
    data, band_data = whole.serialize(), bands.serialize()
    info = export.sidecar(whole, data, plan=plan, rule=rule, normalization=UNIT,
                          outputs="labels", class_names=[f"c{i}" for i in range(4)],
                          palette=None)
    info["bands"] = export.bands_entry(path, band_data, plan)
    export.write(path, data, info, band_data)
    artifact = exported.load(path)
    image = _image((61, 45, 3))
    np.testing.assert_array_equal(artifact.segment(image),
                                  inference.predict_labels(model, variables, image, **options))
    (tmp_path / "model.jax.bands").write_bytes(band_data[:-10])
    with pytest.raises(ValueError, match=r"model.jax.bands is truncated or overwritten"):
        exported.load(path)
