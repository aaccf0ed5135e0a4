"""model.pkl: a pickle of plain data only, loaded with a restricted unpickler that cannot run code.

A pickle runs code only through the globals it names (``GLOBAL`` / ``STACK_GLOBAL`` / extension codes, all
resolved by :meth:`pickle.Unpickler.find_class`) and through persistent ids. Plain data (dict, list, tuple,
str, bytes, int, float, bool, None, set, frozenset) needs neither, so the loader refuses every global and
every persistent id: a pickle whose ``__reduce__`` calls ``os.system`` fails at
``find_class("posix", "system")``, before anything is called.
Every failure raises :class:`ModelFileError` with a clear message.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from ctk.errors import CtkError
from ctk.files import respect_umask
from ctk.predict.tables import TTLTables

FORMAT_VERSION = 1
MODEL_KIND = "ctk-model"
#: Pickle protocol 4: every plain-data type has its own opcode (no globals), readable by Python >= 3.4.
PICKLE_PROTOCOL = 4
_PLAIN_SCALARS = (str, bytes, int, float, bool, type(None))


class ModelFileError(CtkError):
    """A model file cannot be written or read; the message says which file and why."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise ModelFileError(
            f"refusing to load {module}.{name}: a ctk model file holds plain data only "
            "(dict, list, str, numbers, ...); this file would import or call code"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ModelFileError("refusing a persistent id: a ctk model file holds plain data only")


def to_plain(obj: Any, where: str = "model") -> Any:
    """A copy of ``obj`` made of plain data: numpy scalars/arrays via ``tolist()``; anything else refused."""
    if isinstance(obj, bool | type(None) | str | bytes):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str | int | float | bool | tuple):
                raise ModelFileError(f"{where}: key {k!r} of type {type(k).__name__} is not plain data")
            out[tuple(to_plain(k, where)) if isinstance(k, tuple) else k] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list | tuple):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, set | frozenset):
        return sorted(to_plain(v, where) for v in obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist) and type(obj).__module__.split(".")[0] == "numpy":
        return to_plain(tolist(), where)
    raise ModelFileError(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not plain data")


def save_model(model: dict, path: str | Path) -> Path:
    """Write ``model`` (made plain by :func:`to_plain`) atomically, marked with kind and format version."""
    if not isinstance(model, dict):
        raise ModelFileError(f"a model must be a dict, not {type(model).__name__}")
    plain = to_plain(model)
    plain.setdefault("kind", MODEL_KIND)
    plain.setdefault("format_version", FORMAT_VERSION)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(plain, fh, protocol=PICKLE_PROTOCOL)
            respect_umask(tmp)  # mkstemp makes it 0600: other accounts could not load the model
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot write model file ({exc.strerror or exc})") from None
    return path


def loads_model(data: bytes, name: str = "<bytes>") -> dict:
    """Parse model-file bytes (see :func:`load_model`)."""
    if not data:
        raise ModelFileError(f"{name}: empty file, not a ctk model")
    if data[:1] != b"\x80":
        raise ModelFileError(f"{name}: not a pickle file (a ctk model file is a pickle of plain data)")
    try:
        obj = _PlainDataUnpickler(io.BytesIO(data)).load()
    except ModelFileError as exc:
        raise ModelFileError(f"{name}: {exc}") from None
    except (
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        AttributeError,
        OverflowError,
        MemoryError,
        RecursionError,
        UnicodeDecodeError,
    ) as exc:
        raise ModelFileError(
            f"{name}: truncated or corrupt model file ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dict):
        raise ModelFileError(f"{name}: a pickle of {type(obj).__name__}, not a ctk model")
    if obj.get("kind") != MODEL_KIND:
        raise ModelFileError(f"{name}: a pickle of plain data but not a ctk model (no kind={MODEL_KIND!r})")
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{name}: ctk model without a readable format version")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{name}: model format v{version} is newer than this ctk reads (v{FORMAT_VERSION}); upgrade ctk"
        )
    if version < 1:
        raise ModelFileError(f"{name}: unknown model format version {version}")
    return obj


def load_model(path: str | Path) -> dict:
    """Read a model file; refuses anything but plain data. Raises :class:`ModelFileError` on any failure."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a model file") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read model file ({exc.strerror or exc})") from None
    return loads_model(data, str(path))


def tables_from_model(model: dict, name: str = "model") -> TTLTables:
    d = model.get("ttl_tables")
    if d is None:
        raise ModelFileError(f"{name}: model has no TTL tables")
    try:
        tables = TTLTables.from_dict(d)
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{name}: bad TTL tables ({exc})") from None
    bad = [
        k for k, rows in tables.ttl_s.items() if any(not math.isfinite(x) or x < 0 for r in rows for x in r)
    ]
    if bad:
        raise ModelFileError(f"{name}: TTL tables hold negative or non-finite TTLs for {bad[:5]}")
    return tables


def load_ttl_tables(path: str | Path) -> TTLTables:
    """The TTL tables of a model file (what the engine needs at serve time)."""
    return tables_from_model(load_model(path), str(path))
