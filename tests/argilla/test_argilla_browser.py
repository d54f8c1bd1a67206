"""An annotator in a real headless Chromium: blind record, hidden metadata, a choice that comes back.

Skipped when Chromium, chromedriver or selenium is absent (Debian: ``apt-get install chromium
chromium-driver``; ``pip install selenium``).
"""

from __future__ import annotations

import re
import shutil
import time

import polars as pl
import pytest

from prefdata.argilla import PullConfig, PushConfig, a_is_chosen, cli_main, find_dataset, pull, push

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
HIDDEN = ("a_is", "ai_choice", "flip_prob", "route_score", "score_chosen", "strength", "margin")


@pytest.fixture
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_annotator_in_the_browser(argilla_server, pair_table, browser, capsys, monkeypatch, tmp_path):
    from selenium.webdriver.common.by import By

    pairs = pl.from_arrow(pair_table(4, prefix="ui")).with_columns(
        route=pl.Series(["human", "human", "human", "ai"])).to_arrow()
    push(pairs, PushConfig(dataset="browser"))
    dataset = find_dataset(argilla_server.client(), PushConfig(dataset="browser"))
    monkeypatch.setenv("PREFDATA_CACHE", str(tmp_path / "cache"))
    assert cli_main(["users", "add", "uiann"]) == 0
    password = capsys.readouterr().out.split("):\n  ", 1)[1].split("\n", 1)[0]

    browser.get(f"{argilla_server.url}/sign-in")
    _wait(lambda: browser.find_elements(By.NAME, "Username"), "the sign-in form")
    browser.find_element(By.NAME, "Username").send_keys("uiann")
    browser.find_element(By.NAME, "Password").send_keys(password)
    browser.find_element(By.XPATH, "//button[contains(., 'Sign in')]").click()
    _wait(lambda: "/sign-in" not in browser.current_url, "signing in")
    browser.get(f"{argilla_server.url}/dataset/{dataset.id}/annotation-mode")
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    _wait(lambda: "Response B is better" in body() and "Question" in body(), "the first record")

    text = body()
    assert "of 3" in text  # the three routed pairs, not the one left to the AI
    assert "Read the conversation" in text  # the guidelines, on screen
    for name in HIDDEN:
        assert name not in browser.page_source, f"hidden metadata '{name}' reached the annotator's page"
    boxes = browser.find_elements(By.CSS_SELECTOR, "input[id^='preference_']")
    assert len(boxes) == 3 and not any(box.is_selected() for box in boxes)  # nothing pre-selected

    shown = int(re.search(r"Question (\d+):", text).group(1))
    pair_id = f"ui-{shown:05d}"
    flip = "B" if a_is_chosen(pair_id, 0) else "A"  # disagree with the AI
    browser.find_element(By.CSS_SELECTOR, f"label[for='preference_{flip}']").click()
    _wait(lambda: browser.find_element(By.ID, f"preference_{flip}").is_selected(), "the choice to register")
    browser.find_element(By.XPATH, "//button[contains(., 'Submit')]").click()

    def pulled():
        rows = {r["pair_id"]: r for r in pull(pairs, PullConfig(dataset="browser")).table.to_pylist()}
        return rows if rows[pair_id]["human_verdict"] else None

    rows = _wait(pulled, "the submitted response to reach the server", timeout=30)
    row = rows[pair_id]
    assert (row["human_verdict"], row["label_source"], row["annotators"]) == ("flip", "human", ["uiann"])
    assert row["chosen_id"] == f"ui-r{shown}"  # the human's pick is now the chosen response
    assert sum(r["human_verdict"] is not None for r in rows.values()) == 1
