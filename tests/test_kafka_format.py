"""The Kafka sink's pure parts: the message format (key, value, CloudEvents headers), the
checkpoint that moves only on delivery reports, the checkpoint file, and the [kafka] config."""

from __future__ import annotations

import json

import msgspec
import pytest
from test_log_conformance import ev

from storage_events.relay.config import KafkaConfig, RelayConfig
from storage_events.relay.kafka.checkpoint import CheckpointError, FileCheckpoint
from storage_events.relay.kafka.message import message, oversize, rfc3339
from storage_events.relay.kafka.progress import Progress
from storage_events.relay.log.base import make_record
from storage_events.wire import event_json, flags_mask


def record(id: int, event=None):
    event = event or ev("node-a:1", id, path=f"/data/ä b/{id}")
    event.id = id
    return make_record(
        id, event.site, event.node, event.path, flags_mask(event.flags), event_json(event)
    )


# -- the message ---------------------------------------------------------------------------


def test_a_message_is_the_feeds_json_keyed_by_stream_with_cloudevents_headers():
    r = record(7, ev("node-a:1", 7, site="site 1", node="n/1", path="/data/ä b/7"))
    r.event().ts = 1_796_310_898_300_757_545
    m = message(r)
    assert m.key == b"node-a:1"
    assert m.value is r.data  # exactly the bytes /events sends in data:
    assert json.loads(m.value)["id"] == 7
    headers = dict(m.headers)
    assert len(headers) == len(m.headers)  # no header twice
    assert headers == {
        "ce_specversion": b"1.0",
        "ce_id": b"node-a:1:7",
        "ce_source": b"/storage-events/site%201/n%2F1",
        "ce_type": b"storage-events.inotify",
        "ce_time": b"2026-12-03T15:14:58.300757Z",
        "ce_subject": "/data/ä b/7".encode(),
        "content-type": b"application/json",
    }


def test_a_loss_notice_has_its_own_type():
    notice = ev("node-a:1", 3)
    notice.flags = ["IN_Q_OVERFLOW"]
    assert dict(message(record(3, notice)).headers)["ce_type"] == b"storage-events.overflow"


def test_an_event_too_large_for_kafka_becomes_a_notice_with_its_key_and_id():
    r = record(9)
    m = oversize(r, 1_500_000)
    assert (m.key, dict(m.headers)["ce_id"]) == (b"node-a:1", b"node-a:1:9")
    assert dict(m.headers)["ce_type"] == b"storage-events.too_large"
    assert "ce_subject" not in dict(m.headers)  # (the path is what made it large)
    assert json.loads(m.value) | {"ts": 0} == {
        "type": "too_large",
        "id": 9,
        "site": "s",
        "node": "n",
        "stream": "node-a:1",
        "seq": 9,
        "ts": 0,
        "bytes": 1_500_000,
    }


def test_time_is_rfc3339_utc():
    assert rfc3339(0) == "1970-01-01T00:00:00.000000Z"
    assert rfc3339(1_000_000_000_999_999_999) == "2001-09-09T01:46:40.999999Z"


# -- the checkpoint moves only over what was delivered --------------------------------------


def test_the_checkpoint_moves_to_what_the_producer_reports_delivered():
    p = Progress(10)
    p.sent([11, 12, 13])
    p.sent([15, 16])  # (a shared store may leave ids unused)
    assert (p.checkpoint, p.dispatched, p.in_flight) == (10, 16, 5)
    assert p.delivered(0, 13) == 3
    assert (p.checkpoint, p.in_flight) == (13, 2)
    assert p.delivered(0, 13) == 0  # (reported again: nothing new)
    assert p.delivered(0, 16) == 2
    assert (p.checkpoint, p.in_flight) == (16, 0)
    with pytest.raises(ValueError, match="only 16 sent"):
        p.delivered(0, 17)  # never past what was handed over


def test_a_failed_delivery_rewinds_and_late_reports_are_ignored():
    p = Progress(0)
    p.sent([1, 2])
    p.delivered(0, 2)
    p.sent([3, 4])
    p.rewind()
    assert (p.checkpoint, p.dispatched, p.in_flight) == (2, 2, 0)
    assert p.delivered(0, 4) == 0  # a report of what was out before the rewind
    assert p.checkpoint == 2
    p.sent([3, 4])  # the same again, in order
    assert p.delivered(1, 4) == 2
    with pytest.raises(ValueError, match="handed over again"):
        p.sent([4])


# -- the checkpoint file --------------------------------------------------------------------


def test_the_checkpoint_file_round_trips_and_belongs_to_one_log(tmp_path):
    cp = FileCheckpoint(tmp_path, "storage-events")
    assert cp.read(epoch=5) == (0, None)
    cp.write(5, 1234)
    assert cp.read(5) == (1234, None)
    assert not list(tmp_path.glob("*.tmp"))
    resumed, why = cp.read(6)  # the log was deleted and made anew
    assert resumed == 0 and "another event log" in why and "from its start" in why


@pytest.mark.parametrize("text", ["", "{", '{"epoch": 5}', '{"epoch": 5, "id": -1}', "[1]"])
def test_a_damaged_checkpoint_file_is_an_error_naming_it_and_the_way_out(tmp_path, text):
    cp = FileCheckpoint(tmp_path, "t")
    cp.path.write_text(text)
    with pytest.raises(CheckpointError) as e:
        cp.read(5)
    assert str(cp.path) in str(e.value) and "delete it" in str(e.value)


# -- [kafka] --------------------------------------------------------------------------------


def test_kafka_config_gives_producer_settings_with_the_guarantees_fixed():
    cfg = msgspec.toml.decode(
        b'[kafka]\nbootstrap_servers = "k1:9092, k2:9093"\n'
        b'[kafka.config]\n"security.protocol" = "SASL_SSL"\n"linger.ms" = 20\n',
        type=RelayConfig,
    ).kafka
    assert cfg.topic == "storage-events"
    conf = cfg.producer()
    assert conf["bootstrap.servers"] == "k1:9092,k2:9093"
    assert conf["security.protocol"] == "SASL_SSL" and conf["linger.ms"] == 20
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ('bootstrap_servers = "k1"', "must be HOST:PORT"),
        ('bootstrap_servers = "k1:9092,"', "must be HOST:PORT"),
        ('bootstrap_servers = "k1:9092"\ntopic = "a/b"', "topic"),
        ('bootstrap_servers = "k1:9092"\n[kafka.config]\nacks = "1"', "acks=all"),
        (
            'bootstrap_servers = "k1:9092"\n[kafka.config]\n"enable.idempotence" = false',
            "per-stream order",
        ),
        ('bootstrap_servers = "k1:9092"\nbrokers = 1', "unknown field"),
    ],
)
def test_bad_kafka_config_is_refused_saying_what(toml, says):
    with pytest.raises(msgspec.ValidationError, match=says):
        msgspec.toml.decode(f"[kafka]\n{toml}\n".encode(), type=RelayConfig)


def test_kafka_config_default_topic():
    assert KafkaConfig(bootstrap_servers="k:1").topic == "storage-events"
