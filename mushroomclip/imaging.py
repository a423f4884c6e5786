"""Per-image work of data preparation: read, hash, validate, and copy / link / re-encode one file.

Runs in worker processes, so it imports nothing heavy and returns plain dicts.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

COPY_MODES = ("resize", "copy", "link")
EXIF_ORIENTATION = 0x0112
JPEG_NAMES = (".jpg", ".jpeg")


def _write_atomically(
    dest: Path, data: bytes | None = None, image: Image.Image | None = None, quality: int = 90
) -> None:
    # Write-then-rename, so an interrupted run never leaves a half-written image behind.
    tmp = dest.with_name(dest.name + ".part")
    if image is not None:
        image.save(tmp, format="JPEG", quality=quality, optimize=False)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, dest)


def _link(src: Path, dest: Path) -> None:
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another file system: fall back to a symbolic link
        os.symlink(src.resolve(), dest)


def process_image(src: str, dest_dir: str, mode: str, max_side: int, quality: int) -> dict:
    """Validate ``src`` by decoding it fully and place it in ``dest_dir``.

    In ``resize`` mode an image whose long side exceeds ``max_side`` (or that carries an EXIF
    rotation) is re-encoded once as an upright RGB JPEG; every other image is copied byte for byte.
    Returns ``{"status": "ok", "sha1", "dest", "width", "height", "reencoded"}`` or
    ``{"status": <skip reason>, "detail"}``.
    """
    src_path = Path(src)
    try:
        data = src_path.read_bytes()
    except FileNotFoundError:
        return {"status": "missing_file", "detail": "file not found"}
    except OSError as err:
        return {"status": "unreadable_file", "detail": str(err)}
    sha1 = hashlib.sha1(data).hexdigest()
    dest = Path(dest_dir) / src_path.name
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            too_big = mode == "resize" and max_side > 0 and max(width, height) > max_side
            rotated = mode == "resize" and image.getexif().get(EXIF_ORIENTATION, 1) != 1
            if too_big or rotated:
                if too_big:
                    image.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
                upright = ImageOps.exif_transpose(image).convert("RGB")
                if too_big:
                    upright.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                width, height = upright.size
                if dest.suffix.lower() not in JPEG_NAMES:
                    dest = dest.with_name(dest.name + ".jpg")  # "a.png" -> "a.png.jpg": cannot collide
                dest.parent.mkdir(parents=True, exist_ok=True)
                _write_atomically(dest, image=upright, quality=quality)
                return {
                    "status": "ok",
                    "sha1": sha1,
                    "dest": str(dest),
                    "width": width,
                    "height": height,
                    "reencoded": True,
                }
            image.load()  # a full decode is the only reliable test for truncated files
    except UnidentifiedImageError:
        return {"status": "not_an_image", "detail": "not a format Pillow can read"}
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return {"status": "corrupt_image", "detail": f"{type(err).__name__}: {err}"}
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        _link(src_path, dest)
    else:
        _write_atomically(dest, data=data)
    return {"status": "ok", "sha1": sha1, "dest": str(dest), "width": width, "height": height, "reencoded": False}


def process_job(job: tuple) -> tuple[int, dict]:
    """``Pool.imap_unordered`` adapter: ``(index, args...)`` -> ``(index, result)``."""
    index, *args = job
    return index, process_image(*args)
