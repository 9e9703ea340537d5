"""The chat page at ``/`` in a real browser: Debian's headless Chromium driven by selenium.

The test starts its own server and browser (fresh profile, no network besides localhost), types a
message, and watches the answer stream in: the reply bubble must grow over several polls before it
is done, and the tok/s line must show up. Skipped when Chromium or chromedriver is not installed
(scripts/install_test_deps.sh installs them).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server import ServerProcess

webdriver = pytest.importorskip("selenium.webdriver")

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(smollm2_path, "--parallel", "1", "-c", "512")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium / chromedriver not installed (scripts/install_test_deps.sh)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lmap-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_page_streams_an_answer(server: ServerProcess, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/")  # type: ignore[attr-defined]
    assert "lmap" in d.title  # type: ignore[attr-defined]
    WebDriverWait(d, 20).until(lambda d: d.find_element(By.ID, "model").text)  # /v1/models answered
    d.find_element(By.ID, "max_tokens").clear()  # type: ignore[attr-defined]
    d.find_element(By.ID, "max_tokens").send_keys("48")  # type: ignore[attr-defined]
    box = d.find_element(By.ID, "input")  # type: ignore[attr-defined]
    box.send_keys("Tell me a short story about a cat.")
    box.send_keys(Keys.ENTER)

    # the user's message appears, then the reply grows while streaming
    WebDriverWait(d, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.user"))
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        bubbles = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")  # type: ignore[attr-defined]
        if bubbles:
            text = bubbles[-1].text
            if not seen or text != seen[-1]:
                seen.append(text)
            if bubbles[-1].get_attribute("data-state") == "done":
                break
        time.sleep(0.02)
    assert d.find_elements(By.CSS_SELECTOR, ".msg.error") == []  # type: ignore[attr-defined]
    final = seen[-1]
    assert final, "no answer appeared"
    growing = [t for t in seen if t]
    assert len(growing) >= 3, f"the answer did not stream (saw {growing!r})"
    assert all(final.startswith(t) for t in growing)  # every intermediate state is a prefix of the answer
    assert "tok/s" in d.find_element(By.ID, "stats").text  # type: ignore[attr-defined]

    # a second turn sends the history (multi-turn) and the Stop button ends a long answer
    box.send_keys("Make it longer.")
    box.send_keys(Keys.ENTER)
    WebDriverWait(d, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2)
    WebDriverWait(d, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text)
    d.find_element(By.ID, "stop").click()  # type: ignore[attr-defined]
    WebDriverWait(d, 10).until(lambda d: not d.find_element(By.ID, "send").get_attribute("disabled"))
    assert len(d.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2  # type: ignore[attr-defined]
