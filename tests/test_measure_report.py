"""``ctk report``: every referenced image exists and is a valid PNG; the page renders in chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ctk.measure.report import ReportInputs, build_report, is_valid_png, load_inputs, referenced_images
from ctk.measure.results import ProgramResult, ReplayResult, TurnResult
from ctk.store import TraceStore


def _fit_tables(tool_calls):
    """TTL tables fitted the simplest honest way: empirical quantiles per command key."""
    from ctk.predict.features import command_keys
    from ctk.predict.tables import TTLTables

    levels = [0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    by_key: dict[str, list[float]] = {}
    for row in tool_calls.itertuples(index=False):
        cmd = row.command_or_args if isinstance(row.command_or_args, str) else None
        tool = row.tool_name if isinstance(row.tool_name, str) else None
        for key in command_keys(cmd, tool)[:1] + ["*"]:
            by_key.setdefault(key, []).append(float(row.duration_s))
    q = {k: list(np.quantile(v, levels)) for k, v in by_key.items() if len(v) >= 5}
    return TTLTables.build(q, {k: len(by_key[k]) for k in q}, levels)


def _results() -> list[ReplayResult]:
    out = []
    rng = np.random.default_rng(0)
    for label, scale in (("vllm", 1.0), ("continuum", 0.9), ("ttl", 0.7), ("oracle", 0.6)):
        r = ReplayResult(label=label, started_unix_s=0.0, finished_unix_s=60.0)
        for i in range(12):
            turns = [TurnResult(k, float(k), ttft_s=float(rng.lognormal(-2, 1)) * scale, latency_s=1.0)
                     for k in range(5)]
            r.programs.append(ProgramResult(f"p{i}", f"{label}{i}", 0.0, 10.0 * scale + i, turns))
        r.timeline = [{"t_s": float(t), "kv_usage": 0.5 + 0.4 * np.sin(t / 5) ** 2,
                       **({"pinned_blocks": float(t % 7)} if label != "vllm" else {})} for t in range(60)]
        out.append(r)
    return out


def test_report_images_exist_and_are_valid_pngs(sample_store, tmp_path):
    with TraceStore(sample_store, read_only=True) as store:
        tools = store.tool_calls()
    inputs = ReportInputs(tool_calls=tools, tables=_fit_tables(tools), results=_results())
    page = build_report(inputs, tmp_path / "report")
    images = referenced_images(page)
    names = {p.name for p in images}
    assert names == {"tool_durations.png", "calibration.png", "ttl_vs_duration.png", "jct_cdf.png",
                     "ttft_tail.png", "timeline.png"}
    for img in images:
        assert img.exists() and is_valid_png(img), img
    assert "Not drawn" not in page.read_text()


def test_missing_inputs_are_named_not_drawn(sample_store, tmp_path):
    inputs = load_inputs(sample_store, [], None)
    page = build_report(inputs, tmp_path / "r")
    text = page.read_text()
    assert [p.name for p in referenced_images(page)] == ["tool_durations.png"]
    assert text.count("Not drawn: no model given") == 2
    broken = tmp_path / "r" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert not is_valid_png(broken)


def test_report_cli_with_bad_input(tmp_path, ctk_bin):
    (tmp_path / "bad.json").write_text("[1, 2")
    cmd = [*ctk_bin, "report", "--results", str(tmp_path / "bad.json"), "-o", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "bad.json" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*ctk_bin, "report", "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "--db" in r.stderr


#: Injected first into a copy of the page: records script errors, failed resource loads and console.error
#: calls, and after load writes what it saw (and every image's state) into the page for --dump-dom to show.
_PAGE_CHECK = """<script>
window.__ctkErrors = [];
window.addEventListener("error", e => window.__ctkErrors.push(
  e.message || ("failed to load " + ((e.target && (e.target.src || e.target.href)) || "?"))), true);
const __ctkConsoleError = console.error;
console.error = (...a) => { window.__ctkErrors.push(a.join(" ")); __ctkConsoleError(...a); };
window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.setAttribute("data-ctk-check", JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src")),
    errors: window.__ctkErrors}));
});
</script>"""


def _chromium() -> str:
    """Debian's chromium; CI (CTK_REQUIRE_CHROMIUM=1, set by .ci/run) fails instead of skipping without it."""
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("CTK_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed but CTK_REQUIRE_CHROMIUM=1 (.ci/run installs it)")
        pytest.skip("Debian's chromium is not installed")
    return exe


def _page_check(chromium: str, page) -> dict:
    """Open ``page`` headless and return what the injected check saw: images, broken images, errors."""
    text = page.read_text()
    checked = page.with_name("ctk-check-" + page.name)
    checked.write_text(text.replace("<head>", "<head>" + _PAGE_CHECK, 1) if "<head>" in text
                       else _PAGE_CHECK + text)
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
         checked.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    found = re.search(r'data-ctk-check="([^"]*)"', proc.stdout)
    assert found, f"the page did not finish loading: {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = _chromium()
    page = build_report(ReportInputs(results=_results()), tmp_path / "report")
    seen = _page_check(chromium, page)
    assert seen["images"] == len(referenced_images(page)) > 0
    assert seen["broken"] == [] and seen["errors"] == [], seen
    # the check itself notices a broken image and a script error
    (page.parent / "jct_cdf.png").unlink()
    page.write_text(page.read_text().replace("</body>", "<script>undefinedFunction()</script></body>"))
    seen = _page_check(chromium, page)
    assert seen["broken"] == ["jct_cdf.png"] and len(seen["errors"]) == 2, seen
    shot = tmp_path / "shot.png"
    page = build_report(ReportInputs(results=_results()), tmp_path / "report2")
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=1100,2400", page.as_uri()],
        capture_output=True, timeout=120, check=False,
    )
    assert shot.exists() and is_valid_png(shot)
    img = __import__("matplotlib.pyplot").pyplot.imread(shot)
    # the plots are drawn: a good share of the screenshot is not page-white
    assert (img[..., :3].mean(axis=2) < 0.9).mean() > 0.02, sys.platform
