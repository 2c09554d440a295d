"""The dashboard in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium) on a running `battery-server run` that has ingested real events through a real broker.
The figures on the page must be the record's; a battery search must show its timeline; a screenshot
is kept in test-artifacts/ for a human to look at."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from battery_trace.protocol import keys
from battery_trace.server.store import Store

from harness import collectors
from harness.broker import free_port
from harness.publisher import Publisher
from harness.waiting import wait_until
from tests.conftest import missing_service
from tests.world import DAY, World

pytestmark = pytest.mark.integration
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
PACK, PACK_B = "0RJPEA00HAU0AAG1C3000123", "0RJPEA00HAU0AAG1C3000124"
VIN = "LNBSCB3F1PW123456"


def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        missing_service("Chromium and chromedriver", "apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,2200",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def running_server(tmp_path, broker):
    store = Store(f"sqlite:{tmp_path / 'record.sqlite'}")
    world = World(store)
    key_path = tmp_path / "server.key"
    keys.save_private(keys.generate(), key_path)
    port = free_port()
    config = collectors.write_config(tmp_path / "server.toml", store.url, broker, "c1", key_path, web_port=port)
    config.write_text(config.read_text() + f'token_file = "{tmp_path / "web.token"}"\n')
    (tmp_path / "web.token").write_text("browser-test-token-" + "x" * 32 + "\n")  # what `init` would write
    log = tmp_path / "server.log"
    with open(log, "ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "battery_trace.server.cli", "run", "-c", str(config)], stdout=out, stderr=out
        )
    collectors.wait_subscribed(log)
    maker, station = world.device("maker-1", "vehicle_maker"), world.device("station-1", "swap_operator")
    scrapper = world.device("scrap-1", "scrapper")
    t0 = int(time.time() * 1000) - 2 * DAY  # recent, so nothing is reported late
    sealed = [
        maker.seal("installed", {"code": PACK, "vin": VIN}, t0),
        maker.seal("installed", {"code": PACK_B, "vin": VIN}, t0),
        *[
            station.seal(
                "health", {"code": PACK, "health": {"soc_pct": soc, "voltage_v": 340 + soc / 5}}, t0 + soc * 1000
            )
            for soc in (80, 70, 60, 50)
        ],
        scrapper.seal("vehicle_scrapped", {"vin": VIN, "codes": [PACK]}, t0 + DAY),
    ]
    topics = ["bt/v1/maker-1/events"] * 2 + ["bt/v1/station-1/events"] * 4 + ["bt/v1/scrap-1/events"]
    publisher = Publisher(broker, "devices")
    publisher.publish([*zip(topics, sealed, strict=True), ("bt/v1/station-1/events", b"not an envelope")])
    publisher.close()
    wait_until(lambda: store.counts()["events"] == 7 and store.counts()["rejected"], 30, "the events", [server])
    token = (tmp_path / "web.token").read_text().strip()
    yield {"url": f"http://127.0.0.1:{port}", "token": token, "store": store}
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=20)
    store.close()


def test_the_dashboard_shows_the_record_and_traces_a_battery(running_server):
    from selenium.webdriver.common.by import By

    store = running_server["store"]
    driver = browser()
    try:
        driver.get(f"{running_server['url']}/?token={running_server['token']}")
        assert "token" not in driver.current_url  # moved into a cookie

        def text(element_id: str) -> str:
            return driver.find_element(By.ID, element_id).text

        wait_until(lambda: text("t-events") == str(store.counts()["events"]), 20, "the totals")
        assert text("t-rejected") == "1" and text("t-findings") == "1"
        assert "malformed" in text("reasons") and "incomplete_scrapping" in text("kinds")
        devices = driver.find_elements(By.CSS_SELECTOR, "#devices tbody tr")
        assert sorted(row.find_elements(By.TAG_NAME, "td")[0].text for row in devices) == [
            "maker-1",
            "scrap-1",
            "station-1",
        ]
        assert "incomplete_scrapping" in text("findings") and "malformed" in text("rejects")
        driver.find_element(By.ID, "battery-code").send_keys(PACK.lower())
        driver.find_element(By.CSS_SELECTOR, "#battery-form button").click()
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#battery-timeline li"), 10, "the timeline")
        timeline = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#battery-timeline li")]
        assert [line.split()[0] for line in timeline] == ["installed", "vehicle_scrapped"]
        assert text("battery-state") == "retired"
        assert driver.find_elements(By.ID, "health-chart"), "the health chart is drawn"
        driver.find_element(By.ID, "vehicle-vin").send_keys(VIN)
        driver.find_element(By.CSS_SELECTOR, "#vehicle-form button").click()
        wait_until(lambda: "scrapped" in text("vehicle"), 10, "the vehicle")
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
        time.sleep(0)  # the page refreshes itself every 5 s; nothing more to wait for
    finally:
        driver.quit()


def test_the_printed_address_leaves_no_token_in_the_address_or_history(running_server):
    """/#token=… as the server prints it: the fragment never reaches the server; the page trades it for
    the cookie and replaces the address, so neither the address bar nor the history keeps the token."""
    from selenium.webdriver.common.by import By

    store = running_server["store"]
    driver = browser()
    try:
        driver.get(f"{running_server['url']}/#token={running_server['token']}")
        wait_until(
            lambda: driver.find_element(By.ID, "t-events").text == str(store.counts()["events"]), 20, "the totals"
        )
        assert running_server["token"] not in driver.execute_script("return window.location.href")
        driver.get("about:blank")
        driver.back()  # the history entry is the page without the token
        assert running_server["token"] not in driver.execute_script("return window.location.href")
    finally:
        driver.quit()
