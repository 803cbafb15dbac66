"""A run folder is data: a saved config never imports code by itself.

A run folder holds a checkpoint whose saved config names `pwn:Net`, with `pwn.py` beside it
writing a marker file when imported. evaluate / predict / export, resume and `init_from`
must not import it unless the user names that model or passes --trust_saved_code.
"""

import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import child_env, file_mtimes, save_tiny_run

from flaxseg.configs import get_config
from flaxseg.models.registry import UntrustedCode
from flaxseg.optim import create_optimizer
from flaxseg.train import checkpoint
from flaxseg.train.config import build_model
from flaxseg.train.state import create_train_state

EVIL = "pwn:Net"
INPUT_SHAPE = (1, 32, 32, 3)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A workdir whose checkpoint 6 asks for `pwn:Net`; `pwn.py` beside it writes MARKER."""
    folder = tmp_path_factory.mktemp("sent_run")
    save_tiny_run(folder, model_name=EVIL)
    (folder / "pwn.py").write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('MARKER').write_text('ran')\n"
        "from flaxseg.models.unet import UNet as Net\n")
    return folder


def _no_marker(folder: Path) -> bool:
    return not (folder / "MARKER").exists() and "pwn" not in sys.modules


def test_the_command_line_refuses_with_one_line_and_imports_nothing(run_folder):
    # predict and export load a run through the same `evaluate.load_run`.
    before = file_mtimes(run_folder)
    result = subprocess.run([sys.executable, "-m", "flaxseg.evaluate", "--workdir=."],
                            cwd=run_folder, env=child_env(1), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert lines == [
        f"Error: The run in . (step 6) asks to import code: model '{EVIL}' (module 'pwn'). "
        "A saved config never imports code by itself; if you trust that code, name the "
        f"model (--model={EVIL}) or pass --trust_saved_code."], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (run_folder / "MARKER").exists()
    assert file_mtimes(run_folder) == before


def test_load_for_inference_imports_only_a_named_or_trusted_model(run_folder, monkeypatch):
    with pytest.raises(UntrustedCode, match=r"asks to import code: model 'pwn:Net'"):
        checkpoint.load_for_inference(run_folder)
    with pytest.raises(UntrustedCode):  # naming another model allows nothing
        checkpoint.load_for_inference(run_folder, model_name="other:Net")
    assert _no_marker(run_folder)
    monkeypatch.syspath_prepend(str(run_folder))
    model, variables, config = checkpoint.load_for_inference(run_folder, model_name=EVIL)
    assert (run_folder / "MARKER").read_text() == "ran" and config.model.name == EVIL
    assert type(model).__name__ == "UNet" and "params" in variables
    (run_folder / "MARKER").unlink()
    del sys.modules["pwn"]


def test_resume_and_init_from_never_build_the_saved_model(run_folder, tmp_path):
    from flaxseg.train.loop import train_and_evaluate

    before = file_mtimes(run_folder)
    config = get_config("test")
    config.parallel = "jit"
    # Resume: the run's model comes from the user's config; another saved one is refused.
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"config.model.name was 'pwn:Net'"):
        train_and_evaluate(config, str(run_folder))
    # init_from reads another run's checkpoint: its code is not the user's choice.
    model = build_model(config)
    state = create_train_state(model, create_optimizer(config.optimizer, 6),
                               jax.random.key(0), INPUT_SHAPE)
    with pytest.raises(UntrustedCode, match=r"name the model \(--config.model.name=pwn:Net\) "
                                            r"or pass --trust_saved_code\.$"):
        checkpoint.init_from(state, run_folder, model_name=config.model.name)
    assert _no_marker(run_folder)
    assert file_mtimes(run_folder) == before
