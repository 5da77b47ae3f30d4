"""``maelab sweep-report MULTIRUN_DIR``: one table and one plot for a Hydra sweep.

Reads every job directory under MULTIRUN_DIR (``.hydra/overrides.yaml`` and ``results.json``),
finds the overrides whose values differ between jobs (the swept axes), and writes
``sweep_report.md``, ``sweep_report.csv`` and ``sweep_report.png`` (the metric against the first
swept value, one line per value of a second axis, like the paper's Fig. 5) into MULTIRUN_DIR.
A job without results.json (failed, or still running) is listed as such, never left out.
"""

import argparse
import csv
import json
from pathlib import Path

import yaml

# (column, where in results.json): the metrics a report shows when the jobs have them
METRICS = [
    ("acc1", ("", "acc1")),  # a pipeline's (cifar10_fast): its last stage's final top-1
    ("test/acc1", ("test", "test/acc1")),
    ("best val/acc1", ("best", "val/acc1")),
    ("val/acc1", ("last", "val/acc1")),
    ("val/knn_acc", ("last", "val/knn_acc")),
    ("val/loss", ("last", "val/loss")),
    ("train/loss", ("last", "train/loss")),
    ("wall_clock_s", ("", "wall_clock_s")),  # last: never the default plot while a metric is there
]


def read_jobs(sweep_dir: Path) -> list[dict]:
    jobs = []
    job_dirs = [f.parent.parent for f in sorted(sweep_dir.glob("**/.hydra/overrides.yaml"))]
    for job_dir in job_dirs:
        if any(other in job_dir.parents for other in job_dirs):
            continue  # a stage of a pipeline job, which that job's results.json sums up
        overrides = override_values(yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or [])
        results_file = job_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else None
        jobs.append({"dir": job_dir, "overrides": overrides, "results": results})
    return sorted(jobs, key=lambda j: _job_order(j["dir"], sweep_dir))


def override_values(lines: list[str]) -> dict[str, str]:
    """A job's overrides as the command line wrote them, {key: value} (``+experiment``, ``1e-4``);
    a removed key (``~key``) reads "(removed)"."""
    from maelab.config.overrides import parse_overrides

    written = [o.input_line.partition("=") for o in parse_overrides(lines)]
    return {key: value if sep else "(removed)" for key, sep, value in written}


def _job_order(job_dir: Path, sweep_dir: Path):
    name = str(job_dir.relative_to(sweep_dir))
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def swept_keys(jobs: list[dict]) -> list[str]:
    keys = dict.fromkeys(k for j in jobs for k in j["overrides"])
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]


def metric_value(results: dict | None, where: tuple[str, str]) -> float | None:
    section = (results or {}) if not where[0] else (results or {}).get(where[0]) or {}
    value = section.get(where[1])
    return float(value) if isinstance(value, int | float) else None


def _number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def build_table(jobs: list[dict], axes: list[str]) -> tuple[list[str], list[list], list[str]]:
    metrics = [
        (name, where) for name, where in METRICS if any(metric_value(j["results"], where) is not None for j in jobs)
    ]
    header = ["job", *axes, *(name for name, _ in metrics), "status"]
    rows = []
    for j in jobs:
        status = "done" if j["results"] else "no results.json (failed or running)"
        values = [metric_value(j["results"], where) for _, where in metrics]
        rows.append([j["dir"].name, *(j["overrides"].get(k) for k in axes), *values, status])
    return header, rows, [name for name, _ in metrics]


def write_markdown(path: Path, header: list[str], rows: list[list], title: str) -> None:
    def cell(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, jobs: list[dict], axes: list[str], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where = dict(METRICS)[metric]
    x_key, series_key = axes[0], (axes[1] if len(axes) > 1 else None)
    jobs = [j for j in jobs if x_key in j["overrides"]]
    xs = [j["overrides"][x_key] for j in jobs]
    numeric = all(_number(x) is not None for x in xs)
    categories = list(dict.fromkeys(xs))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for series in dict.fromkeys(j["overrides"].get(series_key) for j in jobs):
        points = [
            (_number(j["overrides"][x_key]) if numeric else categories.index(j["overrides"][x_key]), y)
            for j in jobs
            if j["overrides"].get(series_key) == series and (y := metric_value(j["results"], where)) is not None
        ]
        points.sort()
        if points:
            label = f"{series_key}={series}" if series_key else None
            ax.plot(*zip(*points), marker="o", label=label)
            for x, y in points:
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_title(f"{metric} by {x_key}: {path.parent.name}", fontsize=10)
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if series_key:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(sweep_dir: Path, metric: str | None = None) -> dict[str, Path]:
    from maelab.errors import UserError

    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise UserError(f"{sweep_dir}: no sweep jobs in it (looked for <job>/.hydra/overrides.yaml)")
    axes = swept_keys(jobs)
    if not axes:
        raise UserError(f"{sweep_dir}: its {len(jobs)} job(s) share every override; nothing was swept")
    header, rows, metrics = build_table(jobs, axes)
    if metric is None:
        metric = next(iter(metrics), None)
    elif metric not in metrics:
        raise UserError(f"--metric {metric}: the jobs have {', '.join(metrics) or 'no metrics'}")
    out = {"md": sweep_dir / "sweep_report.md", "csv": sweep_dir / "sweep_report.csv"}
    with open(out["csv"], "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    write_markdown(out["md"], header, rows, f"Sweep {sweep_dir.name}: {', '.join(axes)}")
    if metric is not None:
        out["png"] = sweep_dir / "sweep_report.png"
        write_plot(out["png"], jobs, axes, metric)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="maelab sweep-report",
        description="Tabulate and plot a Hydra sweep: sweep_report.md, .csv and .png in the sweep directory.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory, e.g. multirun/mae_vitt_cifar10/<date>")
    names = ", ".join(name for name, _ in METRICS)
    parser.add_argument("--metric", help=f"the metric to plot (default: the first present of {names})")
    args = parser.parse_args(argv)
    for kind, path in report(args.sweep_dir, args.metric).items():
        print(f"{kind:>3}: {path}")
    return 0
