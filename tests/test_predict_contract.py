"""Contract modules the engine imports: command keys, cost model, TTL tables, the model file."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest

from ctk.datasets.shell import PROGRAM_KEY, QUICK_KEY
from ctk.predict.cost import CostModel, choose_ttl, expected_holding_s
from ctk.predict.features import command_keys
from ctk.predict.modelfile import (
    FORMAT_VERSION,
    ModelFile,
    ModelFileError,
    load_model,
    load_ttl_tables,
    save_model,
)
from ctk.predict.tables import NO_PIN, FixedPin, TTLDecision, TTLTables

LEVELS = [0.1, 0.5, 0.9, 0.99]


@pytest.mark.parametrize(
    ("command", "tool", "expected"),
    [
        ("cd /r && python -m pytest -k x", None, ["python:pytest", "python", "*"]),
        ("git status", None, ["git:status", "git", "*"]),
        ("git clone https://x/y", None, ["git:clone", "git", "*"]),
        ("timeout 60 pip3 install --no-deps numpy || echo failed", None, ["pip:install", "pip", "*"]),
        ("python3 -c 'print(1)'", None, ["python:-c", "python", "*"]),
        ("python3.11 train.py --epochs 3", None, ["python:script", "python", "*"]),
        ("FOO=1 sudo -E apt-get install -y curl", None, ["apt-get:install", "apt-get", "*"]),
        (
            "cat <<'EOF' > run.py\nimport os\nsleep 100\nEOF\npython run.py",
            None,
            ["python:script", "python", "*"],
        ),
        ("cat <<'EOF' > run.py\nimport os\nwhile True:", None, ["cat:write", "cat", "*"]),
        ("printf '5\\n1 2' | python3 sol.py", None, ["python:script", "python", "*"]),
        ("ls -la && echo '===' && cat x.txt", None, ["ls", "*"]),
        ("bash -lc 'make test'", None, ["make:test", "make", "*"]),
        ("cd /app && . venv/bin/activate && ./cli_tool w.json", None, ["cli_tool", "*"]),
        (
            "[train_code_improve_1_7_1] \nimport pandas",
            "python_script",
            ["train_code_improve", "python_script", "*"],
        ),
        ('{"folder": "docs"}', "cd", ["cd", "*"]),
        (None, "functions.update_plan", ["update_plan", "*"]),
        ("", None, ["*"]),
        (None, None, ["*"]),
        ("'unbalanced && ls", None, ["unbalanced", "*"]),
    ],
)
def test_command_keys(command, tool, expected):
    """The chain of a call (its kind level, ``(quick)`` / ``(program)``: tests/test_datasets_shell.py)."""
    assert [k for k in command_keys(command, tool) if k not in (QUICK_KEY, PROGRAM_KEY)] == expected


def test_command_keys_fast_and_robust():
    junk = ["\x00\x01", "&&&&||;;", "<<", "((((", "'" * 1000, "a" * 100_000, "$(rm -rf /)", "\n" * 50]
    for j in junk:
        keys = command_keys(j)
        assert keys[-1] == "*"
    cmds = [f"cd /w{i} && python -m pytest tests/t{i}.py -k case{i}" for i in range(2000)]
    t0 = time.perf_counter()
    for c in cmds:  # uncached: every command is new
        command_keys(c)
    per_call = (time.perf_counter() - t0) / len(cmds)
    assert per_call < 200e-6, per_call


def test_cost_model_monotone_and_validated():
    cm = CostModel()
    assert cm.benefit_s(8192) > cm.benefit_s(1024) > cm.requeue_delay_s
    assert cm.holding_cost_per_s(4096, 0.95) > cm.holding_cost_per_s(4096, 0.5)
    assert cm.holding_cost_per_s(8192, 0.9) == pytest.approx(2 * cm.holding_cost_per_s(4096, 0.9))
    assert CostModel.from_dict(cm.to_dict()) == cm
    with pytest.raises(ValueError, match="ascending"):
        CostModel(prefill_tokens=(0, 100, 50), prefill_s=(0, 1, 2))
    with pytest.raises(ValueError, match="equal length"):
        CostModel(pressure_levels=(0.0, 1.0), block_second_price=(1e-6,))


def _brute_force(levels, q, b, c):
    """Grid search of F(τ)·B − c·E[min(T, τ)] (independent of choose_ttl's knot argument)."""
    best = (0.0, 0.0)
    best_j = 0.0
    grid = [i * q[-1] / 4000 for i in range(1, 4001)]
    for tau in grid:
        # F by linear interpolation through (0,0) and the knots
        pts = [(0.0, 0.0)] + list(zip(q, levels, strict=True))
        f = pts[-1][1]
        for (t0, f0), (t1, f1) in zip(pts, pts[1:], strict=False):
            if tau <= t1:
                f = f0 + (f1 - f0) * (tau - t0) / (t1 - t0)
                break
        j = f * b - c * expected_holding_s(levels, q, tau)
        if j > best_j:
            best_j, best = j, (tau, f)
    return best_j, best


@pytest.mark.parametrize("c", [0.0005, 0.01, 0.05, 0.2, 2.0])
def test_choose_ttl_matches_brute_force(c):
    q = [0.02, 0.3, 4.0, 30.0]
    b = 1.0
    ttl, p = choose_ttl(LEVELS, q, b, c)
    j = p * b - c * expected_holding_s(LEVELS, q, ttl) if ttl > 0 else 0.0
    best_j, _ = _brute_force(LEVELS, q, b, c)
    assert j >= best_j - 1e-9
    assert ttl in (0.0, *q)


def test_choose_ttl_behaviour():
    q = [0.02, 0.3, 4.0, 30.0]
    # cheap memory: pin to the top quantile; dear memory: do not pin; in between: a finite TTL
    assert choose_ttl(LEVELS, q, 1.0, 1e-5) == (30.0, 0.99)
    assert choose_ttl(LEVELS, q, 1.0, 100.0) == (0.0, 0.0)
    mid, p_mid = choose_ttl(LEVELS, q, 1.0, 0.1)
    assert 0 < mid < 30.0 and 0 < p_mid < 0.99
    # a higher price never lengthens the pin
    ttls = [choose_ttl(LEVELS, q, 1.0, c)[0] for c in (1e-4, 1e-3, 1e-2, 0.1, 1, 10)]
    assert ttls == sorted(ttls, reverse=True)
    # crossing or zero quantiles are tolerated
    t, p = choose_ttl(LEVELS, [0.0, 0.5, 0.2, 3.0], 1.0, 1e-4)
    assert t == 3.0 and p == 0.99
    with pytest.raises(ValueError):
        choose_ttl(LEVELS, [1.0], 1.0, 1.0)


def _tables() -> TTLTables:
    return TTLTables.build(
        {
            "python:pytest": [0.5, 2.0, 20.0, 60.0],
            "python": [0.05, 0.4, 20, 60],
            "ls": [0.01, 0.02, 0.05, 0.1],
            "*": [0.01, 0.1, 5.0, 30.0],
        },
        {"python:pytest": 40, "python": 400, "ls": 300, "*": 3000},
        LEVELS,
    )


#: What version 1 tables tabulated per key: context buckets (upper edges) × pressure levels.
V1_CONTEXT_EDGES = (1024, 4096, 16384, 65536, 262144)


def _v1_dict(t: TTLTables, hand_set: dict[str, list[list[float]]] | None = None) -> dict:
    """``t`` as the version 1 ``to_dict`` wrote it: a TTL and p_hit row per key × context bucket ×
    pressure level (from :func:`choose_ttl` at the bucket's edge and the level's λ), beside the quantiles.
    ``hand_set``: per key hand-written TTL rows instead (p_hit 0.9 where > 0), and no cost profile."""
    cm = t.cost_model
    levels = list(cm.pressure_levels)
    if hand_set is not None:
        ttl = {k: [list(r) for r in rows] for k, rows in hand_set.items()}
        hit = {k: [[0.9 if x > 0 else 0.0 for x in r] for r in rows] for k, rows in hand_set.items()}
        rows = next(iter(hand_set.values()))
        edges = [10**6 * (i + 1) for i in range(len(rows))]
        levels = [(j + 1) / len(rows[0]) for j in range(len(rows[0]))]
    else:
        ttl, hit = {}, {}
        for k, q in t.quantiles_s.items():
            cells = [
                [
                    choose_ttl(t.quantile_levels, q, cm.benefit_s(e), cm.holding_cost_per_s(e, p))
                    for p in levels
                ]
                for e in V1_CONTEXT_EDGES
            ]
            ttl[k] = [[c[0] for c in row] for row in cells]
            hit[k] = [[c[1] for c in row] for row in cells]
        edges = list(V1_CONTEXT_EDGES)
    return {
        "version": 1,
        "context_edges": edges,
        "pressure_levels": levels,
        "quantile_levels": list(t.quantile_levels),
        "ttl_s": ttl,
        "p_hit": hit,
        "quantiles_s": {k: list(v) for k, v in t.quantiles_s.items()},
        "n_samples": dict(t.n_samples),
        "cost": {} if hand_set is not None else dict(t.cost),
    }


def test_tables_decide_with_the_live_rule_and_back_off():
    t = _tables()
    d = t.engine_decision(["python:pytest", "python", "*"], 3000, 0.0)
    assert isinstance(d, TTLDecision) and d.key == "python:pytest"
    assert t.engine_decision(["pip:install", "pip", "*"], 3000, 0.0).key == "*"
    assert t.engine_decision(["nope"], 3000, 0.0) == NO_PIN
    # ls is short: always pinned for its top quantile, whatever the pressure
    assert all(t.engine_decision(["ls"], 3000, p).ttl_s == pytest.approx(0.1) for p in (0.0, 0.5, 0.99, 1.0))
    # the pin shrinks with pressure (the live price equivalent to it) and context length
    at = [t.engine_decision(["python"], 60000, p).ttl_s for p in t.cost_model.pressure_levels]
    assert at == sorted(at, reverse=True) and at[0] > at[-1]
    assert t.engine_decision(["python"], 60000, 0.0).p_hit == pytest.approx(0.99)
    assert t.engine_decision(["python"], 1000, 0.9).ttl_s >= t.engine_decision(["python"], 60000, 0.9).ttl_s


def test_tables_hold_quantiles_only_and_roundtrip():
    """Trained tables carry the quantiles the engine prices, and no key × context × pressure rows."""
    t = _tables()
    d = t.to_dict()
    assert set(d) == {"version", "quantile_levels", "quantiles_s", "n_samples", "cost"} and d["version"] == 2
    before = t.engine_decision(["ls"], 1000, 1.0)
    t.set_quantiles("ls", [40.0, 80.0, 120.0, 300.0], 5)
    after = t.engine_decision(["ls"], 1000, 1.0)
    assert after.ttl_s != before.ttl_s and t.n_samples["ls"] == 5
    d = t.to_dict()
    again = TTLTables.from_dict(d)
    assert again.to_dict() == d and again == t
    assert again.engine_decision(["python"], 5000, 0.8) == t.engine_decision(["python"], 5000, 0.8)
    with pytest.raises(ValueError, match="lack quantile_levels"):
        TTLTables.from_dict({"version": 2})
    with pytest.raises(ValueError, match="lack"):
        TTLTables.from_dict({"ttl_s": {}})  # version 1 (no version) without its fields
    with pytest.raises(ValueError, match="newer"):
        TTLTables.from_dict({**d, "version": 99})
    with pytest.raises(ValueError, match="4 levels"):
        TTLTables.from_dict({**d, "quantiles_s": {"x": [1.0]}})


def test_version_1_trained_tables_load_without_their_rows_and_decide_the_same():
    """A trained file of version 1 (rows beside the quantiles, a cost profile): the rows, which never
    decided, are dropped; every decision is the one the quantiles give."""
    t = _tables()
    old = _v1_dict(t)
    assert len(pickle.dumps(old)) > 3 * len(pickle.dumps(t.to_dict()))  # the rows were most of it
    back = TTLTables.from_dict(old)
    assert back == t and back.fixed_pins == {} and back.to_dict() == t.to_dict()
    # rows that say something else still never decide
    liar = {**old, "ttl_s": {k: [[999.0] * len(r) for r in v] for k, v in old["ttl_s"].items()}}
    for keys in (["python:pytest", "python", "*"], ["ls"], ["pip:install", "*"]):
        for ctx in (100, 5000, 60000):
            for p in (0.0, 0.5, 0.9, 1.0):
                want = t.engine_decision(keys, ctx, p)
                assert TTLTables.from_dict(old).engine_decision(keys, ctx, p) == want
                assert TTLTables.from_dict(liar).engine_decision(keys, ctx, p) == want


def test_version_1_hand_set_rows_become_fixed_pins_or_a_clear_error(tmp_path):
    """Hand-set version 1 tables (no cost profile): a key's rows, the same TTL in every cell, are its fixed
    pin; rows that vary with context or pressure are refused by name."""
    old = _v1_dict(_tables(), hand_set={"ls": [[30.0]], "sleep": [[1.0]], "*": [[0.0]]})
    t = TTLTables.from_dict(old)
    assert t.fixed_pins == {"ls": FixedPin(30.0, 0.9), "sleep": FixedPin(1.0, 0.9), "*": FixedPin(0.0, 0.0)}
    assert t.engine_decision(["ls", "*"], 5000, 0.0) == TTLDecision(30.0, 0.9, "ls")
    assert t.engine_decision(["make", "*"], 5000, 0.0) == TTLDecision(0.0, 0.0, "*")
    # a key the hand-set rows lack, with quantiles, is priced from them (as the rule did)
    assert t.engine_decision(["python", "*"], 5000, 0.0).key == "python"
    varying = _v1_dict(_tables(), hand_set={"ls": [[30.0, 0.0]], "*": [[0.0, 0.0]]})
    with pytest.raises(ValueError, match="rows of 'ls' vary with context or pressure"):
        TTLTables.from_dict(varying)
    save_model({"ttl_tables": varying}, tmp_path / "v.pkl")
    with pytest.raises(ModelFileError, match=r"v\.pkl: bad TTL tables .*'ls' vary .*fixed_pins"):
        load_ttl_tables(tmp_path / "v.pkl")


def test_fixed_pins_one_ttl_for_every_call_and_per_key():
    one = TTLTables.fixed({"*": 2.0})  # a Continuum-style fixed pin for every call
    assert one.to_dict()["fixed_pins"] == {"*": {"ttl_s": 2.0, "p_hit": 1.0}}
    for keys in (["ls", "*"], command_keys("python -m pytest"), ["*"]):
        assert one.live_decision(keys, 4096, 0.0) == TTLDecision(2.0, 1.0, "*")
    per_key = TTLTables.fixed({"ls": FixedPin(30.0, 0.9), "make": (5.0, 0.5), "*": 0.0})
    back = TTLTables.from_dict(per_key.to_dict())
    assert back == per_key and back.keys() == ["ls", "make", "*"] and back.quantile_levels == []
    assert back.live_decision(["ls", "*"], 4096, 0.0) == TTLDecision(30.0, 0.9, "ls")
    assert back.live_decision(["make", "*"], 4096, 0.0) == TTLDecision(5.0, 0.5, "make")
    assert back.live_decision(["git", "*"], 4096, 0.0) == TTLDecision(0.0, 0.0, "*")
    # priced like any pin: at a high enough live price a fixed pin does not pay
    assert back.live_decision(["make", "*"], 4096, 1.0) == TTLDecision(0.0, 0.0, "make")
    # p_hit may be left out (1.0); bad pins are refused by name
    d = TTLTables.from_dict({"version": 2, "quantile_levels": [], "fixed_pins": {"x": {"ttl_s": 3}}})
    assert d.fixed_pins == {"x": FixedPin(3.0, 1.0)}
    bad_pins = (({"ttl_s": -1}, "ttl_s must be finite"), ({"ttl_s": 1, "p_hit": 2}, "p_hit"), (3, "dict"))
    for bad, msg in bad_pins:
        with pytest.raises(ValueError, match=msg):
            TTLTables.from_dict({"version": 2, "quantile_levels": [], "fixed_pins": {"x": bad}})


def test_model_roundtrip_with_numpy(tmp_path):
    np = pytest.importorskip("numpy")
    t = _tables()
    model = {"ttl_tables": t.to_dict(), "levels": np.array([0.5, 0.9]), "n": np.int64(3), "text": "tree\n"}
    path = save_model(model, tmp_path / "m.pkl")
    back = load_model(path)
    assert back["format_version"] == FORMAT_VERSION and back["levels"] == [0.5, 0.9] and back["n"] == 3
    assert type(back["n"]) is int
    assert load_ttl_tables(path).to_dict() == t.to_dict()
    with pytest.raises(ModelFileError, match="not plain data"):
        save_model({"x": object()}, tmp_path / "bad.pkl")
    assert not (tmp_path / "bad.pkl").exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"kind": "ctk-model", "format_version": 1, "x": _Evil(marker)}, protocol=4))
    with pytest.raises(ModelFileError, match=r"refusing to load (posix|os|nt)\.system"):
        load_model(path)
    with pytest.raises(ModelFileError):
        load_ttl_tables(path)
    with pytest.raises(ModelFileError, match="refusing to load"):
        ModelFile.load(path)
    assert not marker.exists()
    # sanity: the payload does run under plain pickle (so the refusal above is what protected us)
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"hello world", "not a pickle"),
        (
            pickle.dumps({"kind": "ctk-model", "format_version": 1, "a": list(range(100))}, protocol=4)[:40],
            "truncated or corrupt",
        ),
        (pickle.dumps([1, 2, 3], protocol=4), "a pickle of list"),
        (pickle.dumps({"weights": [1.0]}, protocol=4), "not a ctk model"),
        (pickle.dumps({"kind": "ctk-model", "format_version": 99}, protocol=4), "newer than this ctk"),
        (pickle.dumps({"kind": "ctk-model"}, protocol=4), "format version"),
    ],
)
def test_bad_model_files(tmp_path, content, message):
    path = tmp_path / "m.pkl"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        load_model(path)


def test_missing_model_and_bad_tables(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "none.pkl")
    save_model({"ttl_tables": {"ttl_s": {}}}, tmp_path / "m.pkl")
    with pytest.raises(ModelFileError, match="bad TTL tables"):
        load_ttl_tables(tmp_path / "m.pkl")
    save_model({}, tmp_path / "n.pkl")
    with pytest.raises(ModelFileError, match="no TTL tables"):
        load_ttl_tables(tmp_path / "n.pkl")


def test_contract_modules_import_without_heavy_libraries():
    code = (
        "import sys\n"
        "import ctk.predict.features, ctk.predict.cost, ctk.predict.tables, ctk.predict.modelfile\n"
        "bad = [m for m in ('lightgbm', 'sklearn', 'pandas', 'numpy', 'torch') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
