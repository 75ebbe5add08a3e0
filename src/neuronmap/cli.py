"""The `neuronmap` command: one subcommand per workflow step, called by the Snakemake rules.

Each stage's subcommands live in its own `commands` module (`cmd_<name>` runs one, `args_<name>`
declares its arguments, `SETTINGS` names the settings it reads); this module only dispatches,
importing the stage of the command that is called and nothing else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from .errors import NeuronmapError

log = logging.getLogger("neuronmap")

# command -> the stage subpackage that holds it (and the rules file that calls it)
COMMANDS = {
    "prepare-model": "prepare", "prepare": "prepare", "merge-prompts": "prepare", "prepare-languages": "prepare",
    "extract": "extract", "neuron-stats": "extract", "calibrate": "extract",
    "stats-block": "stats", "stats": "stats", "overlap": "stats", "shared-units": "stats", "decode": "stats",
    "sparsity": "stats", "labeling-block": "stats", "versatility": "stats", "stability": "stats",
    "baseline": "ablate", "ablate": "ablate", "ablation-summary": "ablate", "verdicts": "ablate",
    "report": "report", "cost": "report",
    "plan": "plan",
    "corpus-contexts": "corpus", "corpus-records": "corpus", "corpus-merge": "corpus",
    "label-select": "labels", "label-perplexity": "labels",
    "atlas-index": "atlas", "atlas": "atlas",
    "explain-units": "explain", "explain": "explain", "explain-score": "explain", "explain-merge": "explain",
}


def stage_module(command: str):
    return importlib.import_module(f"neuronmap.{COMMANDS[command]}.commands")


def function_name(prefix: str, command: str) -> str:
    return f"{prefix}_{command.replace('-', '_')}"


def build_parser(commands=tuple(COMMANDS)) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronmap", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands:
        module = stage_module(command)
        run = getattr(module, function_name("cmd", command))
        p = sub.add_parser(command, help=run.__doc__)
        settings = module.SETTINGS.get(command)
        if settings is not None:
            p.add_argument("--settings", required=True, type=settings.from_json, metavar="JSON",
                           help=f"the command's settings: {settings.__name__} as JSON (the rule builds it from "
                                "the validated config)")
        getattr(module, function_name("args", command))(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    called = argv[:1] if argv[:1] and argv[0] in COMMANDS else tuple(COMMANDS)
    args = build_parser(called).parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        args.func(args)
    except NeuronmapError as exc:
        print(f"neuronmap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    log.info("%s done in %.1f s", args.command, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
