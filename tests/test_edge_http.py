"""The local HTTP endpoint over a real socket, a real store and state, and a numpy stand-in model."""

from __future__ import annotations

import http.client
import json
import socket
import time

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.config import config_from_dict
from edge_agent.http_api import make_server
from tests.edge_fixtures import FakeModel, events


@pytest.fixture
def served(tmp_path):
    cfg = config_from_dict({"device_id": "dev-1", "state_dir": "s", "bundle_dir": "nope"}, base_dir=tmp_path)
    agent = Agent(cfg, model=FakeModel())
    server = make_server(agent, "127.0.0.1", 0)
    server.start_background()
    yield server, agent
    server.stop()
    agent.close()


def request(server, method, path, body=None, raw: bytes | None = None, headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"null")
    conn.close()
    return out


def test_health_and_state(served):
    server, _ = served
    status, body = request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["bundle_version"] == "fake-1"
    status, body = request(server, "GET", "/state")
    assert status == 200 and body["state"]["rounds"] == 0 and body["store"]["total"] == 0


def test_ingest_forms_and_idempotency(served):
    server, agent = served
    evs = events(4, start_ts=time.time() - 60)
    assert request(server, "POST", "/interactions", evs[0]) == (200, {"added": 1, "duplicates": 0, "pruned": 0, "rejected": []})
    status, body = request(server, "POST", "/interactions", {"events": evs})
    assert status == 200 and (body["added"], body["duplicates"]) == (3, 1)
    status, body = request(server, "POST", "/interactions", evs)
    assert status == 200 and body["duplicates"] == 4
    assert agent.store.counts()["click"] == 4


def test_partly_bad_batch_stores_the_good_events(served):
    server, agent = served
    batch = events(2, start_ts=time.time() - 60) + [{"event_id": "bad", "kind": "click", "item": -1}]
    status, body = request(server, "POST", "/interactions", batch)
    assert status == 422 and body["added"] == 2
    assert body["rejected"][0]["index"] == 2 and "item" in body["rejected"][0]["reason"]


@pytest.mark.parametrize("raw, status, word", [
    (b"{not json", 400, "invalid JSON"),
    (b"\xff\xfe", 400, "UTF-8"),
    (b"42", 400, "body must be"),
    (b'{"events": [], "x": 1}', 400, "unexpected keys"),
])
def test_bad_ingest_bodies(served, raw, status, word):
    server, agent = served
    request(server, "POST", "/interactions", events(1, start_ts=time.time() - 60))
    got, body = request(server, "POST", "/interactions", raw=raw)
    assert got == status and word in body["error"]
    assert agent.store.counts()["total"] == 1, "nothing stored is lost on bad input"


def test_rank_uses_history_profile_and_phi(served):
    server, agent = served
    request(server, "POST", "/interactions", [{"event_id": "c", "kind": "click", "item": 20, "ts": time.time() - 60}])
    agent.set_profile([2, 3])
    status, body = request(server, "POST", "/rank", {"candidates": [5, 21, 18, 40], "k": 3})
    assert status == 200 and body["items"] == [21, 18, 5] and body["phi_source"] == "encoder"
    assert body["scores"][0] == pytest.approx(-1 + 0.25 + 0.05)
    _, _, hist, profile = agent.model.calls[-1]
    assert hist.shape == (4, 5) and hist[0].tolist() == [0, 0, 0, 0, 20] and profile[0].tolist() == [2, 3]
    # the encoder's φ was saved for this bundle: the next rank does not call it again
    n_init = sum(c[0] == "initial_phi" for c in agent.model.calls)
    request(server, "POST", "/rank", {"candidates": [1]})
    assert sum(c[0] == "initial_phi" for c in agent.model.calls) == n_init == 1
    assert agent.state().bundle_version == "fake-1"


@pytest.mark.parametrize("body, word", [
    ({"candidates": []}, "non-empty"),
    ({"candidates": [1, "2"]}, "candidates[1]"),
    ({"candidates": [1, 0]}, "candidates[1]"),
    ({"candidates": [1], "k": 0}, "k = 0"),
    ({"candidates": [1], "extra": 1}, "unknown key"),
    ({"items": [1]}, "candidates"),
    ({"candidates": [51]}, "outside the catalogue 1..50"),
])
def test_bad_rank_requests(served, body, word):
    status, out = request(served[0], "POST", "/rank", body)
    assert status == 400 and word in out["error"]


def test_routes_methods_and_limits(served):
    server, _ = served
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "GET", "/rank")[0] == 405
    assert request(server, "DELETE", "/state")[0] == 405
    status, body = request(server, "POST", "/interactions", raw=b"x", headers={"Content-Length": str(2 << 20)})
    assert status == 413 and "limit" in body["error"]


def test_server_survives_garbage_and_internal_errors(served):
    server, agent = served
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as s:     # not HTTP at all
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        s.recv(1024)
    with socket.create_connection((host, port), timeout=5) as s:     # body shorter than announced
        s.sendall(b"POST /interactions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}")
        s.shutdown(socket.SHUT_WR)
        assert b"400" in s.recv(1024).split(b"\r\n")[0]

    def boom(*a, **k):
        raise RuntimeError("model exploded")
    agent.model.score = boom
    status, body = request(server, "POST", "/rank", {"candidates": [1, 2]})
    assert status == 500 and "model exploded" in body["error"]
    assert request(server, "GET", "/health")[0] == 200


def test_rank_reflects_a_state_saved_by_another_process(served, tmp_path):
    server, agent = served
    request(server, "POST", "/rank", {"candidates": [1]})      # saves the encoder's φ
    from edge_agent.state import StateStore
    other = StateStore(agent.config.state_dir)                   # e.g. `dccl edge train` in another process
    st = other.load()
    st.phi = {"phi": np.full((1, 4), 3.0, np.float32)}
    st.phi_source = "trained"
    other.save(st)
    _, body = request(server, "POST", "/rank", {"candidates": [1]})
    assert body["phi_source"] == "trained" and body["scores"][0] == pytest.approx(3.0 - 1.0)
