"""The page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by selenium; no browser
download) on the app served on a free loopback port. A DreamBench photo is uploaded, 3 steps generated, an image
appears, the LoRA is downloaded and diffusers loads it; a text file named .png shows an error on the page and the next
good request still works."""

import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from hyperbooth.cli.ui import load_studio
from hyperbooth.ui import build_app, serve_locally

DREAMBENCH = (Path(__file__).resolve().parents[2] / ".." / "shared" / "dreambench" / "dataset").resolve()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def page(sd_studio_parts, tmp_path_factory):
    assert CHROMIUM and CHROMEDRIVER, "the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    pipe, hypernet = sd_studio_parts
    studio = load_studio(str(pipe), [hypernet], tmp_path_factory.mktemp("ui_out"))
    app = build_app(studio)
    url = serve_locally(app, studio)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,2400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(url)
    yield driver, url, pipe
    driver.quit()
    app.close()


def _wait(predicate, timeout=120.0, what="the page"):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
        except (StaleElementReferenceException, NoSuchElementException):  # the page re-rendered under us: look again
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _generate(driver, files: list[Path], steps: int = 3):
    from selenium.webdriver.common.by import By

    upload = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#refs input[type=file]"), what="the upload field")[0]
    upload.send_keys("\n".join(str(Path(f).resolve()) for f in files))
    _wait(lambda: all(Path(f).stem in driver.find_element(By.CSS_SELECTOR, "#refs").text for f in files), what="the upload to arrive")  # shown as name and suffix
    slider = driver.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
    slider.clear()
    slider.send_keys(str(steps))
    driver.find_element(By.CSS_SELECTOR, "#generate").click()


def test_upload_generate_download_and_a_bad_file(page, tmp_path):
    from selenium.webdriver.common.by import By

    driver, url, pipe = page
    photo = sorted((DREAMBENCH / "dog").glob("*.jpg"))[0]
    _generate(driver, [photo])
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#gallery img"), what="a generated image")
    link = _wait(lambda: [a for a in driver.find_elements(By.CSS_SELECTOR, "#lora a") if a.get_attribute("href")], what="the LoRA link")[0]
    lora = tmp_path / "subject.safetensors"
    with urllib.request.urlopen(link.get_attribute("href")) as response:
        lora.write_bytes(response.read())
    sd = StableDiffusionPipeline.from_pretrained(pipe)
    sd.load_lora_weights(str(lora))  # the downloaded file, read by diffusers
    assert any("lora" in name for name, _ in sd.unet.named_parameters())
    driver.save_screenshot(str(tmp_path / "page.png"))

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    driver.refresh()
    _generate(driver, [bad])
    toast = _wait(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".toast-body, .toast-wrap, [data-testid=toast-body]")
                           if "not an image file" in e.text], what="the error on the page")
    assert "notes.png: not an image file" in toast[0].text and str(tmp_path) not in toast[0].text  # named, the server's path not shown
    driver.refresh()
    _generate(driver, [photo])  # the app keeps serving
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#gallery img"), what="an image after the error")
