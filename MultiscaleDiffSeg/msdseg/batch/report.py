"""``cohort_report.html``: one self-contained page to review a cohort.

Why self-contained (images embedded as base64 PNG, inline CSS, no scripts): the page is mailed,
archived next to the data, or opened from a cluster's shared disk without a web server.

What it shows, in the order a reviewer needs it: a summary and the cases that failed; the cases
QC flagged (*fail*, then *review*, worst first) with their findings, and the ten most uncertain
cases with their most uncertain structures; the volume, head-size, asymmetry and uncertainty
distributions as box plots with every case as a point (flagged cases in colour), so an outlier is
seen against the cohort; then every segmented case as a card (three-view overlay thumbnail with
the uncertainty row, QC flag and findings, ICV, mean uncertainty), flagged cases first.

Thumbnails are drawn by the worker that segmented the case (it has the image in memory) and kept
as ``S_overlay.png``; the report only embeds them.  Plots use Matplotlib's object API on the Agg
canvas (no pyplot state), which is safe in any process and needs no display.
"""
from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from msdseg.core.labels import LabelTree
from msdseg.batch.qc import QCResult
from msdseg.outputs.thumbnail import png_bytes as _png

#: Cards with a thumbnail; beyond this the remaining *ok* cases are listed in a table only
#: (flagged cases always get a card), which keeps the page loadable for thousands of cases.
MAX_CARDS = 300
FLAG_ORDER = {"fail": 0, "review": 1, "ok": 2}
FLAG_COLOUR = {"fail": "#d62728", "review": "#ff7f0e", "ok": "#1f77b4"}


def _img_tag(png: bytes | None, alt: str, width: int | None = None) -> str:
    if not png:
        return f'<div class="noimg">{html.escape(alt)}: no image</div>'
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


# ----------------------------------------------------------------------------- distributions
def structure_order(tree: LabelTree) -> list[str]:
    """Leaves with each left structure next to its right twin, midline structures last."""
    order: list[str] = []
    for leaf in tree.leaves:
        if leaf.id in order:
            continue
        if leaf.id.startswith("right_") and tree.twin(leaf.id):
            continue
        order.append(leaf.id)
        twin = tree.twin(leaf.id)
        if twin:
            order.append(twin)
    return order


def _short(leaf_id: str) -> str:
    return leaf_id.replace("left_", "L ").replace("right_", "R ").replace("_", " ")


def distribution_png(labels: Sequence[str], columns: Sequence[Sequence[float | None]], flags: Sequence[str],
                     ylabel: str, title: str, log: bool = False,
                     hlines: Sequence[float] = ()) -> bytes | None:
    """Box plot per column plus every case as a jittered point (flagged cases coloured)."""
    data = [np.array([v for v in col if v is not None and math.isfinite(v) and (v > 0 or not log)], dtype=float)
            for col in columns]
    if not any(d.size for d in data):
        return None
    fig = Figure(figsize=(max(6.0, 0.32 * len(labels) + 1.5), 4.0), facecolor="white")
    ax = fig.subplots()
    positions = np.arange(1, len(labels) + 1)
    ax.boxplot([d if d.size else [np.nan] for d in data], positions=positions, widths=0.6, showfliers=False,
               medianprops={"color": "black"}, boxprops={"color": "#555555"}, whiskerprops={"color": "#555555"},
               capprops={"color": "#555555"})
    rng = np.random.default_rng(0)
    for pos, col in zip(positions, columns):
        for value, flag in zip(col, flags):
            if value is None or not math.isfinite(value) or (log and value <= 0):
                continue
            ax.plot(pos + rng.uniform(-0.18, 0.18), value, "o", ms=3.5 if flag == "ok" else 5,
                    color=FLAG_COLOUR.get(flag, "grey"), alpha=0.6 if flag == "ok" else 0.95, zorder=3)
    for h in hlines:
        ax.axhline(h, color="#999999", lw=0.8, ls="--")
    if log:
        ax.set_yscale("log")
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig, 80)


# ----------------------------------------------------------------------------- page
CSS = """
body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.85em} td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ccc;border-radius:6px;padding:6px;width:420px;font-size:0.82em}
.card.fail{border:2px solid #d62728} .card.review{border:2px solid #ff7f0e}
.flag{font-weight:bold;padding:0 5px;border-radius:3px;color:white}
.flag.fail{background:#d62728} .flag.review{background:#ff7f0e} .flag.ok{background:#1f77b4}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:6px 10px;border-radius:4px}
.noimg{width:400px;height:60px;background:#eee;color:#777;display:flex;align-items:center;justify-content:center}
.reasons{color:#444}
"""


def _num(v: Any, fmt: str = ".1f") -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _brief(reasons: Sequence[str], keep: int = 5) -> str:
    """The first few QC reasons (all of them are in cohort_volumes.csv)."""
    if not reasons:
        return "no finding"
    more = f" (+{len(reasons) - keep} more)" if len(reasons) > keep else ""
    return "; ".join(reasons[:keep]) + more


def build_report_html(sidecars: Sequence[Mapping[str, Any]], qc: Mapping[str, QCResult],
                      failures: Sequence[tuple[str, str, str]], tree: LabelTree, outdir: str | os.PathLike,
                      title: str = "msdseg cohort report", run_info: Mapping[str, Any] | None = None) -> str:
    """The HTML text (see the module doc).  ``failures`` are (case, input, reason) triples."""
    outdir = Path(outdir)
    esc = html.escape
    ordered = sorted(sidecars, key=lambda d: (FLAG_ORDER.get(qc[d["case"]].flag, 3), -qc[d["case"]].score, d["case"]))
    flags = [qc[d["case"]].flag for d in ordered]
    counts = {f: flags.count(f) for f in ("fail", "review", "ok")}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>"]
    untrained = [d["case"] for d in sidecars if (d.get("info") or {}).get("trained") is False]
    if untrained:
        parts.append("<p class='warn'><b>UNTRAINED MODEL</b>: these segmentations were made by a network with "
                     "random weights; labels, volumes and QC flags are meaningless.</p>")
    info = dict(run_info or {})
    info.update({"segmented cases": len(sidecars), "failed cases": len(failures),
                 "QC fail / review / ok": f"{counts['fail']} / {counts['review']} / {counts['ok']}"})
    parts.append("<table>" + "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>"
                                     for k, v in info.items()) + "</table>")
    parts.append("<p>QC rule (<code>docs/cohorts.md</code>): <b>fail</b> = implausible brain volume, a major "
                 "structure missing or very high uncertainty; <b>review</b> = volume or asymmetry outliers (robust "
                 "z-scores against the cohort from 20 cases on, fixed adult ranges below) or high uncertainty.</p>")

    if failures:
        parts.append("<h2>Failed cases</h2><table><tr><th>case</th><th>input</th><th>reason</th></tr>")
        parts += [f"<tr><td>{esc(c)}</td><td>{esc(p)}</td><td>{esc(r)}</td></tr>" for c, p, r in failures]
        parts.append("</table>")

    flagged = [d for d in ordered if qc[d["case"]].flag != "ok"]
    if flagged:
        parts.append(f"<h2>Cases to review ({len(flagged)})</h2><table><tr><th>case</th><th>QC</th><th>ICV mL</th>"
                     "<th>mean uncertainty</th><th>findings</th></tr>")
        parts += [f"<tr><td>{esc(d['case'])}</td><td><span class='flag {qc[d['case']].flag}'>{qc[d['case']].flag}"
                  f"</span></td><td>{_num(d.get('icv_ml'), '.0f')}</td><td>{_num(d.get('brain_mean_uncertainty'), '.3f')}"
                  f"</td><td>{esc(_brief(qc[d['case']].reasons, 8))}</td></tr>" for d in flagged]
        parts.append("</table>")
    by_unc = sorted((d for d in ordered if d.get("brain_mean_uncertainty") is not None),
                    key=lambda d: -float(d["brain_mean_uncertainty"]))[:10]
    if by_unc:
        parts.append("<h2>Highest model uncertainty</h2><table><tr><th>case</th><th>mean uncertainty</th>"
                     "<th>most uncertain structures</th></tr>")
        for d in by_unc:
            per = {k: v for k, v in (d.get("uncertainty_by_structure") or {}).items() if v is not None}
            top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:3])
            parts.append(f"<tr><td>{esc(d['case'])}</td><td>{_num(d.get('brain_mean_uncertainty'), '.3f')}</td>"
                         f"<td>{esc(top)}</td></tr>")
        parts.append("</table>")

    if ordered:
        parts.append("<h2>Distributions</h2><p>Boxes: cohort quartiles and 1.5 IQR whiskers; points: cases "
                     "(<span style='color:#d62728'>fail</span>, <span style='color:#ff7f0e'>review</span>, "
                     "<span style='color:#1f77b4'>ok</span>).</p>")
        leaves = structure_order(tree)
        vols = [[d["volumes_ml"].get(leaf) for d in ordered] for leaf in leaves]
        parts.append(_img_tag(distribution_png([_short(x) for x in leaves], vols, flags, "mL (log scale)",
                                               "Structure volumes", log=True), "volumes"))
        summary_cols = [[d.get("icv_ml") for d in ordered], [d.get("labelled_ml") for d in ordered]]
        parts.append(_img_tag(distribution_png(["ICV estimate", "labelled brain"], summary_cols, flags, "mL",
                                               "Head size"), "head size"))
        pairs = [leaf[len("left_"):] for leaf in leaves if leaf.startswith("left_")]
        asym = [[(d.get("asymmetry") or {}).get(p) for d in ordered] for p in pairs]
        parts.append(_img_tag(distribution_png([p.replace("_", " ") for p in pairs], asym, flags,
                                               "2(L-R)/(L+R)", "Left/right asymmetry", hlines=(0.0,)), "asymmetry"))
        unc = [[(d.get("uncertainty_by_structure") or {}).get(leaf) for d in ordered] for leaf in leaves]
        unc_png = distribution_png([_short(x) for x in leaves], unc, flags, "mean uncertainty (P(label wrong))",
                                   "Mean uncertainty per structure")
        if unc_png:
            parts.append(_img_tag(unc_png, "uncertainty"))

    parts.append("<h2>All cases (fail and review first)</h2><div class='cards'>")
    carded = 0
    rest: list[Mapping[str, Any]] = []
    for doc in ordered:
        res = qc[doc["case"]]
        if res.flag == "ok" and carded >= MAX_CARDS:
            rest.append(doc)
            continue
        carded += 1
        png_path = outdir / str((doc.get("outputs") or {}).get("overlay", ""))
        png = png_path.read_bytes() if png_path.is_file() else None
        labels_file = (doc.get("outputs") or {}).get("labels", "")
        parts.append(
            f"<div class='card {res.flag}'><b>{esc(doc['case'])}</b> <span class='flag {res.flag}'>{res.flag}</span>"
            f"<br>{_img_tag(png, doc['case'], 400)}"
            f"<br>ICV {_num(doc.get('icv_ml'), '.0f')} mL &middot; labelled {_num(doc.get('labelled_ml'), '.0f')} mL"
            f" &middot; mean uncertainty {_num(doc.get('brain_mean_uncertainty'), '.3f')}"
            f"<br><a href='{esc(labels_file)}'>labels</a> &middot; <span class='reasons'>{esc(_brief(res.reasons))}"
            f"</span></div>")
    parts.append("</div>")
    if rest:
        parts.append(f"<p>{len(rest)} more cases flagged ok (no thumbnail, to keep the page small):</p><table>"
                     "<tr><th>case</th><th>ICV mL</th><th>mean uncertainty</th></tr>")
        parts += [f"<tr><td>{esc(d['case'])}</td><td>{_num(d.get('icv_ml'), '.0f')}</td>"
                  f"<td>{_num(d.get('brain_mean_uncertainty'), '.3f')}</td></tr>" for d in rest]
        parts.append("</table>")

    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, sidecars: Sequence[Mapping[str, Any]], qc: Mapping[str, QCResult],
                 failures: Sequence[tuple[str, str, str]], tree: LabelTree,
                 run_info: Mapping[str, Any] | None = None) -> Path:
    """Write the page atomically next to the per-case files."""
    from msdseg.core.atomic import atomic_write_text

    path = Path(path)
    text = build_report_html(sidecars, qc, failures, tree, path.parent, run_info=run_info)
    atomic_write_text(path, text)
    return path
