"""The public API (`flaxseg.api`): every promised name imports, and moved names still work."""

import importlib

import pytest

from flaxseg.api import MOVED, PUBLIC


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_public_name_imports(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lost public names {missing}: list the move in api.MOVED"
    if hasattr(mod, "__all__"):  # a package's __all__ and the table say the same
        assert sorted(mod.__all__) == sorted(PUBLIC[module])


@pytest.mark.parametrize(("module", "name"), sorted(MOVED))
def test_a_moved_name_warns_and_is_the_same_object(module, name):
    new_home = importlib.import_module(MOVED[(module, name)])
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} moved to "
                                                rf"{MOVED[(module, name)]}\.{name}"):
        old = getattr(importlib.import_module(module), name)
    assert old is getattr(new_home, name)


def test_the_old_config_import_line_still_works():
    # As users' own config files wrote it until flaxseg.run_config existed.
    with pytest.warns(DeprecationWarning, match="flaxseg.run_config"):
        from flaxseg.configs import base_config, optimizer_config
    config = base_config()
    config.optimizer = optimizer_config(learning_rate=0.1)
    assert config.optimizer.learning_rate == 0.1


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        importlib.import_module("flaxseg.configs").nonexistent  # noqa: B018
