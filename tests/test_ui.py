"""The MLflow UI, in a real headless Chromium, shows a study as people compare it.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``make ui-deps``;
CI installs them) and selenium (a dev dependency). Screenshots are kept under
``test-artifacts/ui/`` for a human to look at.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from experiments.tune import tune

pytestmark = pytest.mark.slow

SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=1900,1000",
)
WAIT_S = 60


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "Chromium is not installed (need `chromium` and `chromedriver` on PATH): "
            "run `make ui-deps` (apt-get install chromium chromium-driver)"
        )
    return browser, driver


@pytest.fixture
def browser():
    binary, driver_path = _chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="stageflow-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # The explicit driver path keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_the_study_run_and_its_trial_runs_are_listed_with_their_metrics(
    tracking_uri, model_name, tmp_path, browser
):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    result = tune(
        "builtin:wine",
        "target",
        3,
        model_name=model_name,
        storage=f"sqlite:///{tmp_path / 'studies.db'}",
        families=("lr",),
    )
    client = MlflowClient(tracking_uri)
    trials = client.search_runs(
        [result.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(browser, WAIT_S)
    parent_link = f"//a[contains(@href, '/runs/{result.parent_run_id}')]"

    try:
        browser.get(f"{tracking_uri}/#/experiments/{result.experiment_id}/runs")
        # A React app: the runs table exists once the parent run's row is rendered.
        wait.until(lambda d: d.find_elements(By.XPATH, parent_link))
        for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
            with contextlib.suppress(WebDriverException):
                close.click()  # the assistant side panel would hide columns
        # Trial runs are nested: expand the parent's row to list them.
        browser.find_element(
            By.XPATH, f"{parent_link}/ancestor::div[@role='gridcell']//button"
        ).click()
        wait.until(lambda d: all(r.info.run_name in d.page_source for r in trials))
        # Metric columns are opt-in in MLflow 3's table: show the ones a study is compared by.
        browser.find_element(By.CSS_SELECTOR, "[data-testid='column-selection-dropdown']").click()
        for metric in ("best_cv_accuracy", "cv_accuracy_mean"):
            wait.until(
                lambda d, m=metric: d.find_elements(By.XPATH, f"//*[normalize-space(text())='{m}']")
            )[0].click()
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        parent = client.get_run(result.parent_run_id)
        expected = [str(parent.data.metrics["best_cv_accuracy"])[:6]] + [
            str(r.data.metrics["cv_accuracy_mean"])[:6] for r in trials
        ]
        wait.until(lambda d: all(v in d.find_element(By.TAG_NAME, "body").text for v in expected))
        text = browser.find_element(By.TAG_NAME, "body").text
    finally:
        browser.save_screenshot(str(SCREENSHOTS / "study-runs.png"))

    assert f"tune-{result.study_name}"[:20] in text
    for run in trials:
        assert run.info.run_name in text
    assert len(trials) == 3

    # The study's plots come through the server's artifact proxy and render as images.
    browser.get(
        f"{tracking_uri}/#/experiments/{result.experiment_id}/runs/{result.parent_run_id}"
        "/artifacts/tuning/optimization_history.png"
    )
    try:
        # The artifact viewer fetches the PNG and shows it from a blob: URL; a loaded plot is
        # an image hundreds of pixels wide (the logo is an SVG).
        image = wait.until(
            lambda d: next(
                (
                    img
                    for img in d.find_elements(By.TAG_NAME, "img")
                    if d.execute_script("return arguments[0].naturalWidth", img) >= 300
                ),
                None,
            )
        )
    finally:
        browser.save_screenshot(str(SCREENSHOTS / "study-plot.png"))
    assert image.is_displayed()
