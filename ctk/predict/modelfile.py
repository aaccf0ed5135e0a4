"""model.pkl: the :class:`ModelFile` type; on disk a pickle of plain data only, loaded with a restricted
unpickler that cannot run code.

A pickle runs code only through the globals it names (``GLOBAL`` / ``STACK_GLOBAL`` / extension codes, all
resolved by :meth:`pickle.Unpickler.find_class`) and through persistent ids. Plain data (dict, list, tuple,
str, bytes, int, float, bool, None, set, frozenset) needs neither, so the loader refuses every global and
every persistent id: a pickle whose ``__reduce__`` calls ``os.system`` fails at
``find_class("posix", "system")``, before anything is called.
Every failure raises :class:`ModelFileError` with a clear message.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ctk.errors import CtkError
from ctk.files import OutputError, write_atomically
from ctk.predict.cost import CostModel
from ctk.predict.tables import TTLTables

if TYPE_CHECKING:
    from ctk.predict.predictors import Predictor

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

    def dump(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            pickle.dump(plain, fh, protocol=PICKLE_PROTOCOL)

    try:
        return write_atomically(path, dump)  # umask mode: other accounts can load the model
    except OutputError as exc:
        raise ModelFileError(f"cannot write model file: {exc}") from None


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
    """The validated TTL tables of a model dict (raises :class:`ModelFileError`); version 1 tables are read
    as :meth:`TTLTables.from_dict` says (their key × context × pressure rows dropped or made fixed pins)."""
    d = model.get("ttl_tables")
    if d is None:
        raise ModelFileError(f"{name}: model has no TTL tables")
    try:
        return TTLTables.from_dict(d)
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{name}: bad TTL tables ({exc})") from None


@dataclass
class ModelFile:
    """What ``ctk train`` writes and every reader uses: metadata, the cost model, the TTL tables, the fitted
    predictors (as their plain ``to_dict()`` specs) and the held-out evaluation.

    On disk it is :meth:`to_dict`, a dict of plain data with one key per field (the keys ``train.py`` has
    always written, so older files load); keys this version does not know are kept in ``extra``.
    """

    tables: TTLTables | None = None
    cost: CostModel = field(default_factory=CostModel)
    predictor: str | None = None  # the primary predictor, the one the tables were built from
    predictors: dict[str, dict] = field(default_factory=dict)  # name -> Predictor.to_dict()
    evaluation: dict = field(default_factory=dict)
    quantile_levels: list[float] = field(default_factory=list)
    feature_spec: dict = field(default_factory=dict)
    training_data: dict = field(default_factory=dict)
    train_config: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    feature_importance: dict = field(default_factory=dict)
    #: per source: the harness cap the pauses were learned under (:class:`ctk.predict.caps.HarnessCap`)
    harness_caps: dict = field(default_factory=dict)
    ctk_version: str | None = None
    created_unix_s: float | None = None
    created_utc: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    name: str = field(default="model", compare=False)  # the file it came from, for error messages

    #: on-disk key -> field, where they differ
    _KEYS: ClassVar[dict[str, str]] = {"ttl_tables": "tables", "cost_model": "cost"}

    def to_dict(self) -> dict:
        """The plain-data dict written to disk (see :func:`save_model`)."""
        out: dict[str, Any] = {"kind": MODEL_KIND}
        for f in fields(self):
            if f.name in ("extra", "name"):
                continue
            value = getattr(self, f.name)
            if f.name == "tables":
                if value is None:
                    continue
                value = value.to_dict()
            elif f.name == "cost":
                value = value.to_dict()
            elif f.name in ("feature_importance", "harness_caps") and not value:
                continue
            out[_DISK_KEY.get(f.name, f.name)] = value
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, d: dict, name: str = "model") -> ModelFile:
        """Rebuild from :meth:`to_dict` output (or any file ``ctk train`` wrote); raises ModelFileError."""
        known = {f.name for f in fields(cls)} - {"extra", "name", "tables", "cost"}
        kw: dict[str, Any] = {"name": name, "extra": {}}
        for k, v in d.items():
            attr = cls._KEYS.get(k, k)
            if attr in known:
                kw[attr] = v
            elif k not in cls._KEYS and k != "kind":
                kw["extra"][k] = v
        if d.get("ttl_tables") is not None:
            kw["tables"] = tables_from_model(d, name)
        try:
            kw["cost"] = CostModel.from_dict(d.get("cost_model") or {})
        except (ValueError, TypeError) as exc:
            raise ModelFileError(f"{name}: bad cost model in model file ({exc})") from None
        for attr in ("predictors", "evaluation", "training_data", "calibration", "harness_caps"):
            if not isinstance(kw.get(attr, {}), dict):
                raise ModelFileError(f"{name}: {attr} must be a dict, not {type(kw[attr]).__name__}")
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        """Write atomically as plain data (:func:`save_model`)."""
        return save_model(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> ModelFile:
        """Read through the restricted unpickler (:func:`load_model`); raises ModelFileError."""
        return cls.from_dict(load_model(path), str(path))

    def ttl_tables(self) -> TTLTables:
        """The TTL tables (what the engine serves with); raises ModelFileError if the file has none."""
        if self.tables is None:
            raise ModelFileError(f"{self.name}: model has no TTL tables")
        return self.tables

    def fitted(self) -> dict[str, Predictor]:
        """Every predictor of the file, rebuilt (lightgbm from its model string); raises ModelFileError."""
        return {n: self._rebuild(n) for n in self.predictors}

    def predictor_name(self, name: str | None = None) -> str:
        """``name`` (default: the primary predictor) if the file holds it; else a ModelFileError."""
        name = name or self.predictor
        if name not in self.predictors:
            raise ModelFileError(
                f"{self.name}: holds no predictor {name!r} (has {', '.join(self.predictors) or 'none'})"
            )
        return name

    def fitted_predictor(self, name: str | None = None) -> tuple[str, Predictor]:
        """``(name, predictor)``: the one named, else the primary, rebuilt; raises ModelFileError."""
        name = self.predictor_name(name)
        return name, self._rebuild(name)

    def _rebuild(self, name: str) -> Predictor:
        from ctk.predict.predictors import predictor_from_dict

        try:
            return predictor_from_dict(self.predictors[name])
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ModelFileError(
                f"{self.name}: cannot rebuild the predictors ({type(exc).__name__}: {exc})"
            ) from None
        except Exception as exc:  # lightgbm raises its own error type on a corrupt model string
            raise ModelFileError(
                f"{self.name}: corrupt predictor in model file ({type(exc).__name__}: {exc})"
            ) from None


_DISK_KEY = {attr: key for key, attr in ModelFile._KEYS.items()}


def default_model_path() -> Path:
    """The model shipped with ctk (a histogram trained on the bundled sample; ``make default-model``)."""
    from importlib.resources import files

    return Path(str(files("ctk.datasets") / "data" / "default_model.pkl"))


def load_ttl_tables(path: str | Path) -> TTLTables:
    """The TTL tables of a model file (what the engine needs at serve time)."""
    return ModelFile.load(path).ttl_tables()
