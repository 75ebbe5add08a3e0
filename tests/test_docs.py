"""The docs against what they describe: docs/config.md against the schema it is generated from,
the README's config snippets against the schema, its links against the files, and its commands
against the checkout (each cheap one is run; the others are named, with what runs them)."""

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from conftest import REPO, SNAKEMAKE, snakemake_env
from neuronmap.config.reference import COMMAND, reference
from neuronmap.config.schema import defaults, validated

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))

# Commands the README shows that this test does not run, and what runs them instead.
NOT_RUN = {
    ".venv/bin/snakemake --workflow-profile profiles/slurm --configfile my.yaml":
        "needs a SLURM cluster and the user's config: tests/test_slurm.py runs the workflow through this profile",
    ".venv/bin/neuronmap atlas --config config.yaml":
        "serves until stopped: tests/test_atlas.py starts the server and queries it",
}


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands() -> list[str]:
    """Each command of the README's ```sh blocks, without its comment."""
    commands = []
    for block in code_blocks(README.read_text(), "sh"):
        for line in block.splitlines():
            command = re.split(r"\s#", line, maxsplit=1)[0].strip()
            if command:
                commands.append(command)
    return commands


def test_config_reference_is_current():
    written = (REPO / "docs" / "config.md").read_text()
    assert written == reference(), f"docs/config.md is stale: regenerate it with `make docs` ({COMMAND})"


def test_config_reference_names_every_key():
    """A row per key, a section per group of keys: what an empty config gets, all of it."""
    text = (REPO / "docs" / "config.md").read_text()

    def missing(config, prefix=""):
        for name, value in config.items():
            if isinstance(value, dict) and value:
                if f"## `{prefix}{name}`" not in text:
                    yield prefix + name
                yield from missing(value, f"{prefix}{name}.")
            elif f"| `{prefix}{name}` |" not in text:
                yield prefix + name

    assert not list(missing(defaults())), f"docs/config.md names none of {list(missing(defaults()))}"


def test_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 170, "the README grew past 170 lines: move detail to docs/"


def test_readme_config_snippets_are_valid():
    """Each ```yaml block of the README is a config: merged over config.yaml, as Snakemake merges
    --configfile, it passes the schema."""
    blocks = code_blocks(README.read_text(), "yaml")
    assert blocks
    for block in blocks:
        config = yaml.safe_load((REPO / "config.yaml").read_text())
        update_config(config, yaml.safe_load(block))
        validated(config)


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: page.name)
def test_links_reach_their_files_and_headings(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in headings(file.read_text()), f"{page.name}: link to {target}: no such heading"


def headings(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in text.splitlines() if line.startswith("#")}


def test_not_run_commands_are_in_the_readme():
    stale = set(NOT_RUN) - set(readme_commands())
    assert not stale, f"NOT_RUN names commands the README no longer shows: {stale}"


def check(command: str) -> tuple[tuple, str | None]:
    """How to check a README command cheaply: the command line to run (empty: nothing to run) and
    the target it asks for, if any. `make run` is run as the Snakemake command it makes, dry;
    another make target is only asked for its recipe (make -n: the target exists; the suite,
    `make docs` and lint run elsewhere); a Snakemake command runs dry; `neuronmap` runs as shown."""
    words = shlex.split(command)
    venv_bin = Path(sys.executable).parent
    dry = ("--dry-run", "--nolock")
    if words[0] == "make":
        recipe = subprocess.run(["make", "-n", "--no-print-directory", *words[1:], f"VENV={venv_bin.parent}"],
                                cwd=REPO, capture_output=True, text=True)
        assert recipe.returncode == 0, f"{command}: {recipe.stderr}"
        if words[1] != "run":
            return (), None
        snakemake = [line for line in recipe.stdout.splitlines() if "/snakemake " in line]
        assert len(snakemake) == 1, f"{command}: expected one snakemake call in\n{recipe.stdout}"
        return (*shlex.split(snakemake[0]), *dry), None
    if words[0] == ".venv/bin/snakemake":
        # A last word after an option's value is a target (`--cores 2 atlas_index`).
        if not words[-1].startswith("-") and not words[-2].startswith("-"):
            return (str(SNAKEMAKE), *words[1:-1], *dry), words[-1]
        return (str(SNAKEMAKE), *words[1:], *dry), None
    if words[0] == ".venv/bin/neuronmap":
        return (str(venv_bin / "neuronmap"), *words[1:]), None
    raise AssertionError(f"README command {command!r}: run it here or list it in NOT_RUN with what runs it")


def test_readme_commands_work_from_the_checkout():
    """Every command of the README, from the checkout: the cheap ones are run (Snakemake dry),
    two at a time; the rest are in NOT_RUN. Snakemake commands that differ only in their target
    are planned in one dry run: parsing the workflow is what costs."""
    commands: dict[tuple, list[str]] = {}  # a command line to run -> the README commands it checks
    targets: dict[tuple, list[str]] = {}
    for command in readme_commands():
        if command not in NOT_RUN:
            argv, target = check(command)
            if argv:
                commands.setdefault(argv, []).append(command)
                targets.setdefault(argv, []).extend([target] if target else [])

    def run(argv):
        argv = [*argv, *targets[argv]]
        return argv, subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=snakemake_env(), timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, commands))
    for shown, (argv, result) in zip(commands.values(), results):
        assert result.returncode == 0, f"{shown}: {shlex.join(argv)}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
