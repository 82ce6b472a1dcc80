"""Open the built docs site in headless Chromium (``make docs-check``).

Serves ``site/`` over HTTP on a free local port, renders the home page and the configuration
reference with headless Chromium (``--dump-dom``, so the checks see the page after its scripts
ran), checks that the navigation holds every top-level section and that the search index exists
and covers the pages, and writes a screenshot of the home page. Exits 1 with one line per
problem; prints what it checked otherwise.

Usage: ``python docs/check_site.py SITE_DIR [--screenshot PNG]``.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PAGES = {"home": "", "configuration reference": "reference/configuration/"}
"""Pages rendered (name -> path under the site root)."""


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("error: no Chromium found (tried " + ", ".join(BROWSERS) + "); install the chromium package")


def _chromium(browser: str, *args: str, timeout: float = 120) -> str:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: {Path(browser).name} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return done.stdout


def _serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # noqa: D102 - silence the access log
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def _nav_titles() -> list[str]:
    """The top-level section titles of mkdocs.yml's nav."""
    # mkdocs.yml holds a !!python tag (the slugify function); a loader that ignores tags is enough
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    config = yaml.load((REPO / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506
    return [next(iter(entry)) for entry in config["nav"]]


def check(site: Path, screenshot: Path | None) -> list[str]:
    """Run the checks on the built ``site``; returns the problems (empty: all good)."""
    problems: list[str] = []
    if not (site / "index.html").is_file():
        return [f"{site}/index.html is missing: run `make docs` first"]
    index = site / "search" / "search_index.json"
    if not index.is_file():
        problems.append(f"the search index {index} is missing (is the search plugin on?)")
    else:
        docs = json.loads(index.read_text(encoding="utf-8")).get("docs", [])
        locations = {d.get("location", "").split("#")[0] for d in docs}
        for path in PAGES.values():
            if path not in locations:
                problems.append(f"the search index has no entry for /{path}")
        print(f"search index: {len(docs)} entries over {len(locations)} pages")

    browser = _browser()
    server, root = _serve(site)
    try:
        titles = _nav_titles()
        for name, path in PAGES.items():
            dom = _chromium(browser, "--dump-dom", root + path)
            if 'class="md-nav' not in dom:
                problems.append(f"{name}: no navigation rendered")
            missing = [t for t in titles if t not in dom]
            if missing:
                problems.append(f"{name}: the navigation lacks {', '.join(missing)}")
            if "md-search__input" not in dom:
                problems.append(f"{name}: no search box rendered")
            print(f"rendered {name} ({root}{path}): {len(dom)} characters of DOM")
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            _chromium(browser, f"--screenshot={screenshot.resolve()}", "--window-size=1280,900", root)
            if not screenshot.is_file() or screenshot.stat().st_size == 0:
                problems.append(f"no screenshot written to {screenshot}")
            else:
                print(f"screenshot of the home page: {screenshot}")
    finally:
        server.shutdown()
    return problems


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("site", type=Path, help="the built site (site/)")
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG of the home page to write")
    args = parser.parse_args()
    problems = check(args.site, args.screenshot)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print("docs site OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
