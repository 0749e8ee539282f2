"""What a run leaves behind: the metrics table per round, DIR/report.md with PNG plots, DIR/results.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cloud_trainer.simulate.loop import KEYS

METRICS = ("auc", "gauc", "hr@10", "ndcg@10")
GROUP_NAMES = ["tail", "q2", "q3", "q4", "head"]


def _f(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.4f}"


def metrics_table(results: dict) -> str:
    lines = ["| round | model | kind | AUC | gAUC | HR@10 | NDCG@10 | " + " | ".join(f"{g} gAUC" for g in GROUP_NAMES)
             + " | cold gAUC | cold NDCG@10 |",
             "|---|---|---|" + "---|" * (4 + len(GROUP_NAMES) + 2)]
    for r, rnd in enumerate(results["rounds"]):
        for key in KEYS:
            s = rnd[key]
            if s is None:
                continue
            o, g, c = s["overall"], s["groups"], s["cold"]
            lines.append(f"| {r + 1} | {key} | {results['kinds'][key]} | " + " | ".join(_f(o[m]) for m in METRICS)
                         + " | " + " | ".join(_f(g[str(q)]["gauc"]) for q in range(len(GROUP_NAMES)))
                         + f" | {_f(c['gauc'])} | {_f(c['ndcg@10'])} |")
    return "\n".join(lines)


def counts_table(results: dict) -> str:
    c = results["counts"]
    rows = [("patches made on devices", c["patches_made"]), ("patches published (incl. resends)", c["patches_published"]),
            ("patches acknowledged by the broker", c["patches_acked"]), ("patches stored (distinct)", c["stored"]),
            ("duplicates dropped by ingest", c["duplicates"]),
            ("rejected (total)", sum(c["rejected"].values()))]
    rows += [(f"rejected: {reason}", n) for reason, n in sorted(c["rejected"].items())]
    rows += [("offered again after 'no subscriber'", c["unrouted_retries"]),
             ("patches re-requested by the cloud", c["resend_requests"]), ("device reconnects", c["reconnects"]),
             ("agent processes restarted", c["agent_restarts"]), ("broker restarts", c["broker_restarts"]),
             ("bundle publishes retried (broker away)", c.get("publish_retries", 0)),
             ("devices that kept their previous φ", c["kept_previous"])]
    return "\n".join(["| what | count |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def phases_table(results: dict) -> str:
    lines = ["| phase | round | session | seconds | devices/s |", "|---|---|---|---|---|"]
    for p in results["phases"]:
        r = "" if p["round"] is None else str(p["round"] + 1)
        # Session 1: devices train on the bundle they hold; 2: on the bundle MoMoDistill produced.
        k = "" if p.get("session") is None else str(p["session"] + 1)
        dps = f"{p['devices_per_s']:.1f}" if "devices_per_s" in p else ""
        lines.append(f"| {p['phase']} | {r} | {k} | {p['seconds']:.1f} | {dps} |")
    rest = results["total_seconds"] - sum(p["seconds"] for p in results["phases"])
    lines.append(f"| (final metrics, report, shutdown) | | | {rest:.1f} | |")
    return "\n".join(lines)


def bundles_table(results: dict) -> str:
    """Each bundle shipped and the step budget its manifest gave the devices (session 2 of a round:
    the budget chosen for a bundle that has already trained on the devices' fresh data)."""
    lines = ["| bundle | round | session | device steps |", "|---|---|---|---|"]
    lines += [f"| {b['version']} | {b['round'] + 1} | {b['session'] + 1} | {b['device_steps']} |"
              for b in results.get("bundles", [])]
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    R = len(results["rounds"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in KEYS:
        ys = [rnd[key]["overall"]["gauc"] for rnd in results["rounds"]]
        ax.plot(range(1, R + 1), ys, marker="o", label=f"{key} ({results['kinds'][key]})")
    ax.set_xlabel("round")
    ax.set_ylabel("gAUC (future window, warm users)")
    ax.set_xticks(range(1, R + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "gauc_per_round.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    last = results["rounds"][-1]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(KEYS)
    labels = GROUP_NAMES + ["cold"]
    for i, key in enumerate(KEYS):
        s = last[key]
        ys = [s["groups"][str(q)]["gauc"] for q in range(len(GROUP_NAMES))] + [s["cold"]["gauc"]]
        ax.bar(np.arange(len(labels)) + i * width, ys, width, label=key)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
    ax.set_ylabel(f"gAUC, round {R}")
    lo = min(v for key in KEYS for v in [last[key]["overall"]["gauc"]] if np.isfinite(v))
    ax.set_ylim(max(0.0, lo - 0.15), 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "gauc_by_activity_group.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    phases = [p for p in results["phases"] if p["round"] is not None]
    if phases:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(dict.fromkeys(p["phase"] for p in phases))
        for i, name in enumerate(names):
            per_round: dict[int, float] = {}           # both fleet sessions of a round in one bar
            for p in phases:
                if p["phase"] == name:
                    per_round[p["round"]] = per_round.get(p["round"], 0.0) + p["seconds"]
            xs = [r + 1 + (i - len(names) / 2) * 0.12 for r in per_round]
            ax.bar(xs, list(per_round.values()), 0.12, label=name)
        ax.set_xlabel("round")
        ax.set_ylabel("seconds")
        ax.set_xticks(range(1, R + 1))
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "phase_seconds.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    pngs = plots(results, out)
    md = [f"# dccl simulate — {results['dataset']}", "",
          f"{results['devices']} devices ({results['cold_devices']} cold-start) in {results['pools']} agent processes, "
          f"{len(results['rounds'])} rounds, seed {results['seed']}, broker: {results['broker']}, "
          f"{results['total_seconds']:.0f} s in all.", "",
          "Metrics on each round's future window (warm users unless noted; activity quintiles tail..head). "
          "`bundle-in`: the bundle the devices hold at the start of the round (its cloud model); `dccl-upload`: "
          "the device models they upload (that bundle + each device's φ trained on the round's fresh data); "
          "`momodistill`: the cloud model after MoMoDistill step 1; `dccl-start`: the new bundle with each "
          "device's starting φ; `dccl`: the device models (the new bundle + each device's φ trained on it).", "",
          metrics_table(results), "", "## What happened", "", counts_table(results), "", "## Bundles", "",
          bundles_table(results), "", "## Phases", "",
          phases_table(results), "",
          "Peak RSS per agent process (MB): " + ", ".join(_f(x) if x is None else f"{x:.0f}"
                                                         for x in results["pool_peak_rss_mb"]), ""]
    if results.get("synthetic"):
        md += ["_These numbers are on SYNTHETIC data._", ""]
    md += [f"![{p.stem}]({p.name})" for p in pngs]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
