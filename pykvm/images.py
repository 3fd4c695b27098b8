"""Reading the files a user hands pykvm (kernels, initrds, flat binaries), with one clear
error per way it can fail."""

from __future__ import annotations

import os

from .errors import ImageError


def read_image_file(path: str | os.PathLike, what: str = "kernel") -> bytes:
    """The whole content of an image file, or an ImageError naming the file and the problem."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as image:
            data = image.read()
    except FileNotFoundError:
        raise ImageError(f"{name}: {what} image not found") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not a {what} image") from None
    except PermissionError:
        raise ImageError(f"{name}: {what} image is not readable (permission denied)") from None
    except OSError as error:
        raise ImageError(f"{name}: cannot read {what} image: {error.strerror}") from None
    if not data:
        raise ImageError(f"{name}: {what} image is empty")
    return data
