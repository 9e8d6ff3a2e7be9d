"""The gallery in a real browser: headless Chromium (Debian's, through Selenium and the
system chromedriver, nothing downloaded) against a real server over the ingested corpus."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageChops
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from asset_library import Library
from asset_library.layout import atomic_path
from asset_library.serve import ServeSettings, create_app
from asset_library_tests.support.http_server import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "gallery.png"
FOREST = "github_jenssegers_imagehash/forest/forest-high.jpg"

#: True once every image on the page has loaded and decoded to real pixels.
ALL_LOADED = """return [...document.querySelectorAll(arguments[0] + ' img')]
    .every(img => img.complete && img.naturalWidth > 0)"""


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            f"{CHROMIUM} or {CHROMEDRIVER} missing: `make install` installs Debian's chromium "
            "and chromium-driver",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(corpus_library, tmp_path_factory) -> Iterator[LiveServer]:
    cache = tmp_path_factory.mktemp("gallery-cache")
    with LiveServer(create_app(ServeSettings(library=corpus_library[0], cache_dir=cache))) as live:
        yield live


def _tiles(driver: webdriver.Chrome, css: str) -> list[str]:
    """The md5s the page's tiles link to, in order."""
    links = driver.find_elements(By.CSS_SELECTOR, f"{css} a.tile")
    return [link.get_attribute("href").rsplit("/", 1)[-1] for link in links]


def test_an_upload_shows_its_near_duplicates_as_thumbnails(
    browser, server, corpus_library, corpus_dir
):
    library = Library(corpus_library[0])
    browser.get(server.url + "/")
    assert "Search" in browser.title
    photo = corpus_dir / FOREST
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: _tiles(d, "#results"))
    wait.until(lambda d: d.execute_script(ALL_LOADED, "#results"))
    expected = [r["md5"] for r in library.similar(photo.read_bytes(), limit=60)]
    assert _tiles(browser, "#results") == expected and len(expected) >= 5
    widths = browser.execute_script(
        "return [...document.querySelectorAll('#results img')].map(i => i.naturalWidth)"
    )
    assert len(widths) == len(expected) and all(0 < w <= 256 for w in widths)
    badges = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#results .badge")]
    assert badges[0] == "0 bits"
    assert "near forest-high.jpg" in browser.find_element(By.ID, "status").text
    _save_screenshot(browser)


def test_a_group_page_shows_its_members(browser, server, corpus_library):
    library = Library(corpus_library[0])
    groups = library.near_duplicate_groups()
    number = next(n for n, group in enumerate(groups) if len(group) <= 6)
    browser.get(f"{server.url}/groups")
    browser.find_element(By.LINK_TEXT, f"Group {number}").click()
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(ALL_LOADED, "#members"))
    assert browser.current_url.endswith(f"/groups/{number}")
    assert sorted(_tiles(browser, "#members")) == sorted(groups[number])


def test_an_md5_looked_up_opens_its_page(browser, server, corpus_library):
    md5 = Library(corpus_library[0]).near_duplicate_groups()[0][0]
    browser.get(server.url + "/rejected")
    assert browser.find_elements(By.CSS_SELECTOR, "table.list tbody tr")
    box = browser.find_element(By.NAME, "md5")
    box.send_keys(md5.upper())
    box.submit()
    WebDriverWait(browser, 30).until(lambda d: d.current_url.endswith(f"/view/{md5}"))
    assert browser.find_element(By.TAG_NAME, "h1").text == md5
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(ALL_LOADED, ".record"))


def _save_screenshot(driver: webdriver.Chrome) -> None:
    """The search page with its results, for the README: palette PNG, kept under 300 KB."""
    with Image.open(io.BytesIO(driver.get_screenshot_as_png())) as shot:
        small = shot.convert("RGB").quantize(colors=192, method=Image.Quantize.MEDIANCUT)
        out = io.BytesIO()
        small.save(out, "PNG", optimize=True)
    assert len(out.getvalue()) < 300_000
    if SCREENSHOT.exists() and _same_picture(SCREENSHOT, small):
        return  # rendering noise only: leave the committed file alone
    with atomic_path(SCREENSHOT) as temp:
        temp.write_bytes(out.getvalue())


def _same_picture(path: Path, image: Image.Image) -> bool:
    """Whether at most 0.1% of the pixels differ (anti-aliasing changes from run to run)."""
    with Image.open(path) as saved:
        if saved.size != image.size:
            return False
        diff = ImageChops.difference(saved.convert("RGB"), image.convert("RGB")).convert("L")
    changed = sum(diff.point(lambda v: 255 if v > 24 else 0).histogram()[255:])
    return changed <= image.width * image.height / 1000
