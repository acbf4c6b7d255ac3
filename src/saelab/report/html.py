"""The report page: one self-contained HTML file (inline CSS, inline PNGs, a few lines of inline JS to sort tables).

Nothing is fetched: no CDN, no web fonts, no external images, so the file opens from disk, offline, anywhere.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CSS = """
:root { --fg:#1d232a; --muted:#5b6672; --line:#d9dee3; --bg:#f6f7f9; --accent:#2458a6; --warn:#fff4d6; --warnline:#e0b23c; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color:var(--fg); background:var(--bg); }
header { background:#18324f; color:#fff; padding:14px 24px; }
header h1 { margin:0 0 2px; font-size:20px; font-weight:600; }
header .sub { color:#c7d3e0; font-size:13px; overflow-wrap:anywhere; }
nav { position:sticky; top:0; z-index:5; background:#fff; border-bottom:1px solid var(--line); padding:6px 24px; font-size:13px; display:flex; flex-wrap:wrap; gap:2px 16px; }
nav a { color:var(--accent); text-decoration:none; white-space:nowrap; }
nav a.omitted { color:var(--muted); text-decoration:line-through; }
main { max-width:1300px; margin:0 auto; padding:12px 24px 40px; }
section { background:#fff; border:1px solid var(--line); border-radius:6px; padding:12px 18px 16px; margin:14px 0; }
section h2 { font-size:17px; margin:2px 0 6px; }
section p.lead { color:var(--muted); margin:0 0 10px; }
section.omitted { background:#fafafa; }
.omit { color:var(--muted); font-style:italic; }
.banner { background:var(--warn); border:1px solid var(--warnline); border-radius:6px; padding:10px 14px; margin:14px 0 0; }
.banner strong { text-transform:uppercase; letter-spacing:.04em; }
.banner ul, .omitted-list ul { margin:4px 0 0 18px; padding:0; }
figure { margin:8px 0 4px; }
figure img { display:block; max-width:100%; height:auto; border:1px solid #eef0f2; }
figcaption { color:var(--muted); font-size:12.5px; margin-top:4px; }
.tablewrap { overflow-x:auto; max-height:520px; overflow-y:auto; border:1px solid var(--line); border-radius:4px; }
table { border-collapse:collapse; width:100%; font-size:12.5px; font-variant-numeric: tabular-nums; }
th, td { padding:4px 6px; border-bottom:1px solid #eceff2; text-align:right; white-space:nowrap; }
th:first-child, td:first-child, td.text, th.text { text-align:left; }
thead th { position:sticky; top:0; background:#eef2f6; cursor:pointer; user-select:none; white-space:normal; vertical-align:bottom; }
table:not(.sortable) thead th { cursor:default; }
thead th[aria-sort="ascending"]::after { content:" ▲"; font-size:10px; }
thead th[aria-sort="descending"]::after { content:" ▼"; font-size:10px; }
tr.published td { color:#5b6672; font-style:italic; background:#fbfbfc; }
tr.best td { font-weight:600; }
td small { color:var(--muted); font-size:11px; }
/* the leaderboard fits the page from ~1,280 px: each sd under its mean, the note and source columns wrap */
#leaderboard-table td small { display:block; }
#leaderboard-table td:first-child, #leaderboard-table td:last-child { white-space:normal; min-width:7em; }
dl.kv { display:grid; grid-template-columns: max-content 1fr; gap:3px 14px; margin:0; font-size:13px; }
dl.kv dt { color:var(--muted); }
dl.kv dd { margin:0; overflow-wrap:anywhere; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size:12.5px; }
.grid2 { display:grid; grid-template-columns: 1fr 1fr; gap:16px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size:12.5px; }
footer { color:var(--muted); font-size:12px; text-align:center; margin-top:20px; }
"""

# Click a header to sort by it (numbers numerically, blanks last); click again to reverse.
JS = """
(function () {
  function key(cell, numeric) {
    var v = cell.getAttribute('data-v');
    if (v === null) { v = cell.textContent.trim(); }
    if (!numeric) { return v.toLowerCase(); }
    var x = parseFloat(v);
    return isNaN(x) ? null : x;
  }
  function sortBy(table, index, th) {
    var numeric = th.getAttribute('data-type') === 'num';
    var ascending = th.getAttribute('aria-sort') !== 'ascending';
    var heads = table.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute('aria-sort'); }
    th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[index], numeric), y = key(b.cells[index], numeric);
      if (x === y) { return 0; }
      if (x === null || x === '') { return 1; }
      if (y === null || y === '') { return -1; }
      return (x < y ? -1 : 1) * (ascending ? 1 : -1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  var tables = document.querySelectorAll('table.sortable');
  for (var t = 0; t < tables.length; t++) {
    (function (table) {
      var heads = table.tHead.rows[0].cells;
      for (var i = 0; i < heads.length; i++) {
        (function (index, th) {
          th.title = 'click to sort';
          th.addEventListener('click', function () { sortBy(table, index, th); });
        })(i, heads[i]);
      }
    })(tables[t]);
  }
})();
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class Figure:
    png: bytes
    alt: str
    caption: str = ""

    def html(self) -> str:
        data = base64.b64encode(self.png).decode("ascii")
        cap = f"<figcaption>{self.caption}</figcaption>" if self.caption else ""
        return f'<figure><img alt="{esc(self.alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


@dataclass
class Section:
    id: str
    title: str
    lead: str = ""
    body: list[str] = field(default_factory=list)  # HTML fragments, in order
    omitted: str | None = None  # the reason, when the section cannot be shown

    def html(self) -> str:
        cls = ' class="omitted"' if self.omitted else ""
        parts = [f'<section id="{esc(self.id)}"{cls}>', f"<h2>{esc(self.title)}</h2>"]
        if self.lead:
            parts.append(f'<p class="lead">{self.lead}</p>')
        if self.omitted:
            parts.append(f'<p class="omit">Omitted: {esc(self.omitted)}</p>')
        parts.extend(self.body)
        parts.append("</section>")
        return "\n".join(parts)


def table(
    headers: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[tuple[str, Any]]],
    *,
    sortable: bool = True,
    row_classes: Sequence[str] | None = None,
    table_id: str | None = None,
) -> str:
    """headers: (label, "num"|"text"); rows: cells as (display html, sort value or None)."""
    tid = f' id="{esc(table_id)}"' if table_id else ""
    sort_cls = ' class="sortable"' if sortable else ""
    out = [f'<div class="tablewrap"><table{tid}{sort_cls}><thead><tr>']
    for label, kind in headers:
        cls = ' class="text"' if kind == "text" else ""
        out.append(f'<th data-type="{kind}"{cls}>{esc(label)}</th>')
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        rc = f' class="{esc(row_classes[i])}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{rc}>")
        for (_label, kind), (display, value) in zip(headers, row):
            attrs = ' class="text"' if kind == "text" else ""
            if value is not None:
                attrs += f' data-v="{esc(value)}"'
            out.append(f"<td{attrs}>{display}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def key_values(items: Sequence[tuple[str, Any]]) -> str:
    out = ['<dl class="kv">']
    for k, v in items:
        if isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True, default=str)
        out.append(f"<dt>{esc(k)}</dt><dd>{esc('—' if v is None else v)}</dd>")
    out.append("</dl>")
    return "".join(out)


def page(
    title: str, subtitle: str, sections: Sequence[Section], banner: Sequence[str], notes: Sequence[str], footer: str
) -> str:
    omitted_cls = ' class="omitted"'
    nav = " ".join(f'<a href="#{esc(s.id)}"{omitted_cls if s.omitted else ""}>{esc(s.title)}</a>' for s in sections)
    top = []
    if banner:
        items = "".join(f"<li>{esc(b)}</li>" for b in banner)
        top.append(
            f'<div class="banner" id="partial" role="alert"><strong>Partial</strong> — this report covers '
            f"an unfinished source:<ul>{items}</ul></div>"
        )
    omitted = [s for s in sections if s.omitted]
    if omitted or notes:
        items = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a>: {esc(s.omitted)}</li>' for s in omitted)
        items += "".join(f"<li>{esc(n)}</li>" for n in notes)
        top.append(
            f'<div class="omitted-list" id="omitted"><p class="lead" style="margin:10px 0 0">'
            f"Not shown, and why:</p><ul>{items}</ul></div>"
        )
    body = "\n".join(s.html() for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header><h1>{esc(title)}</h1><div class="sub">{subtitle}</div></header>
<nav>{nav}</nav>
<main>
{"".join(top)}
{body}
<footer>{footer}</footer>
</main>
<script>{JS}</script>
</body>
</html>
"""
