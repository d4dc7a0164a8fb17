"""Short tables of every benchmark JSON in a folder (what gpu_suite.sh prints last).

python benchmarks/summary.py benchmarks/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness, kernels

SEARCH_COLUMNS = [
    ("file", "file"),
    ("space", "space"),
    ("order", "order"),
    ("config", "config"),
    ("backend", "backend"),
    ("s/step", "median_s"),
    ("× ref", "ratio_vs_reference"),
    ("ops/step", "ops_per_step"),
    ("launches/step", "kernel_launches_per_step"),
    ("peak MiB", "peak_mem_mb"),
    ("GPU-h", "projected_gpu_hours"),
]
# The kernel benchmark's own columns, less the per-call counts (short tables here).
KERNEL_COLUMNS = [
    c for c in kernels.COLUMNS if c[1] not in {"ops_per_step", "kernel_launches_per_step", "mb"}
]


def summarize(folder: str | Path) -> str:
    """Markdown tables: search-step rows of all files, then kernel rows."""
    search, kernel, notes = [], [], []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            notes.append(f"{path.name}: unreadable ({e})")
            continue
        for row in doc.get("rows", []):
            (kernel if "kernel" in row else search).append({**row, "file": path.stem})
        for s in doc.get("skipped", []):
            notes.append(f"{path.name}: skipped {s['backend']}: {s['reason']}")
    parts = []
    if search:
        parts.append(harness.markdown_table(search, SEARCH_COLUMNS))
        paper = ", ".join(f"{k.upper()} {v:g} h" for k, v in harness.PAPER_GPU_HOURS.items())
        parts.append(f"paper, one second-order search on a GTX 1080 Ti: {paper}")
    if kernel:
        parts.append(harness.markdown_table(kernel, KERNEL_COLUMNS))
    if notes:
        parts.append("\n".join(notes))
    return "\n\n".join(parts) or "no results"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/summary.py FOLDER")
    print(summarize(sys.argv[1]))
