"""How big a report is and how fast it opens in headless Chromium (Debian's /usr/bin/chromium).

    .venv/bin/python bench/report.py [results/default/report.html ...] [--runs 5]

For each report: size, and the time from navigation to "every figure and the atlas drawn"
(the page sets body[data-rendered]) over --runs fresh page loads in one browser, measured
both from Python (wall clock) and inside the page (performance.now() at that moment). Prints a
table, then one JSON line with the figures. The acceptance bar is < 10 MB and < 3 s for the
default config's report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from report_browser import browser, open_report, unavailable_reason  # noqa: E402


def measure(path: Path, runs: int) -> dict:
    wall, in_page, atlas_units = [], [], None
    with browser() as context:
        for _ in range(runs):
            with open_report(context, path) as opened:
                page = opened.page
                if page.get_attribute("body", "data-rendered") != "true" or opened.console_errors:
                    raise SystemExit(f"{path}: did not render cleanly: {opened.console_errors}")
                if opened.foreign_requests:
                    raise SystemExit(f"{path}: made requests: {opened.foreign_requests}")
                wall.append(opened.seconds_to_render)
                in_page.append(page.evaluate("performance.now()") / 1000)
                atlas_units = page.evaluate("JSON.parse(document.getElementById('neuronmap-data').textContent)"
                                            ".atlas.site.length")
    return {"report": str(path), "mb": round(path.stat().st_size / 1e6, 3), "atlas_units": atlas_units,
            "runs": runs, "open_s_median": round(statistics.median(wall), 3), "open_s_max": round(max(wall), 3),
            "in_page_s_median": round(statistics.median(in_page), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="*", type=Path, default=[REPO / "results" / "default" / "report.html"])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(reason)
    rows = [measure(path, max(3, args.runs)) for path in args.reports]
    print(f"{'report':60} {'MB':>7} {'units':>6} {'open s (median)':>16} {'max':>6} {'in page':>8}")
    for row in rows:
        print(f"{row['report'][-60:]:60} {row['mb']:7.2f} {row['atlas_units']:6} {row['open_s_median']:16.3f} "
              f"{row['open_s_max']:6.3f} {row['in_page_s_median']:8.3f}")
    print(json.dumps({"bench": "report", "reports": rows}))


if __name__ == "__main__":
    main()
