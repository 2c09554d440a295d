"""Fault injection over the whole pipeline (DESIGN.md §7, promise 1): three gateway agents sealing
health snapshots at 20 Hz from JBD BMS stubs, a private mosquitto, two collectors in one
shared-subscription group, and a private PostgreSQL cluster; every part a real process.

Each case injects one fault under load, then settles the pipeline and asserts that the record
holds exactly what was sealed (1..head of every device, nothing twice), that every chain verifies
link by link from the stored envelopes, and that nothing of ours was quarantined. The recovery
time (from the fault clearing until everything sealed by then is stored, or receipted) is printed
in the run's summary.

Run just these: ``bash scripts/test.sh -m faults``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions

from harness.broker import Broker, BrokerUnavailable, reachable
from harness.pipeline import Pipeline, Report
from harness.postgres import PostgresCluster
from tests.conftest import FAULTS_KEY, missing_service, private_cluster

pytestmark = [pytest.mark.integration, pytest.mark.faults]

OPEN_ACL = "topic readwrite #\n"
# Receipts may be published but nobody may read them: the broker drops them on the way to the agents.
NO_RECEIPTS_ACL = "topic readwrite bt/v1/+/events\ntopic readwrite bt/v1/+/status\ntopic write bt/v1/+/receipts\n"


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    """A private cluster this module may stop and restart (never the session's shared one)."""
    with private_cluster("bt-pg-faults-") as c:
        yield c


@pytest.fixture
def acl(tmp_path: Path) -> Path:
    """The broker's ACL file, where the broker's unprivileged user can read it (harness.broker)."""
    folder = tmp_path / "acl"
    folder.mkdir()
    (folder / "acl").write_text(OPEN_ACL)
    return reachable(folder) / "acl"


@pytest.fixture
def acl_broker(tmp_path: Path, acl: Path) -> Iterator[Broker]:
    """A plaintext broker whose ACL the test may change under load (mosquitto re-reads it on SIGHUP)."""
    try:
        b = Broker(tmp_path / "broker", listener=f"listener {{port}} 127.0.0.1\nallow_anonymous true\nacl_file {acl}\n")
        b.start()
    except BrokerUnavailable as exc:
        missing_service("mosquitto", exc)
    yield b
    b.stop()


@pytest.fixture
def pipeline(request, tmp_path, acl_broker, cluster) -> Iterator[Pipeline]:
    offsets = getattr(request, "param", None)
    p = Pipeline(tmp_path, acl_broker, cluster.create_database(), clock_offsets_s=offsets).start()
    yield p
    p.close()


@pytest.fixture
def report(request) -> Iterator[dict]:
    """What a case measured; shown in the summary at the end of the run."""
    row: dict = {"case": request.node.name}
    yield row
    request.config.stash.setdefault(FAULTS_KEY, []).append(row)


def check(result: Report, row: dict) -> None:
    row.update(sealed=result.stored, duplicates_dropped=result.duplicates_dropped)
    assert min(result.sealed.values()) >= 30, f"too little load to prove anything: {result.sealed}"
    assert result.chains_intact, "a stored chain does not verify"
    assert result.rejected == 0, "the pipeline quarantined its own events"


def test_broker_killed_and_restarted_under_load(pipeline, acl_broker, report):
    pipeline.flowing()
    acl_broker.kill()
    time.sleep(3)  # the outage: agents keep sealing into their outboxes
    acl_broker.start()
    report["recovery_s"] = pipeline.recovery()
    pipeline.flowing()
    check(pipeline.settle(), report)


def test_a_collector_killed_with_sigkill(pipeline, report):
    pipeline.flowing()
    pipeline.kill_collector(0)  # whatever it held unacknowledged, the broker redelivers
    pipeline.flowing()  # the other collector keeps storing meanwhile (the dead one's share waits)
    pipeline.collectors[0].start()
    report["recovery_s"] = pipeline.recovery()
    check(pipeline.settle(), report)


def test_an_agent_killed_with_sigkill_while_sealing(pipeline, report):
    pipeline.flowing()
    report["recovery_s"] = []
    for _ in range(3):
        pipeline.kill_agent(0)
        pipeline.gateways[0].start()
        report["recovery_s"].append(round(pipeline.recovery(ahead=1), 2))  # until it seals and delivers again
    check(pipeline.settle(), report)  # exact 1..head and intact chains: no sequence number was reused


def test_postgresql_stopped_for_30_s_mid_stream(pipeline, cluster, report):
    pipeline.flowing()
    cluster.stop("immediate")
    time.sleep(30)  # collectors hold what they have unacknowledged and retry; agents keep sealing
    assert all(c.process.poll() is None for c in pipeline.collectors), "a collector gave up during the outage"
    cluster.start()
    report["recovery_s"] = pipeline.recovery(timeout=120)
    check(pipeline.settle(), report)


def test_receipts_lost(pipeline, acl, acl_broker, report):
    pipeline.flowing()
    acl.write_text(NO_RECEIPTS_ACL)
    acl_broker.process.send_signal(signal.SIGHUP)
    time.sleep(6)  # three resend periods without a receipt: agents publish again, collectors see duplicates
    acl.write_text(OPEN_ACL)
    acl_broker.process.send_signal(signal.SIGHUP)
    heads = pipeline.heads()
    report["recovery_s"] = pipeline.wait_for(
        lambda: all(g.unreceipted_up_to(heads[g.device]) == 0 for g in pipeline.gateways),
        60,
        "receipts to prune what was sealed during the loss",
    )
    result = pipeline.settle()
    check(result, report)
    assert result.duplicates_dropped > 0, "resent events must have reached the collectors and been dropped"


def test_duplicate_deliveries(pipeline, acl_broker, report):
    """A second publisher repeats every event twice (as a misconfigured bridge would)."""
    repeated: list[int] = []
    echo = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="echo", protocol=mqtt.MQTTv5)

    def again(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        for _ in range(2):
            client.publish(message.topic, message.payload, qos=1)
        repeated.append(2)

    echo.on_message = again
    echo.connect(acl_broker.host, acl_broker.port)
    echo.subscribe("bt/v1/+/events", options=SubscribeOptions(qos=1, noLocal=True))  # not its own copies
    echo.loop_start()
    try:
        pipeline.flowing(events=60)
    finally:
        echo.disconnect()
        echo.loop_stop()
    result = pipeline.settle()
    check(result, report)
    assert sum(repeated) > 100 and result.duplicates_dropped >= sum(repeated)


@pytest.mark.parametrize("pipeline", [{"gw-1": 86400.0, "gw-2": -86400.0}], indirect=True, ids=["a-day-off"])
def test_device_clocks_a_day_off(pipeline, report):
    pipeline.flowing()
    result = pipeline.settle()
    check(result, report)
    with pipeline.store.db.reading() as tx:
        skew = dict(tx.all("SELECT device, AVG(device_time_ms / 1000.0 - received_at) FROM events GROUP BY device"))
    # The record keeps the device's word and its own arrival time: the skew is visible, nothing is refused.
    assert skew["gw-1"] == pytest.approx(86400, abs=120)
    assert skew["gw-2"] == pytest.approx(-86400, abs=120)
    assert skew["gw-3"] == pytest.approx(0, abs=120)
    report["skew_s"] = {d: round(s) for d, s in sorted(skew.items())}
