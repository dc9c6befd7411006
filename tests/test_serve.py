"""`transferlab serve` for real, over loopback: valid uploads answered with the model's own predictions,
every kind of bad upload refused with a clear 4xx, 50 concurrent requests all answered (each with its own
image's answer), and the upload page driven in headless Chromium through the DevTools protocol."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, TINY, train_tiny_run
from PIL import Image
from test_report import chromium

import transferlab

FAST = {**TINY, "strategy": "head-only", "feature_cache": "memory"}
LIMITS = {"max_upload_mb": 0.25, "max_files": 4, "max_pixels": 200_000}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("serve"), **FAST)


@pytest.fixture(scope="module", params=["run", "onnx"])
def server(request, run):
    """The app under uvicorn in a thread, on a socket bound here to a free loopback port; yields its URL."""
    import uvicorn

    from transferlab.export.serve import ServeLimits, create_app

    model = run if request.param == "run" else transferlab.export_model(run, "onnx", dynamic_batch=True).path
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, ServeLimits(**LIMITS)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


def png(colour=(200, 40, 40), size=(40, 40), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def multipart(files: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, data, content_type in files:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                   f"Content-Type: {content_type}\r\n\r\n".encode())
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def request(url: str, path: str = "/predict", *, files=None, body: bytes | None = None,
            content_type: str | None = None) -> tuple[int, dict | str]:
    headers = {}
    if files is not None:
        body, content_type = multipart(files)
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url + path, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text, kind = r.status, r.read().decode(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, text, kind = e.code, e.read().decode(), e.headers.get("content-type", "")
    return status, json.loads(text) if kind.startswith("application/json") else text


def test_valid_images_get_the_same_predictions_as_the_predict_command(server, run, tmp_path):
    red, blue = png(COLOURS["red"], seed=1), png(COLOURS["blue"], (64, 48), seed=2)
    status, body = request(server, "/predict?top_k=1", files=[("r.png", red, "image/png"), ("b.png", blue, "image/png")])
    assert status == 200, body
    assert [p["filename"] for p in body["predictions"]] == ["r.png", "b.png"]
    (tmp_path / "r.png").write_bytes(red)
    (tmp_path / "b.png").write_bytes(blue)
    offline = transferlab.predict(run, [tmp_path / "r.png", tmp_path / "b.png"], top_k=1)
    for served, local in zip(body["predictions"], offline):
        assert served["predictions"][0]["label"] == local["predictions"][0]["label"]
        assert abs(served["predictions"][0]["probability"] - local["predictions"][0]["probability"]) < 1e-5


@pytest.mark.parametrize(("case", "status", "message"), [
    ("oversize", 413, "over the 0.25 MB limit"),
    ("bomb", 413, "decompression bomb: 600x600 pixels exceeds limit 200000"),
    ("text content type", 415, "only images are accepted"),
    ("not multipart", 415, "multipart/form-data"),
    ("non-image bytes", 422, "not an image"),
    ("truncated", 422, "truncated or corrupt image"),
    ("empty file", 422, "zero-byte file"),
    ("no file", 400, "no image in the request"),
    ("too many files", 400, "Too many files"),
])
def test_bad_uploads_are_refused_with_a_clear_json_error(server, case, status, message):
    good = png()
    bomb = io.BytesIO()
    Image.new("RGB", (600, 600), (10, 20, 30)).save(bomb, "PNG")  # 1.5 KB on the wire, 360 000 pixels
    rng = np.random.default_rng(0)
    uploads = {
        "oversize": {"files": [("big.png", rng.bytes(300_000), "image/png")]},
        "bomb": {"files": [("bomb.png", bomb.getvalue(), "image/png")]},
        "text content type": {"files": [("notes.txt", b"hello", "text/plain")]},
        "not multipart": {"body": good, "content_type": "image/png"},
        "non-image bytes": {"files": [("fake.png", b"<html>not a picture</html>", "image/png")]},
        "truncated": {"files": [("cut.png", good[: len(good) // 2], "image/png")]},
        "empty file": {"files": [("empty.png", b"", "image/png")]},
        "no file": {"body": b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--x--\r\n",
                    "content_type": "multipart/form-data; boundary=x"},
        "too many files": {"files": [(f"{i}.png", good, "image/png") for i in range(5)]},
    }[case]
    got, body = request(server, **uploads)
    assert got == status, body
    assert isinstance(body, dict) and message in body["error"], body
    if case in ("bomb", "text content type", "non-image bytes", "truncated"):
        assert body["files"][0]["index"] == 0 and body["files"][0]["filename"]


def test_a_request_with_some_bad_files_answers_each_file(server):
    """One bad file no longer sinks the others (issue 21): each file gets its labels or its error, as
    `predict --json` gives them, in order, with 200 as long as one file was usable."""
    red, blue = png(COLOURS["red"], seed=5), png(COLOURS["blue"], seed=6)
    bomb = io.BytesIO()
    Image.new("RGB", (600, 600)).save(bomb, "PNG")
    status, body = request(server, "/predict?top_k=1", files=[  # LIMITS: 4 files at most
        ("b.png", blue, "image/png"), ("cut.png", red[: len(red) // 2], "image/png"),
        ("notes.txt", b"hello", "text/plain"), ("bomb.png", bomb.getvalue(), "image/png")])
    assert status == 200, body
    entries = body["predictions"]
    assert [e["filename"] for e in entries] == ["b.png", "cut.png", "notes.txt", "bomb.png"]
    assert entries[0]["predictions"][0]["label"] == "blue"
    assert entries[1]["error"].startswith("truncated or corrupt image") and "predictions" not in entries[1]
    assert entries[2] == {"filename": "notes.txt",
                          "error": "content type 'text/plain' is not image/* (only images are accepted)"}
    assert entries[3]["error"].startswith("decompression bomb: 600x600 pixels exceeds limit 200000")
    # nothing usable: the request is refused, with the highest of its files' statuses and every file's reason
    status, body = request(server, files=[("cut.png", red[: len(red) // 2], "image/png"),
                                          ("bomb.png", bomb.getvalue(), "image/png")])
    assert status == 422 and [f["filename"] for f in body["files"]] == ["cut.png", "bomb.png"], body


def test_fifty_concurrent_requests_are_all_answered_each_with_its_own_image(server):
    def one(i: int):
        colour = "red" if i % 2 else "blue"
        return colour, request(server, files=[(f"{i}.png", png(COLOURS[colour], seed=i), "image/png")])

    before = request(server, "/health")[1]
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    assert [status for _, (status, _) in answers] == [200] * 50
    for i, (colour, (_, body)) in enumerate(answers):
        assert body["predictions"][0]["filename"] == f"{i}.png"
    after = request(server, "/health")[1]
    assert after["images"] - before["images"] == 50 and after["requests"] - before["requests"] == 50
    assert after["largest_batch"] > 1  # concurrent requests really shared forward passes


def test_health_and_the_upload_page(server):
    status, health = request(server, "/health")
    assert status == 200 and health["status"] == "ok" and health["classes"] == ["blue", "red"]
    assert health["limits"]["max_upload_mb"] == 0.25
    status, body = request(server, "/predict?top_k=many", files=[("a.png", png(), "image/png")])
    assert status == 422 and body["error"].startswith("invalid request parameters: top_k")
    status, page = request(server, "/")
    assert status == 200 and '<input id="files" type="file"' in page and ".innerHTML" not in page.split("<script>")[1]


# --- the real command, and a real browser ---------------------------------------------------------------------


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out; NUL-separated JSON)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()
        # Move our ends above 10 so the child's dup2 onto 3 and 4 can never clobber them.
        child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome))
        os.close(to_chrome)
        os.close(from_chrome)

        def wire() -> None:  # runs between fork and exec: only dup2, which takes no lock
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--window-size=1200,900", f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire, close_fds=False,  # noqa: PLW1509
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(child_in)
        os.close(child_out)
        self._buffer, self._id = b"", 0

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    assert "error" not in reply, reply["error"]
                    return reply["result"]
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.time()))
            assert ready, f"no answer to {method} from chromium"
            chunk = os.read(self._read, 1 << 20)
            assert chunk, "chromium closed the DevTools pipe"
            self._buffer += chunk

    def evaluate(self, session: str, expression: str):
        return self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._write)
        os.close(self._read)


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_on_loopback_and_the_upload_page_works_in_chromium(run, tmp_path):
    binary = chromium()
    port = free_port()
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "transferlab", "serve", str(run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    browser = None
    try:
        def healthy():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return request(url, "/health")[0] == 200
            except OSError:
                return False

        wait_for(healthy, 120, "the server to start")
        uploads = [tmp_path / "red photo.png", tmp_path / "blue <b>.png"]
        uploads[0].write_bytes(png(COLOURS["red"], (160, 120), seed=3))
        uploads[1].write_bytes(png(COLOURS["blue"], (120, 160), seed=4))
        broken = tmp_path / "broken.png"  # its own error on its card; the others are still predicted
        broken.write_bytes(b"<html>not a picture</html>")

        browser = DevTools(binary, tmp_path / "profile")
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.call("Page.navigate", session, url=url + "/")
        wait_for(lambda: "classes" in (browser.evaluate(session, "document.getElementById('model').textContent")
                                       or ""), what="the page to load the model's description")
        root = browser.call("DOM.getDocument", session)["root"]["nodeId"]
        node = browser.call("DOM.querySelector", session, nodeId=root, selector="#files")["nodeId"]
        browser.call("DOM.setFileInputFiles", session, nodeId=node, files=[str(p) for p in [*uploads, broken]])
        state = wait_for(lambda: (s := browser.evaluate(session, "document.getElementById('results').dataset.state"))
                         in ("done", "error") and s, what="the predictions")
        assert state == "done", browser.evaluate(session, "document.getElementById('status').textContent")
        cards = browser.evaluate(session, "[...document.querySelectorAll('.card')].map(c => c.innerText)")
        assert len(cards) == 3
        assert cards[2].startswith("broken.png") and "not an image" in cards[2]
        assert "(1 could not be read)" in browser.evaluate(session, "document.getElementById('status').textContent")
        cards = cards[:2]
        assert cards[0].startswith("red photo.png") and cards[1].startswith("blue <b>.png")  # shown as text
        assert [c.split("\n")[1] for c in cards] == ["red", "blue"]  # each photo's own colour comes first
        assert all("%" in c and "red" in c.split("\n", 1)[1] and "blue" in c.split("\n", 1)[1] for c in cards)
        assert browser.evaluate(session, "[...document.images].slice(0, 2).every(i => i.complete && i.naturalWidth > 0)")

        shot = tmp_path / "upload-page.png"
        shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", session, format="png")["data"]))
        with Image.open(shot) as image:
            assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 600
            pixels = np.asarray(image.convert("RGB")).astype(np.int16)
        assert pixels.std() > 20  # not a blank page
        # the uploaded photos and the probability bars are saturated colour; text and background are not
        assert ((pixels.max(axis=2) - pixels.min(axis=2)) > 80).sum() > 20_000
    finally:
        if browser is not None:
            browser.close()
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}" in log and "Traceback" not in log


def test_unknown_and_sets_as_query_parameters(server):
    status, body = request(server + "/predict?unknown=auto&target_precision=0.9&sets=0.8", path="",
                           files=[("a.png", png(COLOURS["red"], seed=3), "image/png"),
                                  ("b.png", png((120, 120, 120), seed=4), "image/png")])
    assert status == 200, body
    threshold = body["abstain"]["threshold"]
    for entry in body["predictions"]:
        top = entry["predictions"][0]
        assert entry["abstained"] == (top["probability"] < threshold)
        assert entry["label"] == ("unknown" if entry["abstained"] else top["label"])
        assert entry["set"] and entry["set"][0] == top["label"]
    status, body = request(server + "/predict?sets=2", path="", files=[("a.png", png(), "image/png")])
    assert status == 400 and "--sets must be a coverage" in json.dumps(body)
