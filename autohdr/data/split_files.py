"""Files autohdr writes into a user's folder (split CSVs, the overfit report), never over a user's own.

The split CSVs (``train_split.csv``, ``val_split.csv``) and ``overfit_report.json`` go to a folder
the user names (``AUTOHDR_SPLIT_DIR``, ``--out``, ``--out-dir``), which may already hold another
tool's files of the same names. autohdr replaces a file only when it wrote it itself and nobody
changed it since: every write records the SHA-256 of each file in the folder's sidecar
``.autohdr-split.json``; a later write checks every file it is about to replace against that
record first, and refuses, naming the path, when a file has no record (not written by autohdr)
or its bytes differ from the record (edited since). Nothing is written unless every file passes.

Why a sidecar rather than a marker line inside the CSV: the CSVs stay plain ``image_id,
input_path, target_path`` tables that pandas and other tools read unchanged, and a hash also
catches a file autohdr wrote that was edited afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

from autohdr.data.pairs import DataError

#: The record of the files autohdr wrote in a folder (``{"files": {name: sha256}}``).
SIDECAR_NAME = ".autohdr-split.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_record(folder: Path) -> dict[str, str]:
    """``name -> sha256`` of the files the sidecar lists; an unreadable sidecar proves nothing (``{}``)."""
    try:
        files = json.loads((folder / SIDECAR_NAME).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {str(k): str(v) for k, v in files.items()}


def check_replaceable(folder: str | Path, names: list[str] | tuple[str, ...]) -> None:
    """Raise unless autohdr may write each of ``names`` in ``folder``.

    A name may be written when no file of that name exists, or when the folder's sidecar records
    it with the SHA-256 it has now (autohdr wrote it and nobody changed it).

    Raises:
        DataError: naming the first file that exists and is not a plain file, has no record, or was
            modified since autohdr wrote it.
    """
    folder = Path(folder)
    record = _read_record(folder)
    sidecar = folder / SIDECAR_NAME
    for name in names:
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        advice = "move it away or choose another folder (AUTOHDR_SPLIT_DIR, --out, --out-dir)"
        if path.is_symlink() or not path.is_file():
            raise DataError(f"refusing to write {path}: it exists and is not a plain file; {advice}")
        recorded = record.get(name)
        if recorded is None:
            raise DataError(f"refusing to overwrite {path}: it was not written by autohdr (no record of it in "
                            f"{sidecar}); {advice}")
        if recorded != sha256_bytes(path.read_bytes()):
            raise DataError(f"refusing to overwrite {path}: it changed since autohdr wrote it (its SHA-256 differs "
                            f"from the one recorded in {sidecar}); {advice}")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_owned_files(folder: str | Path, files: Mapping[str, str | bytes]) -> dict[str, Path]:
    """Write ``files`` (name -> content; text is UTF-8) into ``folder`` and record them in its sidecar.

    Every name is checked with :func:`check_replaceable` before anything is written. Each file
    is written atomically, then the sidecar (which keeps the records of other files it lists).

    Returns:
        name -> path of every file written.

    Raises:
        DataError: a file may not be replaced (see :func:`check_replaceable`); nothing is written.
    """
    folder = Path(folder)
    check_replaceable(folder, list(files))
    folder.mkdir(parents=True, exist_ok=True)
    record = _read_record(folder)
    written = {}
    for name, content in files.items():
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        path = folder / name
        _write_atomic(path, data)
        record[name] = sha256_bytes(data)
        written[name] = path
    sidecar = {"written_by": "autohdr",
               "note": "files autohdr wrote here and their SHA-256; autohdr replaces only these, unchanged",
               "files": dict(sorted(record.items()))}
    _write_atomic(folder / SIDECAR_NAME, (json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))
    return written
