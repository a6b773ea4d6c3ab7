"""Public names that load on first use (PEP 562), for packages whose import must stay light
(``fastkd`` and ``fastkd.cache``: the command line's argument parsing never imports torch)."""
import importlib
import sys


def lazy_exports(module_name: str, names: dict):
    """``(__getattr__, __dir__)`` for module ``module_name``: each name in ``names`` (name ->
    the module that defines it) is imported from there on first access and then kept."""

    def __getattr__(name):
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            setattr(sys.modules[module_name], name, value)
            return value
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[module_name])) | set(names))

    return __getattr__, __dir__
