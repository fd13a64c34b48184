"""`tandem run`, the README's main job, end to end: parity on smoke, `tandem bench --suite
cpu-smoke`, and the report (about a minute on 2 cores)."""

from __future__ import annotations

import json

import pandas as pd

from harness.cli import main
from harness.config import load_suite


def test_tandem_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["run", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    index = out / "report" / "index.html"
    assert printed.strip().splitlines()[-1] == str(index.resolve())
    assert index.exists() and (out / "report" / "report.md").exists()

    summary = json.loads((out / "parity" / "parity_summary.json").read_text())
    assert summary["passed"] is True

    records = pd.read_parquet(out / "bench" / "records.parquet")
    cases = [c.name for c in load_suite("cpu-smoke").cases]
    for case in cases:
        rows = records[records.case == case]
        for side in ("engine", "jax"):
            metrics = set(rows[rows.side == side].metric)
            assert {"step_ms", "tokens_per_s", "flops_per_s", "mfu", "mfu_palm",
                    "peak_mem_bytes"} <= metrics, (case, side, metrics)
        speedup = rows[(rows.side == "ratio") & (rows.metric == "speedup") & (rows.repeat == -1)]
        assert len(speedup) == 1 and speedup.value.iloc[0] > 0, case
    pipelined = records[(records.stages > 1) & (records.metric == "bubble")]
    assert set(pipelined.side) >= {"engine", "theory"}

    # the report of that real run: every figure written is referenced by both documents, and
    # every image the HTML references exists
    import re

    html = index.read_text()
    md = (out / "report" / "report.md").read_text()
    figures = sorted((out / "report" / "figures").glob("*.png"))
    names = {f.name for f in figures}
    assert {"speedup.png", "throughput.png", "mfu.png", "parity.png", "losses.png",
            "bubble.png"} <= names, names
    assert any(n.startswith("timeline_") for n in names), names
    for f in figures:
        assert f"figures/{f.name}" in html and f"figures/{f.name}" in md, f.name
    for src in re.findall(r'<img[^>]+src="([^"]+)"', html):
        assert (out / "report" / src).exists(), src
