"""Folders the tests read from, wherever a test module sits below tests/, and a loader of the
scripts there (examples, benchmarks, fixtures' writers) as modules."""
import importlib.util
import os

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
FIXTURES = os.path.join(TESTS, "fixtures")
EXAMPLES = os.path.join(ROOT, "examples")


def load_script(path: str):
    """The Python script at ``path`` (relative to the repository root, or absolute) as a module,
    named after its file."""
    path = os.path.join(ROOT, path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
