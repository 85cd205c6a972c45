"""The demo page in a real headless Chromium, against the demo under gunicorn (as ``make demo``).

Click "Download" on a game, watch the page prepare it, click the "Save" link it then shows, and
check the file that lands in the browser's download folder, byte for byte; then a second game
from the same page, two games prepared at the same time, and a game that cannot be prepared. A
screenshot of the page, taken once a download is ready, is kept in test-artifacts/demo-page.png.

Chromium lets a page start one download by itself, then drops the next ones until the user acts
again. The browser here keeps that limit (see ``browser``), so a page that started downloads from
script would lose one of them, and these tests would see it.
"""

from __future__ import annotations

import shutil
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .clients import unavailable
from .demo_server import DemoServer
from .servers import PROJECT
from .test_examples import expected_entries

pytestmark = pytest.mark.server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = PROJECT / "test-artifacts" / "demo-page.png"
GAME = "Commander Keen"
SECOND_GAME = "Ōkami Fan Edition"
DEADLINE = 60  # seconds for the download to be prepared and land on disk

# The network is closed: nothing may try to reach out (updates, sync, safe browsing lists).
CHROME_ARGUMENTS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,800",
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """A headless Chromium driven by the system chromedriver, and its download folder."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        unavailable(
            f"a headless browser test needs {' and '.join(missing)} (Debian: chromium, chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("a headless browser test needs selenium (pip install selenium)")

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in [*CHROME_ARGUMENTS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
            "safebrowsing.enabled": True,
        },
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    # Downloads go to the folder by the preferences above alone. Not DevTools'
    # Browser.setDownloadBehavior: it lifts Chromium's limit on downloads a page starts by itself
    # and overwrites a file downloaded twice, so it would hide both from these tests.
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver, downloads
    finally:
        driver.quit()  # Chromium and chromedriver both


def wait_until(predicate: Any, what: str, timeout: float = DEADLINE) -> Any:
    """Poll ``predicate`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def finished_download(downloads: Path, name: str) -> Path | None:
    """``name`` once Chromium is done with it: no partial file left, and the size holding still."""
    target = downloads / name
    if list(downloads.glob("*.crdownload")) or not target.exists():
        return None
    size = target.stat().st_size
    time.sleep(0.3)
    return target if size > 0 and target.stat().st_size == size else None


def png_image(path: Path) -> tuple[int, int, int]:
    """Width, height and the number of distinct byte values of the pixel data of a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, width, height, pixels = 8, 0, 0, b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            pixels += body
        position += 12 + length
    return width, height, len(set(zlib.decompress(pixels)))


def downloaded(downloads: Path) -> list[str]:
    return sorted(path.name for path in downloads.iterdir())


def ready_link(row: Any) -> Any:
    """The "Save" link the row shows once its download is prepared."""
    from selenium.webdriver.common.by import By

    return wait_until(lambda: row.find_elements(By.CSS_SELECTOR, ".status a.ready"), "the Save link")[0]


def prepare(row: Any) -> Any:
    """Click the row's "Download" and wait for the page to offer the prepared download; its link."""
    from selenium.webdriver.common.by import By

    button = row.find_element(By.CSS_SELECTOR, "button.download")
    status = row.find_element(By.CSS_SELECTOR, ".status")
    button.click()
    assert not button.is_enabled()  # while the request runs
    assert status.text == "Preparing…"
    link = ready_link(row)
    assert button.is_enabled()
    assert row.get_attribute("data-state") == "ready"
    return link


def save(link: Any, downloads: Path, name: str) -> Path:
    """Click a Save link: exactly one new file, ``name``, lands in the download folder."""
    before = downloaded(downloads)
    assert name not in before
    link.click()
    saved = wait_until(lambda: finished_download(downloads, name), f"the download of {name}")
    assert downloaded(downloads) == sorted([*before, name])  # one file per click, and no other
    return saved


def zip_entries(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as opened:
        assert opened.testzip() is None
        return {info.filename: opened.read(info) for info in opened.infolist()}


def test_download_two_games_in_a_row_in_the_browser(browser: tuple[Any, Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver, downloads = browser
    data = tmp_path / "data"
    with DemoServer(data, prepare_seconds=1, poll_seconds=0.5) as demo:
        driver.get(demo.url + "/")
        assert driver.title == "Game library"
        rows = driver.find_elements(By.CSS_SELECTOR, "tr[data-game]")
        assert [row.get_attribute("data-game") for row in rows] == sorted(
            ["Commander Keen", "Doom (1993)", "Megalith", "Quake", "Ōkami Fan Edition"]
        )
        row = driver.find_element(By.CSS_SELECTOR, f'tr[data-game="{GAME}"]')
        assert row.find_element(By.CSS_SELECTOR, ".size").text == "400.0 KiB"
        assert row.find_element(By.CSS_SELECTOR, ".files").text == "4"
        assert row.find_element(By.CSS_SELECTOR, ".status").text == ""

        link = prepare(row)
        assert link.text == f"Save {GAME}.zip"
        assert link.get_attribute("href").startswith(demo.url + "/download/")
        assert downloaded(downloads) == []  # the page starts no download by itself
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.unlink(missing_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))
        archive = save(link, downloads, f"{GAME}.zip")

        # A second game from the same page load, saved the same way.
        okami = driver.find_element(By.CSS_SELECTOR, f'tr[data-game="{SECOND_GAME}"]')
        link = prepare(okami)
        assert link.text == f"Save {SECOND_GAME}.zip"
        second = save(link, downloads, f"{SECOND_GAME}.zip")

        # A game whose folder vanished: preparing it fails, and the page says so (and nothing more).
        shutil.rmtree(data / "games" / "Quake")
        quake = driver.find_element(By.CSS_SELECTOR, 'tr[data-game="Quake"]')
        quake.find_element(By.CSS_SELECTOR, "button.download").click()
        error = wait_until(
            lambda: quake.find_elements(By.CSS_SELECTOR, ".status .error"), "the error message"
        )[0]
        assert error.text == "This download could not be prepared. Please try again later."
        assert quake.get_attribute("data-state") == "failed"
        assert not quake.find_elements(By.CSS_SELECTOR, "a.ready")
        assert downloaded(downloads) == sorted([f"{GAME}.zip", f"{SECOND_GAME}.zip"])
        problems = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert problems == [], problems

    entries = zip_entries(archive)
    assert sorted(entries) == ["KEEN1.EXE", "data/LEVEL01.CK1", "data/LEVEL02.CK1", "data/gfx/EGAGRAPH.CK1"]
    assert entries == expected_entries(data / "games" / GAME)
    entries = zip_entries(second)
    assert sorted(entries) == ["data/brushes/sumi-e.pak", "data/music/title.ogg", "okami.exe"]
    assert entries == expected_entries(data / "games" / SECOND_GAME)

    width, height, values = png_image(SCREENSHOT)
    assert (width, height) >= (800, 400)
    assert values > 16, "the screenshot is blank"


def test_games_prepared_at_the_same_time_are_both_saved(browser: tuple[Any, Path], tmp_path: Path) -> None:
    """Two games asked for before either is ready: had the page started each download itself,
    the second would come with no click since the first, and Chromium would drop it."""
    from selenium.webdriver.common.by import By

    driver, downloads = browser
    data = tmp_path / "data"
    games = {"Doom (1993)": "DOOM.ZIP", "Quake": "quake.iso"}  # each sent as its one file
    with DemoServer(data, prepare_seconds=1, poll_seconds=0.5) as demo:
        driver.get(demo.url + "/")
        rows = [driver.find_element(By.CSS_SELECTOR, f'tr[data-game="{game}"]') for game in games]
        for row in rows:
            row.find_element(By.CSS_SELECTOR, "button.download").click()
        links = [ready_link(row) for row in rows]
        assert [link.text for link in links] == [f"Save {name}" for name in games.values()]
        assert downloaded(downloads) == []  # the page starts no download by itself
        saved = [save(link, downloads, name) for link, name in zip(links, games.values(), strict=True)]
        problems = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert problems == [], problems

    for path, (game, name) in zip(saved, games.items(), strict=True):
        assert path.read_bytes() == (data / "games" / game / name).read_bytes()
