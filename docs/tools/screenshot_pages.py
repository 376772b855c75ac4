"""The docs' release check: build the site, serve it on loopback, and take a screenshot of every page in headless
Chromium (Debian's ``chromium`` package; no browser download), failing on a page that does not render, that
logs a console error, or that asks for a file the site does not have.

    python docs/tools/screenshot_pages.py --out site-shots     # then look at site-shots/*.png

A page fails when Chromium exits with an error, when its screenshot is nearly blank (a page that did not
render), or when it logs a console error (a missing script, image or stylesheet, a JavaScript exception).
Nothing leaves the machine: the server listens on 127.0.0.1, and Chromium runs with its background
networking off.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
    "--enable-logging=stderr", "--v=0",
)  # fmt: skip
_CONSOLE = re.compile(r"CONSOLE[:(]\d+\)?\] \"(.*?)\", source: (\S*)")
MISSING: list[str] = []  # what the pages asked the server for and did not get (a missing image, script, ...)


class _Server(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # one line per request would bury the report
        pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if str(code).isdigit() and int(code) >= 400:
            MISSING.append(f"{code} {self.path}")


def pages(site: Path) -> list[str]:
    """Every page of a built site, as its URL path (``/``, ``quickstart/``, ...)."""
    found = []
    for index in sorted(site.rglob("index.html")):
        relative = index.parent.relative_to(site).as_posix()
        if relative.startswith(("assets", "search")):
            continue
        found.append("/" if relative == "." else f"/{relative}/")
    return found


def blank(png: Path) -> bool:
    """Whether a screenshot is (nearly) one colour: a page that did not render."""
    from PIL import Image

    with Image.open(png) as image:
        colours = image.convert("RGB").resize((256, 256)).getcolors(maxcolors=1 << 16) or []
    return len(colours) < 8


def console_errors(stderr: str) -> list[str]:
    """What the page wrote to its console (a built MkDocs page writes nothing): errors, failed loads."""
    return [f"{message} ({source})" for message, source in _CONSOLE.findall(stderr)]


def shoot(chromium: str, url: str, png: Path, profile: Path, width: int, height: int) -> tuple[bool, str]:
    command = [
        chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
        "--virtual-time-budget=3000", f"--screenshot={png}", url,
    ]  # fmt: skip
    MISSING.clear()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not png.is_file():
        return False, f"chromium exited {done.returncode}: {done.stderr.strip()[-300:]}"
    if blank(png):
        return False, "the screenshot is blank: the page did not render"
    errors = console_errors(done.stderr) + [f"not found: {m}" for m in MISSING]
    if errors:
        return False, "console: " + "; ".join(errors)[:500]
    return True, "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("site-shots"), help="Folder for the screenshots.")
    parser.add_argument("--site", type=Path, default=None, help="A built site to use (default: build one).")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1600)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args(argv)
    if shutil.which(args.chromium) is None:
        print(f"no {args.chromium!r}: install Debian's chromium package (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="retool-shots-") as scratch:
        site = args.site
        if site is None:
            site = Path(scratch) / "site"
            subprocess.run(
                [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
                cwd=ROOT, check=True,
            )  # fmt: skip
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Server, directory=str(site)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        args.out.mkdir(parents=True, exist_ok=True)
        failed = 0
        listed = pages(site)
        try:
            for path in listed:
                name = path.strip("/").replace("/", "-") or "index"
                ok, detail = shoot(
                    args.chromium, base + path, args.out / f"{name}.png", Path(scratch) / "profile", args.width,
                    args.height,
                )  # fmt: skip
                failed += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {path:<28} {detail if not ok else args.out / f'{name}.png'}")
        finally:
            server.shutdown()
    print(f"{failed} of {len(listed)} pages failed" if failed else f"all {len(listed)} pages rendered")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
