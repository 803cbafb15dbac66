"""Shared test setup.

JAX sees 4 CPU devices in every test process, so the pmap path is exercised on
this 2-core machine; the flag must be set before JAX initialises its backend,
which is why it happens here at import time. Reproducibility tests pin the
device count explicitly.
"""

import os
from importlib import metadata


def _jaxlib_version() -> tuple[int, ...]:
    return tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])


# Tiny test models spend most of their time in XLA's compiler, not running: compile with
# XLA's backend optimisations off and without LLVM's expensive passes. The suite's CPU time
# falls from ~900 s to ~490 s (Python 3.11, jaxlib 0.10.2; wall 8-9 min -> 5 min), and the
# tiny U-Net's train step gives the same loss and params bit for bit. The tests check what
# flaxseg computes, which the optimisation level does not change; users' runs keep XLA's
# defaults. Set before JAX initialises its backend; child processes inherit it.
_FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
if _jaxlib_version() == (0, 10):
    # The loop emitters instead of the MLIR fusion emitters: 20% less compile time for
    # the tiny test models (measured on jaxlib 0.10.2). jaxlib 0.12 has only the latter
    # and aborts on the unknown flag.
    _FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import math  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from flaxseg.cli import collect_garbage_less  # noqa: E402
from flaxseg.models import create_model, model_geometry, model_spec  # noqa: E402

NUM_TEST_DEVICES = 4

# The workers trace thousands of programs: the command lines' garbage-collector settings
# (flaxseg.cli) take ~8% off their CPU.
collect_garbage_less()

jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)
# JAX's partitionable threefry (the default) takes XLA:CPU 20-40 s to compile a tiny
# U-Net's initialiser; the classic threefry 5 s, and every test and child process
# initialises models. The values drawn differ, not their properties; the tests that are
# about sharded random bits (the mesh's dropout masks) switch the default back on.
THREEFRY_PARTITIONABLE = False
jax.config.update("jax_threefry_partitionable", THREEFRY_PARTITIONABLE)

# JAX's persistent compilation cache, shared by the xdist workers and the child processes
# the tests start (XLA_CACHE_DIR): a program compiled once (a train step, an initialiser)
# is loaded from disk by every later test that builds it again. Every program, however
# quick to compile: the ~3,900 small ones (a jnp op, a metric) were compiled again by each
# worker and each of ~70 child processes (the cold suite took 5:07 with a 0.5 s threshold,
# 4:39 without; the cache holds ~40 MB). Kept between local runs under .pytest_cache/
# (JAX's cache keys hold the program, the flags and the versions).
XLA_CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             ".pytest_cache", "xla")
jax.config.update("jax_compilation_cache_dir", XLA_CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

ISBI_DIR_ENV = "FLAXSEG_ISBI_DIR"

# xdist hands whole modules to its workers (--dist=loadfile) in collection order
# (--no-loadscope-reorder; its default order is by test count). The modules that take
# longest (measured with --durations) start first, so the run does not end with one worker
# finishing a long module while the other idles.
_LONGEST_FIRST = ("test_multiprocess.py", "test_resume.py", "test_reliability.py",
                  "test_train_core.py", "test_evaluate_predict.py", "test_models_pretrained.py",
                  "test_models_deeplab.py", "test_models_zoo.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.fixture(scope="session")
def num_devices() -> int:
    n = jax.local_device_count()
    assert n == NUM_TEST_DEVICES, f"expected {NUM_TEST_DEVICES} CPU devices, JAX sees {n}"
    return n


@pytest.fixture(scope="session")
def isbi_dir() -> str:
    """The ISBI 2012 membrane data; only tests that use it may skip without it."""
    path = os.environ.get(ISBI_DIR_ENV)
    if not path:
        pytest.skip(f"{ISBI_DIR_ENV} is not set (point it at shared/data/isbi2012_membrane)")
    if not os.path.isdir(path):
        pytest.fail(f"{ISBI_DIR_ENV}={path!r} is not a directory")
    return path


def file_mtimes(root) -> dict[str, int]:
    """Every file below `root` with its mtime (ns): equal before and after = nothing written."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[path] = os.stat(path).st_mtime_ns
    return out


def child_env(num_devices: int, **extra: str) -> dict[str, str]:
    """The environment of a test's child Python process: this one's XLA flags (the cheap
    compile passes), the shared compilation cache, the threefry kind, `num_devices` CPU
    devices, the repository on the path."""
    return {**os.environ, "JAX_NUM_CPU_DEVICES": str(num_devices),
            "JAX_COMPILATION_CACHE_DIR": XLA_CACHE_DIR,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_THREEFRY_PARTITIONABLE": str(THREEFRY_PARTITIONABLE).lower(),
            "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            **extra}


# jax 0.12.1: the processes of one multi-process CPU job that load their train step from the
# persistent compilation cache hang in its first cross-process collective (gloo), every
# time; the same job whose processes compile the step themselves runs (measured on the
# 2x2-device job of test_multiprocess; jax 0.10.2 and 0.12.0.1 run it from the cache).
MULTIPROCESS_CACHE = jax.__version_info__ < (0, 12, 1)


def multiprocess_env(num_devices: int, **extra: str) -> dict[str, str]:
    """`child_env` for one process of a multi-process job: without the compilation cache
    where jax hangs on cached multi-process programs (`MULTIPROCESS_CACHE`)."""
    env = child_env(num_devices, **extra)
    if not MULTIPROCESS_CACHE:
        del env["JAX_COMPILATION_CACHE_DIR"]
    return env


def save_tiny_run(workdir, steps=(6,), model_name: str | None = None) -> None:
    """Checkpoints `steps` of the test config's untrained model into `workdir`, as a training
    run would save them (state, loop, config), without training; `model_name` replaces the
    saved config's model name."""
    from flaxseg.configs import get_config
    from flaxseg.optim import create_optimizer
    from flaxseg.train.checkpoint import Checkpointer
    from flaxseg.train.config import build_model
    from flaxseg.train.state import create_train_state

    config = get_config("test")
    input_shape = (1, *config.dataset.image_size, 3)
    state = create_train_state(build_model(config), create_optimizer(config.optimizer, 6),
                               jax.random.key(0), input_shape)
    saved = config.to_dict()
    saved["model"]["name"] = model_name or saved["model"]["name"]
    ckpt = Checkpointer(workdir, keep=len(steps))
    for step in steps:
        ckpt.save(step, state, loop={"input_shape": list(input_shape)}, config=saved)
    ckpt.close()


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A coordinator port no other test or connection can take meanwhile.

    An OS-assigned port (bind to 0) is free only until the socket closes: gloo's own
    connections and the other xdist worker's jobs draw from the same ephemeral range and
    can take it before JAX's coordinator binds it. So: a port below the ephemeral range
    (the kernel never hands those out), from a block of 1,000 per xdist worker, the first
    of them that binds.
    """
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)
    top = _ephemeral_low() - 1000 * worker
    for port in range(top - 1, top - 1000, -1):
        if port in _HANDED_OUT:  # a job of this worker may not have bound it yet
            continue
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in [{top - 1000}, {top}) for the coordinator")


def final_params(workdir, step: int) -> list:
    """The params and BatchNorm statistics of checkpoint `step` of a run, as NumPy."""
    import numpy as np

    from flaxseg.train.checkpoint import load_for_inference

    _, variables, _ = load_for_inference(workdir, step=step)
    return [np.asarray(x) for x in jax.tree.leaves(variables)]


def assert_bitwise_same_run(workdir, reference, step: int) -> None:
    """Checkpoint `step` holds bitwise the reference's arrays, and metrics.jsonl its lines."""
    import numpy as np

    from flaxseg.train.reporting import read_metrics

    for got, want in zip(final_params(workdir, step), final_params(reference, step),
                         strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert read_metrics(workdir) == read_metrics(reference)


@pytest.fixture(scope="session")
def torchvision():
    """torchvision's model definitions, beside the CPU torch wheel (the `torch` extra).

    PyPI's torchvision 0.28 is a CUDA build whose compiled ops do not load beside the CPU
    torch 2.13.0 wheel, and its fake-op registrations then raise at import. The model
    definitions are pure Python: tolerate those registrations (both the call and the
    decorator `torch.library.register_fake` returns), import, restore. Skips without torch.
    """
    torch = pytest.importorskip("torch")
    original = torch.library.register_fake

    def tolerant(*args, **kwargs):
        try:
            decorate = original(*args, **kwargs)
        except RuntimeError:
            return lambda fn: fn

        def apply(fn):
            try:
                return decorate(fn)
            except RuntimeError:
                return fn

        return apply

    torch.library.register_fake = tolerant
    try:
        import torchvision
    except ImportError:
        pytest.skip("torchvision is not installed (pip install -e '.[torch]')")
    finally:
        torch.library.register_fake = original
    return torchvision


# ----------------------------------------------------------------------------- tiny models
# Variables come from `random_variables` (NumPy draws into `jax.eval_shape`'d structures):
# it skips the init's random-number compilation, which dominates a tiny model's test time.


def random_variables(model: nn.Module, shape, seed: int = 0, bias_scale: float = 0.1):
    """Variables shaped as `model.init` makes them, drawn with NumPy (He-scaled kernels)."""
    spec = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), spec)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, std, leaf.shape)
        elif name in ("bias", "mean"):
            value = rng.normal(0.0, bias_scale, leaf.shape)
        else:  # norm scales, running variances
            value = np.ones(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def nhwc(x) -> jax.Array:
    """A PyTorch `[B, C, H, W]` array (or tensor) as a JAX `[B, H, W, C]` one."""
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def max_rel_error(got, want) -> float:
    """max |got - want| / max |want|: the error relative to the largest reference value."""
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def save_state_dict(module, path) -> str:
    """A torch module's state dict saved to `path` (a .pth file); returns the path."""
    import torch

    torch.save(module.state_dict(), path)
    return str(path)


def randomise_batch_norm(module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters in a torch module (eval mode
    reads them), drawn from `seed`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, lo, hi in ((m.running_mean, -0.1, 0.1), (m.running_var, 0.5, 1.5),
                                  (m.weight, 0.5, 1.5), (m.bias, -0.1, 0.1)):
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)


def uniform_images(seed: int, shape) -> jax.Array:
    """Float32 images in [0, 1), drawn with NumPy."""
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def out_shape(model: nn.Module, shape):
    """The output of `model` on inputs of `shape`, as ShapeDtypeStructs (nothing runs)."""
    spec = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    return jax.eval_shape(model.init_with_output, jax.random.key(0), spec)[0]


def tiny_model(name: str, **kwargs) -> nn.Module:
    """The registered model `name` at its registration's tiny width, 3 classes."""
    return create_model(name, num_classes=3, **{**model_spec(name).tiny, **kwargs})


def tiny_size(name: str, at_least: int = 32) -> int:
    """The smallest input size >= `at_least` the tiny model `name` takes."""
    return model_geometry(tiny_model(name)).smallest_input(at_least)


# The command line, optionally slowed down per batch, or with a full disk from a given
# checkpoint on (orbax's save raising what tensorstore raises on ENOSPC, seen on a tmpfs).
TRAIN_CHILD = r"""
import os, runpy, sys, time
delay = float(os.environ.get("FLAXSEG_TEST_BATCH_DELAY", "0"))
if delay:
    from flaxseg.data import pipeline
    real_next = pipeline.TrainIterator.__next__
    def slow_next(self):
        time.sleep(delay)
        return real_next(self)
    pipeline.TrainIterator.__next__ = slow_next
full_from = int(os.environ.get("FLAXSEG_TEST_DISK_FULL_FROM", "0"))
if full_from:  # the disk fills during the asynchronous (background) save of that step
    from orbax.checkpoint._src.checkpointers import async_checkpointer
    real_commit = async_checkpointer._background_wait_for_commit_futures
    def commit(directory, futures, *args, **kwargs):
        if int(os.path.basename(str(directory))) < full_from:
            return real_commit(directory, futures, *args, **kwargs)
        for f in futures:  # the arrays are written, then the disk is full
            f.result()
        raise OSError(28, "No space left on device", str(directory))
    async_checkpointer._background_wait_for_commit_futures = commit
if os.environ.get("FLAXSEG_TEST_FLOAT64"):  # the model computes and keeps params in float64
    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    from flaxseg.train import loop
    real_build = loop.build_model
    loop.build_model = lambda config: real_build(config).clone(dtype=jnp.float64,
                                                               param_dtype=jnp.float64)
sys.argv = ["flaxseg.train", *sys.argv[1:]]
runpy.run_module("flaxseg.train", run_name="__main__", alter_sys=True)
"""
