"""The web page in a real browser (Debian's chromium + chromium-driver, driven by Selenium): it loads,
uploads an image, sends a message, shows the streamed answer, draws images, and shows errors.
A screenshot is saved to runs/test-artifacts/serve_page.png (or $POLYMODAL_ARTIFACTS)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ARTIFACTS = Path(os.environ.get("POLYMODAL_ARTIFACTS", "runs/test-artifacts"))


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_chat_with_an_image_streams_an_answer_and_images_are_drawn(browser, unified_server, checkpoints, scene):
    image = checkpoints["root"] / "upload.png"
    scene.resize((64, 64)).save(image)
    browser.get(unified_server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert browser.find_element(By.ID, "model").text == "unified"
    assert browser.find_element(By.ID, "image-panel").is_displayed()  # the model declares generate_image

    browser.find_element(By.ID, "image").send_keys(str(image))
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
    browser.find_element(By.ID, "message").send_keys("What color is the circle?")
    browser.find_element(By.ID, "send").click()
    answer = wait.until(lambda d: d.find_element(By.ID, "answer-1"))
    wait.until(lambda d: answer.get_attribute("data-state") != "streaming")
    assert answer.get_attribute("data-state") == "done", browser.find_element(By.ID, "error").text
    assert int(answer.get_attribute("data-chunks")) >= 1
    assert answer.text.strip()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img")  # the uploaded image is in the chat

    browser.find_element(By.ID, "image-prompt").send_keys("A large red star is in the center.")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))


def test_errors_are_shown_to_the_user(browser, unified_server):
    browser.get(unified_server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("100000")  # past the model's context: the server answers 400
    browser.find_element(By.ID, "message").send_keys("Hello")
    browser.find_element(By.ID, "send").click()
    error = browser.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed())
    assert "maximum context length" in error.text
