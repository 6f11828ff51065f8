"""The bridge's HTTPS server with real TLS and real signatures: registration, jobs, resumable
transfers, expiry, and every refusal one JSON line that costs only its request."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import referencing

from fedmilm.bridge.board import Board, Offer, new_job_id
from fedmilm.bridge.http import MAX_CHUNK, Bridge, BridgeServer, Enrolment, server_tls
from fedmilm.bridge.signing import NONCE, SIGNATURE, TIME, Verifier, new_key, public_pem, sign
from fedmilm.clients.reference_phone import BridgeClient
from fedmilm.deploy.credentials import create_credentials
from fedmilm.deploy.processes import free_port
from fedmilm.export.job import JobResult, TrainJob

SCHEMAS = Path(__file__).resolve().parents[3] / "clients" / "android" / "schemas"
CODE = "enrol-3-" + "x" * 24


def validator(name: str) -> jsonschema.Draft202012Validator:
    schemas = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")}
    registry = referencing.Registry().with_resources(
        (s["$id"], referencing.Resource.from_contents(s)) for s in schemas.values())
    jsonschema.Draft202012Validator.check_schema(schemas[f"{name}.schema.json"])
    return jsonschema.Draft202012Validator(schemas[f"{name}.schema.json"], registry=registry)


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    return create_credentials(tmp_path_factory.mktemp("creds"), num_nodes=0)


@pytest.fixture
def bridge(credentials, tmp_path) -> Iterator[tuple[Bridge, str]]:
    state = Bridge(Board(), Verifier(), Enrolment({
        "3": hashlib.sha256(CODE.encode()).hexdigest(),
        "4": hashlib.sha256(b"enrol-4-" + b"y" * 24).hexdigest()}))
    server = BridgeServer(("127.0.0.1", free_port()), state,
                          server_tls(credentials.server_cert, credentials.server_key))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def phone(tmp_path: Path, url: str, credentials, device: str = "3",
          code: str | None = CODE) -> BridgeClient:
    storage = tmp_path / f"phone-{device}"
    storage.mkdir(exist_ok=True)
    (storage / "phone.json").write_text(json.dumps({"bridge": url, "device": device,
                                                    "ca": str(credentials.ca_cert)}))
    if code is not None:
        (storage / "enrolment").write_text(code)
    return BridgeClient(storage)


def offer(expires_in: float = 60.0, adapter: bytes = bytes(range(256)) * 40,
          upload_size: int = 4000) -> Offer:
    return Offer(id=new_job_id(), server_round=2, bundle="0" * 64,
                 files={"manifest.json": {"size": 10, "sha256": "1" * 64}},
                 job=TrainJob(epochs=1, batch_size=4, sampling="shuffle",
                              noise_multiplier=None, max_grad_norm=None),
                 adapter=adapter, upload_size=upload_size, clip_norm=0.5,
                 expires=time.time() + expires_in)


def test_a_phone_registers_its_own_key_once_with_its_one_time_code(bridge, credentials,
                                                                   tmp_path):
    state, url = bridge
    client = phone(tmp_path, url, credentials, code="wrong-code-" + "z" * 20)
    with pytest.raises(RuntimeError, match="403"):
        client.register()
    (client.storage / "enrolment").write_text(CODE)
    bad = client.request("POST", "/v1/register", json.dumps(
        {"device": "3", "public_key": "not a key", "enrolment": CODE}).encode(), signed=False)
    assert bad.status == 400 and validator("error").is_valid(bad.json())
    request = {"device": "3", "public_key": public_pem(client.key), "enrolment": CODE}
    assert validator("register").is_valid(request)
    client.register()  # the malformed attempt did not burn the code
    assert state.verifier.registered("3") and not (client.storage / "enrolment").exists()
    again = client.request("POST", "/v1/register", json.dumps(request).encode(), signed=False)
    assert again.status == 403  # single use


def test_every_request_after_registration_must_be_signed_by_that_devices_key(
        bridge, credentials, tmp_path):
    _, url = bridge
    client = phone(tmp_path, url, credentials)
    client.register()
    assert client.request("GET", "/v1/jobs/next").status == 204
    assert client.request("GET", "/v1/jobs/next", signed=False).status == 401
    forged = sign(new_key(), "3", "GET", "/v1/jobs/next")  # right device, wrong key
    assert client.request("GET", "/v1/jobs/next", signed=False, headers=forged).status == 401
    headers = sign(client.key, "3", "GET", "/v1/jobs/next")
    assert client.request("GET", "/v1/jobs/next", signed=False, headers=headers).status == 204
    replayed = client.request("GET", "/v1/jobs/next", signed=False, headers=headers)
    assert replayed.status == 401 and "replayed" in replayed.json()["error"]
    aimed = sign(client.key, "3", "GET", "/v1/jobs/next")  # signed for another path
    assert client.request("GET", "/v1/jobs/abcdefgh12/adapter", signed=False,
                          headers=aimed).status == 401
    stale = {**sign(client.key, "3", "GET", "/v1/jobs/next"), TIME: str(int(time.time()) - 900)}
    assert client.request("GET", "/v1/jobs/next", signed=False, headers=stale).status == 401
    for missing in (NONCE, SIGNATURE):
        partial = {k: v for k, v in sign(client.key, "3", "GET", "/v1/jobs/next").items()
                   if k != missing}
        assert client.request("GET", "/v1/jobs/next", signed=False,
                              headers=partial).status == 401


def test_a_job_downloads_and_uploads_resumably_and_its_result_completes_it(
        bridge, credentials, tmp_path):
    state, url = bridge
    client = phone(tmp_path, url, credentials)
    client.register()
    job = state.board.post("3", offer())
    answer = client.checked("GET", "/v1/jobs/next").json()
    validator("offer").validate(answer)
    adapter = answer["adapter"]
    # a dropped download resumes where it stopped
    partial = tmp_path / "adapter.part"
    partial.write_bytes(job.offer.adapter[:1000])
    client.download(adapter["path"], partial, adapter["size"])
    assert partial.read_bytes() == job.offer.adapter
    tail = client.request("GET", adapter["path"], headers={"Range": "bytes=10000-"})
    assert tail.status == 206 and tail.body == job.offer.adapter[10000:]
    bad_range = client.request("GET", adapter["path"], headers={"Range": "bytes=0-5,9-"})
    assert bad_range.status == 416
    # the update goes up in pieces; a piece at the wrong offset is refused, the bridge says
    # what it holds, and the phone goes on from there
    update = bytes(reversed(range(250))) * 16
    path = answer["update"]["path"]
    assert client.checked("PUT", f"{path}?offset=0", update[:1500]).json() == {"received": 1500}
    wrong = client.request("PUT", f"{path}?offset=1000", update[1000:2000])
    assert wrong.status == 409 and "1500" in wrong.json()["error"]
    held = client.checked("GET", path).json()
    assert validator("upload_status").is_valid(held) and held == {"received": 1500}
    early = JobResult(steps=2, examples=8, tokens=100, loss=1.5, seconds=0.5).to_json()
    assert client.request("POST", answer["result"], early.encode()).status == 409  # incomplete
    client.checked("PUT", f"{path}?offset=1500", update[1500:])
    too_much = client.request("PUT", f"{path}?offset=4000", b"\0\0\0\0")
    assert too_much.status == 409
    bogus = client.request("POST", answer["result"], b'{"steps": -1}')
    assert bogus.status == 400 and validator("error").is_valid(bogus.json())
    assert client.request("POST", answer["result"], early.encode()).status == 204
    assert state.board.wait(job) and bytes(job.received) == update
    assert job.result == JobResult.from_json(early)
    assert client.request("GET", "/v1/jobs/next").status == 204  # done: nothing more to do


def test_a_job_is_only_its_devices_and_expires_with_its_round(bridge, credentials, tmp_path):
    state, url = bridge
    mine = phone(tmp_path, url, credentials)
    mine.register()
    other = phone(tmp_path, url, credentials, device="4", code="enrol-4-" + "y" * 24)
    other.register()
    job = state.board.post("3", offer())
    assert other.request("GET", "/v1/jobs/next").status == 204
    stolen = other.request("GET", f"/v1/jobs/{job.offer.id}/adapter")
    assert stolen.status == 410
    late = state.board.post("3", replace(offer(), expires=time.time() - 1))
    assert not state.board.wait(job)  # replaced by the next round's job
    assert mine.request("GET", "/v1/jobs/next").status == 204
    for method, suffix, body in (("GET", "adapter", b""), ("PUT", "update?offset=0", b"1234"),
                                 ("POST", "result", b"{}")):
        gone = mine.request(method, f"/v1/jobs/{late.offer.id}/{suffix}", body)
        assert gone.status == 410, (method, suffix)
    assert not state.board.wait(late)


def test_bodies_are_bounded_before_they_are_read(bridge, credentials, tmp_path):
    state, url = bridge
    client = phone(tmp_path, url, credentials)
    client.register()
    job = state.board.post("3", offer())
    path = f"/v1/jobs/{job.offer.id}/update?offset=0"
    headers = {**sign(client.key, "3", "PUT", path, b""),
               "Content-Length": str(MAX_CHUNK + 1)}
    import http.client
    import ssl

    conn = http.client.HTTPSConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=10,
                                       context=ssl.create_default_context(
                                           cafile=str(credentials.ca_cert)))
    conn.putrequest("PUT", path)
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders()  # and no body at all: the bridge must answer without waiting for it
    response = conn.getresponse()
    assert response.status == 413 and "over the" in json.loads(response.read())["error"]
    conn.close()
    assert client.request("GET", "/v1/jobs/next").status == 200  # the bridge serves on


def test_bundle_files_are_served_by_name_only(bridge, credentials, tmp_path):
    state, url = bridge
    client = phone(tmp_path, url, credentials)
    client.register()
    folder = tmp_path / "bundle"
    folder.mkdir()
    from fedmilm.bridge.http import BundleFiles

    data = b"program bytes" * 100
    (folder / "train.pte").write_bytes(data)
    state.bundles["a" * 64] = BundleFiles(folder, {"train.pte": {
        "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}})
    got = client.checked("GET", f"/v1/bundles/{'a' * 64}/train.pte")
    assert got.body == data
    assert client.request("GET", f"/v1/bundles/{'a' * 64}/train.pte",
                          headers={"Range": "bytes=1000-"}).body == data[1000:]
    for name in ("base.ptd", "..%2Fkey.pem", "../../etc/passwd"):
        assert client.request("GET", f"/v1/bundles/{'a' * 64}/{name}").status == 404


def test_a_dp_phone_reports_nothing_derived_from_its_data():
    from fedmilm.clients.reference_phone import released

    trained = JobResult(steps=6, examples=48, tokens=2000, loss=1.7, seconds=3.2)
    assert released({"clip_norm": None}, trained) == trained
    assert json.loads(released({"clip_norm": 0.5}, trained).to_json()) == {
        "steps": 0, "examples": 0, "tokens": 0, "loss": 0.0, "seconds": 0.0}
