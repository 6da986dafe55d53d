"""bench/accuracy.py's report: targets and plot recomputed from the committed results."""

from __future__ import annotations

import json
import os
import shutil

from conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def test_replot_recomputes_the_committed_targets(tmp_path, monkeypatch):
    require("matplotlib", "bench/accuracy.py draws its plot with it")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import accuracy

    found = sorted(f for f in os.listdir(RESULTS) if f.startswith("accuracy-cpu-") and f.endswith(".json"))
    assert found, "bench/results holds no accuracy-cpu-*.json"
    src = os.path.join(RESULTS, found[0])
    out = tmp_path / "accuracy.json"
    shutil.copy(src, out)
    doc = json.loads(out.read_text())
    for r in doc["rows"]:  # derived columns and targets must come back from the measured ones alone
        r.pop("delta_pct", None)
        r.pop("steady_bytes_per_token", None)
    doc.pop("targets")
    out.write_text(json.dumps(doc))
    assert accuracy.main(["--replot", "--out", str(out), "--plans-dir", RESULTS]) == 0
    with open(src) as f:
        committed = json.load(f)
    assert json.loads(out.read_text())["targets"] == committed["targets"]
    png = tmp_path / "accuracy.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
