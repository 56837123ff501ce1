"""Writing evaluation results: the JSON, a Markdown table (printed), and an HTML report with image grids.

The HTML holds, per subject, its reference photos and one row per prompt: the prompt, its mean scores, and its
images (each with its seed and scores on hover); images are inline base64 PNG, or PNG files in
``<report stem>_images/`` beside it.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from hyperbooth.files import atomic_write


def write_json(results: dict, path: Path) -> Path:
    """Atomically; NaN never appears (undefined scores are null), so any JSON reader takes it."""
    text = json.dumps(results, indent=2, allow_nan=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    """One row per subject and an overall row: the mean of each metric over its images (with how many images had
    no score, where any), and the number of failed steps."""
    names = list(results["metrics"])
    header = ["subject", "class", *names, "failed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]

    def cell(summary: dict | None) -> str:
        if not summary:
            return "–"
        text = _fmt(summary["mean"])
        return text + (f" ({summary['undefined']} n/a)" if summary["undefined"] else "")

    failures = results.get("failures", [])
    for name, entry in results["subjects"].items():
        failed = sum(1 for f in failures if f["subject"] == name)
        lines.append("| " + " | ".join([name, entry["class"], *(cell(entry["summary"].get(m)) for m in names), str(failed)]) + " |")
    lines.append("| " + " | ".join(["**all**", "", *(cell(results["summary"].get(m)) for m in names), str(len(failures))]) + " |")
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: middle; }
th { background: #f4f4f4; text-align: left; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.grid img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; margin: 1px; border: 1px solid #eee; }
.refs img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; margin: 1px; }
.failed { color: #b00; } .meta { color: #666; font-size: 0.9em; } .prompt { max-width: 22em; }
"""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


class _Images:
    """Image sources for the HTML: data URIs, or files written beside the report."""

    def __init__(self, report: Path, embed: bool):
        self.embed = embed
        self.folder = report.with_name(f"{report.stem}_images")
        if not embed:
            self.folder.mkdir(exist_ok=True)

    def src(self, png: bytes, *parts: str) -> str:
        if self.embed:
            return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        path = self.folder.joinpath(*map(_safe, parts[:-1]), _safe(parts[-1]) + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(png))
        return path.relative_to(self.folder.parent).as_posix()


def write_html(results: dict, gallery, path: Path, embed: bool = True) -> Path:
    """The report: settings, the summary table, then per subject its references and a grid row per prompt."""
    esc = html.escape
    images = _Images(path, embed)
    names = list(results["metrics"])
    seeds = results["protocol"]["seeds"]
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', "<title>hyperbooth evaluation</title>", f"<style>{_CSS}</style></head><body>"]
    out.append("<h1>hyperbooth evaluation: DreamBench protocol</h1>")
    out.append(f"<p class='meta'>status: <b>{esc(results['status'])}</b> · {esc(results['created'])} · hyperbooth {esc(results['hyperbooth_version'])}"
               f" · {results['protocol']['images_per_prompt']} images per prompt, seeds {esc(str(seeds))}</p>")
    out.append(f"<p><b>method</b> ({esc(results['method']['kind'])}): {esc(results['method']['description'])}<br>"
               f"<b>backend</b> ({esc(results['backend']['kind'])}): {esc(results['backend']['description'])}</p>")
    out.append("<table><tr><th>metric</th><th>what it measures</th></tr>")
    for name, meta in results["metrics"].items():
        out.append(f"<tr><td>{esc(name)}</td><td>{esc(meta['description'])}</td></tr>")
    out.append("</table>")

    out.append("<h2>Summary</h2><table><tr><th>subject</th><th>class</th>" + "".join(f"<th>{esc(m)}</th>" for m in names) + "<th>failed</th></tr>")
    failures = results.get("failures", [])
    rows = [(f"<a href='#s-{esc(_safe(n))}'>{esc(n)}</a>", esc(e["class"]), e["summary"], sum(1 for f in failures if f["subject"] == n)) for n, e in results["subjects"].items()]
    rows.append(("<b>all</b>", "", results["summary"], len(failures)))
    for label, cls, summary, failed in rows:
        cells = "".join(f"<td class='num'>{_cell(summary.get(m))}</td>" for m in names)
        out.append(f"<tr><td>{label}</td><td>{cls}</td>{cells}<td class='num{' failed' if failed else ''}'>{failed}</td></tr>")
    out.append("</table>")
    if failures:
        out.append("<h2>Failures</h2><ul>")
        for f in failures:
            where = f["subject"] + (f" / {f['prompt']!r}" if f["prompt"] else "")
            out.append(f"<li class='failed'>{esc(where)} — {esc(f['stage'])}: {esc(f['error'])}</li>")
        out.append("</ul>")

    for name, entry in results["subjects"].items():
        pictures = (gallery.subjects.get(name) if gallery is not None else None) or {"references": [], "prompts": {}}
        out.append(f"<h2 id='s-{esc(_safe(name))}'>{esc(name)} <span class='meta'>({esc(entry['class'])}, {esc(entry['kind'])})</span></h2>")
        refs = "".join(f"<img alt='reference {i}' src='{images.src(png, name, f'ref_{i}')}'>" for i, png in enumerate(pictures["references"]))
        timing = f" · personalization {entry['personalize_seconds']:.2f} s" if entry.get("personalize_seconds") else ""
        out.append(f"<div class='refs'><span class='meta'>references{timing}</span><br>{refs}</div>")
        if entry.get("failed"):
            out.append(f"<p class='failed'>{esc(json.dumps(entry['failed']))}</p>")
        out.append("<table><tr><th>prompt</th>" + "".join(f"<th>{esc(m)}</th>" for m in names) + "<th>images</th></tr>")
        for p_index, (prompt, record) in enumerate(entry["prompts"].items()):
            cells = "".join(f"<td class='num'>{_cell(record['summary'].get(m))}</td>" for m in names)
            pngs = pictures["prompts"].get(prompt, [])
            tags = []
            for k, png in enumerate(pngs):
                scores = ", ".join(f"{m} {_fmt(record['scores'][m][k])}" for m in names if m in record["scores"])
                tags.append(f"<img alt='seed {seeds[k]}' title='seed {seeds[k]}: {esc(scores)}' src='{images.src(png, name, f'p{p_index:02d}_{k}')}'>")
            failed = "".join(f"<div class='failed'>{esc(stage)}: {esc(err)}</div>" for stage, err in record["failed"].items())
            out.append(f"<tr><td class='prompt'>{esc(prompt)}{failed}</td>{cells}<td class='grid'>{''.join(tags)}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    text = "\n".join(out)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _cell(summary: dict | None) -> str:
    if not summary:
        return "–"
    text = _fmt(summary["mean"])
    return text + (f" <span class='meta'>({summary['undefined']} n/a)</span>" if summary["undefined"] else "")
