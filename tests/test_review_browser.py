"""The review page in real headless Chromium: keyboard decisions saved, reloaded, and on disk.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them). Without them the
tests skip, except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from catalog_gen.review import decisions as review
from catalog_gen.review import server as review_server
from test_report import XSS, make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not CHROMIUM or not DRIVER:
        return "Chromium or chromedriver not found (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _missing()
    if missing and os.environ.get("CI"):
        pytest.fail(f"browser tests must run under CI: {missing}")
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never reach for the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--window-size=1280,1000",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path)


def wait_for(condition, what: str, timeout: float = 8.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def page_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def images_loaded(driver) -> bool:
    """The plots and the first card's images (the rest load lazily) came through, CSP included."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.plots img, .card:first-of-type img'))"
        ".every(img => img.complete && img.naturalWidth > 0)")


def states(driver) -> dict[str, int]:
    return driver.execute_script(
        "return {approved: document.querySelectorAll('.cand.approved').length,"
        " rejected: document.querySelectorAll('.cand.rejected').length}")


def test_keyboard_review_is_saved_and_survives_reload(browser, run_dir):
    from selenium.webdriver.common.keys import Keys

    server = review_server.serve(run_dir, 0, reviewer="tester")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(server.url)
        mode = "return window.catalogReview && window.catalogReview.mode()"
        wait_for(lambda: browser.execute_script(mode) == "server", "the page to reach the server")
        wait_for(lambda: browser.find_element("id", "reviewer").get_attribute("value") == "tester",
                 "the name given to catalog review --reviewer in the name box")
        press(browser, "a")                          # RG-1 #0 approved; a decision does not move on
        press(browser, "j", "r", "3")                # RG-1 #1 rejected: artefact
        press(browser, "j", "j")                     # RG-1 #2, then the next card: the <script> SKU, #0
        press(browser, "r", "6", "smudge", Keys.ENTER)  # rejected: other, with a note
        press(browser, "j", "a", "u")                # approve #1, then undo it
        wait_for(lambda: browser.execute_script("return window.catalogReview.pending()") == 0, "saves")
        wait_for(lambda: review.load_decisions(run_dir).height == 3, "three rows on disk")

        table = review.load_decisions(run_dir).sort("sku", "candidate")
        expected = [("RG-1", 0, "approve", None, None), ("RG-1", 1, "reject", "artefact", None),
                    (XSS, 0, "reject", "other", "smudge")]
        got = list(zip(table["sku"], table["candidate"], table["decision"], table["reason_code"], table["note"]))
        assert sorted(got, key=str) == sorted(expected, key=str)
        assert set(table["reviewer"]) == {"tester"}
        assert pl.read_csv(run_dir / "decisions.csv").height == 3

        browser.refresh()
        wait_for(lambda: browser.execute_script(mode) == "server", "the reloaded page")
        wait_for(lambda: states(browser) == {"approved": 1, "rejected": 2}, "decisions shown after reload")
        # Progress counts the 5 kept candidates; the three decided here were dropped by the gates.
        assert browser.find_element("id", "progress-text").text == (
            "0 / 5 kept reviewed \u00b7 0 approved \u00b7 0 rejected \u00b7 3 dropped by the gates decided")
        assert "smudge" in browser.execute_script(
            "return document.querySelectorAll('.card')[1].querySelector('.cand .state').textContent")
        assert wait_for(lambda: images_loaded(browser), "images")
        assert page_errors(browser) == []
    finally:
        server.shutdown()
        server.server_close()


def test_static_page_filters_keeps_and_exports_decisions(browser, run_dir, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from catalog_gen.review.report import write_report

    index = write_report(run_dir).index
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    browser.get(index.as_uri())
    assert browser.execute_script("return window.catalogReview.mode()") == "static"
    assert wait_for(lambda: images_loaded(browser), "images from file://")
    visible = ("return window.catalogReport.visibleCandidates()"
               ".map(c => c.closest('.card').dataset.instance + '#' + c.dataset.candidate)")
    Select(browser.find_element("id", "f-instance")).select_by_value("ring/signet")
    assert {v.split("#")[0] for v in browser.execute_script(visible)} == {"ring/signet"}
    Select(browser.find_element("id", "f-instance")).select_by_value("")
    Select(browser.find_element("id", "f-gate")).select_by_value("dino")
    assert len(browser.execute_script(visible)) == 1
    Select(browser.find_element("id", "f-gate")).select_by_value("")
    Select(browser.find_element("id", "f-sort")).select_by_value("clipi:desc")
    first = browser.execute_script("return window.catalogReport.visibleCandidates()[0].dataset.candidate")
    assert first == "2"  # the highest CLIP-I candidate leads

    reviewer = browser.find_element("id", "reviewer")
    reviewer.send_keys("carol", Keys.TAB)
    press(browser, Keys.ESCAPE, "a")
    browser.refresh()  # kept in localStorage
    wait_for(lambda: states(browser) == {"approved": 1, "rejected": 0}, "the decision after reload")

    browser.find_element("id", "export").click()
    exported = wait_for(lambda: [p for p in downloads.glob("*.json")], "the exported file")
    result = review.import_decisions(run_dir, exported[0])
    assert result.applied == 1
    row = review.load_decisions(run_dir).row(0, named=True)
    assert row["decision"] == "approve" and row["reviewer"] == "carol"
    assert page_errors(browser) == []


def test_sort_and_the_score_legend(browser, run_dir):
    from selenium.webdriver.support.ui import Select

    from catalog_gen.review.report import write_report

    browser.get(write_report(run_dir).index.as_uri())
    cards = "return Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden).map(c => c.dataset.sku)"
    sheet_order = browser.execute_script(cards)
    assert Select(browser.find_element("id", "f-sort")).first_selected_option.text == "Sheet order"
    Select(browser.find_element("id", "f-sort")).select_by_visible_text("SKU (A-Z)")
    by_name = browser.execute_script(cards)
    expected = browser.execute_script(
        "return arguments[0].slice().sort((a, b) => a.localeCompare(b, undefined, {numeric: true}))", sheet_order)
    assert by_name == expected != sheet_order
    legend = browser.find_element("css selector", ".legend").get_attribute("textContent")
    assert "CLIP-I" in legend and "DINO" in legend and "prompt" in legend
    assert "reference photos" in browser.find_element("css selector", "table.scores th").get_attribute("title")
    assert page_errors(browser) == []


def test_a_phone_width_page_does_not_scroll_sideways(browser, run_dir):
    from catalog_gen.review.report import write_report

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True})
    try:
        browser.get(write_report(run_dir).index.as_uri())
        width = browser.execute_script("return document.documentElement.clientWidth")
        assert width == 390
        wide = browser.execute_script("return Array.from(document.querySelectorAll('body *')).filter(e => e.getBoundingClientRect().right > 391).map(e => e.tagName + '.' + e.className + '#' + e.id)")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width, wide
        header = browser.execute_script("return document.querySelector('header.top').getBoundingClientRect().height")
        assert header <= 844 / 3, f"the header takes {header:.0f} px of an 844 px screen"
        # Every pass-rate cell can be reached: inside the screen, or inside a table that scrolls by itself.
        reachable = browser.execute_script("""
            return Array.from(document.querySelectorAll('td.rate')).every(td => {
              const table = td.closest('table');
              return td.getBoundingClientRect().right <= innerWidth
                || (getComputedStyle(table).overflowX === 'auto' && table.getBoundingClientRect().right <= innerWidth);
            })""")
        assert reachable
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
