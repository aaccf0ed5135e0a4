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
from ctk.predict.tables import NO_PIN, TTLDecision, TTLTables

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


def test_tables_lookup_backoff_buckets_and_pressure():
    t = _tables()
    d = t.lookup(["python:pytest", "python", "*"], 3000, 0.0)
    assert isinstance(d, TTLDecision) and d.key == "python:pytest"
    assert t.lookup(["pip:install", "pip", "*"], 3000, 0.0).key == "*"
    assert t.lookup(["nope"], 3000, 0.0) == NO_PIN
    # ls is short: always pinned, whatever the pressure
    assert all(t.lookup(["ls"], 3000, p).ttl_s == pytest.approx(0.1) for p in (0.0, 0.5, 0.99, 1.0))
    # pressure rounds up: 0.81 uses the 0.9 column
    i09 = t.pressure_levels.index(0.9)
    assert (
        t.pressure_index(0.81) == i09
        and t.pressure_index(0.9) == i09
        and t.pressure_index(7) == len(t.pressure_levels) - 1
    )
    assert t.context_bucket(0) == 0 and t.context_bucket(10**9) == len(t.context_edges) - 1
    assert t.context_bucket(None) == 0
    # the pin shrinks with pressure and context length
    at = [t.lookup(["python"], 60000, p).ttl_s for p in t.pressure_levels]
    assert at == sorted(at, reverse=True) and at[0] > at[-1]
    d = t.lookup(["python"], 60000, 0.0)
    assert d.p_hit == pytest.approx(0.99)


def test_tables_recompute_and_roundtrip():
    t = _tables()
    before = t.lookup(["ls"], 1000, 1.0)
    t.recompute("ls", [40.0, 80.0, 120.0, 300.0], 5)
    after = t.lookup(["ls"], 1000, 1.0)
    assert after.ttl_s != before.ttl_s and t.n_samples["ls"] == 5
    d = t.to_dict()
    again = TTLTables.from_dict(d)
    assert again.to_dict() == d
    assert again.lookup(["python"], 5000, 0.8) == t.lookup(["python"], 5000, 0.8)
    with pytest.raises(ValueError, match="shape"):
        TTLTables.from_dict({**d, "ttl_s": {"x": [[1.0]]}, "p_hit": {"x": [[1.0]]}})
    with pytest.raises(ValueError, match="lack"):
        TTLTables.from_dict({"ttl_s": {}})
    with pytest.raises(ValueError, match="newer"):
        TTLTables.from_dict({**d, "version": 99})


def test_tables_lookup_latency():
    t = _tables()
    keys = command_keys("cd /r && python -m pytest -k x")
    n = 20000
    t0 = time.perf_counter()
    for i in range(n):
        t.lookup(keys, 1000 + i, 0.85)
    assert (time.perf_counter() - t0) / n < 50e-6  # the bench measures p99 against 20 µs


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
