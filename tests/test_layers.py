"""The package's floors (docs/style.md, "Floors you can name"), read from its imports.

Low to high: the ground (errors, config, io, maths and the package's own __init__), the model,
the stages, and on top the command line and the workflow façade. A module imports its own floor
and the floors below it; a stage imports no other stage (stages meet through Parquet files),
but for the few arrows listed, with their reasons, in BETWEEN_STAGES; and no module imports
itself through others. An import inside a function is an arrow like any other: run lazily, it
still runs the code it names.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "neuronmap"

GROUND, MODEL, STAGE, TOP = range(4)
FLOOR_NAMES = ("ground", "model", "stage", "top")
# The floor of each top-level module or subpackage of the package.
FLOORS = {
    PACKAGE: GROUND, "errors": GROUND, "config": GROUND, "io": GROUND, "maths": GROUND,
    "model": MODEL,
    "prepare": STAGE, "extract": STAGE, "stats": STAGE, "ablate": STAGE, "corpus": STAGE, "labels": STAGE,
    "plan": STAGE, "report": STAGE, "atlas": STAGE, "explain": STAGE,
    "cli": TOP, "workflow": TOP, "__main__": TOP,
}

# The arrows between two stages that are right as they are. What else two stages share moves
# down a floor (maths/, io/, model/).
BETWEEN_STAGES = {
    # A settings class nests the settings of another stage whose keys it reads, so that each key
    # is declared once. Settings modules hold declarations only: no code runs through them.
    ("neuronmap.labels.settings", "neuronmap.ablate.settings"):
        "the label perplexity test reads the significance keys of the ablate stage's test",
    ("neuronmap.plan.settings", "neuronmap.prepare.settings"): "the plan sizes the jobs of these stages",
    ("neuronmap.plan.settings", "neuronmap.extract.settings"): "the plan sizes the jobs of these stages",
    ("neuronmap.plan.settings", "neuronmap.ablate.settings"): "the plan sizes the jobs of these stages",
    # The plan counts the tokens of the prompts prepare will write before prepare has run (while
    # the workflow is parsed too), so it builds them with prepare's own code: prompts built any
    # other way would plan another run.
    ("neuronmap.plan.estimate", "neuronmap.prepare.prompts"): "the plan counts the prompts prepare builds",
    ("neuronmap.plan.estimate", "neuronmap.prepare.relations"): "the plan counts the prompts prepare builds",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def arrows(module: str) -> dict[str, int]:
    """The package's modules that `module` imports, anywhere in it (functions included), with
    the line of the first import of each."""
    path = MODULES[module]
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name in MODULES and name != module and name not in found:
                found[name] = node.lineno
    return found


GRAPH = {module: arrows(module) for module in MODULES}


def part(module: str) -> str:
    """The top-level module or subpackage `module` belongs to."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def floor(module: str) -> int:
    return FLOORS[part(module)]


def test_every_module_stands_on_a_floor():
    unplaced = sorted({part(module) for module in MODULES} - set(FLOORS))
    assert not unplaced, f"{unplaced}: add them to FLOORS (tests/test_layers.py) on the floor they belong to"


def test_no_arrow_runs_up():
    problems = [f"{MODULES[module].relative_to(SRC)}:{line}: {module} ({FLOOR_NAMES[floor(module)]}) imports "
                f"{target} ({FLOOR_NAMES[floor(target)]})"
                for module, targets in GRAPH.items() for target, line in targets.items()
                if floor(target) > floor(module)]
    assert not problems, "arrows that run up a floor:\n" + "\n".join(problems)


def test_no_stage_imports_another_stage():
    problems = [f"{MODULES[module].relative_to(SRC)}:{line}: {module} imports {target}"
                for module, targets in GRAPH.items() for target, line in targets.items()
                if floor(module) == floor(target) == STAGE and part(module) != part(target)
                and (module, target) not in BETWEEN_STAGES]
    assert not problems, ("a stage imports another stage (move what they share down a floor: maths/, io/, "
                          "model/):\n" + "\n".join(problems))


def test_every_arrow_between_stages_listed_is_still_there():
    stale = [pair for pair in BETWEEN_STAGES if pair[1] not in GRAPH.get(pair[0], {})]
    assert not stale, f"no longer imported, remove them from BETWEEN_STAGES: {stale}"


def test_no_import_cycle():
    """No module imports itself through others (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, "modules that import each other (through others):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles)


def test_the_walk_sees_lazy_imports():
    """The walk finds an import inside a function (the workflow façade imports the stages so)."""
    assert "neuronmap.plan.estimate" in GRAPH["neuronmap.workflow.checks"]
