"""Optional dependencies, imported where they are needed with one kind of error.

flaxseg's core needs only its declared dependencies; PyTorch (`[torch]`), h5py (`[h5]`),
scipy (`[scipy]`) and TensorFlow (`[tf]`) are extras. `require` imports one of them and,
when it is missing, raises an error that names what needed it and the install command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The pip extra that installs each optional top-level module.
EXTRAS = {"torch": "torch", "h5py": "h5", "scipy": "scipy", "tensorflow": "tf"}


def require(module: str, purpose: str, error: type[Exception] = ImportError) -> ModuleType:
    """`importlib.import_module(module)`, or `error` naming `purpose` and the pip extra.

    Args:
      module: a dotted module name whose top-level package is in `EXTRAS`
        (e.g. 'scipy.ndimage').
      purpose: what needs it, completing "... needs <package>" (e.g. "The elastic
        deformation").
      error: the exception class raised when it is missing (a module's own error type,
        so callers catching it see one kind).
    """
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise error(f"{purpose} needs {package}: pip install 'flaxseg[{EXTRAS[package]}]'."
                    ) from e
