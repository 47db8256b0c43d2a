"""Image files <-> image tensors: any Pillow-readable image in, (1,3,H,W) float32 in [0,1]; 8-bit RGB out."""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..coding.bitstream import FLAG_ALPHA, FLAG_GREY
from ..fileio import atomic_write_bytes

__all__ = ["load_image", "save_image", "to_uint8"]

#: Pillow modes of 16-bit unsigned greyscale samples (full scale 65535)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_MODE_NAMES = {"I": "32-bit integer", "F": "32-bit float"}


def load_image(path: str | os.PathLike[str]) -> tuple[torch.Tensor, int, str | None]:
    """Read an image as (1,3,H,W) float32 in [0,1]. Greyscale and alpha inputs are converted to RGB; 16-bit
    greyscale is scaled by its format's full scale (65535); 32-bit integer or float images are refused.

    Returns (tensor, header flags, note or None)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            flags = 0
            note = None
            if mode in _SIXTEEN_BIT or (mode == "I" and im.format == "PNG"):
                # 16-bit samples (a PNG's mode "I" holds at most 16 bits): full scale is 65535, whatever the content
                arr = np.asarray(im, dtype=np.float64)
                arr = np.clip(arr / 65535.0, 0, 1)
                arr = (arr * 255.0 + 0.5).astype(np.uint8)
                im2 = Image.fromarray(arr, "L")
                mode = "L"
                note = f"{os.fspath(path)}: 16-bit samples scaled to 8 bits"
            elif mode in ("I", "F") or mode.startswith(("I;", "F;")):
                raise ValueError(f"{os.fspath(path)}: unsupported image mode {mode} ({_MODE_NAMES.get(mode, mode)} "
                                 "samples have no defined full scale); convert it to 8- or 16-bit first")
            else:
                im2 = im
            if mode in ("L", "LA", "1", "P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBa", "La"):
                has_alpha = "A" in mode or "a" in mode or (mode == "P" and "transparency" in im2.info)
                grey = mode in ("L", "LA", "1", "La")
                if grey:
                    flags |= FLAG_GREY
                if has_alpha:
                    flags |= FLAG_ALPHA
                parts = []
                if grey:
                    parts.append("greyscale replicated to RGB")
                if has_alpha:
                    parts.append("alpha channel dropped")
                if not parts:
                    parts.append(f"mode {mode} converted to RGB")
                note = (note + ", " if note else f"{os.fspath(path)}: ") + ", ".join(parts)
                im2 = im2.convert("RGB")
            elif mode != "RGB":
                raise ValueError(f"{os.fspath(path)}: unsupported image mode {mode}")
            arr = np.asarray(im2, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{os.fspath(path)}: cannot read image ({e.__class__.__name__})") from None
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0
    return x, flags, note


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1,3,H,W) float in [0,1] -> HxWx3 uint8 (round half up after clamping)."""
    a = torch.clamp(x[0], 0, 1).mul(255.0).add(0.5).floor().to(torch.uint8)
    return a.permute(1, 2, 0).cpu().numpy()


def save_image(path: str | os.PathLike[str], x: torch.Tensor) -> None:
    """Write (1,3,H,W) in [0,1] as an 8-bit RGB image, atomically. The format follows the extension (PNG default)."""
    im = Image.fromarray(to_uint8(x), "RGB")
    ext = os.path.splitext(os.fspath(path))[1].lower()
    fmt = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM",
           ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(ext, "PNG")
    buf = io.BytesIO()
    kw = {"quality": 100} if fmt in ("JPEG", "WEBP") else {}
    im.save(buf, format=fmt, **kw)
    atomic_write_bytes(path, buf.getvalue())
