"""Output helpers shared by every stage: atomic output folders and JSON reports."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson


class OutputExistsError(FileExistsError):
    """The output folder exists and is not empty, and overwrite was not asked for."""


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; move it into place only if the block succeeds.

    An interrupted or failed run leaves `out` as it was (absent or the previous result).
    """
    out = Path(out).resolve()
    if out.exists() and not overwrite and any(out.iterdir()):
        raise OutputExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON with sorted keys and a trailing newline (stable across runs)."""
    data = orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    Path(path).write_bytes(data + b"\n")


def read_json(path: str | os.PathLike) -> Any:
    return orjson.loads(Path(path).read_bytes())
