"""Create (or print) the W&B workspace for mukv runs: accuracy against budget, breakdowns, efficiency, figures.

    pip install -e ".[dashboard]"                 # wandb-workspaces
    wandb login                                   # once; uploads: wandb sync outputs/**/wandb/offline-run-*
    python experiments/wandb_dashboard.py --entity ME --project mukv [--group reproduce_rvs]
    python experiments/wandb_dashboard.py --entity ME --project mukv --dry-run   # print the spec, no network

Runs are grouped by experiment (W&B group = ``task_name``; see ``mukv/train_eval.py``), tagged
``method:<m>``, ``dataset:<d>``, ``model:<m>``, ``sweep:<time>``, ``grid:main|budget``, and carry the
flattened metrics in their summary (``accuracy``, ``mean_score``, ``invalid_judgments``,
``mean_online_tokens``, ``kv_gb_per_hour``, ``by_age/<bucket>/accuracy``, ...). The panels below read those
keys; the runs table groups by ``method`` and pins the paper's columns.
"""

from __future__ import annotations

import argparse
import sys

SECTIONS: list[tuple[str, list[dict]]] = [
    ("Accuracy against budget", [
        {"type": "scatter", "title": "accuracy vs online tokens", "x": "mean_online_tokens", "y": "accuracy",
         "log_x": True},
        {"type": "scatter", "title": "accuracy vs KV GB per hour", "x": "kv_gb_per_hour", "y": "accuracy"},
        {"type": "scatter", "title": "accuracy vs stream length (dataset.max_minutes)", "x": "max_minutes",
         "y": "accuracy"},
    ]),
    ("Accuracy by method", [
        {"type": "bar", "title": "accuracy", "metrics": ["accuracy"]},
        {"type": "bar", "title": "mean judge score (0-5)", "metrics": ["mean_score"]},
        {"type": "bar", "title": "invalid judgments", "metrics": ["invalid_judgments"]},
        {"type": "bar", "title": "accuracy by question type",
         "metrics": ["accuracy_by_type/detail", "accuracy_by_type/count", "accuracy_by_type/current"]},
    ]),
    ("Efficiency", [
        {"type": "bar", "title": "KV GB per hour of video", "metrics": ["kv_gb_per_hour"]},
        {"type": "bar", "title": "peak KV bytes", "metrics": ["peak_kv_bytes"]},
        {"type": "bar", "title": "peak GPU memory (bytes)", "metrics": ["peak_cuda_bytes"]},
        {"type": "bar", "title": "encode frames per second", "metrics": ["encode_fps"]},
        {"type": "bar", "title": "latency (s): first token, full answer", "metrics": ["mean_ttft_s", "mean_latency_s"]},
    ]),
    ("Figures", [
        {"type": "media", "title": "accuracy by question age", "keys": ["figures/accuracy_by_age"]},
        {"type": "media", "title": "memory and latency along the stream", "keys": ["figures/stream_memory_latency"]},
    ]),
]
PINNED = ["summary:method", "summary:dataset", "summary:model", "summary:accuracy", "summary:mean_score",
          "summary:invalid_judgments", "summary:mean_online_tokens", "summary:kv_gb_per_hour",
          "summary:mean_ttft_s", "summary:mean_latency_s", "summary:encode_fps"]


def build_workspace(entity: str, project: str, name: str = "mukv", group: str | None = None):
    """The workspace object (wandb_workspaces); ``.save()`` creates it on the W&B server."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def panel(spec: dict):
        if spec["type"] == "scatter":
            return wr.ScatterPlot(title=spec["title"], x=wr.SummaryMetric(spec["x"]), y=wr.SummaryMetric(spec["y"]),
                                  log_x=spec.get("log_x"))
        if spec["type"] == "bar":
            return wr.BarPlot(title=spec["title"], metrics=[wr.SummaryMetric(m) for m in spec["metrics"]],
                              orientation="v")
        return wr.MediaBrowser(title=spec["title"], media_keys=spec["keys"], num_columns=2)

    sections = [ws.Section(name=title, panels=[panel(s) for s in specs], is_open=True) for title, specs in SECTIONS]
    filters = [ws.Metric("Group") == group] if group else ""
    return ws.Workspace(
        entity=entity, project=project, name=name, sections=sections,
        runset_settings=ws.RunsetSettings(filters=filters, groupby=[ws.Summary("method")], pinned_columns=PINNED),
    )


def spec_dict() -> dict:
    """The dashboard as plain data (what --dry-run prints when wandb-workspaces is not installed)."""
    return {"sections": [{"name": t, "panels": s} for t, s in SECTIONS], "pinned_columns": PINNED,
            "groupby": "summary:method"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--entity", default="ENTITY")
    parser.add_argument("--project", default="mukv")
    parser.add_argument("--name", default="mukv", help="workspace (view) name")
    parser.add_argument("--group", help="only the runs of this W&B group (an experiment's task_name)")
    parser.add_argument("--dry-run", action="store_true", help="print the panel spec; contact no server")
    args = parser.parse_args(argv)
    import json

    try:
        workspace = build_workspace(args.entity, args.project, args.name, args.group)
    except ImportError:
        if args.dry_run:
            print(json.dumps(spec_dict(), indent=2))
            return 0
        print('error: wandb-workspaces is not installed: pip install -e ".[dashboard]"', file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps({"workspace": args.name, "entity": args.entity, "project": args.project,
                          "group": args.group, **spec_dict(),
                          "panels": sum(len(s.panels) for s in workspace.sections)}, indent=2))
        return 0
    workspace.save()
    print(f"saved workspace '{args.name}': {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
