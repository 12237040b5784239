"""Cache files of tensors named by a content key: written atomically, read back only under that key.

The teacher-output cache (``distill``) and the zero-shot score cache (``score_cache``) both keep a
safetensors file whose metadata records the key it is named by and a format number; a file that
cannot be read, or that was written for another key or format, is a :class:`DataError` naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import DataError


def write_keyed_tensors(path: Path, tensors: dict[str, torch.Tensor], key: str, fmt: int,
                        **metadata: str) -> None:
    """Write ``tensors`` to ``path`` with ``key`` and ``fmt`` in its metadata, aside first and then renamed."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"key": key, "format": str(fmt), **metadata})
    tmp.replace(path)


def read_keyed_tensors(path: Path, key: str, fmt: int, what: str, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of the cache file ``path``, refused unless it was written for ``key`` in format ``fmt``.

    ``what`` names the file in errors (e.g. "teacher-output cache file"); ``fix`` says what to do.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise DataError(f"{path}: the {what} is unreadable ({type(exc).__name__}: {exc}); {fix}") from None
    if meta.get("key") != key or meta.get("format") != str(fmt):
        raise DataError(f"{path}: the {what} was written for another key or format "
                        f"(key {meta.get('key')!r}, format {meta.get('format')!r}); {fix}")
    return tensors
