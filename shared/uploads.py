"""Uploads: what a user may upload, checked on the way in and again by the worker.

Three kinds, told apart by content (not only by extension): a `dataset` (a zip of
images, optionally in one folder per class), an `image`, and a `prompts` file
(.txt, one prompt a line, or .csv with prompt, negative_prompt, seed columns).
Every refusal is a SpecError naming `file` and the bound it broke. Jobs refer to
an upload as `upload:<id>`; `check_upload_refs` checks those at submit time.

No Flask and no torch here: the web side and the worker both use this module.
"""
from __future__ import annotations

import csv
import io
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared import idempotency
from shared.auth import can_see, visible
from shared.config import Settings
from shared.db import session_scope
from shared.errors import SpecError, StorageError, TooLarge, UploadNotFound
from shared.models import Upload, User, new_id
from shared.specs import MAX_PROMPT_CHARS
from shared.storage import CHUNK_BYTES, Storage, file_digest, human_bytes, upload_key

UPLOAD_KINDS = ("dataset", "image", "prompts")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "BMP": "image/bmp", "GIF": "image/gif"}
PROMPT_TYPES = {".txt": "text/plain", ".csv": "text/csv"}
PROMPT_COLUMNS = ("prompt", "negative_prompt", "seed")
MAX_PROMPTS = 10_000
MAX_PROMPTS_BYTES = 16 * 1024**2
MAX_CLASSES = 1000  # class folders in a dataset zip (class labels are 0..999 elsewhere)
SEED_MAX = 2**32 - 1
# Members smaller than this are not ratio-checked: a small solid-colour BMP
# compresses 1000:1 and is harmless; the total-size cap still counts it.
RATIO_MIN_BYTES = 1024**2
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
REF_PREFIX = "upload:"
REF_RE = re.compile(r"upload:([0-9a-f]{32})")
ALLOWED_EXTS = " ".join(IMAGE_EXTS)
ARTICLE = {"dataset": "a dataset", "image": "an image", "prompts": "a prompts"}


@dataclass(frozen=True)
class UploadInfo:
    """An upload row, detached from its session (what the worker gets)."""

    id: str
    filename: str
    kind: str
    content_type: str
    size: int
    sha256: str
    meta: dict

    @property
    def ref(self) -> str:
        return REF_PREFIX + self.id

    @classmethod
    def from_row(cls, row: Upload) -> "UploadInfo":
        return cls(row.id, row.filename, row.kind, row.content_type, row.size, row.sha256, dict(row.meta or {}))


# ------------------------------------------------------------------ helpers
def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx" if pixels >= 100_000 else f"{pixels} px"


def upload_error(reason: str) -> SpecError:
    """The refusal of an upload: a SpecError on the `file` field, naming the reason."""
    return SpecError(f"invalid upload: {reason}", {"file": reason})


def upload_too_large(reason: str) -> TooLarge:
    """An upload over its size bound: a TooLarge (413) on the `file` field."""
    return TooLarge(f"invalid upload: {reason}", {"file": reason})


def upload_ref(upload_id: str) -> str:
    return REF_PREFIX + upload_id


def parse_upload_ref(ref: str) -> str | None:
    """The id in `upload:<32 hex>`, or None if `ref` is not a well-formed upload reference."""
    match = REF_RE.fullmatch(ref) if isinstance(ref, str) else None
    return match.group(1) if match else None


def safe_filename(name: str | None) -> str:
    """The client's filename as a display name: last path component, printable, at most 200 chars."""
    base = re.split(r"[/\\]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if base in ("", ".", ".."):
        return "upload"
    if len(base) > 200:
        suffix = PurePosixPath(base).suffix[:16]
        base = base[: 200 - len(suffix)] + suffix
    return base


def _suffix(name: str) -> str:
    """PurePosixPath(name).suffix, lower-cased, by string operations: it runs once per
    entry of a zip of up to 100,000 images, where pathlib took most of the checks' time."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    dot = base.rfind(".")
    return base[dot:].lower() if 0 < dot < len(base) - 1 else ""


def copy_capped(src: BinaryIO, dest: Path, max_bytes: int) -> int:
    """Copy a stream to `dest`, refusing (SpecError on `file`) once it passes `max_bytes`."""
    size = 0
    with open(dest, "wb") as out:
        for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
            size += len(chunk)
            if size > max_bytes:
                raise upload_too_large(f"upload is larger than the {human_bytes(max_bytes)} upload limit")
            out.write(chunk)
    return size


# ------------------------------------------------------------------ images
def _open_image(fp, label: str, settings: Settings) -> Image.Image | None:
    """PIL's lazy open (header only) plus the pixel cap; None when PIL knows no such image."""
    try:
        image = Image.open(fp, formats=list(IMAGE_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = _mpx(int(found.group(1))) if found else "too large"
        raise upload_error(
            f"image {label} is {size}, above the {_mpx(settings.upload_max_pixels)} limit (decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        return None
    width, height = image.size
    if width * height > settings.upload_max_pixels:
        image.close()
        raise upload_error(
            f"image {label} is {width}x{height} = {_mpx(width * height)}, "
            f"above the {_mpx(settings.upload_max_pixels)} limit"
        )
    return image


def _inspect_image(filename: str, path: Path, settings: Settings) -> tuple[str, dict] | None:
    """(content_type, meta) for an image PIL can open and fully decode; None when the
    file is not an image (text starting with `BM` makes PIL's BMP parser fail, too)."""
    try:
        image = _open_image(path, filename, settings)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if _suffix(filename) in IMAGE_EXTS:
            raise upload_error(f"image {filename} is corrupt or truncated: {exc}") from None
        return None
    if image is None:
        return None
    with image:
        try:
            image.load()  # decode it all (bounded by the pixel cap): catches truncated files
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise upload_error(f"image {filename} is corrupt or truncated: {exc}") from None
        return IMAGE_FORMATS[image.format], {
            "width": image.width, "height": image.height, "mode": image.mode, "format": image.format,
        }


# ------------------------------------------------------------------ dataset zips
def _unsafe_path(name: str) -> bool:
    """Absolute, `..`, backslash, drive letter, empty or `.` components: all refused."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return True
    parts = name.rstrip("/").split("/")
    return any(part in ("", ".", "..") for part in parts)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _is_junk(name: str) -> bool:
    """macOS and editor litter: `__MACOSX/...` and dotfiles (`.DS_Store`, `._x.png`) anywhere."""
    parts = name.rstrip("/").split("/")
    return parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)


def max_zip_entries(settings: Settings) -> int:
    """Entries of any sort (images, folders, skipped junk) a zip may list."""
    return 2 * settings.upload_max_files + 1000


def _declared_entries(path: Path) -> int | None:
    """The entry count from the end-of-central-directory record, read before
    zipfile parses (and holds in memory) every entry."""
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return None
    try:
        with open(path, "rb") as f:
            record = end_record(f)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return record[zipfile._ECD_ENTRIES_TOTAL] if record else None


def sample_indices(count: int, most: int) -> list[int]:
    """At most `most` indices spread evenly over range(count), in order; 0 and
    count - 1 are always among them (so `most` below 2 counts as 2)."""
    if count <= most:
        return list(range(count))
    most = max(most, 2)
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def dataset_members(
    zf: zipfile.ZipFile, settings: Settings, inspect_images: int | None = None,
) -> tuple[list[tuple[str, int | None]], list[str] | None]:
    """List a dataset zip safely: (member name, class index or None) sorted by name,
    and the class names (sorted folder names) or None for an unlabelled set.

    Refuses (SpecError on `file`) zip-slip paths, symlinks, non-image entries,
    encrypted entries, duplicates, too many images, a declared uncompressed total or
    a per-member compression ratio above the settings' caps, images above the pixel
    cap (read from each member's header only), and a zip with no image. Skips
    folders, `__MACOSX/` and dotfiles.

    Every entry's name, size and ratio is checked (the central directory alone). The
    headers decoded are every image's, or with `inspect_images` that many spread over
    the archive, its first and last images among them. The web side samples on upload
    (a zip of 100,000 images would hold a web thread for seconds); the worker calls
    this again with no sample, so every image's header is checked before it reads one."""
    infos = zf.infolist()
    if len(infos) > max_zip_entries(settings):
        raise upload_error(
            f"archive lists {len(infos)} entries, above the {max_zip_entries(settings)}-entry limit "
            f"(2 x upload_max_files + 1000, counting folders and skipped files)"
        )
    images: list[zipfile.ZipInfo] = []
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if _unsafe_path(name):
            raise upload_error(f"archive entry {name!r} escapes the archive (zip-slip)")
        if _is_symlink(info):
            raise upload_error(f"archive entry {name!r} is a symbolic link (not allowed)")
        if info.is_dir() or _is_junk(name):
            continue
        if name in seen:
            raise upload_error(f"archive entry {name!r} appears twice")
        seen.add(name)
        if _suffix(name) not in IMAGE_EXTS:
            raise upload_error(f"entry {name!r} is not an image (allowed: {ALLOWED_EXTS})")
        if info.flag_bits & 0x1:
            raise upload_error(f"entry {name!r} is encrypted (not supported)")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= RATIO_MIN_BYTES and ratio > settings.upload_max_ratio:
            raise upload_error(
                f"entry {name!r} expands from {human_bytes(info.compress_size)} to {human_bytes(info.file_size)}: "
                f"compression ratio {ratio:.0f} exceeds {settings.upload_max_ratio:g} (decompression bomb)"
            )
        images.append(info)

    if not images:
        raise upload_error(f"archive contains no images (allowed: {ALLOWED_EXTS})")
    if len(images) > settings.upload_max_files:
        raise upload_error(f"archive has {len(images)} images, above the {settings.upload_max_files}-image limit")
    total = sum(info.file_size for info in images)
    if total > settings.upload_max_uncompressed_bytes:
        raise upload_error(
            f"uncompressed size {human_bytes(total)} exceeds the {human_bytes(settings.upload_max_uncompressed_bytes)} limit"
        )

    inspected = images if inspect_images is None else [images[i] for i in sample_indices(len(images), inspect_images)]
    for info in inspected:
        try:
            with zf.open(info) as fp:
                image = _open_image(fp, info.filename, settings)
        except SpecError:
            raise
        except NotImplementedError as exc:
            raise upload_error(f"entry {info.filename!r} uses an unsupported compression method: {exc}") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, SyntaxError, ValueError) as exc:
            raise upload_error(f"entry {info.filename!r} is not a readable image: {exc}") from None
        if image is None:
            raise upload_error(f"entry {info.filename!r} is not an image (allowed: {ALLOWED_EXTS})")

    images.sort(key=lambda i: i.filename)
    parts = [tuple(i.filename.split("/")) for i in images]
    if all(len(p) >= 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]  # one common top-level folder: `mydata/cat/1.png`
    if all(len(p) == 2 for p in parts):
        classes = sorted({p[0] for p in parts})
        if len(classes) > MAX_CLASSES:
            raise upload_error(f"archive has {len(classes)} class folders, above the {MAX_CLASSES}-class limit")
        index = {c: i for i, c in enumerate(classes)}
        return [(i.filename, index[p[0]]) for i, p in zip(images, parts)], classes
    return [(i.filename, None) for i in images], None


def _inspect_dataset(path: Path, settings: Settings) -> dict:
    declared = _declared_entries(path)
    if declared is not None and declared > max_zip_entries(settings):
        raise upload_error(
            f"archive lists {declared} entries, above the {max_zip_entries(settings)}-entry limit "
            f"(2 x upload_max_files + 1000, counting folders and skipped files)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            members, classes = dataset_members(zf, settings, settings.upload_inspect_images)
            uncompressed = sum(zf.getinfo(name).file_size for name, _ in members)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise upload_error(f"not a valid zip archive (corrupt or truncated): {exc}") from None
    return {"num_images": len(members), "classes": classes, "uncompressed_bytes": uncompressed}


# ------------------------------------------------------------------ prompts
def _prompts_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_PROMPTS_BYTES:
        raise upload_error(f"prompts file is {human_bytes(size)}, above the {human_bytes(MAX_PROMPTS_BYTES)} limit")
    data = path.read_bytes()
    if b"\x00" in data:
        raise upload_error("prompts file is binary (contains NUL bytes), expected utf-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise upload_error(f"prompts file is not utf-8 text (bad byte at offset {exc.start})") from None


def _seed(raw: str, line: int) -> int:
    try:
        seed = int(raw)
    except ValueError:
        raise upload_error(f"line {line}: seed {raw!r} is not an integer") from None
    if not 0 <= seed <= SEED_MAX:
        raise upload_error(f"line {line}: seed {seed} is outside [0, {SEED_MAX}]")
    return seed


def _check_length(text: str, what: str, line: int) -> None:
    """A prompt is held to the bound a job's own `prompts` are (MAX_PROMPT_CHARS): the
    file's bytes cap alone would take a 15 MiB line as one prompt."""
    if len(text) > MAX_PROMPT_CHARS:
        raise upload_error(
            f"line {line}: {what} is {len(text)} characters, above the {MAX_PROMPT_CHARS}-character limit")


def _parse_csv(text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in reader.fieldnames or []]
        if "prompt" not in header:
            raise upload_error(f"prompts .csv needs a 'prompt' column in its header row (columns: {', '.join(PROMPT_COLUMNS)})")
        unknown = [h for h in header if h not in PROMPT_COLUMNS]
        if unknown:
            raise upload_error(f"prompts .csv has unknown columns {unknown} (allowed: {', '.join(PROMPT_COLUMNS)})")
        reader.fieldnames = header
        prompts = []
        for row in reader:
            line = reader.line_num
            if None in row:
                raise upload_error(f"line {line}: more fields than the header's {len(header)}")
            values = {k: (v or "").strip() for k, v in row.items()}
            if not any(values.values()):
                continue
            if not values["prompt"]:
                raise upload_error(f"line {line}: prompt is empty")
            for column in ("prompt", "negative_prompt"):
                _check_length(values.get(column) or "", column, line)
            item: dict[str, Any] = {"prompt": values["prompt"]}
            if values.get("negative_prompt"):
                item["negative_prompt"] = values["negative_prompt"]
            if values.get("seed"):
                item["seed"] = _seed(values["seed"], line)
            prompts.append(item)
            if len(prompts) > MAX_PROMPTS:
                break
    except csv.Error as exc:
        raise upload_error(f"prompts .csv is malformed at line {reader.line_num}: {exc}") from None
    return prompts


def parse_prompts(text: str, fmt: str) -> list[dict]:
    """Prompts from a .txt (`fmt="txt"`: one a line, blank lines skipped) or a .csv."""
    if fmt == "csv":
        prompts = _parse_csv(text)
    else:
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if prompt := line.strip():
                _check_length(prompt, "prompt", number)
                prompts.append({"prompt": prompt})
    if not prompts:
        raise upload_error("prompts file has no prompts")
    if len(prompts) > MAX_PROMPTS:
        raise upload_error(f"prompts file has more than {MAX_PROMPTS} prompts, the limit")
    return prompts


def read_prompts(path: Path) -> list[dict]:
    """[{"prompt", "negative_prompt"?, "seed"?}] from a .csv (by suffix) or a .txt file.
    Raises SpecError on `file` for a file that inspect_upload would refuse."""
    path = Path(path)
    return parse_prompts(_prompts_text(path), "csv" if _suffix(path.name) == ".csv" else "txt")


# ------------------------------------------------------------------ inspect
def inspect_upload(filename: str, path: Path, settings: Settings) -> tuple[str, str, dict]:
    """(kind, content_type, meta) for an uploaded file, told apart by content: zip
    magic means a dataset, something PIL opens (as PNG, JPEG, WebP, BMP or GIF) an
    image, utf-8 text named .txt or .csv a prompts file. Anything else, or a file
    that breaks a bound, raises SpecError on `file` naming the reason."""
    path = Path(path)
    size = path.stat().st_size
    if size > settings.upload_max_bytes:
        raise upload_too_large(
            f"upload is {human_bytes(size)}, above the {human_bytes(settings.upload_max_bytes)} upload limit")
    if size == 0:
        raise upload_error("upload is empty")
    with open(path, "rb") as f:
        head = f.read(4)
    if head in ZIP_MAGIC:
        return "dataset", "application/zip", _inspect_dataset(path, settings)
    image = _inspect_image(filename, path, settings)
    if image is not None:
        return "image", image[0], image[1]
    ext = _suffix(filename)
    if ext in PROMPT_TYPES:
        prompts = parse_prompts(_prompts_text(path), ext[1:])
        return "prompts", PROMPT_TYPES[ext], {"num_prompts": len(prompts), "format": ext[1:]}
    if ext == ".zip":
        raise upload_error(f"{filename!r} is named .zip but is not a zip archive")
    if ext in IMAGE_EXTS:
        raise upload_error(f"{filename!r} is named {ext} but is not a readable image")
    raise upload_error(
        f"{filename!r} is not a supported upload: a .zip of images (dataset), an image ({ALLOWED_EXTS}), "
        f"or a utf-8 prompts file (.txt or .csv)"
    )


# ------------------------------------------------------------------ rows
def save_upload(
    sessions: sessionmaker[Session], storage: Storage, settings: Settings, filename: str, path: Path,
    expect_kinds: tuple[str, ...] | None = None, owner_id: str | None = None,
    idempotency_claim: idempotency.Claim | None = None,
) -> Upload:
    """Inspect, store the bytes under `upload_key(id)`, then insert the row (owned by
    `owner_id`, with its Idempotency-Key claim if any). If any step fails, nothing is
    left behind: no object in storage and no row. With `expect_kinds`, a file of another
    kind is refused before anything is stored."""
    kind, content_type, meta = inspect_upload(filename, path, settings)
    if expect_kinds and kind not in expect_kinds:
        expected = " or ".join(ARTICLE.get(k, k) for k in expect_kinds)
        raise upload_error(f"{filename!r} is {ARTICLE.get(kind, kind)} upload, expected {expected} upload")
    size, sha256 = file_digest(path)
    upload_id = new_id()
    try:
        storage.put_file(upload_key(upload_id), path, content_type)
        with session_scope(sessions) as session:
            upload = Upload(
                id=upload_id, filename=safe_filename(filename), kind=kind, content_type=content_type, size=size,
                sha256=sha256, meta=meta, owner_id=owner_id,
            )
            session.add(upload)
            idempotency.record(session, idempotency_claim, upload_id)
    except BaseException:
        storage.delete_prefix(f"uploads/{upload_id}")
        raise
    return upload


def get_upload(session: Session, upload_id: str, viewer: User | None = None) -> Upload:
    upload = session.get(Upload, upload_id)
    if upload is None or not can_see(upload.owner_id, viewer):
        raise UploadNotFound(f"no upload with id {upload_id!r}")
    return upload


def list_uploads(
    session: Session, kind: str | None = None, limit: int = 50, offset: int = 0, viewer: User | None = None
) -> tuple[list[Upload], int]:
    query = visible(select(Upload), Upload, viewer)
    if kind:
        query = query.where(Upload.kind == kind)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(Upload.created_at.desc(), Upload.id).limit(limit).offset(offset)).all()
    return list(rows), total or 0


def find_upload(session: Session, ref: str, expected_kind: str) -> UploadInfo:
    """The upload `ref` (`upload:<id>`) names, which must be of `expected_kind`, or UploadNotFound."""
    upload_id = parse_upload_ref(ref)
    if upload_id is None:
        raise UploadNotFound(f"{ref!r} is not an upload reference: expected upload:<32 hex digits>")
    upload = session.get(Upload, upload_id)
    if upload is None:
        raise UploadNotFound(f"{ref}: no such upload")
    if upload.kind != expected_kind:
        raise UploadNotFound(
            f"{ref} is {ARTICLE.get(upload.kind, upload.kind)} upload, "
            f"expected {ARTICLE.get(expected_kind, expected_kind)} upload"
        )
    return UploadInfo.from_row(upload)


def download_upload(storage: Storage, info: UploadInfo, dest_dir: Path) -> Path:
    """Download an upload to `dest_dir/<id>/<filename>` and check its sha256 against the row."""
    key = upload_key(info.id)
    if not storage.exists(key):
        raise UploadNotFound(f"{info.ref}: the upload's file is missing from storage ({key})")
    path = Path(dest_dir) / info.id / safe_filename(info.filename)
    storage.download(key, path)
    size, sha256 = file_digest(path)
    if (size, sha256) != (info.size, info.sha256):
        path.unlink(missing_ok=True)
        raise StorageError(
            f"{info.ref}: downloaded {size} bytes with sha256 {sha256[:12]}…, "
            f"the upload has {info.size} bytes with sha256 {info.sha256[:12]}…"
        )
    return path


def field_upload_kinds(field) -> tuple[str, ...]:
    extra = field.json_schema_extra
    if not isinstance(extra, dict) or "upload_kind" not in extra:
        return ()
    kinds = extra["upload_kind"]
    return (kinds,) if isinstance(kinds, str) else tuple(kinds)


def check_upload_refs(session: Session, spec_cls: type[BaseModel], params: dict, viewer: User | None = None) -> None:
    """For each field of `spec_cls` declaring `json_schema_extra={"upload_kind": ...}`,
    check that an `upload:<id>` value names an existing upload of that kind that
    `viewer` may see (another user's is "not found"). Other
    values (`digits`, `hf:...`) are left to the spec. Raises SpecError naming the field."""
    for name, field in spec_cls.model_fields.items():
        kinds = field_upload_kinds(field)
        value = params.get(name) if kinds else None
        for ref in value if isinstance(value, list) else [value]:
            if not isinstance(ref, str) or not ref.startswith(REF_PREFIX):
                continue
            upload_id = parse_upload_ref(ref)
            if upload_id is None:
                reason = f"{ref!r} is not an upload reference: expected upload:<32 hex digits>"
            elif (upload := session.get(Upload, upload_id)) is None or not can_see(upload.owner_id, viewer):
                reason = f"{ref} not found"
            elif upload.kind not in kinds:
                expected = " or ".join(ARTICLE.get(k, k) for k in kinds)
                reason = f"{ref} is {ARTICLE.get(upload.kind, upload.kind)} upload, expected {expected} upload"
            else:
                continue
            raise SpecError(f"{name}: {reason}", {name: reason})
