"""The atlas, statically and in a real headless Chromium, from file:// and from a 127.0.0.1 server.

The export comes from the real pipeline (tiny model with statistics, samples and a bottom-2,
originals with hostile ids such as `files/<script>window.pwned=1;</script>.png`). A browser test
fails on any console error or page error, on an image that does not load once scrolled into view,
and if any id's HTML ran. Unit pages must show the histogram, the overlays and masks, the samples
by band and the bottom, with images that load.
"""

from __future__ import annotations

import functools
import html
import http.server
import os
import shutil
import threading
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest

from originals import ONERROR_ID, SCRIPT_ID, make_originals
from pipeline.config import IndexConfig
from pipeline.export.run import export
from pipeline.index.run import index
from pipeline.progress import Progress

pytestmark = pytest.mark.usefixtures("ray_local")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
LAYERS = ("conv2", "fc")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """An exported tiny-model index of hostile-named originals; returns OUT/export."""
    root = tmp_path_factory.mktemp("atlas")
    data = make_originals(root)
    out = root / "out"
    cfg = IndexConfig(
        model="tiny_models:tiny", data=str(data), layers=LAYERS, out=str(out),
        workers=2, batch_size=4, shard_size=6, bottom=2,
    )  # fmt: skip
    index(cfg, Progress(quiet=True))
    export(str(out), progress=Progress(quiet=True))
    return out / "export"


class Page(HTMLParser):
    """Collects tags, attributes, ids and text of one page."""

    def __init__(self, path: Path):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self.ids.add(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)


UNITS = {"conv2": 6, "fc": 5}


def pages(site: Path) -> list[Path]:
    return sorted((site / "atlas").glob("*.html"))


def test_one_page_per_layer_and_unit_and_every_link_resolves_inside_the_export(site):
    names = [p.name for p in pages(site)]
    units = [f"unit-{layer}-{u}.html" for layer, count in UNITS.items() for u in range(count)]
    assert names == sorted(["index.html", "layer-conv2.html", "layer-fc.html", *units])
    for page_path in pages(site):
        page = Page(page_path)
        for _, attrs in page.tags:
            for key in ("href", "src"):
                if key not in attrs or attrs[key] == "data:,":  # the empty favicon
                    continue
                parsed = urllib.parse.urlsplit(attrs[key])
                assert not parsed.scheme and not parsed.netloc, attrs[key]
                if not parsed.path:
                    assert parsed.fragment in page.ids, attrs[key]
                    continue
                target = (page_path.parent / urllib.parse.unquote(parsed.path)).resolve()
                assert target.is_file() and target.is_relative_to(site.resolve()), attrs[key]


def test_images_are_lazy_and_there_is_no_script(site):
    for page_path in pages(site):
        page = Page(page_path)
        images = [attrs for tag, attrs in page.tags if tag == "img"]
        assert images and all(attrs.get("loading") == "lazy" for attrs in images)
        assert all(tag != "script" for tag, _ in page.tags)
        assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)


def test_hostile_image_ids_are_text(site):
    source = "".join(p.read_text(encoding="utf-8") for p in pages(site))
    text = "".join("".join(Page(p).text) for p in pages(site))
    for image_id in (SCRIPT_ID, ONERROR_ID):
        assert html.escape(image_id) in source and image_id in text
    units = [p for p in pages(site) if p.name.startswith("unit-")]
    on_units = "".join("".join(Page(p).text) for p in units)
    assert SCRIPT_ID in on_units or ONERROR_ID in on_units  # unit pages escape them too


def test_a_unit_page_has_stats_histogram_overlays_masks_samples_and_bottom(site):
    page = Page(site / "atlas" / "unit-conv2-0.html")
    text = "".join(page.text)
    assert {"stats", "top", "samples", "bottom"} <= page.ids
    assert "fire rate" in text and "mean" in text and "p99" in text and "Band p50" in text
    tags = [tag for tag, _ in page.tags]
    assert tags.count("svg") == 1 and tags.count("rect") >= 1
    classes = [attrs.get("class") for tag, attrs in page.tags if tag == "img"]
    assert classes.count("patch") == classes.count("overlay") == classes.count("mask") > 9
    assert classes.count("grid") == 1


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI; .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (CI installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(site):
    """A static server on 127.0.0.1 over the export folder; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def loaded(page, image) -> None:
    """Scroll a lazy image into view and wait until it has decoded pixels."""
    image.scroll_into_view_if_needed()
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=image.element_handle())


def visit(browser, url: str) -> list[str]:
    """Open the atlas at `url`, follow each layer link, load every grid; return the problems."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.goto(url + "atlas/index.html")
    assert page.locator("h1").inner_text() == "ninebest atlas"
    loaded(page, page.locator("img").first)  # filters.png
    links = page.locator("table a")
    assert links.all_inner_texts() == list(LAYERS)
    for layer in LAYERS:
        page.goto(url + "atlas/index.html")
        page.get_by_role("link", name=layer, exact=True).click()
        assert page.locator("h1").inner_text() == f"Layer {layer}"
        grids = page.locator("img.grid")
        assert grids.count() == UNITS[layer]
        for i in range(grids.count()):
            loaded(page, grids.nth(i))
        shown = page.locator("td.id bdi").all_inner_texts()
        assert SCRIPT_ID in shown or ONERROR_ID in shown
        assert page.evaluate("window.pwned") is None
        assert page.locator("script").count() == 0 and page.locator("img[src=x]").count() == 0
    page.goto(url + "atlas/layer-conv2.html")
    page.locator("a.unit-page").first.click()
    visit_unit(page)
    page.close()
    return problems


def visit_unit(page) -> None:
    """A unit page shows its histogram, and its overlays, masks, samples and bottom load."""
    assert page.locator("h1").inner_text() == "Layer conv2, unit 0"
    assert "fire rate" in page.locator("p.stats").inner_text()
    histogram = page.locator("svg.histogram")
    histogram.scroll_into_view_if_needed()
    box = histogram.bounding_box()
    assert box is not None and box["width"] > 100 and box["height"] > 50
    assert page.locator("svg.histogram rect").count() >= 1
    bars = page.locator("svg.histogram rect").evaluate_all(
        "rects => rects.filter(r => r.getBBox().height > 0).length"
    )
    assert bars >= 1
    for where in ("#top img.overlay", "#top img.mask", "#samples img", "#bottom img"):
        images = page.locator(where)
        assert images.count() > 0, where
        for i in range(images.count()):
            loaded(page, images.nth(i))
    assert page.locator("#samples h3").count() >= 1
    assert page.locator("#bottom figure").count() == 2
    assert page.evaluate("window.pwned") is None and page.locator("script").count() == 0


def test_atlas_from_file_url(site, browser):
    assert visit(browser, site.resolve().as_uri() + "/") == []


def test_atlas_from_a_static_server(site, browser, server):
    assert visit(browser, server) == []
