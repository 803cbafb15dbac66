"""benchmarks/: the --quick suite's JSON, MFU arithmetic, peak table, torch equality check,
the output-stride bound."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import child_env, save_tiny_run

from benchmarks import output_stride, peaks, pipeline, throughput
from benchmarks.plot import line_plot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m benchmarks.throughput --quick` in a fresh process (it forces 2 devices),
    with the tests' compile flags and compilation cache (this checks fields, not speed)."""
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--quick", f"--out_dir={out}"],
        cwd=REPO, env=child_env(2), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    return out, records, result.stdout


def test_quick_writes_every_field(quick_run):
    out, records, stdout = quick_run
    # jit: infer at batch 1 and 2, train at 2; mesh train at batch 2 on 1 and 2 devices.
    kinds = sorted((r["parallel"], r["mode"], r["per_device_batch"], r["num_devices"])
                   for r in records)
    assert kinds == [("jit", "infer", 1, 1), ("jit", "infer", 2, 1), ("jit", "train", 2, 1),
                     ("mesh", "train", 2, 1), ("mesh", "train", 2, 2)]
    for r in records:
        assert set(throughput.JSON_FIELDS) <= set(r), set(throughput.JSON_FIELDS) - set(r)
        assert r["platform"] == "cpu" and r["jax_version"] == jax.__version__
        assert r["compile_s"] > 0 and r["timed_steps"] == 5
        assert 0 < r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"]
        assert r["global_batch"] == r["per_device_batch"] * r["num_devices"]
        assert math.isclose(r["images_per_s"], r["global_batch"] / (r["step_ms_median"] / 1e3),
                            rel_tol=1e-9)
        assert math.isclose(r["images_per_s_per_device"] * r["num_devices"], r["images_per_s"],
                            rel_tol=1e-9)
        assert r["flops_per_image"] > 0 and r["num_params"] > 0
        assert math.isclose(r["flops_per_image"] * r["per_device_batch"],
                            r["flops_per_step_per_device"], rel_tol=1e-9)
        assert math.isclose(r["tflops_per_s_per_device"],
                            r["flops_per_step_per_device"] / (r["step_ms_median"] / 1e3) / 1e12,
                            rel_tol=1e-9)
        assert r["peak_source"].startswith("matmul probe") and r["peak_tflops_per_device"] > 0
        assert math.isclose(r["mfu"], r["tflops_per_s_per_device"] / r["peak_tflops_per_device"],
                            rel_tol=1e-9)
        assert r["pipeline_images_per_s"] > 0 and r["compiled_memory_bytes"] > 0
        assert r["remat"] == "none"
        assert (r["saved_activation_bytes"] or 0) > 0 if r["mode"] == "train" else (
            r["saved_activation_bytes"] is None)
    train = {(r["parallel"], r["num_devices"]): r for r in records if r["mode"] == "train"}
    # A training step costs more than a forward pass: backward + optimiser.
    infer2 = next(r for r in records if r["mode"] == "infer" and r["per_device_batch"] == 2)
    assert train["jit", 1]["flops_per_image"] > 2 * infer2["flops_per_image"]
    # On the mesh the cost analysis is per device: the same per-image FLOPs on 1 and 2 devices.
    assert math.isclose(train["mesh", 1]["flops_per_image"], train["mesh", 2]["flops_per_image"],
                        rel_tol=0.05)
    assert train["mesh", 1]["weak_scaling_efficiency"] == pytest.approx(1.0)
    assert train["mesh", 2]["weak_scaling_efficiency"] == pytest.approx(
        train["mesh", 2]["images_per_s"] / (2 * train["mesh", 1]["images_per_s"]))
    assert train["jit", 1]["weak_scaling_efficiency"] is None
    assert (out / "images_per_s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert table.count("\n| cpu | unet | 32 |") == len(records) and table.strip() in stdout


def test_memory_only_reports_each_partition_count_without_running(tmp_path, capsys):
    # In this process (the tests' 4 CPU devices): no step runs, so nothing needs a fresh one.
    # An HxW size (it once reached the model's geometry as the string '32x48').
    assert throughput.main(["--models=unet", "--features=4", "--depth=2", "--image_sizes=32x48",
                            "--batch_sizes=2", "--remat=block", "--spatial_partitions=1,2",
                            "--memory_only", f"--out_dir={tmp_path}"]) == 0
    with open(tmp_path / "results.jsonl") as f:
        records = {(r["remat"], r["spatial_partitions"]): r for r in map(json.loads, f)}
    assert sorted(records) == [("block", 1), ("block", 2)]
    for (remat, split), r in records.items():
        assert r["compiled_memory_bytes"] > 0 and "step_ms_median" not in r
        # Each of the `split` devices keeps its share of the image's activations.
        assert r["saved_activation_bytes"] == records[remat, 1]["saved_activation_bytes"] // split
    assert not (tmp_path / "images_per_s.png").exists()
    table = (tmp_path / "results.md").read_text()
    assert table.count("| cpu | unet | 32x48 | 2 |") == 2
    assert table.strip() in capsys.readouterr().out


def test_mfu_arithmetic():
    # 2e12 FLOPs in 0.5 s = 4 TFLOP/s; against a 10 TFLOP/s peak that is 40 %.
    assert peaks.achieved_tflops(2e12, 0.5) == pytest.approx(4.0)
    assert peaks.mfu(2e12, 0.5, 10.0) == pytest.approx(0.4)
    # H100 bf16: 989.4 TFLOP/s; a step of 98.94 TFLOP in 0.2 s is 50 %.
    peak = peaks.lookup_peak("NVIDIA H100 80GB HBM3", "bfloat16")
    assert peaks.mfu(98.94e12, 0.2, peak.tflops) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="step_seconds"):
        peaks.mfu(1e9, 0.0, 1.0)
    with pytest.raises(ValueError, match="peak_tflops"):
        peaks.mfu(1e9, 1.0, 0.0)
    with pytest.raises(ValueError, match="flops_per_step"):
        peaks.achieved_tflops(-1.0, 1.0)


@pytest.mark.parametrize("kind, dtype, row, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "float32", "H100 PCIe", 378.0),
    ("NVIDIA H200", "bfloat16", "H200", 989.4),
    ("NVIDIA A100-SXM4-40GB", "float32", "A100", 156.0),
    ("Tesla V100-SXM2-16GB", "float32", "V100", 15.7),
    ("TPU v4", "bfloat16", "TPU v4", 275.0),
    ("TPU v5 lite", "bfloat16", "TPU v5e", 197.0),
    ("TPU v5p", "float32", "TPU v5p", 459.0),
    ("TPU v5", "bfloat16", "TPU v5p", 459.0),
    ("TPU v6 lite", "bfloat16", "TPU v6e", 918.0),
])  # fmt: skip
def test_peak_table_lookup(kind, dtype, row, tflops):
    assert peaks.table_entry(kind) == row
    peak = peaks.lookup_peak(kind, dtype)
    assert peak.tflops == tflops and row in peak.source


def test_peak_lookup_unknown_and_bad_dtype():
    assert peaks.lookup_peak("cpu", "float32") is None
    assert peaks.lookup_peak("Some New Accelerator", "bfloat16") is None
    with pytest.raises(ValueError, match="dtype"):
        peaks.lookup_peak("TPU v4", "float16")
    probe = peaks.matmul_probe("float32", size=128, repeats=2)
    assert probe.tflops > 0 and probe.source.startswith("matmul probe")


def test_step_statistics_match_numpy():
    times = [0.3, 0.1, 0.2, 0.5, 0.4, 0.25]
    stats = throughput.step_statistics(times, global_batch=8, num_devices=2)
    assert stats["step_ms_median"] == pytest.approx(1e3 * np.median(times))
    assert stats["step_ms_p10"] == pytest.approx(1e3 * np.percentile(times, 10))
    assert stats["step_ms_p90"] == pytest.approx(1e3 * np.percentile(times, 90))
    assert stats["images_per_s"] == pytest.approx(8 / np.median(times))
    assert stats["images_per_s_per_device"] == pytest.approx(4 / np.median(times))


def test_scaling_counts_and_bad_flags():
    assert throughput.scaling_counts(1) == [1]
    assert throughput.scaling_counts(6) == [1, 2, 4, 6]
    assert throughput.scaling_counts(8) == [1, 2, 4, 8]
    assert throughput.scaling_counts(4, num_processes=2) == [2, 4, 8]
    for argv in (["--batch_sizes=0"], ["--models=resnet"], ["--steps=2"], ["--num_devices=0"]):
        with pytest.raises(SystemExit):
            throughput.parse_args(argv)
    with pytest.raises(ValueError, match="fcn8s"):
        throughput._model_kwargs("fcn8s", throughput.parse_args(["--features=8"]))
    jax.devices()  # the backend is up: forcing a device count now must fail clearly
    with pytest.raises(RuntimeError, match="fresh process"):
        throughput.configure_devices(3)


def test_line_plot_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="series"):
        line_plot({}, str(tmp_path / "x.png"), title="t")


def test_torch_twin_equals_flaxseg():
    pytest.importorskip("torch")
    from benchmarks import compare_torch

    pair = compare_torch.Pair(features=4, in_channels=3, num_classes=3, image_size=32, batch=2)
    batch = compare_torch.make_batch(0, 2, 32, 3, 3)
    gaps = compare_torch.check_equal(pair, batch)
    for layout in compare_torch.LAYOUTS:
        assert gaps[f"{layout}_logits_max_abs"] <= 1e-4
        assert gaps[f"{layout}_grad_max_rel"] <= 1e-2
    assert gaps["nchw_loss_abs"] <= 1e-5 * max(1.0, gaps["loss"])
    # The check must catch a real difference: nudge one transposed-conv weight.
    import torch

    with torch.no_grad():
        pair.torch_model.upconvs[0].weight[0, 0, 0, 1] += 0.5
    with pytest.raises(AssertionError, match="differ"):
        compare_torch.check_equal(pair, batch)


def test_image_sizes_are_square_or_height_by_width():
    args = throughput.parse_args(["--image_sizes=572,512x1024"])
    assert args.image_sizes == [572, "512x1024"]
    assert [throughput.height_width(s) for s in args.image_sizes] == [(572, 572), (512, 1024)]
    for bad in ("0", "512x", "1x2x3", "big"):
        with pytest.raises(SystemExit):
            throughput.parse_args([f"--image_sizes={bad}"])


def test_pipeline_benchmark_measures_the_host_and_the_loop(tmp_path):
    # A tiny generated JPEG folder: the host's rate and CPU time, then the loop with the
    # nearly free model (passed by path) and its data-wait share.
    path = pipeline.write_folder(str(tmp_path / "jpg"), "jpg", (24, 32), 4)
    host = pipeline.host_rate(path, crop=(16, 16), workers=0, batches=2, batch_size=4,
                              cache=True)
    assert host["images"] == 8 and host["cpu_s"] > 0 and host["images_per_cpu_s"] > 0
    loop = pipeline.train_rate(path, crop=(16, 16), workers=0, steps=3, batch_size=4,
                               cache=True, workdir=str(tmp_path / "run"))
    assert 0 <= loop["data_wait_share"] <= 1
    assert loop["step_images_per_sec"] >= loop["images_per_sec"] > 0
    table = pipeline.markdown([{"folder": "JPG 24x32", "crop": "16x16", "workers": 0,
                                **host, **loop}])
    assert table.count("\n") == 2 and "| JPG 24x32 | 16x16 | 0 |" in table


def test_large_images_scene_is_a_memory_mappable_tiff_and_rows_format(tmp_path):
    from benchmarks import large_images
    from flaxseg.image_files import load_image

    large_images.write_scene(str(tmp_path / "scene.tif"), 40, rows=16)
    scene = load_image(str(tmp_path / "scene.tif"))
    assert isinstance(scene, np.memmap) and scene.shape == (40, 40, 3) and scene.std() > 10
    row = {"size": 40, "devices": 4, "runtime": "inprocess", "seconds": 1.5,
           "s_per_mpx": 937.5, "peak_gib": 0.5, "anon_gib": 0.4}
    assert large_images.format_rows([row]).splitlines()[-1] == (
        "| 40x40 | 4 | inprocess | 1.5 | 937.5 | 0.5 GiB | 0.4 GiB |")


def test_the_output_stride_bound_is_exact_at_stride_1_and_fits_above_pooling():
    masks = output_stride.val_masks(32)[:16]
    pooled, fitted = output_stride.fitted_logits(masks, 1, 4, steps=1)
    # At stride 1 the pooled logits are the one-hot masks: every pixel right.
    assert output_stride.scores(pooled, masks, 4)[0] == 1.0
    pooled, fitted = output_stride.fitted_logits(masks, 4, 4, steps=100)
    (p, _), (f, per_class) = (output_stride.scores(z, masks, 4) for z in (pooled, fitted))
    assert pooled.shape == fitted.shape == (16, 8, 8, 4) and len(per_class) == 4
    assert 0.5 < p < f < 1.0, (p, f)


def test_a_runs_errors_by_band_match_its_predictions_counted_by_hand(tmp_path):
    """run_errors (flaxseg.evaluate's trimap) against the run's predictions, the bands and
    the IoUs counted in NumPy."""
    from flaxseg import evaluate, inference
    from flaxseg.data import create_source
    from flaxseg.metrics import boundary_band
    from flaxseg.train.checkpoint import load_for_inference

    save_tiny_run(tmp_path)  # the untrained test model: errors everywhere
    result = output_stride.run_errors(str(tmp_path), widths=(1, 3))
    model, variables, config = load_for_inference(tmp_path)
    preprocess = evaluate.eval_preprocess(config, "native")
    examples = [preprocess(e) for e in create_source(config.dataset, "val")]
    labels = np.stack([e["label"] for e in examples]).astype(np.int64)
    preds = inference.predict_logits(model, variables, np.stack([e["image"] for e in examples]),
                                     mode="pad").argmax(-1)

    def miou(mask):
        ious = [((labels == c) & (preds == c) & mask).sum()
                / ((labels == c) & mask | (preds == c) & mask).sum() for c in range(4)
                if ((labels == c) & mask | (preds == c) & mask).any()]
        return np.mean(ious)

    wrong = preds != labels
    assert result["mean_iou"] == pytest.approx(miou(np.ones_like(wrong)), abs=1e-12)
    assert result["error_rate"] == pytest.approx(wrong.mean(), abs=1e-12)
    for width in (1, 3):
        band = np.asarray(boundary_band(labels.astype(np.int32), width))
        got = result["bands"][width]
        assert got["pixel_share"] == pytest.approx(band.mean(), abs=1e-12)
        assert got["error_share"] == pytest.approx((wrong & band).sum() / wrong.sum(), abs=1e-9)
        assert got["mean_iou"] == pytest.approx(miou(band), abs=1e-12)
        assert got["mean_iou_outside"] == pytest.approx(miou(~band), abs=1e-12)
    assert 0 < result["bands"][1]["pixel_share"] < result["bands"][3]["pixel_share"] < 1
