"""Loading SWE-bench-format instances: a local JSON/JSONL file or folder, the bundled samples, or the hub.

An instance is a dict with at least ``instance_id`` and ``problem_statement`` (SWE-bench fields). For the
``local`` environment it also names where its repository comes from: ``ctk_repo_path`` (a folder, a git
repository or an archive; relative paths are resolved against the instances file) — or the collector's
``--repo-dir`` holding ``<owner>__<name>`` / ``<name>`` folders or archives.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from ctk.errors import CtkError

#: Named SWE-bench subsets on the Hugging Face hub (the same names mini-swe-agent uses).
SUBSETS = {
    "full": "princeton-nlp/SWE-Bench",
    "verified": "princeton-nlp/SWE-Bench_Verified",
    "lite": "princeton-nlp/SWE-Bench_Lite",
    "multimodal": "princeton-nlp/SWE-Bench_Multimodal",
    "multilingual": "swe-bench/SWE-Bench_Multilingual",
    "smith": "SWE-bench/SWE-smith",
}
REQUIRED = ("instance_id", "problem_statement")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz", ".zip")


class InstanceError(CtkError, ValueError):
    """Instances cannot be loaded; the message says why."""


def bundled_tasks_dir() -> Path:
    """The folder of the bundled sample tasks (``instances.jsonl``, ``repos/``, ``script.json``)."""
    return Path(str(resources.files("ctk.datasets") / "tasks"))


def bundled_script_path() -> Path:
    """The scripted-model answers that solve the bundled sample tasks."""
    return bundled_tasks_dir() / "script.json"


def _read_file(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    rows: list[Any]
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InstanceError(f"{path}:{n}: not JSON ({exc.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InstanceError(f"{path}: not JSON ({exc.msg})") from None
        rows = data if isinstance(data, list) else [data]
    out = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InstanceError(f"{path}: entry {n} is not an object")
        missing = [k for k in REQUIRED if not row.get(k)]
        if missing:
            raise InstanceError(f"{path}: entry {n} lacks {', '.join(missing)}")
        row = dict(row)
        rp = row.get("ctk_repo_path")
        if rp and not Path(rp).is_absolute():
            row["ctk_repo_path"] = str((path.parent / rp).resolve())
        out.append(row)
    return out


def load_local(path: str | Path) -> list[dict[str, Any]]:
    """Instances from a JSON list / JSONL file, or every ``*.json``/``*.jsonl`` in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.name != "script.json"
        )
        if not files:
            raise InstanceError(f"{path}: no *.json or *.jsonl files")
        rows = [r for f in files for r in _read_file(f)]
    elif path.is_file():
        rows = _read_file(path)
    else:
        raise InstanceError(f"{path}: no such file or folder")
    seen: set[str] = set()
    for r in rows:
        if r["instance_id"] in seen:
            raise InstanceError(f"{path}: instance {r['instance_id']!r} appears twice")
        seen.add(r["instance_id"])
    return rows


def load_hub(subset: str, split: str = "test") -> list[dict[str, Any]]:
    """A SWE-bench subset via ``datasets`` (needs the hub, or a local dataset folder as ``subset``)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise InstanceError(
            "loading a SWE-bench subset needs the `datasets` package; "
            "pass --instances FILE to use local instances"
        ) from None
    name = SUBSETS.get(subset, subset)
    try:
        return [dict(r) for r in load_dataset(name, split=split)]
    except Exception as exc:  # offline, unknown name, ...
        raise InstanceError(
            f"cannot load SWE-bench subset {name!r} split {split!r}: {exc}. "
            "Without hub access pass --instances FILE|DIR (or 'bundled')."
        ) from None


def select(
    instances: list[dict[str, Any]], filter_spec: str = "", slice_spec: str = ""
) -> list[dict[str, Any]]:
    """Keep instances whose id matches the ``filter_spec`` regex, then apply a ``start:stop[:step]`` slice."""
    if filter_spec:
        try:
            pattern = re.compile(filter_spec)
        except re.error as exc:
            raise InstanceError(f"--filter {filter_spec!r} is not a regular expression: {exc}") from None
        instances = [i for i in instances if pattern.search(i["instance_id"])]
    if slice_spec:
        try:
            parts = [int(x) if x.strip() else None for x in slice_spec.split(":")]
            if not 1 <= len(parts) <= 3:
                raise ValueError
            instances = instances[slice(*parts)] if len(parts) > 1 else instances[: parts[0]]
        except (ValueError, TypeError):
            raise InstanceError(f"--slice {slice_spec!r}: expected start:stop[:step], e.g. 0:5") from None
    return instances


def load_instances(
    instances: str | Path | None = None,
    subset: str | None = None,
    split: str = "test",
    filter_spec: str = "",
    slice_spec: str = "",
) -> list[dict[str, Any]]:
    """Instances from ``instances`` (a path, or ``"bundled"``) or else from the hub ``subset``."""
    if instances is not None and subset is not None:
        raise InstanceError("give either --instances or --subset, not both")
    if instances is not None:
        rows = load_local(
            bundled_tasks_dir() / "instances.jsonl" if str(instances) == "bundled" else instances
        )
    elif subset is not None:
        rows = load_hub(subset, split)
    else:
        raise InstanceError("no instances: pass --instances FILE|DIR|bundled or --subset verified|lite|...")
    return select(rows, filter_spec, slice_spec)


def find_repo_source(instance: dict[str, Any], repo_dir: str | Path | None = None) -> Path:
    """Where the ``local`` environment takes an instance's repository from."""
    rp = instance.get("ctk_repo_path")
    if rp:
        p = Path(rp)
        if not p.exists():
            raise InstanceError(f"{instance['instance_id']}: repository {p} does not exist")
        return p
    if repo_dir is not None and instance.get("repo"):
        root = Path(repo_dir)
        owner_name = str(instance["repo"]).replace("/", "__")
        name = str(instance["repo"]).rsplit("/", 1)[-1]
        for stem in (owner_name, name):
            for cand in [root / stem, *(root / f"{stem}{s}" for s in ARCHIVE_SUFFIXES)]:
                if cand.exists():
                    return cand
        raise InstanceError(
            f"{instance['instance_id']}: no {owner_name} or {name} (folder or archive) in {root}"
        )
    raise InstanceError(
        f"{instance['instance_id']}: no repository for the local environment "
        "(set ctk_repo_path in the instance or pass --repo-dir)"
    )
