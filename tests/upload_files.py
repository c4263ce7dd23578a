"""Files to upload in tests: images, dataset zips (good and hostile), prompts files."""
from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib

from PIL import Image


def png_bytes(width: int = 8, height: int = 8, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` and has no pixel data: PIL's lazy open
    reads the size from the header, and nothing here should ever decode it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


def zip_bytes(entries: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    """A deflated zip of `entries`; names ending in `/` become folder entries."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name.endswith("/"):
                info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
            elif name in symlinks:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            else:
                info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, data)
    return buf.getvalue()


def class_zip() -> bytes:
    """`mydata/<class>/<n>.png` for three classes (2 + 3 + 1 images), with macOS junk."""
    entries = {"mydata/": b"", "mydata/zebra/": b""}
    for cls, count in [("zebra", 2), ("cat", 3), ("dog", 1)]:
        for i in range(count):
            entries[f"mydata/{cls}/{i}.png"] = png_bytes(color=(i * 40, 0, 0))
    entries["__MACOSX/mydata/cat/._0.png"] = b"\x00\x05\x16\x07 resource fork"
    entries["mydata/.DS_Store"] = b"\x00\x00\x00\x01Bud1"
    entries["mydata/cat/._1.png"] = b"AppleDouble"
    return zip_bytes(entries)


def flat_zip(n: int = 4) -> bytes:
    return zip_bytes({f"img{i}.png": png_bytes(color=(0, i * 50, 0)) for i in range(n)})


def bomb_zip(megabytes: int = 20) -> bytes:
    """One `.png` member of `megabytes` MiB of zeros: deflate shrinks it about 1000:1."""
    return zip_bytes({"ok.png": png_bytes(), "bomb.png": bytes(megabytes * 1024 * 1024)})
