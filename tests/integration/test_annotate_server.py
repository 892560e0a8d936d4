"""mmalign annotate over HTTP: bad requests change nothing, the token, and a load test with a SIGKILL."""

from __future__ import annotations

import json
import secrets
import threading
import time

import pytest
from annotate_media import Server
from conftest import write_pair_images

pytest.importorskip(
    "starlette", reason="pip install 'mmalign[annotate]' (or [dev]) for the annotate server tests"
)
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx: pip install 'mmalign[dev]'")

from starlette.testclient import TestClient  # noqa: E402

from mmalign.annotate.items import load_items  # noqa: E402
from mmalign.annotate.server import create_app  # noqa: E402
from mmalign.annotate.store import LabelStore  # noqa: E402
from mmalign.cli import main  # noqa: E402


@pytest.fixture
def store(tmp_path):
    items = load_items(write_pair_images(tmp_path / "imgs", n=3))
    s = LabelStore(tmp_path / "labels.jsonl", items, overlap=1)
    yield s
    s.close()


def good_label(client, annotator="ann"):
    item = client.get("/api/next", params={"annotator": annotator}).json()["item"]
    return {
        "label_id": secrets.token_hex(8),
        "annotator": annotator,
        "item": item["id"],
        "choice": "left",
        "elapsed_ms": 900,
    }


def test_bad_requests_get_4xx_and_change_nothing(store):
    client = TestClient(create_app(store, allowed_hosts={"testserver"}))
    body = good_label(client)
    size = store.path.stat().st_size
    bad = [
        ({**body, "choice": "up"}, 422, "choice"),
        ({**body, "label_id": "../../x"}, 422, "label_id"),
        ({**body, "annotator": "a b"}, 422, "annotator"),
        ({**body, "elapsed_ms": -1}, 422, "elapsed_ms"),
        ({**body, "path": "/etc/passwd"}, 422, "path"),  # unknown fields are refused
        ({**body, "item": "nope"}, 404, "not in the manifest"),
        ({**body, "segments": ["left"]}, 422, "only for video"),
    ]
    for payload, code, words in bad:
        r = client.post("/api/label", json=payload)
        assert r.status_code == code and words in r.json()["error"], (payload, r.text)
    r = client.post("/api/label", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/api/label", content=json.dumps(body), headers={"content-type": "text/plain"})
    assert r.status_code == 415  # what a cross-site form could send without a CORS preflight
    r = client.post("/api/label", content=b"x" * 70_000, headers={"content-type": "application/json"})
    assert r.status_code == 413
    chunks = (b"x" * 10_000 for _ in range(10))  # no Content-Length: counted as it arrives
    r = client.post("/api/label", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/api/undo", json={"annotator": "ann", "label_id": "nonexistent1"})
    assert r.status_code == 404
    assert client.get("/api/next", params={"annotator": ""}).status_code == 422
    # media only by manifest index: paths and other indices reach nothing
    item = body["item"]
    assert client.get(f"/media/{item}/0").status_code == 200
    for url in (
        f"/media/{item}/2",
        "/media/..%2F..%2Fetc%2Fpasswd/0",
        "/media/../../etc/passwd",
        f"/media/{item}/..%2F..%2Fpairs.jsonl",
        "/pairs.jsonl",
        "/static/../items.py",
    ):
        assert client.get(url).status_code == 404, url
    assert store.path.stat().st_size == size == 0
    assert client.post("/api/label", json=body).status_code == 200 and store.path.stat().st_size > 0


def test_token_host_and_rate_limit(store):
    token = "s3cret-token"
    client = TestClient(create_app(store, token=token))
    assert client.get("/").status_code == 401
    assert client.get("/api/next", params={"annotator": "a"}).status_code == 401
    assert client.get("/api/next", params={"annotator": "a", "token": "wrong-token"}).status_code == 401
    body = {
        "label_id": "abcdefgh12",
        "annotator": "a",
        "item": store.items[0].id,
        "choice": "left",
        "elapsed_ms": 1,
    }
    assert client.post("/api/label", json=body).status_code == 401
    assert store.path.stat().st_size == 0
    assert client.get(f"/media/{store.items[0].id}/0").status_code == 401
    assert (
        client.get(
            "/api/next", params={"annotator": "a"}, headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 200
    )
    page = client.get("/", params={"token": token})  # the printed URL: sets the cookie the page then uses
    assert page.status_code == 200 and "mmalign annotate" in page.text
    assert client.get(f"/media/{store.items[0].id}/0").status_code == 200  # via the cookie

    local = TestClient(
        create_app(store, allowed_hosts={"127.0.0.1", "localhost"}), base_url="http://evil.example"
    )
    assert local.get("/").status_code == 400  # DNS rebinding: a loopback server answers only its own names

    slow = TestClient(create_app(store, rate=5, allowed_hosts={"testserver"}))
    codes = [slow.get("/api/next", params={"annotator": "r"}).status_code for _ in range(30)]
    assert codes[:10] == [200] * 10 and 429 in codes


def test_cli_names_the_bad_row(tmp_path, capsys):
    manifest = write_pair_images(tmp_path / "imgs", n=2)
    rows = manifest.read_text().splitlines()
    row = json.loads(rows[1])
    row["rejected"] = "gone.png"
    manifest.write_text(rows[0] + "\n" + json.dumps(row) + "\n")
    code = main(["annotate", "serve", str(manifest), "--out", str(tmp_path / "l.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "pairs.jsonl:2 (rejected): file not found" in err and "Traceback" not in err
    assert not (tmp_path / "l.jsonl").exists()


def test_token_is_required_off_loopback():
    from mmalign.commands.annotate import access_token

    assert access_token("127.0.0.1", None) is None and access_token("localhost", None) is None
    generated = {access_token("0.0.0.0", None) for _ in range(3)}
    assert len(generated) == 3 and all(len(t) >= 24 for t in generated)
    assert access_token("0.0.0.0", "given-token") == "given-token"
    with pytest.raises(ValueError, match="at least 8"):
        access_token("0.0.0.0", "short")


def test_off_loopback_the_printed_token_is_required(tmp_path):
    """A non-loopback bind (127.0.0.2 stands in for 0.0.0.0 without opening a port to the network)."""
    import httpx

    manifest = write_pair_images(tmp_path / "imgs", n=2)
    server = Server(manifest, tmp_path / "labels.jsonl", "--host", "127.0.0.2")
    try:
        assert "?token=" in server.url and any("needs the token" in line for line in server.lines)
        token = server.url.split("?token=")[1]
        assert httpx.get(server.base).status_code == 401
        assert httpx.get(server.base + "api/next?annotator=a").status_code == 401
        with httpx.Client() as browser:
            assert browser.get(server.url).status_code == 200  # sets the cookie
            item = browser.get(server.base + "api/next?annotator=a").json()["item"]
            assert browser.get(server.base + item["left"]).status_code == 200
        body = {
            "label_id": "abcdefgh12",
            "annotator": "a",
            "item": item["id"],
            "choice": "left",
            "elapsed_ms": 5,
        }
        assert httpx.post(server.base + "api/label", json=body).status_code == 401
        assert not (tmp_path / "labels.jsonl").read_text()
        r = httpx.post(server.base + "api/label", json=body, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["new"]
    finally:
        server.stop()


def test_stats_and_export_commands(tmp_path, capsys):
    items = load_items(write_pair_images(tmp_path / "imgs", n=4))
    store = LabelStore(tmp_path / "labels.jsonl", items, overlap=2)
    for who, choices in {
        "ann": ["left", "left", "right", "tie"],
        "bob": ["left", "right", "right", "tie"],
    }.items():
        for it, choice in zip(items, choices):
            store.submit(
                label_id=f"{who}-{it.id}",
                annotator=who,
                item_id=it.id,
                choice=choice,
                segments=None,
                elapsed_ms=2000,
            )
    store.close()
    assert main(["annotate", "stats", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "8 labels (0 undone) on 4 items" in out and "Cohen's kappa" in out and "(ann vs bob)" in out
    assert (
        main(["annotate", "export", str(store.path), "--out", str(tmp_path / "p.jsonl"), "--majority"]) == 0
    )
    counts = json.loads(capsys.readouterr().out)
    assert counts["rows"] + counts["no_majority"] == 4
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["annotate", "export", str(empty), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "no labels to export" in capsys.readouterr().err


@pytest.mark.slow
def test_load_8_clients_400_items_sigkill_restart(tmp_path):
    """8 concurrent clients, 400 items, overlap 2, SIGKILL mid-run, restart: none lost, none duplicated."""
    import httpx

    imgs = write_pair_images(tmp_path / "imgs", n=1)
    pair = json.loads(imgs.read_text().splitlines()[0])
    manifest = tmp_path / "imgs" / "many.jsonl"
    manifest.write_text("".join(json.dumps({**pair, "prompt": f"prompt {i}"}) + "\n" for i in range(400)))
    labels = tmp_path / "labels.jsonl"
    server = Server(manifest, labels, "--overlap", "2", "--rate", "100000")
    port = server.base.rsplit(":", 1)[1].strip("/")
    acked: list[str] = []
    conflicts = [0]
    lock = threading.Lock()
    stop = time.monotonic() + 150

    def client(name: str) -> None:
        with httpx.Client(base_url=server.base, timeout=5) as http:

            def call(method, url, **kw):
                while time.monotonic() < stop:
                    try:
                        r = http.request(method, url, **kw)
                        if r.status_code < 500:
                            return r
                    except httpx.TransportError:
                        pass
                    time.sleep(0.05)
                raise TimeoutError(name)

            while True:
                item = call("GET", "/api/next", params={"annotator": name}).json()["item"]
                if item is None:
                    return
                body = {
                    "label_id": secrets.token_hex(8),
                    "annotator": name,
                    "item": item["id"],
                    "choice": "left" if len(acked) % 3 else "tie",
                    "elapsed_ms": 10,
                }
                r = call("POST", "/api/label", json=body)  # retried with the same id across the kill
                with lock:
                    if r.status_code == 200:
                        acked.append(body["label_id"])
                    else:
                        assert r.status_code == 409, r.text
                        conflicts[0] += 1

    threads = [threading.Thread(target=client, args=(f"client{i}",)) for i in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        while len(acked) < 300 and time.monotonic() < stop:
            time.sleep(0.01)
        at_kill = len(acked)
        server.kill()
        server = Server(manifest, labels, "--overlap", "2", "--rate", "100000", "--port", port)
        for t in threads:
            t.join(timeout=max(1, stop - time.monotonic()))
        elapsed = time.monotonic() - t0
        # and once more after the work is done: the restarted server knows everything is labelled
        server.kill()
        server = Server(manifest, labels, "--overlap", "2", "--port", port)
        after = httpx.get(server.base + "api/next", params={"annotator": "client0"}).json()
        newcomer = httpx.get(server.base + "api/next", params={"annotator": "newcomer"}).json()
        assert (
            after["item"] is None and after["progress"]["complete"] == 400 and after["progress"]["mine"] > 0
        )
        assert newcomer["item"] is None and newcomer["progress"]["left_for_me"] == 0
    finally:
        server.stop()
    assert not any(t.is_alive() for t in threads), "clients did not finish in time"
    records = [json.loads(x) for x in labels.read_text().splitlines()]
    ids = [r["label_id"] for r in records]
    assert len(ids) == len(set(ids)), "a label was written twice"
    assert set(acked) <= set(ids), "an acknowledged label was lost"
    assert len(acked) == len(ids) == 800
    per_item: dict[str, set[str]] = {}
    for r in records:
        per_item.setdefault(r["item"], set()).add(r["annotator"])
    assert len(per_item) == 400 and all(len(v) == 2 for v in per_item.values())
    print(
        f"\nload test: 800 labels by 8 clients in {elapsed:.1f} s, SIGKILL after {at_kill} acknowledged, "
        f"{conflicts[0]} conflicts answered 409"
    )
