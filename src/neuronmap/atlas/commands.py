"""`neuronmap` subcommands of the atlas: the index of every unit (rule atlas_index), and the
server over it (`neuronmap atlas`, run by hand: no rule calls it)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("neuronmap")

# Neither takes --settings: the index reads no setting, and the server is started by hand with a
# config file or a run's folder (AtlasSettings is read from the one, or the schema's defaults).
SETTINGS: dict = {}

SOURCES = ("units", "examples", "peak_tokens", "neuron_stats", "decoded", "label_records", "label_units",
           "label_expertise", "explanations", "explain_scores")


def cmd_atlas_index(args) -> None:
    """the atlas's index: one row per unit with every stage's numbers"""
    from ..errors import NeuronmapError
    from .index import AtlasSources, build_index, write_index
    if args.run is not None:
        out = Path(args.out) if args.out else Path(args.run) / "atlas" / "units.parquet"
        sources = AtlasSources.found_in(Path(args.run))
    else:
        if not args.out:
            raise NeuronmapError("atlas-index: --out is needed with the files given one by one (or give --run)")
        out = Path(args.out)
        given = {name: _one(name, getattr(args, name)) for name in SOURCES}
        expertise = {Path(p).name.removesuffix(".parquet"): Path(p) for p in args.expertise or []}
        sources = AtlasSources(**given, expertise=expertise)
    for name in ("examples", "label_expertise", "explain_scores"):  # read by the cards too: say now if missing
        path = getattr(sources, name)
        if path is not None and not Path(path).is_file():
            raise NeuronmapError(f"{path}: file not found")
    index, metadata = build_index(sources)
    write_index(index, metadata, out, sources)
    log.info("atlas index %s: %d units from %s statistics; %d relations, %d labels", out, index.height,
             metadata["records"], len(metadata["relations"]), len(metadata["labels"]))


def _one(name: str, paths: list[str] | None) -> Path | None:
    from ..errors import NeuronmapError
    if paths and len(paths) > 1:
        raise NeuronmapError(f"atlas-index: --{name.replace('_', '-')} takes one file (got {len(paths)})")
    return Path(paths[0]) if paths else None


def args_atlas_index(p) -> None:
    p.add_argument("--run", help="a finished run's folder: index whatever files it has (instead of the files below)")
    for name in SOURCES:
        # nargs="*": the rule passes every option, empty where the stage did not run.
        p.add_argument(f"--{name.replace('_', '-')}", nargs="*", metavar="PATH")
    p.add_argument("--expertise", nargs="*", metavar="PATH",
                   help="expertise/<relation>.parquet of each relation")
    p.add_argument("--out", help="default with --run: <run>/atlas/units.parquet")


def cmd_atlas(args) -> None:
    """serve a run's atlas of every unit on a local web page"""
    import yaml

    from ..config.schema import validated
    from ..errors import NeuronmapError
    from .server import serve
    from .settings import AtlasSettings
    if args.config is not None:
        try:
            config = validated(yaml.safe_load(Path(args.config).read_text()) or {})
        except FileNotFoundError:
            raise NeuronmapError(f"{args.config}: file not found") from None
        settings = AtlasSettings.from_config(config)
        run = Path(args.run) if args.run else Path("results") / config["run"]
    else:
        if args.run is None:
            raise NeuronmapError("atlas: give --run results/<run> or --config <config.yaml>")
        settings, run = AtlasSettings.defaults(), Path(args.run)
    host = args.host or settings.host
    port = settings.port if args.port is None else _port(args.port)
    serve(run, host, port)


def _port(text: str) -> int:
    from ..errors import NeuronmapError
    if not text.isdigit() or int(text) > 65535:
        raise NeuronmapError(f"atlas: --port must be 0..65535 (got {text!r})")
    return int(text)


def args_atlas(p) -> None:
    p.add_argument("--run", help="the run's folder, results/<run> (default with --config: results/<its run>)")
    p.add_argument("--config", help="the run's config file: its run, and atlas.host / atlas.port")
    # Overrides of atlas.host / atlas.port, parsed here (not by argparse) so that a value not given
    # is told apart from the config's.
    p.add_argument("--host", help="address to listen on (default atlas.host)")
    p.add_argument("--port", help="port to listen on, 0 for a free one (default atlas.port)")
