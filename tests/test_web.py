"""The dashboard's JSON API and its guard: every figure comes from the record; no token, no data."""

from __future__ import annotations

import time

import pytest
from battery_trace.server.store import Store
from battery_trace.server.web.app import create_app
from starlette.testclient import TestClient

from tests.world import DAY, T0, World

PACK, PACK_B = "0RJPEA00HAU0AAG1C3000123", "0RJPEA00HAU0AAG1C3000124"
VIN = "LNBSCB3F1PW123456"
TOKEN = "s3cret-token"


@pytest.fixture
def client(store_url):
    store = Store(store_url)
    world = World(store)
    maker, station = world.device("maker-1", "vehicle_maker"), world.device("station-1", "swap_operator")
    scrapper = world.device("scrap-1", "scrapper")
    world.send(maker, "installed", {"code": PACK, "vin": VIN}, T0)
    world.send(maker, "installed", {"code": PACK_B, "vin": VIN}, T0)
    now_ms = int(time.time() * 1000)
    for soc in (90, 70, 50):  # these three arrive now: they show in the ingest chart
        raw = station.seal("health", {"code": PACK, "health": {"soc_pct": soc}}, T0 + (100 - soc) * 1000)
        world.deliver(station, raw, now_ms)
    world.send(scrapper, "vehicle_scrapped", {"vin": VIN, "codes": [PACK]}, T0 + DAY)
    world.deliver(station, b"garbage", T0 + DAY)
    store.record_status(
        "station-1", {"state": "online", "backlog": 3, "oldest_unreceipted_s": 1.5, "time": T0}, T0 / 1000
    )
    app = create_app(store, TOKEN, lambda: (True, "ok"))
    with TestClient(app) as c:
        yield c
    store.close()


def test_no_token_no_data_and_the_token_moves_into_a_cookie(client):
    assert client.get("/api/overview").status_code == 401
    shell = client.get("/")  # the page without data: its script logs in with the token from #token=
    assert shell.status_code == 200 and "<script" in shell.text
    assert client.post("/login", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "set-cookie" not in client.post("/login", headers={"Authorization": "Bearer wrong"}).headers
    assert client.get("/api/overview", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/overview", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    first = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert (
        first.status_code == 303
        and first.headers["location"].endswith("/")
        and "token" not in first.headers["location"]
    )
    assert "httponly" in first.headers["set-cookie"].lower()
    page = client.get("/")
    assert page.status_code == 200 and "battery-trace" in page.text and "cdn" not in page.text.lower()
    assert client.get("/healthz").text == "ok\n" and client.get("/static/app.js").status_code == 200


def authed(client, path):
    response = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_overview_matches_the_record(client):
    o = authed(client, "/api/overview?window_s=600&bucket_s=60")
    assert o["totals"]["events"] == 6 and o["totals"]["rejected"] == {"malformed": 1}
    assert o["totals"]["findings_open"] == {"incomplete_scrapping": 1}
    assert (o["devices"], o["devices_online"], o["batteries"], o["vehicles"]) == (3, 1, 2, 1)
    assert sum(b["accepted"] for b in o["ingest"]["buckets"]) == 3 and len(o["ingest"]["buckets"]) == 10


def test_devices_battery_vehicle_findings_rejects(client):
    devices = {d["device"]: d for d in authed(client, "/api/devices")}
    station = devices["station-1"]
    assert (station["state"], station["backlog"], station["lag_s"], station["chain"]) == ("online", 3, 1.5, "intact")
    assert station["stored"] == 3 and station["quarantined"] == 1 and devices["maker-1"]["state"] == "unknown"
    battery = authed(client, f"/api/batteries/{PACK.lower()}")
    assert battery["state"] == "retired" and [h["soc_pct"] for h in battery["health"]] == [90, 70, 50]
    assert authed(client, f"/api/vehicles/{VIN}")["findings"][0]["kind"] == "incomplete_scrapping"
    missing = client.get("/api/batteries/0RJPEA00HAU0AAG1C3009999", headers={"Authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 404 and "no event" in missing.json()["error"]
    assert [f["kind"] for f in authed(client, "/api/findings?open=1&kind=incomplete_scrapping")] == [
        "incomplete_scrapping"
    ]
    bad = client.get("/api/findings?kind=nonsense", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 400 and "valid:" in bad.json()["error"]
    (reject,) = authed(client, "/api/rejects?reason=malformed")
    assert reject["reason"] == "malformed" and "raw" not in reject


def test_metrics_are_open_and_bounded(client):
    text = client.get("/metrics").text
    assert "bt_server_devices_enrolled 3.0" in text and "bt_server_devices_online 1.0" in text
    assert "bt_server_commit_seconds_bucket" in text and "station-1" not in text  # no label per device


def test_the_fragments_token_is_traded_for_a_cookie(client):
    """The printed address is /#token=…: the page's script posts the fragment's token to /login, which
    answers with the cookie (never cached); from then on the API answers."""
    assert client.get("/api/overview").status_code == 401
    done = client.post("/login", headers={"Authorization": f"Bearer {TOKEN}"})
    assert done.status_code == 204 and done.headers["cache-control"] == "no-store"
    assert "httponly" in done.headers["set-cookie"].lower() and "samesite=strict" in done.headers["set-cookie"].lower()
    assert client.get("/api/overview").status_code == 200
