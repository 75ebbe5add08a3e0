"""Turning sections, figures and the atlas into one self-contained HTML file.

The page inlines everything it uses: its stylesheet and script (assets/), the
vega-embed/Vega/Vega-Lite bundle that vl-convert ships, the figures' specs with their data, and
the atlas JSON. The same specs are written as SVG and PNG beside it for papers.
"""

from __future__ import annotations

import html
import importlib.resources
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import altair as alt
import polars as pl
import vl_convert

from ..io.parquet import atomic_path

log = logging.getLogger(__name__)

# The Vega-Lite version altair writes, e.g. "6.4" for "v6.4.1": the page and vl-convert use the same.
VEGA_LITE = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])


def asset(name: str) -> str:
    return (importlib.resources.files("neuronmap.report") / "assets" / name).read_text(encoding="utf-8")


def script_json(value) -> str:
    """JSON that is safe inside <script>: no '<', '>' or '&' can end the element early."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def inline_script(source: str) -> str:
    # A script's text ends at the first "</script"; the bundled libraries must not contain it.
    if "</script" in source.lower():
        raise ValueError("inline script contains </script")
    return source


def note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def table(frame: pl.DataFrame, caption: str | None = None, digits: int = 3) -> str:
    def cell(value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return html.escape(str(value))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in frame.iter_rows())
    title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="data">{title}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


@dataclass
class Page:
    """Collects the page's sections (and their table of contents) and figures in order."""
    title: str
    sections: list[str] = field(default_factory=list)
    figures: list[tuple[str, dict]] = field(default_factory=list)
    toc: list[tuple[str, str]] = field(default_factory=list)

    def add(self, *parts: str) -> None:
        self.sections.extend(parts)

    def section(self, anchor: str, heading: str) -> None:
        self.toc.append((anchor, heading))
        self.sections.append(f'<h2 id="{anchor}">{html.escape(heading)}</h2>')

    def figure(self, name: str, chart: alt.TopLevelMixin, description: str) -> str:
        spec = chart.to_dict()
        self.figures.append((name, spec))
        return (f'<div class="figure" id="figure-{name}" role="img" '
                f'aria-label="{html.escape(description)}"></div>')

    def render(self, data: dict) -> str:
        links = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.toc)
        payload = {**data, "figures": [{"name": name, "spec": spec} for name, spec in self.figures]}
        return (
            "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(self.title)}</title><style>{asset('report.css')}</style></head><body><main>"
            f'<nav class="toc">{links}</nav>{"".join(self.sections)}</main>'
            f'<script type="application/json" id="neuronmap-data">{script_json(payload)}</script>'
            f'<script type="module">{inline_script(vega_bundle())}</script>'
            f'<script type="module">{inline_script(asset("report.js"))}</script>'
            "</body></html>")


def vega_bundle() -> str:
    return vl_convert.javascript_bundle(vl_version=VEGA_LITE)


def write_figures(figures: list[tuple[str, dict]], directory: Path) -> list[Path]:
    """Each figure as <name>.svg and <name>.png (2× scale) for papers and slides."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in figures:
        svg_path, png_path = directory / f"{name}.svg", directory / f"{name}.png"
        with atomic_path(svg_path) as tmp:
            tmp.write_text(vl_convert.vegalite_to_svg(spec, vl_version=VEGA_LITE), encoding="utf-8")
        with atomic_path(png_path) as tmp:
            tmp.write_bytes(vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE, scale=2))
        written += [svg_path, png_path]
    log.info("wrote %d figures to %s", len(figures), directory)
    return written
