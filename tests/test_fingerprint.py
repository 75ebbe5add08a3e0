"""Code fingerprints (neuronmap.workflow.fingerprint) against a small package written here: what
counts as a change of a command's code and what does not."""

import textwrap

import pytest

from neuronmap.workflow.fingerprint import ModuleGraph, code_fingerprint, command_modules
from conftest import REPO


@pytest.fixture
def package(tmp_path):
    files = {
        "neuronmap/__init__.py": '"""The package."""\n',
        "neuronmap/cli.py": "from .errors import Problem\nCOMMANDS = {'one': 'stage', 'two': 'stage'}\n",
        "neuronmap/errors.py": "class Problem(Exception):\n    pass\n",
        "neuronmap/shared.py": "def helper():\n    return 1\n",
        "neuronmap/stage/__init__.py": "",
        "neuronmap/stage/work.py": "from ..shared import helper\n\ndef work():\n    return helper()\n",
        "neuronmap/stage/other.py": "def other():\n    return 2\n",
        "neuronmap/stage/commands.py": textwrap.dedent('''\
            """Two commands."""
            SETTINGS = {}

            def _common():
                return 0

            def cmd_one(args):
                """first"""
                from .work import work
                return work() + _common()

            def args_one(p):
                p.add_argument("--x")

            def cmd_two(args):
                from . import other
                return other.other()

            def args_two(p):
                pass
            '''),
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def fingerprint(root, command):
    from neuronmap import cli
    original = cli.COMMANDS
    cli.COMMANDS = {"one": "stage", "two": "stage"}  # the synthetic package's table
    try:
        return code_fingerprint(command, root)
    finally:
        cli.COMMANDS = original


def edit(root, name, old, new):
    path = root / name
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_modules_follow_imports_inside_functions_and_packages(package):
    modules = ModuleGraph(package).closure("neuronmap.stage.commands", "one")
    assert set(modules) == {"neuronmap", "neuronmap.stage", "neuronmap.stage.commands", "neuronmap.stage.work",
                            "neuronmap.shared"}
    assert "neuronmap.stage.other" in ModuleGraph(package).closure("neuronmap.stage.commands", "two")


def test_comments_docstrings_and_formatting_change_nothing(package):
    before = fingerprint(package, "one")
    edit(package, "neuronmap/stage/commands.py", '"""first"""', '"""the first command, reworded"""\n    # why')
    edit(package, "neuronmap/shared.py", "def helper():", "# a comment\n\n\ndef helper():  # here too")
    edit(package, "neuronmap/__init__.py", '"""The package."""', '"""The package, described anew."""')
    assert fingerprint(package, "one") == before


def test_a_real_change_counts_for_the_commands_that_run_it(package):
    one, two = fingerprint(package, "one"), fingerprint(package, "two")
    edit(package, "neuronmap/shared.py", "return 1", "return 3")
    assert fingerprint(package, "one") != one and fingerprint(package, "two") == two
    one = fingerprint(package, "one")
    edit(package, "neuronmap/stage/commands.py", "return other.other()", "return other.other() + 1")
    assert fingerprint(package, "one") == one and fingerprint(package, "two") != two
    edit(package, "neuronmap/stage/commands.py", "return 0", "return 5")  # a helper of cmd_one only
    assert fingerprint(package, "one") != one


def test_a_c_kernel_a_module_compiles_counts_as_its_code(package):
    (package / "neuronmap/stage/kernel.c").write_text("int twice(int x) { return 2 * x; }\n")
    edit(package, "neuronmap/stage/work.py", "def work():", 'SOURCE = "kernel.c"\n\ndef work():')
    one, two = fingerprint(package, "one"), fingerprint(package, "two")
    edit(package, "neuronmap/stage/kernel.c", "2 * x", "3 * x")
    assert fingerprint(package, "one") != one and fingerprint(package, "two") == two
    extract = command_modules("extract", REPO / "src")
    assert "statistics_kernel.c" in extract["neuronmap.model.native_statistics"]


def test_the_real_commands_run_their_stage_and_not_the_others():
    root = REPO / "src"
    report = command_modules("report", root)
    assert "neuronmap.report.build" in report and not any(m.startswith("neuronmap.extract") for m in report)
    extract = command_modules("extract", root)
    assert {"neuronmap.extract.engine", "neuronmap.model.hooks", "neuronmap.io.responses"} <= set(extract)
    assert not any(m.startswith(("neuronmap.ablate", "neuronmap.report", "neuronmap.stats")) for m in extract)
