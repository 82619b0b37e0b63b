"""serve.py: the JSON API through the framework's test client, the admission queue, the command
line, and a real uvicorn server on loopback under a burst of uploads and an endless body."""

from __future__ import annotations

import base64
import io
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from data.image import load_image, normalize_user_image, pad_to_bucket
from data.layout import IMAGES_DIR
from data.normalize import detokenize
from im2latex.confidence import calibration_path
from model.checkpoint import content_digest, load_checkpoint, load_model
from model.predict import predict
from serve import JobPool, ServeConfig, create_app, main, render_png
from tests.conftest import ROOT
from tests.test_confidence import straight_calibration, write_calibration

UPLOAD_MB = 1


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def client(loaded) -> Iterator[TestClient]:
    config = ServeConfig(max_upload_mb=UPLOAD_MB, model_name="tiny.pt")
    with TestClient(create_app(*loaded, config)) as c:
        yield c


@pytest.fixture(scope="module")
def formula_path(tiny_dataset) -> Path:
    return sorted((tiny_dataset / IMAGES_DIR).glob("*.png"))[0]


# The start of a valid multipart upload whose file part never ends.
FILE_PART_HEAD = (b'--x\r\nContent-Disposition: form-data; name="image"; filename="f.png"\r\n'
                  b"Content-Type: image/png\r\n\r\n")
MULTIPART = {"content-type": "multipart/form-data; boundary=x"}


def post(client, data: bytes, content_type: str = "image/png", **form: str):
    return client.post("/api/predict", files={"image": ("f.png", data, content_type)}, data=form)


# ------------------------------------------------------------------------------ the API


def test_predict_decodes_like_the_library_renders_and_leaves_no_files(
        client, loaded, formula_path, tmp_path, monkeypatch):
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(cwd)
    data = formula_path.read_bytes()
    r = post(client, data, beam_size="2")
    assert r.status_code == 200, r.text
    body = r.json()
    img = pad_to_bucket(normalize_user_image(load_image(data)))
    expected = predict(*loaded, [img], beam_size=2)[0]
    assert body["tokens"] == expected.latex
    assert body["latex"] == detokenize(expected.latex)
    assert body["score"] == pytest.approx(expected.score, abs=1e-4) and body["score"] <= 0
    assert body["confidence"] is None  # a model nobody calibrated: no figure rather than a guess
    assert body["ms"] > 0
    rendered = Image.open(io.BytesIO(base64.b64decode(body["render_png"])))
    assert rendered.format == "PNG" and rendered.width > 20
    assert list(tmp.iterdir()) == [] and list(cwd.iterdir()) == []


def test_a_calibrated_model_answers_with_its_confidence(loaded, formula_path):
    calibration = straight_calibration("a" * 64)  # create_app trusts its caller's check
    config = ServeConfig(model_name="tiny.pt")
    with TestClient(create_app(*loaded, config, calibration)) as c:
        assert c.get("/api/health").json()["model"]["calibrated"] is True
        for beam in ("1", "3"):
            body = post(c, formula_path.read_bytes(), beam_size=beam).json()
            want = calibration.probability(body["score"], int(beam))
            assert body["confidence"] == pytest.approx(want, abs=1e-6) and 0 <= want <= 1


@pytest.mark.parametrize("beam", ["0", "11", "two"])
def test_beam_size_outside_1_to_10_is_refused(client, formula_path, beam):
    r = post(client, formula_path.read_bytes(), beam_size=beam)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "beam_size"]


def test_bytes_that_are_not_an_image_are_refused_with_415(client):
    r = post(client, b"\x89PNG\r\n\x1a\n but then not a PNG at all")
    assert r.status_code == 415
    assert "not a readable image" in r.json()["detail"]


def test_a_declared_non_image_type_is_refused_with_415(client):
    r = post(client, b"a = b + c", content_type="text/plain")
    assert r.status_code == 415
    assert r.json()["detail"] == "expected an image, got text/plain"


def test_a_request_without_a_file_is_refused_with_422(client):
    r = client.post("/api/predict", json={"image": "x.png"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "image"]
    assert "`file`" in r.json()["detail"][0]["msg"]  # says the other name works too


def test_the_image_may_come_as_file_the_field_pix2tex_uses(client, formula_path):
    data = formula_path.read_bytes()
    by_image = post(client, data, beam_size="1")
    by_file = client.post("/api/predict", files={"file": ("f.png", data, "image/png")},
                          data={"beam_size": "1"})
    assert by_image.status_code == by_file.status_code == 200, by_file.text
    assert by_file.json()["tokens"] == by_image.json()["tokens"]


def test_an_image_under_both_field_names_is_refused_with_422(client, formula_path):
    data = formula_path.read_bytes()
    r = client.post("/api/predict", files={"image": ("f.png", data, "image/png"),
                                           "file": ("g.png", data, "image/png")})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "file"]
    assert "not both" in r.json()["detail"][0]["msg"]


def test_a_blank_image_is_refused_with_422(client):
    r = post(client, png_bytes(np.full((40, 120), 255, np.uint8)))
    assert r.status_code == 422
    assert "no ink" in r.json()["detail"]


def test_an_upload_over_the_limit_is_refused_with_413(client):
    over = b"\0" * (UPLOAD_MB * 1024 * 1024 + 1)
    r = post(client, over)
    assert r.status_code == 413
    assert r.json()["detail"] == f"upload larger than the limit of {UPLOAD_MB} MB"
    chunks = [FILE_PART_HEAD] + [b"\0" * 65536] * 32  # no Content-Length: counted as read
    chunked = client.post("/api/predict", content=iter(chunks), headers=MULTIPART)
    assert chunked.status_code == 413 and "limit" in chunked.json()["detail"]


def test_an_image_too_costly_to_normalize_is_refused_within_two_seconds(client):
    dots = np.full((400, 400), 255, np.uint8)
    dots[::4, ::4] = 0  # 1-px dots every 4 px: once scaled up 18x, minutes and gigabytes
    start = time.monotonic()
    r = post(client, png_bytes(dots))
    assert 400 <= r.status_code < 500, r.text
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("size", [(100_000, 100_000), (5_000, 4_000)])
def test_too_many_pixels_are_refused_from_the_header(client, size):
    bomb = png_header_only(*size)
    assert len(bomb) < 100  # decoding it would need gigabytes
    r = post(client, bomb)
    assert r.status_code == 422
    assert r.json()["detail"].endswith("than the limit of 16 megapixels")


def test_health_describes_the_model_and_the_limits(client, loaded):
    h = client.get("/api/health").json()
    model, vocab = loaded
    assert h["status"] == "ok" and h["model"]["name"] == "tiny.pt"
    assert h["model"]["vocab_size"] == len(vocab)
    assert h["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert (h["beam_size"], h["max_beam_size"], h["max_upload_mb"]) == (5, 10, UPLOAD_MB)
    assert h["capacity"] == 17 and h["busy"] == 0
    assert h["model"]["calibrated"] is False


def test_openapi_documents_both_endpoints_with_described_fields(client):
    doc = client.get("/openapi.json").json()
    predict_op = doc["paths"]["/api/predict"]["post"]
    form = predict_op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form_fields = doc["components"]["schemas"][form.rsplit("/", 1)[1]]["properties"]
    assert set(form_fields) == {"image", "file", "beam_size"}
    assert all(form_fields[f].get("description") for f in ("image", "file"))
    assert {"200", "413", "415", "422", "503"} <= set(predict_op["responses"])
    assert "get" in doc["paths"]["/api/health"]
    fields = doc["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"latex", "score", "confidence", "render_png", "ms"} <= set(fields)
    assert all(f.get("description") for f in fields.values())
    assert "exactly right" in fields["confidence"]["description"]
    info = doc["components"]["schemas"]["ModelInfo"]["properties"]
    assert info["calibrated"]["description"]


def test_the_page_loads_nothing_from_the_network(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert "/static/app.js" in refs and "/static/style.css" in refs
    assert all(ref.startswith(("/", "data:")) for ref in refs)
    for ref in ("/static/app.js", "/static/style.css"):
        asset = client.get(ref)
        assert asset.status_code == 200 and "http://" not in asset.text
        assert "https://" not in asset.text


def test_render_png_typesets_good_latex_and_returns_none_for_refused_latex():
    png = render_png(r"\frac{a}{b}")
    assert Image.open(io.BytesIO(base64.b64decode(png))).height > 20
    assert render_png(r"\input{/etc/passwd}") is None
    assert render_png("") is None


# ------------------------------------------------------------------------------ the queue


def test_job_pool_admits_threads_plus_queue_jobs_and_frees_slots():
    pool = JobPool(threads=1, queue=1)
    gate = threading.Event()
    try:
        assert pool.reserve() and pool.reserve() and not pool.reserve()
        running = pool.submit(gate.wait, 10)
        waiting = pool.submit(gate.wait, 10)
        assert not pool.reserve()
        assert waiting.cancel()  # a job cancelled before it ran frees its slot too
        assert pool.busy == 1 and pool.reserve()
        pool.release()
        gate.set()
        running.result(timeout=10)
        assert pool.busy == 0
    finally:
        gate.set()
        pool.shutdown()


# ------------------------------------------------------------------------------ command line


def test_cli_without_a_model_names_the_flag(tmp_path, capsys):
    assert main(["--model_path", str(tmp_path / "missing.pt")]) == 1
    assert "--model_path" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--model_path", str(bad)]) == 1
    assert "not a readable im2latex checkpoint" in capsys.readouterr().err


def test_cli_uses_the_calibration_beside_the_model_and_notes_one_for_other_weights(
        tiny_model, tmp_path, capsys, monkeypatch):
    import serve

    apps = []
    monkeypatch.setattr(serve.uvicorn, "run", lambda app, **kw: apps.append(app))
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(tiny_model.read_bytes())

    def calibrated() -> bool:
        assert main(["--model_path", str(ckpt), "--device", "cpu"]) == 0
        with TestClient(apps.pop()) as c:
            return c.get("/api/health").json()["model"]["calibrated"]

    assert calibrated() is False and "note: " not in capsys.readouterr().err  # none: nothing said
    write_calibration(ckpt, content_digest(load_checkpoint(ckpt)))
    assert calibrated() is True and "note: " not in capsys.readouterr().err
    write_calibration(ckpt, "0" * 64)
    assert calibrated() is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: {calibration_path(ckpt)}: measured on "
                                               "other weights")


# ------------------------------------------------------------------------------ real server


@contextmanager
def serve_process(model_path: Path, log_path: Path, *flags: str) -> Iterator[str]:
    """`python serve.py` on a free loopback port; yields its base URL once it answers."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), "--model_path", str(model_path),
             "--host", "127.0.0.1", "--port", "0", *flags],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        url = None
        while url is None:
            assert proc.poll() is None, f"serve.py exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no server:\n{log_path.read_text()[-3000:]}"
            m = re.search(r"running on (http://127\.0\.0\.1:\d+)", log_path.read_text())
            url = m.group(1) if m else None
            time.sleep(0.2)
        assert httpx2.get(f"{url}/api/health", timeout=10).status_code == 200
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(tiny_model, log, "--threads", "1", "--queue", "2", "--beam_size", "1",
                       f"--max_upload_mb={UPLOAD_MB}", "--max_connections", "200") as url:
        yield url


def test_a_burst_of_50_uploads_is_answered_or_refused_and_the_server_survives(
        server, formula_path):
    data = formula_path.read_bytes()

    def upload(_: int) -> httpx2.Response:
        return httpx2.post(f"{server}/api/predict", files={"image": ("f.png", data, "image/png")},
                           timeout=120)

    with ThreadPoolExecutor(50) as clients:
        answers = list(clients.map(upload, range(50)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes  # capacity 3: most of a 50-burst must wait outside
    for r in answers:
        if r.status_code == 200:
            assert isinstance(r.json()["latex"], str)
        else:
            assert r.json()["detail"].startswith("busy") and r.headers["retry-after"]
    health = httpx2.get(f"{server}/api/health", timeout=10).json()
    assert health["status"] == "ok" and health["busy"] == 0
    again = httpx2.post(f"{server}/api/predict", files={"image": ("f.png", data, "image/png")},
                        timeout=60)
    assert again.status_code == 200


def status_of_unfinished_upload(url: str, headers: str, body: bytes) -> int:
    """Send a request whose body never ends and return the status the server answers with.

    A server that waited for the whole body would never answer: the socket times out."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\n{headers}\r\n")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            assert data, "connection closed without an answer"
            answer += data
    return int(answer.split(b" ", 2)[1])


def chunked(data: bytes, size: int = 65536) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size))


def test_an_oversized_body_is_refused_before_it_ends(server):
    declared = f"Content-Length: {200 * 1024 * 1024}\r\n"
    assert status_of_unfinished_upload(server, declared, FILE_PART_HEAD) == 413
    streamed = chunked(FILE_PART_HEAD + b"\0" * (UPLOAD_MB * 1024 * 1024 + 131072))
    assert status_of_unfinished_upload(server, "Transfer-Encoding: chunked\r\n", streamed) == 413
    assert httpx2.get(f"{server}/api/health", timeout=10).json()["status"] == "ok"
