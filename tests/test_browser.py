"""The web page end to end in headless Chromium: upload, paste, the answer and its rendering."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator

import pytest
from PIL import Image

from data.layout import IMAGES_DIR
from tests.test_serve import serve_process

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver; .ci/install adds them in CI)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
                  "--window-size=1100,1000"]
# A paste as the browser delivers it: a ClipboardEvent whose clipboardData holds an image file.
PASTE_JS = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], "clip.png", {type: "image/png"}));
document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data}));
"""


@pytest.fixture
def browser(tmp_path) -> Iterator:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_shows_latex_rendering_confidence_and_time(browser, tiny_model, tiny_dataset,
                                                          tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image = sorted((tiny_dataset / IMAGES_DIR).glob("*.png"))[0]
    wait = WebDriverWait(browser, 60)
    loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
    with serve_process(tiny_model, tmp_path / "serve.log", "--beam_size", "2") as url:
        browser.get(url)
        beam = Select(browser.find_element(By.ID, "beam"))
        wait.until(lambda d: "best.pt" in d.find_element(By.ID, "model-info").text)
        assert len(beam.options) == 10 and beam.first_selected_option.get_attribute("value") == "2"
        beam.select_by_value("1")

        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "status").text == "Done.")
        latex = browser.find_element(By.ID, "latex").get_attribute("value")
        assert latex.strip()
        render = browser.find_element(By.ID, "render")
        assert render.is_displayed() and browser.execute_script(loaded, render)
        assert browser.execute_script(loaded, browser.find_element(By.ID, "preview"))
        assert browser.find_element(By.ID, "confidence").text.endswith("%")
        assert browser.find_element(By.ID, "time").text.endswith("ms")
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 1000

        browser.find_element(By.ID, "copy").click()
        wait.until(lambda d: d.find_element(By.ID, "copy").text == "Copied")

        old_preview = browser.find_element(By.ID, "preview").get_attribute("src")
        browser.execute_script(PASTE_JS, base64.b64encode(image.read_bytes()).decode())
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src") != old_preview
                   and d.find_element(By.ID, "status").text == "Done.")
        assert browser.find_element(By.ID, "latex").get_attribute("value") == latex

        browser.execute_script(PASTE_JS, "aGVsbG8=")  # "hello" labelled as a PNG
        wait.until(lambda d: "not a readable image" in d.find_element(By.ID, "status").text)
