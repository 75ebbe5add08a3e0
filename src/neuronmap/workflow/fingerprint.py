"""What a command's code is, for deciding reruns: a digest of the syntax trees of the modules it
really imports, with comments, docstrings and formatting left out.

The rules hand it to Snakemake as a param, so a comment, a docstring or a reformatting reruns
nothing, while a real change reruns exactly the commands whose code it is in (and what reads
their outputs). A stage's `commands` module counts only with the command's own `cmd_`/`args_`
functions and the helpers they use: editing one command of a stage does not rerun its siblings.
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

PACKAGE = "neuronmap"


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _command_only(tree: ast.Module, command: str) -> ast.Module:
    """A commands module as `command` runs it: its statements but the functions, and of those only
    the command's own and the ones they use."""
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    keep = {name for name in (f"cmd_{command.replace('-', '_')}", f"args_{command.replace('-', '_')}")
            if name in functions}
    todo = list(keep)
    while todo:
        for node in ast.walk(functions[todo.pop()]):
            if isinstance(node, ast.Name) and node.id in functions and node.id not in keep:
                keep.add(node.id)
                todo.append(node.id)
    tree.body = [node for node in tree.body if not isinstance(node, ast.FunctionDef) or node.name in keep]
    return tree


# (file, its text, command) -> (stripped tree as text, package modules it imports): the workflow
# asks for every rule's fingerprint at each parse, and the rules share most modules.
_READ: dict[tuple, tuple[str, frozenset[str]]] = {}


def _kernel_sources(path: Path, text: str) -> str:
    """The C sources a module compiles (a string naming a .c file beside it, such as
    model/statistics_kernel.c), with their headers: their numbers are the module's, so a change
    to one reruns what the module computes."""
    from ..model.native import kernel_text
    names = sorted(set(re.findall(r"[\"']([\w.-]+\.c)[\"']", text)))
    return "".join(f"\n{name}\n{kernel_text(path.parent / name)}" for name in names if (path.parent / name).is_file())


class ModuleGraph:
    """The package's modules as files under `root` (the directory holding the `neuronmap` folder)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def tree(self, module: str, command: str | None = None, text: str | None = None) -> ast.Module:
        tree = ast.parse(self.path(module).read_text() if text is None else text)
        if command is not None:
            tree = _command_only(tree, command)
        return _without_docstrings(tree)

    def imports(self, module: str, tree: ast.Module) -> set[str]:
        """Package modules `tree` imports (at any depth, functions included), with the packages
        around them, whose __init__ runs first."""
        is_package = self.path(module).name == "__init__.py"
        here = module.split(".") if is_package else module.split(".")[:-1]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                target = ".".join(base + (node.module.split(".") if node.module else []))
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        modules = set()
        for name in found:
            parts = name.split(".")
            if parts[0] != PACKAGE:
                continue
            for depth in range(1, len(parts) + 1):
                prefix = ".".join(parts[:depth])
                if self.path(prefix) is not None:
                    modules.add(prefix)
        return modules

    def read(self, module: str, command: str | None = None) -> tuple[str, frozenset[str]]:
        path = self.path(module)
        text = path.read_text()
        kernels = _kernel_sources(path, text)
        key = (str(path), text, kernels, command)
        if key not in _READ:
            tree = self.tree(module, command, text)
            _READ[key] = (ast.dump(tree) + kernels, frozenset(self.imports(module, tree)))
        return _READ[key]

    def closure(self, module: str, command: str | None = None) -> dict[str, str]:
        """Every module `module` runs, as {module: its stripped syntax tree dumped as text}."""
        dumps, todo = {}, [(module, command)]
        while todo:
            name, only = todo.pop()
            if name in dumps:
                continue
            dumps[name], imported = self.read(name, only)
            todo += [(other, None) for other in imported if other not in dumps]
        return dumps


def command_modules(command: str, root: str | Path) -> dict[str, str]:
    """The modules `neuronmap <command>` runs: the dispatcher and the command's stage code."""
    from ..cli import COMMANDS
    graph = ModuleGraph(root)
    modules = graph.closure(f"{PACKAGE}.cli")
    modules.update(graph.closure(f"{PACKAGE}.{COMMANDS[command]}.commands", command))
    return modules


def code_fingerprint(command: str, root: str | Path) -> str:
    digest = hashlib.sha256()
    for name, dump in sorted(command_modules(command, root).items()):
        digest.update(f"{name}\n{dump}\n".encode())
    return digest.hexdigest()[:16]
