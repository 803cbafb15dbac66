"""Per-device peak FLOP/s, model FLOPs utilisation (MFU), and the CPU matmul probe.

MFU = achieved FLOP/s per device / peak FLOP/s per device. Achieved FLOPs come from
XLA's cost analysis of the compiled step (what the compiler will execute), so MFU
here is "compiler-FLOPs utilisation": it counts the backward pass, the optimiser and
the loss, and leaves out multiply-adds that fall on zero padding.

Peaks are dense (no structured sparsity), per device as JAX sees it (one GPU, one TPU
chip; a v4 / v5p megacore chip is one JAX device), from the vendors' data sheets:

- NVIDIA: bfloat16 = dense BF16 tensor-core peak; float32 = dense TF32 tensor-core
  peak, because XLA:GPU runs float32 matmuls and convolutions on TF32 tensor cores
  at JAX's default precision (V100 has neither TF32 nor BF16: its FP32 peak is used).
- TPU: float32 = the bfloat16 peak, because JAX's default precision runs float32
  matmuls as single bfloat16 MXU passes (`jax.default_matmul_precision('highest')`
  triples the passes and so divides the achievable rate).

On CPU there is no data sheet to trust (clock, cores and vector units vary per VM),
so the peak is measured: the best rate of a jitted square matmul (`matmul_probe`),
reported with `peak_source='matmul probe ...'`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Dense TFLOP/s per device: {name: {dtype: peak}}.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bfloat16": 989.4, "float32": 494.7},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H200": {"bfloat16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "V100": {"bfloat16": 15.7, "float32": 15.7},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6e": {"bfloat16": 918.0, "float32": 918.0},
}

# `jax.Device.device_kind` substrings (lower case) -> table row; first match wins, so
# the more specific pattern comes first ("tpu v5 lite" before "tpu v5").
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("h100 pcie", "H100 PCIe"),
    ("h100", "H100 SXM"),
    ("h200", "H200"),
    ("a100", "A100"),
    ("v100", "V100"),
    ("tpu v4", "TPU v4"),
    ("tpu v5 lite", "TPU v5e"),
    ("tpu v5e", "TPU v5e"),
    ("tpu v5p", "TPU v5p"),
    ("tpu v5", "TPU v5p"),
    ("tpu v6 lite", "TPU v6e"),
    ("tpu v6e", "TPU v6e"),
)

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Peak:
    """A per-device peak and where it came from (a data-sheet row or a measurement)."""

    tflops: float
    source: str


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}.")


def table_entry(device_kind: str) -> str | None:
    """The `PEAK_TFLOPS` row for a `device.device_kind` string, or None if it has none."""
    kind = device_kind.lower()
    for pattern, name in _KIND_PATTERNS:
        if pattern in kind:
            return name
    return None


def lookup_peak(device_kind: str, dtype: str) -> Peak | None:
    """The data-sheet peak for this device kind and compute dtype, or None if unknown.

    >>> lookup_peak("NVIDIA H100 80GB HBM3", "bfloat16").tflops
    989.4
    """
    _check_dtype(dtype)
    name = table_entry(device_kind)
    if name is None:
        return None
    return Peak(PEAK_TFLOPS[name][dtype], f"data sheet: {name} {dtype} dense")


def achieved_tflops(flops_per_step: float, step_seconds: float) -> float:
    """TFLOP/s of one device that executes `flops_per_step` in `step_seconds`."""
    if flops_per_step < 0:
        raise ValueError(f"flops_per_step must be >= 0; got {flops_per_step}.")
    if step_seconds <= 0:
        raise ValueError(f"step_seconds must be > 0; got {step_seconds}.")
    return flops_per_step / step_seconds / 1e12


def mfu(flops_per_step: float, step_seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of one device: achieved / peak (a fraction, not percent).

    Args:
      flops_per_step: FLOPs one device executes per step (compiled cost analysis).
      step_seconds: wall time of one step.
      peak_tflops: that device's peak in TFLOP/s for the compute dtype.
    """
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0; got {peak_tflops}.")
    return achieved_tflops(flops_per_step, step_seconds) / peak_tflops


def matmul_probe(dtype: str = "float32", size: int = 2048, repeats: int = 10) -> Peak:
    """Measures a device's practical peak: the best TFLOP/s of a jitted `[n, n] @ [n, n]`.

    Runs on JAX's default device (call it after configuring devices). The best of
    `repeats` timed calls after a warm-up, so background load lowers it less than a mean.
    """
    _check_dtype(dtype)
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be >= 1; got {size}, {repeats}.")
    import jax
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.dtype(dtype))
    b = jax.random.normal(key_b, (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    tflops = 2.0 * size**3 / best / 1e12
    return Peak(tflops, f"matmul probe: best of {repeats} x {size}^3 {dtype} on this device")


def device_peak(device_kind: str, platform: str, dtype: str) -> Peak | None:
    """The data-sheet peak, or on CPU the matmul probe; None for an unknown accelerator."""
    peak = lookup_peak(device_kind, dtype)
    if peak is None and platform == "cpu":
        peak = matmul_probe(dtype)
    return peak
