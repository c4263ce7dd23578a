"""Bounds on what an upload costs and carries: a dataset zip's image headers are
decoded at upload for a bounded sample only (the worker decodes them all), and a
prompts file's prompts are held to the length a job's own prompts are."""
from __future__ import annotations

import io
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select

from shared import uploads
from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.errors import SpecError
from shared.models import Upload
from shared.specs import MAX_PROMPT_CHARS
from shared.storage import make_storage
from shared.uploads import dataset_members, inspect_upload, read_prompts, sample_indices, save_upload
from tests.upload_files import png_bytes, zip_bytes

SETTINGS = Settings.embedded(Path("/nonexistent"))
PNG = png_bytes()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refusal(tmp_path: Path, name: str, data: bytes, settings: Settings = SETTINGS) -> str:
    with pytest.raises(SpecError) as info:
        inspect_upload(name, write(tmp_path, name, data), settings)
    assert set(info.value.fields) == {"file"}
    return info.value.fields["file"]


def images(n: int, bad_at: int | None = None, bad: bytes = b"not a png at all") -> bytes:
    """A flat zip of n PNGs in archive order img000.png, img001.png, ...; the one at
    `bad_at` holds `bad` instead."""
    return zip_bytes({f"img{i:03d}.png": bad if i == bad_at else PNG for i in range(n)})


# ------------------------------------------------------------------ the sample
@pytest.mark.parametrize("count, most", [(100_000, 1000), (1001, 1000), (37, 5), (10, 2)])
def test_the_sample_is_spread_over_the_archive_with_its_ends(count, most):
    picked = sample_indices(count, most)
    assert len(picked) == most and picked == sorted(set(picked))
    assert picked[0] == 0 and picked[-1] == count - 1
    gaps = [b - a for a, b in zip(picked, picked[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spread


def test_a_small_archive_is_decoded_whole_and_a_tiny_bound_keeps_the_ends():
    assert sample_indices(5, 1000) == [0, 1, 2, 3, 4]
    assert sample_indices(9, 0) == [0, 8] and sample_indices(9, 1) == [0, 8]
    assert sample_indices(1, 0) == [0]


def test_upload_decodes_only_the_sample_and_the_worker_decodes_every_header(tmp_path, monkeypatch):
    opened: list[str] = []
    real_open = uploads._open_image

    def counting(fp, label, settings):
        opened.append(label)
        return real_open(fp, label, settings)

    monkeypatch.setattr(uploads, "_open_image", counting)
    path = write(tmp_path, "d.zip", images(50))
    kind, _, meta = inspect_upload("d.zip", path, replace(SETTINGS, upload_inspect_images=5))
    assert kind == "dataset" and meta["num_images"] == 50
    assert opened == [f"img{i:03d}.png" for i in (0, 12, 24, 37, 49)]

    opened.clear()
    with zipfile.ZipFile(path) as zf:  # what the worker calls before it reads the zip
        members, _ = dataset_members(zf, SETTINGS)
    assert len(members) == 50 and sorted(opened) == [f"img{i:03d}.png" for i in range(50)]


@pytest.mark.parametrize("bad_at", [0, 19])
def test_a_bad_first_or_last_image_is_refused_at_upload(tmp_path, bad_at):
    reason = refusal(tmp_path, "d.zip", images(20, bad_at), replace(SETTINGS, upload_inspect_images=2))
    assert reason == f"entry 'img{bad_at:03d}.png' is not an image (allowed: .png .jpg .jpeg .webp .bmp .gif)"


@pytest.mark.parametrize("name, data, fragment", [
    ("../evil.png", PNG, "zip-slip"),
    ("run.sh", b"#!/bin/sh\n", "is not an image"),
    ("bomb.png", bytes(2 * 1024 * 1024), "decompression bomb"),
], ids=["zip-slip", "not-an-image", "bomb"])
def test_the_structure_of_every_entry_is_checked_whatever_the_sample(tmp_path, name, data, fragment):
    """Names, suffixes and ratios come from the central directory: checked for the
    entries the sample does not decode, too (here the middle one of 21)."""
    entries = {f"img{i:03d}.png": PNG for i in range(20)}
    entries = {**dict(list(entries.items())[:10]), name: data, **dict(list(entries.items())[10:])}
    assert fragment in refusal(tmp_path, "d.zip", zip_bytes(entries), replace(SETTINGS, upload_inspect_images=2))


def test_an_image_the_sample_skipped_fails_the_training_job(run_inline, sqlite_settings, tmp_path):
    """Accepted at upload (its header was not in the sample), refused by the worker's
    own check before it reads any image: the job fails naming the entry."""
    settings = replace(sqlite_settings, upload_inspect_images=2)
    path = write(tmp_path, "d.zip", images(20, bad_at=7))
    upload = save_upload(make_sessionmaker(make_engine(settings.database_url)), make_storage(settings), settings,
                         "d.zip", path)
    assert upload.meta["num_images"] == 20

    job = run_inline("ddpm.train", {"preset": "tiny", "dataset": f"upload:{upload.id}", "max_steps": 1,
                                    "batch_size": 2}, settings)
    assert job.status == "failed"
    assert "entry 'img007.png' is not an image" in job.error


# ------------------------------------------------------------------ prompt lengths
def long_line(n: int) -> str:
    """Words, n characters, no space at either end."""
    return ("a cat " * (n // 6 + 1))[: n - 1] + "x"


OVER = MAX_PROMPT_CHARS + 1
HUGE = 15 * 1024 * 1024  # one line of 15 MiB, under the prompts file's 16 MiB cap


@pytest.mark.parametrize("name, text, line, what, n", [
    ("p.txt", f"a cat\n\n{long_line(OVER)}\na dog\n", 3, "prompt", OVER),
    ("p.txt", long_line(HUGE), 1, "prompt", HUGE),
    ("p.csv", f"prompt,negative_prompt\na cat,blurry\n{long_line(OVER)},\n", 3, "prompt", OVER),
    ("p.csv", f"prompt,seed,negative_prompt\na cat,1,{long_line(OVER)}\n", 2, "negative_prompt", OVER),
], ids=["txt", "txt-15MiB-line", "csv-prompt", "csv-negative_prompt"])
def test_a_prompt_over_the_length_limit_is_refused(tmp_path, name, text, line, what, n):
    reason = refusal(tmp_path, name, text.encode())
    assert reason == f"line {line}: {what} is {n} characters, above the {MAX_PROMPT_CHARS}-character limit"
    with pytest.raises(SpecError):  # the worker reads the file with the same rules
        read_prompts(write(tmp_path, name, text.encode()))


def test_a_prompt_at_the_length_limit_is_accepted(tmp_path):
    at_limit = long_line(MAX_PROMPT_CHARS)
    _, _, meta = inspect_upload("p.txt", write(tmp_path, "p.txt", f"  {at_limit}  \n".encode()), SETTINGS)
    assert meta["num_prompts"] == 1
    csv_text = f"prompt,negative_prompt\n{at_limit},{at_limit}\n"
    prompts = read_prompts(write(tmp_path, "p.csv", csv_text.encode()))
    assert prompts == [{"prompt": at_limit.strip(), "negative_prompt": at_limit.strip()}]


def test_the_api_refuses_a_long_prompt_and_stores_nothing(client, sqlite_settings):
    text = f"a cat\n{'x' * (MAX_PROMPT_CHARS + 1)}\n".encode()
    resp = client.post("/api/v1/uploads", data={"file": (io.BytesIO(text), "prompts.txt")})
    assert resp.status_code == 400, resp.get_json()
    body = resp.get_json()
    assert body["fields"] == {"file": f"line 2: prompt is {MAX_PROMPT_CHARS + 1} characters, "
                                      f"above the {MAX_PROMPT_CHARS}-character limit"}
    engine = make_engine(sqlite_settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            assert session.scalar(select(func.count()).select_from(Upload)) == 0
    finally:
        engine.dispose()
    assert make_storage(sqlite_settings).list("uploads") == []
