"""The house rules that a reader relies on, checked on the source: kernel code imports nothing
from the API layer (only other kernels)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imported_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_kernels_import_nothing_from_the_api_layer():
    folder = os.path.join(ROOT, "kernels")
    offending = [f"{name}: {module}" for name in sorted(os.listdir(folder))
                 if name.endswith(".py")
                 for module in _imported_modules(os.path.join(folder, name))
                 if (module == "fastkd" or module.startswith("fastkd."))
                 and not module.startswith("fastkd.kernels")]
    assert not offending, offending


def _library_modules():
    """{module name: path} of every library module (fastkd/, its cache package, kernels/)."""
    modules = {}
    for folder, package in (("fastkd", "fastkd"), ("fastkd/cache", "fastkd.cache"),
                            ("kernels", "fastkd.kernels")):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                stem = name[:-3]
                module = package if stem == "__init__" else f"{package}.{stem}"
                modules[module] = os.path.join(ROOT, folder, name)
    return modules


def _imports(path):
    """(module, names) of every absolute import in the file, inside functions too."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, tuple(alias.name for alias in node.names)


def test_no_import_cycles():
    """No two library modules import each other, directly or through others, not even with an
    import inside a function (a package's ``__init__`` re-exporting its modules aside)."""
    modules = _library_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for imported, names in _imports(path):
            for candidate in [imported] + [f"{imported}.{name}" for name in names]:
                if candidate in modules and candidate != module:
                    targets.add(candidate)
        graph[module] = {target for target in targets
                         if not (module.endswith("__init__") or target == module.rsplit(".", 1)[0]
                                 or modules[target].endswith("__init__.py"))}
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_across_modules():
    """No library module imports another's underscore-private name or module, or reads a
    private name as an attribute of a module it imported."""
    modules = _library_modules()
    offending = []
    for module, path in modules.items():
        aliases = set()
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update(alias.asname for alias in node.names
                               if alias.asname and alias.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in modules:
                        aliases.add(alias.asname or alias.name)
                    elif node.module in modules and _private(alias.name):
                        offending.append(f"{module}: {node.module}.{alias.name}")
        offending += [f"{module}: imports {imported}" for imported, _ in _imports(path)
                      if imported.startswith("fastkd") and _private(imported.rsplit(".", 1)[-1])]
        offending += [f"{module}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in aliases and _private(node.attr)]
    assert not offending, offending


def test_the_layout_in_the_design_notes_matches_the_tree():
    """docs/design.md's Layout section names every library file (by path or, inside its
    folder's row, by name), and every path it names exists."""
    import glob
    import re
    text = open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8").read()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.find("\n## ", 1)] if "\n## " in layout[1:] else layout
    named = set(re.findall(r"`([^`\s]+)`", layout))
    missing_paths = [name for name in sorted(named) if "/" in name and not name.startswith("--")
                     and not glob.glob(os.path.join(ROOT, name.rstrip("/")))]
    assert not missing_paths, missing_paths
    library = [os.path.relpath(path, ROOT) for path in _library_modules().values()]
    library += [os.path.relpath(path, ROOT)
                for path in glob.glob(os.path.join(ROOT, "kernels", "*.[ch]"))]
    unnamed = [path for path in sorted(library)
               if path not in named and os.path.basename(path) not in named]
    assert not unnamed, unnamed


def test_names_used_across_modules_are_public():
    """A name one library module imports from another that declares ``__all__`` is in it."""
    modules = _library_modules()
    exported = {}
    for module, path in modules.items():
        for node in ast.parse(open(path, encoding="utf-8").read(), path).body:
            if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "__all__"
                                                    for target in node.targets):
                exported[module] = set(ast.literal_eval(node.value))
    unlisted = [f"{module}: {imported}.{name}" for module, path in modules.items()
                for imported, names in _imports(path) if imported in exported
                for name in names if name not in exported[imported]
                and f"{imported}.{name}" not in modules]
    assert not unlisted, unlisted
