"""Each setting is declared once: the schema holds every default, the code none that disagrees."""

import ast
import dataclasses

import pytest

from neuronmap import cli
from neuronmap.config import schema
from neuronmap.config.settings import config_key, lookup, settings_classes
from conftest import REPO


def schema_leaves(node: dict, prefix: str = "") -> dict[str, dict]:
    """Every key of the config schema, dotted, with its schema."""
    leaves = {}
    for name, sub in node.get("properties", {}).items():
        key = f"{prefix}{name}"
        leaves[key] = sub
        leaves.update(schema_leaves(sub, key + "."))
    return leaves


LEAVES = schema_leaves(schema.load_schema())
DEFAULTS = schema.defaults()


def all_settings():
    for command in cli.COMMANDS:
        cli.stage_module(command)  # import every stage's settings
    return settings_classes()


def test_every_command_with_settings_builds_them_from_the_default_config():
    for command in cli.COMMANDS:
        settings = cli.stage_module(command).SETTINGS.get(command)
        if settings is not None:
            built = settings.from_config(DEFAULTS)
            assert type(built).from_json(built.to_json()) == built, command


def test_settings_fields_name_schema_keys_and_have_no_defaults():
    for cls in all_settings():
        for field in dataclasses.fields(cls):
            if isinstance(field.type, str) and field.type.endswith("Settings"):
                continue
            assert config_key(field) in LEAVES, f"{cls.__name__}.{field.name}: no key {config_key(field)}"
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, \
                f"{cls.__name__}.{field.name} has a default: the schema is the one place defaults live"


def test_command_line_options_carry_no_setting():
    """Settings reach a command as --settings JSON only: no option of its own repeats one."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    setting_names = {key.rsplit(".", 1)[-1].replace("_", "-") for key, sub in LEAVES.items() if sub.get("type") != "object"}
    for name, sub in commands.items():
        for action in sub._actions:
            option = next((o for o in action.option_strings if o.startswith("--")), None)
            # A path option may share a key's name (--top-activations, the file); a setting has a
            # value type or a default.
            is_value = action.default is not None or action.type not in (None, str)
            if option and option[2:] in setting_names and is_value:
                pytest.fail(f"neuronmap {name} {option}: a setting as an option; it belongs in --settings")


def literal_defaults(tree: ast.AST):
    """(name, default) of every function parameter and class field with a literal default."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                yield arg.arg, default, node.lineno
        elif isinstance(node, ast.ClassDef):
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and statement.value is not None \
                        and isinstance(statement.target, ast.Name):
                    yield statement.target.id, statement.value, statement.lineno


# Names of config keys that the code also uses for other things (a tensor's dtype and device, the
# value a deactivated unit is set to).
GENERIC = {"value", "dtype", "device", "model", "text", "dir", "source", "names"}


def test_no_default_in_the_code_disagrees_with_the_schema():
    """A parameter or field named like a config key (its last part, where that is unambiguous)
    with a literal default other than None must default to the schema's value."""
    by_name: dict[str, set] = {}
    for key, sub in LEAVES.items():
        if "default" in sub and sub.get("type") != "object":
            by_name.setdefault(key.rsplit(".", 1)[-1], set()).add(repr(lookup(DEFAULTS, key)))
    unambiguous = {name: values.pop() for name, values in by_name.items() if len(values) == 1}
    problems = []
    for path in sorted((REPO / "src" / "neuronmap").rglob("*.py")):
        for name, default, line in literal_defaults(ast.parse(path.read_text())):
            if name not in unambiguous or name in GENERIC:
                continue
            try:
                value = ast.literal_eval(default)
            except ValueError:
                continue
            if value is None:
                continue
            value = list(value) if isinstance(value, tuple) else value
            if repr(value) != unambiguous[name]:
                problems.append(f"{path.relative_to(REPO)}:{line}: {name}={value!r}, schema {unambiguous[name]}")
    assert not problems, "\n".join(problems)


def test_the_schema_ships_inside_the_package():
    """The package finds its schema beside its own modules, so an installed package finds it as
    a checkout does: it is package data, listed in pyproject.toml."""
    import tomllib
    package, path = (REPO / "src" / "neuronmap").resolve(), schema.SCHEMA_PATH.resolve()
    assert path.is_file() and path.is_relative_to(package)
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["neuronmap"]
    assert path.relative_to(package).as_posix() in listed
