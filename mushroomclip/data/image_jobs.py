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
TRANSPOSED = (5, 6, 7, 8)  # the EXIF orientations that swap width and height
JPEG_NAMES = (".jpg", ".jpeg")


def utf8_safe(text: str) -> str:
    """``text`` with each byte of a file name that is not UTF-8 written as ``%XX``, so it fits in a CSV or JSON.

    Python carries such bytes as lone surrogates (``os.fsdecode``'s "surrogateescape"); UTF-8 text is unchanged.
    """
    return "".join(f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)


def write_atomically(dest: Path, data: bytes) -> None:
    """Write-then-rename, so an interrupted run never leaves a half-written file behind; the temporary
    name carries the process id, so two writers never rename each other's file."""
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _link(src: Path, dest: Path) -> None:
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another file system: fall back to a symbolic link
        os.symlink(src.resolve(), dest)


def output_names(name: str, mode: str) -> tuple[str, ...]:
    """The names :func:`process_image` may write a source called ``name`` under: its UTF-8-safe name, and in
    ``resize`` mode, for a file that is not named as a JPEG, that name + ``.jpg`` (if it is re-encoded)."""
    safe = utf8_safe(name)
    return (safe, safe + ".jpg") if mode == "resize" and Path(safe).suffix.lower() not in JPEG_NAMES else (safe,)


def downscale(width: int, height: int, max_side: int, short_side: int) -> float:
    """The factor (1: none) that brings the long side to at most ``max_side`` and the short side to at most
    ``short_side``; 0 leaves that side unlimited. Never an enlargement."""
    limits = [max_side / max(width, height)] * (max_side > 0) + [short_side / min(width, height)] * (short_side > 0)
    return min([1.0, *limits])


def process_image(src: str, dest_dir: str, mode: str, max_side: int, quality: int, short_side: int = 0) -> dict:
    """Validate ``src`` by decoding it fully and place it in ``dest_dir``.

    In ``resize`` mode an image whose long side exceeds ``max_side`` or whose short side exceeds ``short_side``
    (:func:`downscale`), or that carries an EXIF rotation, is re-encoded once as an upright RGB JPEG (scaled down
    as far as the tighter limit asks); every other image is copied byte for byte.
    Returns ``{"status": "ok", "sha1", "dest", "dest_size", "dest_mtime_ns", "width", "height", "reencoded"}``,
    ``{"status": <skip reason>, "detail"}`` for a bad source file, or ``{"status": "write_error", "detail"}``
    when the output could not be written (not a property of the source: never cached).
    """
    src_path = Path(src)
    try:
        data = src_path.read_bytes()
    except FileNotFoundError:
        return {"status": "missing_file", "detail": "file not found"}
    except OSError as err:
        return {"status": "unreadable_file", "detail": str(err)}
    sha1 = hashlib.sha1(data).hexdigest()
    dest = Path(dest_dir) / utf8_safe(src_path.name)
    reencoded = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            scale = downscale(width, height, max_side, short_side) if mode == "resize" else 1.0
            too_big = scale < 1
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            rotated = mode == "resize" and orientation != 1
            if too_big or rotated:
                # the long side's limit alone: the box it always was; else the scaled size, in stored orientation
                box = (max_side, max_side) if not short_side else (round(width * scale), round(height * scale))
                if too_big:
                    image.draft("RGB", box)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below the box
                upright = ImageOps.exif_transpose(image).convert("RGB")
                if too_big:
                    box = box[::-1] if orientation in TRANSPOSED else box
                    upright.thumbnail(box, Image.Resampling.LANCZOS)
                width, height = upright.size
                buffer = io.BytesIO()
                upright.save(buffer, format="JPEG", quality=quality, optimize=False)
                reencoded = buffer.getvalue()
                if dest.suffix.lower() not in JPEG_NAMES:
                    dest = dest.with_name(output_names(src_path.name, mode)[-1])  # "a.png" -> "a.png.jpg"
            else:
                image.load()  # a full decode is the only reliable test for truncated files
    except UnidentifiedImageError:
        return {"status": "not_an_image", "detail": "not a format Pillow can read"}
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return {"status": "corrupt_image", "detail": f"{type(err).__name__}: {err}"}
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if reencoded is not None:
            write_atomically(dest, reencoded)
        elif mode == "link":
            _link(src_path, dest)
        else:
            write_atomically(dest, data)
        written = dest.stat()
    except OSError as err:
        return {"status": "write_error", "detail": f"cannot write {utf8_safe(str(dest))}: {err}"}
    return {
        "status": "ok",
        "sha1": sha1,
        "dest": str(dest),
        "dest_size": written.st_size,
        "dest_mtime_ns": written.st_mtime_ns,
        "width": width,
        "height": height,
        "reencoded": reencoded is not None,
    }


def process_job(job: tuple) -> tuple[int, dict]:
    """``Pool.imap_unordered`` adapter: ``(index, args...)`` -> ``(index, result)``."""
    index, *args = job
    return index, process_image(*args)
