"""Short tables of every benchmark JSON in a folder, or of one file (what gpu_suite.sh
prints last).

    python benchmarks/summary.py benchmarks/results
    python benchmarks/summary.py benchmarks/results/gpu-kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ab, alpha_grad_error, cuda_path_ops, harness, kernels, triton_resources

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
    ("device busy", "busy_fraction"),
    ("peak MiB", "peak_mem_mb"),
    ("GPU-h", "projected_gpu_hours"),
]
# The kernel benchmark's own columns, less the per-call counts (short tables here).
KERNEL_COLUMNS = [
    c for c in kernels.COLUMNS if c[1] not in {"ops_per_step", "kernel_launches_per_step", "mb"}
]
# The other tools' tables, after the search steps': (a key only their rows have, columns).
TABLES = [
    ("kernel", [("file", "file"), *KERNEL_COLUMNS]),
    ("rel_error", [("file", "file"), *alpha_grad_error.COLUMNS]),
    ("triton_kernel", [("file", "file"), *triton_resources.COLUMNS]),
    ("version", [("file", "file"), *ab.COLUMNS]),
    ("launches_floor_per_step", [("file", "file"), *cuda_path_ops.COLUMNS]),
]


def summarize(where: str | Path) -> str:
    """Markdown tables: the search-step rows of all files (the JSON files of the folder
    ``where``, or the file it names), then the kernel, α-gradient-error, Triton-resource,
    before/after (ab.py) and CUDA-path op-count rows, each kind in its own table."""
    search, notes = [], []
    other: dict[str, list[dict]] = {key: [] for key, _ in TABLES}
    where = Path(where)
    for path in sorted(where.glob("*.json")) if where.is_dir() else [where]:
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            notes.append(f"{path.name}: unreadable ({e})")
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("rows", []), list):
            notes.append(f"{path.name}: not a results file (no rows)")
            continue
        profiles = doc.get("device_profile") or {}
        for row in doc.get("rows", []):
            kind = next((key for key, _ in TABLES if key in row), None)
            if kind is None:
                busy = profiles.get(row.get("backend"), {}).get("busy_fraction")
                search.append({**row, "file": path.stem, "busy_fraction": busy})
            else:
                other[kind].append({**row, "file": path.stem})
        for s in doc.get("skipped", []):
            notes.append(f"{path.name}: skipped {s['backend']}: {s['reason']}")
    parts = []
    if search:
        parts.append(harness.markdown_table(search, SEARCH_COLUMNS))
        paper = ", ".join(f"{k.upper()} {v:g} h" for k, v in harness.PAPER_GPU_HOURS.items())
        parts.append(f"paper, one second-order search on a GTX 1080 Ti: {paper}")
    parts += [harness.markdown_table(other[key], cols) for key, cols in TABLES if other[key]]
    if notes:
        parts.append("\n".join(notes))
    return "\n\n".join(parts) or "no results"


def main(argv: list[str] | None = None) -> str:
    """Prints (and returns) the tables of the folder or file given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", help="a folder of result JSON files, or one such file")
    args = p.parse_args(argv)
    path = Path(args.path)
    if not path.exists():
        p.error(f"{path}: no such folder or file")
    if not path.is_dir() and not path.is_file():
        p.error(f"{path}: not a folder or a file")
    if path.is_file():  # a file named is a results file or a mistake (a folder may mix)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"{path}: unreadable ({e})")
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            p.error(f"{path}: not a results file (no rows)")
    text = summarize(path)
    print(text)
    return text


if __name__ == "__main__":
    main()
