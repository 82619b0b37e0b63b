"""The web page end to end in headless Chromium: upload, paste, the answer and its rendering."""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator

import pytest
from PIL import Image

import demo
from data.files import atomic_open
from data.layout import IMAGES_DIR
from data.normalize import detokenize
from data.render import render_formulas
from im2latex import Reader
from model.checkpoint import DEFAULT_MODEL
from tests.conftest import HAVE_TEX, ROOT
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
DOCS_WINDOW = (1000, 900)  # docs/web.png: a width the README shows well; grown to the page
# A paste as the browser delivers it: a ClipboardEvent whose clipboardData holds an image file.
PASTE_JS = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], "clip.png", {type: "image/png"}));
document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data}));
"""


def small_png(path: os.PathLike) -> Image.Image:
    """A screenshot in 256 colours: the page is flat colours and gray text, so the palette
    loses nothing visible and the file is a fraction of the size."""
    return Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)


def fit_window_to_page(driver) -> None:
    """Grow the window until the whole page shows: a screenshot takes the viewport only."""
    chrome = driver.execute_script("return window.outerHeight - window.innerHeight")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(DOCS_WINDOW[0], height + chrome)


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


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs to render the upload")
def test_the_shipped_model_reads_an_upload_and_the_page_is_photographed(browser, tmp_path):
    """The page a newcomer sees: the shipped model's real reading of a rendered test formula
    (demo.py's seeded sample), typeset back. IM2LATEX_UPDATE_DOCS=1 also writes docs/web.png."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    truth = demo.draw(demo.read_formula_file(demo.FORMULAS), 1, seed=0)[0]
    image = tmp_path / "formula.png"
    Image.fromarray(render_formulas([detokenize(truth)])[0]).save(image)
    expected = Reader(DEFAULT_MODEL, beam_size=5)(image)

    browser.set_window_size(*DOCS_WINDOW)
    with serve_process(DEFAULT_MODEL, tmp_path / "serve.log", "--beam_size", "5") as url:
        browser.get(url)
        wait = WebDriverWait(browser, 90)
        wait.until(lambda d: DEFAULT_MODEL.name in d.find_element(By.ID, "model-info").text)
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "status").text == "Done.")
        latex = browser.find_element(By.ID, "latex")
        assert latex.is_displayed() and latex.get_attribute("value") == detokenize(expected.latex)
        loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
        shown = [browser.find_element(By.ID, i) for i in ("preview", "render")]
        assert all(el.is_displayed() and browser.execute_script(loaded, el) for el in shown)
        fit_window_to_page(browser)
        shot = tmp_path / "web.png"
        assert browser.save_screenshot(str(shot))
        boxes = [el.rect for el in shown]
    page = Image.open(shot).convert("L")
    assert page.size[0] == DOCS_WINDOW[0]
    for box in boxes:  # the upload and the reading typeset back are both whole on the picture
        assert box["y"] + box["height"] <= page.size[1] and box["x"] + box["width"] <= page.size[0]
        crop = page.crop((box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"]))
        assert crop.getextrema()[0] < 100, f"no ink where an image should be: {box}"
    if os.environ.get("IM2LATEX_UPDATE_DOCS") == "1":
        with atomic_open(ROOT / "docs" / "web.png") as fh:
            small_png(shot).save(fh, "PNG", optimize=True)
