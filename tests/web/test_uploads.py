"""POST/GET /api/v1/uploads through the test client, upload references in job
submissions (API and form), and `diffqueue upload` against a real HTTP server."""
from __future__ import annotations

import hashlib
import io
import re
import threading
from dataclasses import replace

import pytest
from pydantic import Field
from werkzeug.serving import make_server

from shared.specs import KINDS, Kind, Spec
from shared.storage import make_storage, upload_key
from tests.conftest import free_port
from tests.upload_files import bomb_zip, class_zip, flat_zip, png_bytes, zip_bytes

ALLOWED = "(allowed: .png .jpg .jpeg .webp .bmp .gif)"


def post_file(client, data: bytes, filename: str, **kw):
    return client.post("/api/v1/uploads", data={"file": (io.BytesIO(data), filename)}, **kw)


def upload(client, data: bytes, filename: str) -> dict:
    resp = post_file(client, data, filename)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def totals(client, settings) -> tuple[int, list[str], int]:
    """(upload rows, storage keys under uploads/, job rows)."""
    return (
        client.get("/api/v1/uploads").get_json()["total"],
        make_storage(settings).list("uploads"),
        client.get("/api/v1/jobs").get_json()["total"],
    )


# ------------------------------------------------------------------ accepted
@pytest.mark.parametrize(
    "data, filename, kind, content_type, meta",
    [
        (class_zip(), "pets.zip", "dataset", "application/zip", {"num_images": 6, "classes": ["cat", "dog", "zebra"]}),
        (flat_zip(4), "flat.zip", "dataset", "application/zip", {"num_images": 4, "classes": None}),
        (png_bytes(30, 20), "cat.png", "image", "image/png", {"width": 30, "height": 20, "mode": "RGB"}),
        (b"a cat\n\na dog\n", "prompts.txt", "prompts", "text/plain", {"num_prompts": 2}),
        (b"prompt,negative_prompt,seed\na cat,blurry,1\na dog,,\n", "prompts.csv", "prompts", "text/csv",
         {"num_prompts": 2}),
    ],
)
def test_upload_accepted(client, sqlite_settings, data, filename, kind, content_type, meta):
    resp = post_file(client, data, filename)
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert re.fullmatch(r"[0-9a-f]{32}", body["id"])
    assert body["ref"] == f"upload:{body['id']}"
    assert (body["filename"], body["kind"], body["content_type"]) == (filename, kind, content_type)
    assert body["size"] == len(data) and body["sha256"] == hashlib.sha256(data).hexdigest()
    assert {k: body["meta"][k] for k in meta} == meta
    assert body["created_at"].endswith("+00:00")
    assert resp.headers["Location"].endswith(f"/api/v1/uploads/{body['id']}")
    assert make_storage(sqlite_settings).get_bytes(upload_key(body["id"])) == data

    got = client.get(resp.headers["Location"])
    assert got.status_code == 200 and got.get_json() == body


def test_dataset_meta_counts_the_uncompressed_bytes(client):
    import zipfile

    body = upload(client, class_zip(), "pets.zip")
    with zipfile.ZipFile(io.BytesIO(class_zip())) as zf:
        images = [i for i in zf.infolist() if i.filename.startswith("mydata/") and i.filename.endswith(".png")
                  and "/." not in i.filename]
    assert body["meta"]["uncompressed_bytes"] == sum(i.file_size for i in images)


def test_list_uploads_newest_first(client):
    ids = [upload(client, png_bytes(), f"{i}.png")["id"] for i in range(3)]
    prompts = upload(client, b"a cat\n", "p.txt")["id"]
    body = client.get("/api/v1/uploads").get_json()
    assert [u["id"] for u in body["uploads"]] == [prompts, *reversed(ids)]
    assert body["total"] == 4

    body = client.get("/api/v1/uploads?kind=image&limit=2").get_json()
    assert [u["id"] for u in body["uploads"]] == [ids[2], ids[1]]
    assert (body["total"], body["limit"], body["offset"]) == (3, 2, 0)
    assert [u["id"] for u in client.get("/api/v1/uploads?kind=image&offset=2").get_json()["uploads"]] == [ids[0]]

    for query, field in [("kind=video", "kind"), ("limit=0", "limit"), ("offset=x", "offset")]:
        resp = client.get(f"/api/v1/uploads?{query}")
        assert resp.status_code == 400 and field in resp.get_json()["fields"]


def test_missing_upload_is_404_json(client):
    resp = client.get("/api/v1/uploads/" + "0" * 32)
    assert resp.status_code == 404
    body = resp.get_json()
    assert body["error"] == "not_found" and "0" * 32 in body["message"]


# ------------------------------------------------------------------ refused
def assert_refused(resp, fragment: str, status: int = 400):
    assert resp.status_code == status, resp.get_json()
    body = resp.get_json()
    assert set(body) == {"error", "message", "fields"}
    assert body["error"] == {400: "invalid_params", 413: "request_too_large"}[status]
    assert set(body["fields"]) == {"file"}
    assert fragment in body["fields"]["file"] and fragment in body["message"]


@pytest.mark.parametrize(
    "data, filename, fragment",
    [
        (zip_bytes({"a/1.png": png_bytes(), "../../etc/cron.d/x.png": png_bytes()}), "slip.zip",
         "archive entry '../../etc/cron.d/x.png' escapes the archive (zip-slip)"),
        (bomb_zip(20), "bomb.zip", "compression ratio"),
        (zip_bytes({"a/1.png": png_bytes(), "a/readme.txt": b"hi"}), "mixed.zip",
         f"entry 'a/readme.txt' is not an image {ALLOWED}"),
        (b"PK\x03\x04garbage", "corrupt.zip", "not a valid zip archive"),
        (b"\x7fELF", "prog", "is not a supported upload"),
    ],
)
def test_refused_upload_leaves_nothing(client, sqlite_settings, data, filename, fragment):
    assert_refused(post_file(client, data, filename), fragment)
    assert totals(client, sqlite_settings) == (0, [], 0)


def test_bomb_reason_names_ratio_and_bound(client):
    resp = post_file(client, bomb_zip(20), "bomb.zip")
    assert_refused(resp, "exceeds 200 (decompression bomb)")
    assert "entry 'bomb.png' expands from" in resp.get_json()["fields"]["file"]


@pytest.fixture
def small_client(sqlite_settings):
    """An app whose uploads are capped at 2 KiB."""
    from web import create_app

    return create_app(replace(sqlite_settings, upload_max_bytes=2048)).test_client()


def test_oversize_upload_refused_from_its_content_length(small_client, sqlite_settings):
    data = flat_zip(2) + bytes(200 * 1024)  # a content length past the cap plus the multipart slack
    assert_refused(post_file(small_client, data, "big.zip"), "above the 2.0 KiB upload limit", 413)
    assert totals(small_client, sqlite_settings) == (0, [], 0)


def test_oversize_upload_refused_while_streaming(small_client, sqlite_settings):
    data = bytes(10 * 1024)  # within the multipart slack, so the bytes are counted as they arrive
    assert_refused(post_file(small_client, data, "big.zip"), "upload is larger than the 2.0 KiB upload limit", 413)
    assert totals(small_client, sqlite_settings) == (0, [], 0)


def test_oversize_upload_without_content_length(small_client, sqlite_settings):
    """A chunked body (no Content-Length): werkzeug stops reading at the cap and the
    one error handler words its 413 as the others."""
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.zip\"\r\n"
            f"Content-Type: application/zip\r\n\r\n").encode() + bytes(200 * 1024) + f"\r\n--{boundary}--\r\n".encode()
    resp = small_client.post("/api/v1/uploads", input_stream=io.BytesIO(body),
                             content_type=f"multipart/form-data; boundary={boundary}",
                             environ_overrides={"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"})
    assert resp.request.content_length is None
    assert_refused(resp, "upload is larger than the 2.0 KiB upload limit", 413)
    assert totals(small_client, sqlite_settings) == (0, [], 0)


def test_upload_needs_a_file_field(client):
    resp = client.post("/api/v1/uploads", data={"other": (io.BytesIO(b"x"), "x.txt")})
    assert resp.status_code == 400 and resp.get_json()["fields"] == {"file": "required"}
    resp = client.post("/api/v1/uploads", json={"file": "x"})
    assert resp.status_code == 400 and resp.get_json()["fields"] == {"file": "required"}


def test_request_body_over_max_request_bytes_is_a_413(client):
    resp = client.post("/api/v1/jobs", data=b"{" + b" " * (1024 * 1024) + b"}", content_type="application/json")
    assert resp.status_code == 413
    body = resp.get_json()
    assert body["error"] == "request_too_large"
    assert body["fields"] == {"body": "request body is larger than the 1048576-byte limit (1.0 MiB)"}


# ------------------------------------------------------------------ references in jobs
class UploadRefSpec(Spec):
    """A test kind with an upload field, as ddpm.train's `dataset` will have."""

    dataset: str = Field("digits", json_schema_extra={"upload_kind": "dataset"})


@pytest.fixture
def upload_kind(monkeypatch):
    monkeypatch.setitem(KINDS, "test.uploads", Kind("test.uploads", UploadRefSpec, "cpu", "Upload refs"))
    return "test.uploads"


def test_job_with_an_upload_ref(client, upload_kind):
    dataset = upload(client, flat_zip(), "d.zip")["ref"]
    image = upload(client, png_bytes(), "i.png")["ref"]
    missing = "upload:" + "a" * 32

    for ref, reason in [(missing, f"{missing} not found"),
                        (image, f"{image} is an image upload, expected a dataset upload")]:
        resp = client.post("/api/v1/jobs", json={"kind": upload_kind, "params": {"dataset": ref}})
        assert resp.status_code == 400
        body = resp.get_json()
        assert body["fields"] == {"dataset": reason} and body["message"] == f"dataset: {reason}"
    assert client.get("/api/v1/jobs").get_json()["total"] == 0

    resp = client.post("/api/v1/jobs", json={"kind": upload_kind, "params": {"dataset": dataset}})
    assert resp.status_code == 202
    assert resp.get_json()["params"]["dataset"] == dataset
    resp = client.post("/api/v1/jobs", json={"kind": upload_kind, "params": {"dataset": "hf:fashion_mnist"}})
    assert resp.status_code == 202  # not an upload ref: left to the spec
    assert client.get("/api/v1/jobs").get_json()["total"] == 2


def test_form_submit_with_a_bad_upload_ref(client, upload_kind):
    image = upload(client, png_bytes(), "i.png")["ref"]
    resp = client.post(f"/submit/{upload_kind}", data={"dataset": image, "priority": "0"})
    assert resp.status_code == 400
    assert f"{image} is an image upload, expected a dataset upload" in resp.get_data(as_text=True)
    assert client.get("/api/v1/jobs").get_json()["total"] == 0


# ------------------------------------------------------------------ CLI
@pytest.fixture
def live_url(app):
    """The app on a real HTTP server in a thread, for the CLI's streaming upload."""
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def test_cli_upload_prints_the_ref(live_url, tmp_path, capsys, client):
    from shared.cli import main

    path = tmp_path / "pets dataset.zip"
    path.write_bytes(class_zip())
    main(["upload", str(path), "--url", live_url])
    out, err = capsys.readouterr()
    ref = out.strip()
    assert re.fullmatch(r"upload:[0-9a-f]{32}", ref)
    assert "dataset pets dataset.zip: 6 images, 3 classes" in err
    body = client.get(f"/api/v1/uploads/{ref[len('upload:'):]}").get_json()
    assert body["filename"] == "pets dataset.zip" and body["sha256"] == hashlib.sha256(class_zip()).hexdigest()

    bad = tmp_path / "slip.zip"
    bad.write_bytes(zip_bytes({"../x.png": png_bytes()}))
    with pytest.raises(SystemExit) as info:
        main(["upload", str(bad), "--url", live_url])
    assert info.value.code == 1
    assert "HTTP 400" in capsys.readouterr().err
