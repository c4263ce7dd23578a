"""Uploads without Flask: what inspect_upload accepts and refuses (and why), the
dataset listing the worker reuses, prompts files, upload references in job params,
saving (all or nothing) and the worker's fetch_upload on local and S3 storage."""
from __future__ import annotations

import io
import logging
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from pydantic import Field
from sqlalchemy import func, select

from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.errors import SpecError, StorageError, UploadNotFound
from shared.models import Upload
from shared.specs import Spec
from shared.storage import make_storage, upload_key
from shared.uploads import (
    check_upload_refs,
    dataset_members,
    inspect_upload,
    read_prompts,
    save_upload,
)
from tests.upload_files import bomb_zip, class_zip, flat_zip, png_bytes, png_header_only, zip_bytes

SETTINGS = Settings.embedded(Path("/nonexistent"))  # the upload limits at their defaults


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(tmp_path, name: str, data: bytes, settings: Settings = SETTINGS) -> str:
    """inspect_upload's refusal reason, which is always on the `file` field."""
    with pytest.raises(SpecError) as info:
        inspect_upload(name, write(tmp_path, name, data), settings)
    assert set(info.value.fields) == {"file"}
    assert info.value.fields["file"] in str(info.value)
    return info.value.fields["file"]


# ------------------------------------------------------------------ datasets
def test_dataset_with_class_folders(tmp_path):
    kind, content_type, meta = inspect_upload("pets.zip", write(tmp_path, "pets.zip", class_zip()), SETTINGS)
    assert (kind, content_type) == ("dataset", "application/zip")
    assert meta["classes"] == ["cat", "dog", "zebra"]  # sorted folder names; mydata/ stripped
    assert meta["num_images"] == 6  # junk (__MACOSX, .DS_Store, ._1.png) and folders skipped
    with zipfile.ZipFile(io.BytesIO(class_zip())) as zf:
        members, classes = dataset_members(zf, SETTINGS)
        assert meta["uncompressed_bytes"] == sum(zf.getinfo(name).file_size for name, _ in members)
    assert classes == ["cat", "dog", "zebra"]
    assert members == [
        ("mydata/cat/0.png", 0), ("mydata/cat/1.png", 0), ("mydata/cat/2.png", 0),
        ("mydata/dog/0.png", 1), ("mydata/zebra/0.png", 2), ("mydata/zebra/1.png", 2),
    ]


@pytest.mark.parametrize(
    "names, classes",
    [
        (["b/1.png", "a/1.png", "a/2.png"], ["a", "b"]),  # no common top folder to strip
        (["img0.png", "img1.png"], None),  # flat
        (["top/1.png", "top/2.png"], None),  # one common folder, stripped: flat
        (["a/1.png", "a/sub/2.png"], None),  # mixed depths
        (["a/1.png", "2.png"], None),
    ],
)
def test_dataset_labels(names, classes):
    with zipfile.ZipFile(io.BytesIO(zip_bytes({n: png_bytes() for n in names}))) as zf:
        members, got = dataset_members(zf, SETTINGS)
    assert got == classes
    assert [name for name, _ in members] == sorted(names)
    labels = [label for _, label in members]
    assert labels == ([classes.index(n.split("/")[0]) for n in sorted(names)] if classes else [None] * len(names))


def test_flat_dataset(tmp_path):
    kind, _, meta = inspect_upload("flat.zip", write(tmp_path, "flat.zip", flat_zip(5)), SETTINGS)
    assert kind == "dataset" and meta["num_images"] == 5 and meta["classes"] is None


def test_kind_is_told_by_content_not_by_extension(tmp_path):
    assert inspect_upload("data.png", write(tmp_path, "data.png", flat_zip()), SETTINGS)[0] == "dataset"
    assert inspect_upload("pic.txt", write(tmp_path, "pic.txt", png_bytes()), SETTINGS)[0] == "image"
    assert "named .zip but is not a zip archive" in refused(tmp_path, "x.zip", b"just text\n")


@pytest.mark.parametrize(
    "name",
    ["../x.png", "a/../../x.png", "/etc/x.png", "C:/x.png", "c:x.png", "a\\..\\..\\x.png", "a//x.png", "./x.png",
     "../evil/"],
)
def test_zip_slip_entries_are_refused(tmp_path, name):
    data = zip_bytes({"ok.png": png_bytes(), name: png_bytes() if not name.endswith("/") else b""})
    assert refused(tmp_path, "d.zip", data) == f"archive entry {name!r} escapes the archive (zip-slip)"


def test_symlink_entry_is_refused(tmp_path):
    data = zip_bytes({"ok.png": png_bytes(), "link.png": b"/etc/passwd"}, symlinks=("link.png",))
    assert refused(tmp_path, "d.zip", data) == "archive entry 'link.png' is a symbolic link (not allowed)"


def test_non_image_entry_is_refused(tmp_path):
    data = zip_bytes({"a/1.png": png_bytes(), "a/notes.txt": b"hello"})
    assert refused(tmp_path, "d.zip", data) == (
        "entry 'a/notes.txt' is not an image (allowed: .png .jpg .jpeg .webp .bmp .gif)"
    )


def test_entry_named_png_that_is_not_an_image_is_refused(tmp_path):
    reason = refused(tmp_path, "d.zip", zip_bytes({"fake.png": b"this is text, not a PNG"}))
    assert reason == "entry 'fake.png' is not an image (allowed: .png .jpg .jpeg .webp .bmp .gif)"


def test_zip_with_only_junk_is_refused(tmp_path):
    data = zip_bytes({"__MACOSX/._x.png": b"junk", ".DS_Store": b"junk", "empty/": b""})
    assert refused(tmp_path, "d.zip", data) == "archive contains no images (allowed: .png .jpg .jpeg .webp .bmp .gif)"


def test_decompression_bomb_member_is_refused(tmp_path):
    reason = refused(tmp_path, "d.zip", bomb_zip(20))
    assert reason.startswith("entry 'bomb.png' expands from ")
    assert "to 20.0 MiB: compression ratio" in reason
    assert reason.endswith("exceeds 200 (decompression bomb)")


def test_ratio_cap_comes_from_settings(tmp_path):
    lenient = replace(SETTINGS, upload_max_ratio=1e6)
    # Past the ratio check, the zeros are still not a PNG.
    assert refused(tmp_path, "d.zip", bomb_zip(2), lenient) == (
        "entry 'bomb.png' is not an image (allowed: .png .jpg .jpeg .webp .bmp .gif)"
    )


def test_uncompressed_total_cap(tmp_path):
    data = flat_zip(3)
    total = sum(i.file_size for i in zipfile.ZipFile(io.BytesIO(data)).infolist())
    assert refused(tmp_path, "d.zip", data, replace(SETTINGS, upload_max_uncompressed_bytes=100)) == (
        f"uncompressed size {total} B exceeds the 100 B limit"
    )


def test_image_count_cap(tmp_path):
    assert refused(tmp_path, "d.zip", flat_zip(3), replace(SETTINGS, upload_max_files=2)) == (
        "archive has 3 images, above the 2-image limit"
    )


def test_entry_count_is_capped_before_the_zip_is_parsed(tmp_path):
    entries = {f"d{i}/": b"" for i in range(1003)} | {"x.png": png_bytes()}
    assert refused(tmp_path, "d.zip", zip_bytes(entries), replace(SETTINGS, upload_max_files=1)) == (
        "archive lists 1004 entries, above the 1002-entry limit (2 x upload_max_files + 1000, counting folders and "
        "skipped files)"
    )


def test_pixel_cap_reads_only_the_member_header(tmp_path):
    # 5000x5000 declared, no pixel data at all: refused from the header alone.
    data = zip_bytes({"ok.png": png_bytes(), "big/x.png": png_header_only(5000, 5000)})
    assert refused(tmp_path, "d.zip", data) == "image big/x.png is 5000x5000 = 25.0 Mpx, above the 16.8 Mpx limit"


def test_pil_decompression_bomb_error_is_a_400_reason(tmp_path):
    # Above twice PIL's own MAX_IMAGE_PIXELS, Image.open itself raises DecompressionBombError.
    data = zip_bytes({"huge.png": png_header_only(20000, 20000)})
    assert refused(tmp_path, "d.zip", data) == "image huge.png is 400.0 Mpx, above the 16.8 Mpx limit (decompression bomb)"


def test_pil_decompression_bomb_warning_as_error_is_a_400_reason(tmp_path):
    # Between PIL's limit and twice it, PIL warns; under `-W error` that warning is raised.
    data = zip_bytes({"big.png": png_header_only(10000, 10000)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reason = refused(tmp_path, "d.zip", data)
    assert reason == "image big.png is 100.0 Mpx, above the 16.8 Mpx limit (decompression bomb)"


def test_duplicate_entries_are_refused(tmp_path):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("x.png", png_bytes())
            zf.writestr("x.png", png_bytes())
    assert refused(tmp_path, "d.zip", buf.getvalue()) == "archive entry 'x.png' appears twice"


@pytest.mark.parametrize("data", [b"PK\x03\x04" + b"\x00" * 64, flat_zip()[:-30]])
def test_corrupt_zip_is_refused(tmp_path, data):
    assert refused(tmp_path, "d.zip", data).startswith("not a valid zip archive (corrupt or truncated): ")


def test_upload_size_cap(tmp_path):
    data = flat_zip()
    assert len(data) < 1024
    assert refused(tmp_path, "d.zip", data, replace(SETTINGS, upload_max_bytes=100)) == (
        f"upload is {len(data)} B, above the 100 B upload limit"
    )


# ------------------------------------------------------------------ images
def test_image(tmp_path):
    kind, content_type, meta = inspect_upload("cat.png", write(tmp_path, "cat.png", png_bytes(30, 20)), SETTINGS)
    assert (kind, content_type) == ("image", "image/png")
    assert meta == {"width": 30, "height": 20, "mode": "RGB", "format": "PNG"}

    buf = io.BytesIO()
    Image.new("L", (12, 7)).save(buf, "JPEG")
    assert inspect_upload("x.jpg", write(tmp_path, "x.jpg", buf.getvalue()), SETTINGS)[1:] == (
        "image/jpeg", {"width": 12, "height": 7, "mode": "L", "format": "JPEG"},
    )


def test_image_pixel_cap(tmp_path):
    assert refused(tmp_path, "x.png", png_bytes(20, 20), replace(SETTINGS, upload_max_pixels=100)) == (
        "image x.png is 20x20 = 400 px, above the 100 px limit"
    )


def test_truncated_image_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, "PNG")  # noise: the pixel data does not compress away
    reason = refused(tmp_path, "x.png", buf.getvalue()[: len(buf.getvalue()) // 2])
    assert reason.startswith("image x.png is corrupt or truncated: ")


def test_unsupported_file_is_refused(tmp_path):
    assert refused(tmp_path, "x.bin", b"\x7fELF\x02\x01") == (
        "'x.bin' is not a supported upload: a .zip of images (dataset), an image (.png .jpg .jpeg .webp .bmp .gif), "
        "or a utf-8 prompts file (.txt or .csv)"
    )
    assert refused(tmp_path, "empty.txt", b"") == "upload is empty"


# ------------------------------------------------------------------ prompts
def test_txt_prompts(tmp_path):
    # "BM..." makes PIL's BMP parser fail, not just pass: still a prompts file.
    path = write(tmp_path, "p.txt", "BMW on a mountain road\n\n  a cat, oil painting  \n\ufffd émoji ok\n".encode())
    assert inspect_upload("p.txt", path, SETTINGS) == ("prompts", "text/plain", {"num_prompts": 3, "format": "txt"})
    assert read_prompts(path) == [
        {"prompt": "BMW on a mountain road"}, {"prompt": "a cat, oil painting"}, {"prompt": "\ufffd émoji ok"},
    ]


def test_csv_prompts(tmp_path):
    text = 'prompt,negative_prompt,seed\n"a cat, in a hat",blurry,7\na dog,,\n\n,,\n"multi\nline",,42\n'
    path = write(tmp_path, "p.csv", b"\xef\xbb\xbf" + text.encode())  # with a BOM, as Excel writes it
    assert inspect_upload("p.csv", path, SETTINGS) == ("prompts", "text/csv", {"num_prompts": 3, "format": "csv"})
    assert read_prompts(path) == [
        {"prompt": "a cat, in a hat", "negative_prompt": "blurry", "seed": 7},
        {"prompt": "a dog"},
        {"prompt": "multi\nline", "seed": 42},
    ]


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("p.csv", b"text,seed\na,1\n", "prompts .csv needs a 'prompt' column in its header row (columns: prompt, "
                                        "negative_prompt, seed)"),
        ("p.csv", b"prompt,style\na,b\n", "prompts .csv has unknown columns ['style'] (allowed: prompt, "
                                          "negative_prompt, seed)"),
        ("p.csv", b"prompt,seed\na,1\nb,x\n", "line 3: seed 'x' is not an integer"),
        ("p.csv", b"prompt,seed\na,-1\n", "line 2: seed -1 is outside [0, 4294967295]"),
        ("p.csv", b"prompt,seed\n,5\n", "line 2: prompt is empty"),
        ("p.csv", b"prompt\na,b\n", "line 2: more fields than the header's 1"),
        ("p.txt", b"\n \n", "prompts file has no prompts"),
        ("p.txt", "caf\xe9\n".encode("latin-1"), "prompts file is not utf-8 text (bad byte at offset 3)"),
        ("p.txt", b"a\x00b\n", "prompts file is binary (contains NUL bytes), expected utf-8 text"),
        ("p.txt", b"p\n" * 10_001, "prompts file has more than 10000 prompts, the limit"),
    ],
)
def test_bad_prompts_files(tmp_path, name, data, reason):
    assert refused(tmp_path, name, data) == reason
    with pytest.raises(SpecError) as info:
        read_prompts(tmp_path / name)
    assert info.value.fields == {"file": reason}


def test_ten_thousand_prompts_is_fine(tmp_path):
    path = write(tmp_path, "p.txt", b"p\n" * 10_000)
    assert inspect_upload("p.txt", path, SETTINGS)[2]["num_prompts"] == 10_000


# ------------------------------------------------------------------ saving and references
@pytest.fixture
def sessions(sqlite_settings):
    engine = make_engine(sqlite_settings.database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def save(settings, sessions, tmp_path, name: str, data: bytes) -> Upload:
    return save_upload(sessions, make_storage(settings), settings, name, write(tmp_path, name, data))


def test_save_upload_stores_the_bytes_and_the_row(sqlite_settings, sessions, tmp_path):
    upload = save(sqlite_settings, sessions, tmp_path, "pets.zip", class_zip())
    assert make_storage(sqlite_settings).get_bytes(upload_key(upload.id)) == class_zip()
    with sessions() as session:
        row = session.get(Upload, upload.id)
        assert (row.filename, row.kind, row.size, row.meta["classes"]) == ("pets.zip", "dataset", len(class_zip()),
                                                                          ["cat", "dog", "zebra"])


def test_save_upload_leaves_nothing_when_the_insert_fails(sqlite_settings, tmp_path):
    storage = make_storage(sqlite_settings)
    unmigrated = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no uploads table: the insert fails
    with pytest.raises(Exception, match="no such table: uploads"):
        save_upload(make_sessionmaker(unmigrated), storage, sqlite_settings, "x.png", write(tmp_path, "x.png",
                                                                                            png_bytes()))
    unmigrated.dispose()
    assert storage.list("uploads") == []


def test_save_upload_stores_nothing_for_a_refused_file(sqlite_settings, sessions, tmp_path):
    with pytest.raises(SpecError):
        save(sqlite_settings, sessions, tmp_path, "d.zip", bomb_zip(2))
    assert make_storage(sqlite_settings).list("uploads") == []
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Upload)) == 0


class RefSpec(Spec):
    dataset: str = Field("digits", json_schema_extra={"upload_kind": "dataset"})
    init_images: list[str] = Field([], json_schema_extra={"upload_kind": ["image"]})
    note: str = "upload:not-checked"  # no upload_kind: left alone


def test_check_upload_refs(sqlite_settings, sessions, tmp_path):
    dataset = save(sqlite_settings, sessions, tmp_path, "d.zip", flat_zip()).id
    image = save(sqlite_settings, sessions, tmp_path, "i.png", png_bytes()).id
    missing = "f" * 32

    def check(**params):
        with sessions() as session:
            check_upload_refs(session, RefSpec, RefSpec(**params).model_dump())

    check()  # digits
    check(dataset="hf:fashion_mnist")
    check(dataset=f"upload:{dataset}", init_images=[f"upload:{image}", f"upload:{image}"])
    for params, field, reason in [
        ({"dataset": f"upload:{missing}"}, "dataset", f"upload:{missing} not found"),
        ({"dataset": f"upload:{image}"}, "dataset", f"upload:{image} is an image upload, expected a dataset upload"),
        ({"init_images": [f"upload:{image}", f"upload:{dataset}"]}, "init_images",
         f"upload:{dataset} is a dataset upload, expected an image upload"),
        ({"dataset": "upload:xyz"}, "dataset", "'upload:xyz' is not an upload reference: expected upload:<32 hex digits>"),
    ]:
        with pytest.raises(SpecError) as info:
            check(**params)
        assert info.value.fields == {field: reason}
        assert str(info.value) == f"{field}: {reason}"


# ------------------------------------------------------------------ worker: fetch_upload
@pytest.fixture(params=["local", "s3"])
def any_settings(request, sqlite_settings):
    return sqlite_settings if request.param == "local" else request.getfixturevalue("prod_settings")


def test_fetch_upload_round_trip(any_settings, tmp_path):
    from worker.context import JobContext

    engine = make_engine(any_settings.database_url)
    sessions = make_sessionmaker(engine)
    storage = make_storage(any_settings)
    data = class_zip()
    upload = save(any_settings, sessions, tmp_path, "pets.zip", data)
    image = save(any_settings, sessions, tmp_path, "i.png", png_bytes())
    ctx = JobContext(any_settings, sessions, storage, "0" * 32, 1, logging.getLogger("test"))
    try:
        path, info = ctx.fetch_upload(f"upload:{upload.id}", "dataset")
        assert path.read_bytes() == data
        assert path.name == "pets.zip" and ctx.workdir in path.parents
        assert (info.id, info.ref, info.kind, info.size, info.sha256) == (
            upload.id, f"upload:{upload.id}", "dataset", len(data), upload.sha256)
        assert info.meta["classes"] == ["cat", "dog", "zebra"]
        with zipfile.ZipFile(path) as zf:  # what the worker's loader does with it
            assert dataset_members(zf, any_settings)[1] == ["cat", "dog", "zebra"]

        with pytest.raises(UploadNotFound, match=f"upload:{image.id} is an image upload, expected a dataset upload"):
            ctx.fetch_upload(f"upload:{image.id}", "dataset")
        with pytest.raises(UploadNotFound, match=f"upload:{'e' * 32}: no such upload"):
            ctx.fetch_upload(f"upload:{'e' * 32}", "dataset")
        with pytest.raises(UploadNotFound, match="not an upload reference"):
            ctx.fetch_upload("digits", "dataset")

        storage.put_bytes(upload_key(image.id), b"tampered", "image/png")
        with pytest.raises(StorageError, match="sha256"):
            ctx.fetch_upload(f"upload:{image.id}", "image")
        storage.delete_prefix(f"uploads/{image.id}")
        with pytest.raises(UploadNotFound, match="missing from storage"):
            ctx.fetch_upload(f"upload:{image.id}", "image")
    finally:
        ctx.close()
        engine.dispose()


# ------------------------------------------------------------------ settings
def test_upload_settings_from_env_and_back(tmp_path):
    defaults = Settings.from_env({"DIFFQUEUE_DATA_DIR": str(tmp_path)})
    assert (defaults.upload_max_bytes, defaults.upload_max_files, defaults.upload_max_uncompressed_bytes,
            defaults.upload_max_pixels, defaults.upload_max_ratio) == (1024**3, 100_000, 4 * 1024**3, 4096 * 4096, 200.0)
    env = {"DIFFQUEUE_DATA_DIR": str(tmp_path), "DIFFQUEUE_UPLOAD_MAX_BYTES": "1000", "DIFFQUEUE_UPLOAD_MAX_FILES": "7",
           "DIFFQUEUE_UPLOAD_MAX_UNCOMPRESSED_BYTES": "5000", "DIFFQUEUE_UPLOAD_MAX_PIXELS": "64",
           "DIFFQUEUE_UPLOAD_MAX_RATIO": "12.5"}
    settings = Settings.from_env(env)
    assert (settings.upload_max_bytes, settings.upload_max_files, settings.upload_max_uncompressed_bytes,
            settings.upload_max_pixels, settings.upload_max_ratio) == (1000, 7, 5000, 64, 12.5)
    assert Settings.from_env({**settings.as_env(), "DIFFQUEUE_DATA_DIR": str(tmp_path)}) == settings
