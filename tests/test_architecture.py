"""The package's shape, checked from its source: imports point one way (cli → api → streaming → io
→ methods → core), without cycles or private names across modules; each method's name is written
in its own module only; the CLI's commands hold no numerical code; the library prints nothing; no
module is over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qbnorm_cli import methods

PACKAGE = Path(__file__).resolve().parent.parent / "qbnorm_cli"
# What each part may import from the package (besides itself). The registry sits between the
# files that read probes and the core it builds normalisers from.
LAYERS = {
    "core": {"errors"},
    "errors": set(),
    "version": set(),
    "startup": {"io", "errors"},  # the signal handlers of every phase: io/staging.py (stdlib and errors only)
    "methods": {"core", "errors"},
    "io": {"core", "errors", "version", "methods"},
    "streaming": {"core", "errors", "io"},
    "api": {"core", "errors", "version", "methods", "io", "streaming"},
    "plots": {"core", "errors", "version", "methods", "io"},  # figures of the api's results (matplotlib inside)
    "cli": {"core", "errors", "version", "methods", "io", "streaming", "api", "startup", "plots"},
    "__init__": {"startup", "api", "core", "errors", "io", "methods", "version"},
    "__main__": {"cli"},
}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("qbnorm_cli", *parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


MODULES = modules()


def part(module: str) -> str:
    """The layer a module belongs to: its first component under qbnorm_cli."""
    rest = module.split(".")[1:]
    return rest[0] if rest else "__init__"


def imports(tree: ast.Module, module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import in the module, at any depth (function-level too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: a relative import (the package imports absolutely)"
            base = node.module or ""
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            # `from package import submodule` depends on the submodule (the package's own code runs
            # first, but what is used is the submodule)
            if len(submodules) < len(names):
                out.append((base, [n for n in names if f"{base}.{n}" not in MODULES]))
            out += [(m, []) for m in submodules]
    return [(m, names) for m, names in out if m == "qbnorm_cli" or m.startswith("qbnorm_cli.")]


GRAPH = {name: {m for m, _ in imports(tree, name) if m in MODULES and m != name} for name, tree in MODULES.items()}


def test_layers_import_downwards_only():
    wrong = []
    for name, targets in GRAPH.items():
        for target in targets:
            if target == "qbnorm_cli" or part(target) == part(name):
                continue
            if part(target) not in LAYERS[part(name)]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for target in sorted(GRAPH[node]):
            if target == "qbnorm_cli":
                continue
            if state.get(target) == 1:
                cycles.append(" → ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_package_itself_is_imported_only_by_nothing_inside():
    """qbnorm_cli/__init__ is the public face: no module inside imports from it (it imports them)."""
    inside = [name for name, tree in MODULES.items() if name != "qbnorm_cli"
              for m, _ in imports(tree, name) if m == "qbnorm_cli"]
    # `from qbnorm_cli import api` names a subpackage, which `imports` lists separately
    assert all(name.startswith("qbnorm_cli.") for name in inside)
    for name, tree in MODULES.items():
        for m, names in imports(tree, name):
            if m == "qbnorm_cli":
                assert all(f"qbnorm_cli.{n}" in MODULES for n in names), (name, names)


def test_no_private_names_across_modules():
    found = [f"{name}: from {m} import {n}" for name, tree in MODULES.items()
             for m, names in imports(tree, name) for n in names if n.startswith("_") and not n.startswith("__")]
    found += [f"{name}: {m}" for name, tree in MODULES.items() for m, _ in imports(tree, name)
              if any(p.startswith("_") and not p.startswith("__") for p in m.split("."))]
    attribute_access = []
    for name, tree in MODULES.items():
        aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").startswith("qbnorm_cli") for alias in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                attribute_access.append(f"{name}: {node.value.id}.{node.attr}")
    assert not found and not attribute_access, found + attribute_access


# The same word in another vocabulary, declared once: --progress none (cli/report.py PROGRESS_OFF).
OTHER_VOCABULARIES = {("qbnorm_cli.cli.report", "none")}


def test_each_method_name_is_written_in_its_own_module_only():
    """A method is one module of qbnorm_cli/methods/: its name (a string anywhere else) would tie
    another module to it."""
    home = {m.name: m.build.__module__ for m in methods.METHODS.values()}
    outside = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in home \
                    and home[node.value] != name:
                outside.append(f"{name}:{node.lineno} {node.value!r}")
    declared = [o for o in outside if any(o.startswith(m + ":") and o.endswith(repr(w)) for m, w in OTHER_VOCABULARIES)]
    assert len(declared) <= len(OTHER_VOCABULARIES), declared  # each other vocabulary writes its word once
    outside = [o for o in outside if o not in declared]
    assert not outside, outside


def test_each_method_is_one_module_of_the_methods_package():
    homes = [methods.METHODS[name].build.__module__ for name in methods.BUILT_IN_NAMES]
    assert len(set(homes)) == len(homes) and all(h.startswith("qbnorm_cli.methods.") for h in homes), homes
    assert {f"qbnorm_cli.methods.{m}" for m in methods.BUILT_IN} == set(homes)


def test_parameters_are_declared_in_the_registry_only():
    """A method parameter's Parameter(...) is written in qbnorm_cli/methods/ alone (its base declares
    them); other modules may check their own options with the class (evaluate's queries_per_item)."""
    calls = [f"{name}:{node.lineno} {node.args[0].value!r}" for name, tree in MODULES.items() if part(name) != "methods"
             for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Parameter"
             and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in methods.PARAMETERS]
    assert not calls, calls


def test_no_option_of_a_method_parameter_is_written_by_hand():
    """The options of the method parameters (--beta, --min-count, --lambda …) of normalise, export,
    tune and probe come from the registry's declarations (cli/shared.py); none is spelled out in a
    command. (hubness's and hubs's --k is another k: the neighbourhood of N_k.)"""
    flags = {p.option for p in methods.PARAMETERS.values()}
    commands = {f"qbnorm_cli.cli.{c}" for c in ("normalise", "export", "tune", "probe")}
    written = [f"{name}:{node.lineno} {arg.value}" for name, tree in MODULES.items() if name in commands
               for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Option"
               for arg in node.args if isinstance(arg, ast.Constant) and arg.value in flags]
    assert not written, written


def _naming(tree: ast.Module, word: str) -> bool:
    """Whether a module names `word`: as a variable, attribute, argument or keyword, or as a string."""
    for node in ast.walk(tree):
        names = {getattr(node, "id", None), getattr(node, "attr", None), getattr(node, "arg", None)}
        if isinstance(node, ast.alias):
            names.add(node.asname or node.name)
        if word in names or (isinstance(node, ast.Constant) and node.value == word):
            return True
    return False


# Parameters that are also the words of everyday code: a loop's k, the β of a kernel or a probe.
COMMON_WORDS = {"k", "beta"}


@pytest.mark.parametrize("parameter", [name for name in methods.PARAMETERS if name not in COMMON_WORDS])
def test_a_parameter_is_named_in_one_module_at_most_outside_the_registry(parameter):
    """A parameter is declared once, in qbnorm_cli/methods/: the options, the library's keywords,
    the params file, the figures' labels and the probe records its values pick (Parameter.picks,
    .params_key) come from its declaration, so no other module needs its name (one may: a
    statistic computed for it, a hint naming it)."""
    naming = [name for name, tree in MODULES.items() if part(name) != "methods" and _naming(tree, parameter)]
    assert len(naming) <= 1, naming


@pytest.mark.parametrize("name", [n for n in MODULES if part(n) == "cli"])
def test_commands_hold_no_numerical_code(name):
    """A command parses, calls the library and reports: it needs neither numpy nor the kernels."""
    targets = {m for m, _ in imports(MODULES[name], name)}
    third_party = {alias.name.split(".")[0] for node in ast.walk(MODULES[name]) if isinstance(node, ast.Import)
                   for alias in node.names}
    third_party |= {(node.module or "").split(".")[0] for node in ast.walk(MODULES[name])
                    if isinstance(node, ast.ImportFrom) and not node.level}
    assert "numpy" not in third_party and "h5py" not in third_party, name
    assert not {t for t in targets if part(t) in ("streaming",) or t.startswith("qbnorm_cli.core.statistics")}, name


def test_the_library_never_prints():
    printing = [f"{name}:{node.lineno}" for name, tree in MODULES.items() if part(name) not in ("cli", "startup")
                for node in ast.walk(tree)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not printing, printing


MOST_LINES = 600  # a module longer than this holds more than one concern (issue 25)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_the_line_limit(name):
    """One module per concern: none over MOST_LINES lines (cluster.py had 1037, schemas.py 936)."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MOST_LINES, f"{path.relative_to(PACKAGE.parent)}: {lines} lines"


def test_starting_a_command_imports_no_scipy_special():
    """scipy.special takes longer to import than a small command takes to run (issue 30's regressions:
    main's start-up was 0.5 s slower than d73bd3c's, most of it this); only mp's Gaussian fit needs it."""
    import subprocess
    import sys

    script = ("import sys, qbnorm_cli, qbnorm_cli.cli\n"
              "print(sorted(m for m in sys.modules if m.startswith('scipy.special')))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
