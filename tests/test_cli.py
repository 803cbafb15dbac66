"""A user's mistake on a command line is one `Error:` line and exit status 2 (flaxseg.cli):
config files that raise or define no get_config, stray positional arguments, a workdir that
is a file. In-process: `python -m flaxseg.train`'s main under `cli.run_absl`."""

import sys

import pytest
from absl import flags
from conftest import file_mtimes

from flaxseg import cli


def _train_cli(monkeypatch, capsys, *args):
    """(exit status, stderr) of `python -m flaxseg.train ARGS`, run in this process."""
    from flaxseg.train.__main__ import main

    monkeypatch.setattr(sys, "argv", ["flaxseg.train", *args])
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run_absl(main)
    finally:
        flags.FLAGS.unparse_flags()  # the next test parses its own
        # ml_collections loads each config file as the module 'config_config', into the
        # module object already there: a later file would keep this one's functions.
        sys.modules.pop("config_config", None)
    return exit_.value.code, capsys.readouterr().err


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err[-3000:]
    return lines[0]


@pytest.mark.parametrize("source, expected", [
    ("def get_config():\n    raise RuntimeError('no GPU here')\n",
     "Error: the config file {path}: get_config() raised RuntimeError: no GPU here (line 2). "
     "Fix the file, or set FLAXSEG_TRACEBACK=1 for the traceback."),
    ("def get_config():\n    raise ValueError('set DATA_DIR first')\n",
     "Error: the config file {path}: get_config() raised ValueError: set DATA_DIR first "
     "(line 2). Fix the file, or set FLAXSEG_TRACEBACK=1 for the traceback."),
    ("config = {}\n",
     "Error: the config file {path} defines no get_config(); a config file is Python whose "
     "get_config() returns an ml_collections.ConfigDict (see flaxseg/configs/)."),
])
def test_a_config_file_that_raises_or_has_no_get_config_is_one_line(
        tmp_path, monkeypatch, capsys, source, expected):
    path = tmp_path / "my config.py"
    path.write_text(source)
    before = file_mtimes(tmp_path)
    status, err = _train_cli(monkeypatch, capsys, f"--config={path}",
                             f"--workdir={tmp_path / 'run'}")
    assert status == 2 and _one_error_line(err) == expected.format(path=path)
    assert file_mtimes(tmp_path) == before  # no workdir made, the file untouched


def test_stray_positional_arguments_name_the_quoting_fix(tmp_path, monkeypatch, capsys):
    # `--config=/x/my config.py` unquoted: the shell passes "config.py" on its own.
    status, err = _train_cli(monkeypatch, capsys, f"--config={tmp_path}/my", "config.py",
                             f"--workdir={tmp_path / 'run'}")
    assert status == 2 and _one_error_line(err) == (
        f"Error: unexpected arguments ['config.py']: options are --flag=value; quote a value "
        f"with spaces: --config='{tmp_path}/my config.py'.")
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_named_as_such(tmp_path, capsys):
    from flaxseg.configs import get_config
    from flaxseg.train.checkpoint import load_for_inference
    from flaxseg.train.loop import train_and_evaluate

    workdir = tmp_path / "notes.txt"
    workdir.write_text("mine")
    expected = (f"Error: the workdir {workdir} is a file, not a directory; pass --workdir a "
                "directory (a new one, or a training run's).")
    for run in (lambda: train_and_evaluate(get_config("test"), str(workdir)),  # train
                lambda: load_for_inference(str(workdir))):  # evaluate, predict, export
        with pytest.raises(ValueError) as error:
            run()
        assert cli.report(error.value) == 2
        assert _one_error_line(capsys.readouterr().err) == expected
    assert workdir.read_text() == "mine"


def test_entry_points_collect_garbage_less():
    import gc

    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's defaults
    gc.unfreeze()
    try:
        seen = []
        assert cli.run(lambda: seen.append((gc.get_threshold(), gc.get_freeze_count()))) == 0
        (thresholds, frozen), = seen
        # The imported modules' objects are out of the collector's view.
        assert thresholds == cli.GC_THRESHOLDS and frozen > 10_000
    finally:
        gc.set_threshold(*before)
