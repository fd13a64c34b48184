"""The report as data (sections of tables, figures, notes, links) and its two renderings.

What it is: one document model written out twice — index.html (self-contained: inline CSS, no
scripts, no external resources, figures as relative <img>) and report.md (the same content) —
so the two can never drift apart. What it is not: where numbers are computed or formatted
(tables.py, build.py) or drawn (figures.py).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    """Cells are preformatted strings. `flags[i]` marks row i: "bad" (red in HTML, bold in
    Markdown), "good" (green in HTML) or "" (plain)."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    flags: list[str] = field(default_factory=list)
    note: str = ""
    numeric: list[bool] = field(default_factory=list)  # right-align these columns in HTML
    nowrap: bool = False  # keep cells on one line (numeric tables); long text tables wrap


@dataclass
class Figure:
    path: str  # relative to the report directory, e.g. "figures/speedup.png"
    title: str
    caption: str


@dataclass
class Note:
    text: str
    kind: str = "info"  # info | missing | warn


@dataclass
class Links:
    items: list[tuple[str, str]]  # (relative href, text)
    note: str = ""


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)
    intro: str = ""


@dataclass
class Card:
    value: str
    label: str
    tone: str = ""  # "" | good | bad


@dataclass
class Document:
    title: str
    subtitle: list[str]
    cards: list[Card]
    sections: list[Section]


CSS = """
:root { --fg:#1d2228; --muted:#5b6570; --line:#d9dee3; --bg:#ffffff; --band:#f5f7f9;
        --bad:#fde2e1; --badfg:#a1140f; --good:#e3f4e6; --goodfg:#1c6b2c; --accent:#0b5cad; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 28px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 40px 0 10px; padding-bottom: 6px;
     border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
.sub { color: var(--muted); margin: 0; font-size: 13px; }
nav { margin: 18px 0 8px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 16px; white-space: nowrap; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin: 18px 0 4px; }
.card { border:1px solid var(--line); border-radius:8px; padding:10px 16px; min-width:170px;
        background: var(--band); }
.card .v { font-size: 24px; font-weight: 650; }
.card .l { color: var(--muted); font-size: 12.5px; max-width: 230px; }
.card.good { background: var(--good); } .card.good .v { color: var(--goodfg); }
.card.bad { background: var(--bad); } .card.bad .v { color: var(--badfg); }
.intro { color: var(--muted); max-width: 900px; }
.tablewrap { overflow-x: auto; margin: 6px 0 4px; }
table { border-collapse: collapse; font-size: 13.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left;
         vertical-align: top; }
th { background: var(--band); font-weight: 600; white-space: nowrap; }
table.nowrap td { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.bad td { background: var(--bad); color: var(--badfg); font-weight: 600; }
tr.good td { background: var(--good); }
.tnote { color: var(--muted); font-size: 12.5px; margin: 2px 0 14px; max-width: 1000px; }
figure { margin: 18px 0 26px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; max-width: 1000px; }
figcaption b { color: var(--fg); }
.note { border-left: 4px solid var(--line); padding: 6px 12px; margin: 10px 0;
        background: var(--band); font-size: 13.5px; }
.note.missing { border-color: #c9a227; }
.note.warn { border-color: var(--badfg); background: var(--bad); }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
ul.links { margin: 6px 0; }
"""


def _num(cell: str) -> bool:
    s = cell.strip().replace(",", "").replace("×", "").replace("%", "")
    s = s.split(" ")[0].rstrip("kMGT")
    try:
        float(s)
        return True
    except ValueError:
        return False


def _html_table(t: Table) -> str:
    numeric = t.numeric or [all(_num(r[i]) or r[i] in ("", "—") for r in t.rows) and
                            any(_num(r[i]) for r in t.rows) for i in range(len(t.columns))]
    out = [f"<h3>{html.escape(t.title)}</h3>"] if t.title else []
    out.append('<div class="tablewrap"><table%s><thead><tr>'
               % (' class="nowrap"' if t.nowrap else ""))
    out += [f"<th>{html.escape(c)}</th>" for c in t.columns]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(t.rows):
        flag = t.flags[i] if i < len(t.flags) else ""
        out.append(f'<tr class="{flag}">' if flag else "<tr>")
        for j, cell in enumerate(row):
            cls = ' class="num"' if j < len(numeric) and numeric[j] else ""
            out.append(f"<td{cls}>{html.escape(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    if t.note:
        out.append(f'<p class="tnote">{html.escape(t.note)}</p>')
    return "".join(out)


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    out = [f"### {t.title}", ""] if t.title else []
    out.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
    out.append("|" + "|".join("---" for _ in t.columns) + "|")
    for i, row in enumerate(t.rows):
        bad = i < len(t.flags) and t.flags[i] == "bad"
        cells = [_md_cell(c) for c in row]
        if bad:
            cells = [f"**{c}**" if c else c for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    if t.note:
        out += ["", f"_{t.note}_"]
    return "\n".join(out)


def render_html(doc: Document) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(doc.title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{e(doc.title)}</h1>"]
    parts += [f'<p class="sub">{e(s)}</p>' for s in doc.subtitle]
    if doc.cards:
        parts.append('<div class="cards">')
        for c in doc.cards:
            tone = f" {c.tone}" if c.tone else ""
            parts.append(f'<div class="card{tone}"><div class="v">{e(c.value)}</div>'
                         f'<div class="l">{e(c.label)}</div></div>')
        parts.append("</div>")
    parts.append("<nav>" + "".join(f'<a href="#{s.id}">{e(s.title)}</a>'
                                   for s in doc.sections) + "</nav>")
    for s in doc.sections:
        parts.append(f'<section id="{s.id}"><h2>{e(s.title)}</h2>')
        if s.intro:
            parts.append(f'<p class="intro">{e(s.intro)}</p>')
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(_html_table(b))
            elif isinstance(b, Figure):
                parts.append(f'<figure><img src="{e(b.path)}" alt="{e(b.title)}">'
                             f"<figcaption><b>{e(b.title)}.</b> {e(b.caption)}</figcaption>"
                             "</figure>")
            elif isinstance(b, Note):
                parts.append(f'<div class="note {b.kind}">{e(b.text)}</div>')
            elif isinstance(b, Links):
                if b.note:
                    parts.append(f'<p class="intro">{e(b.note)}</p>')
                parts.append('<ul class="links">' + "".join(
                    f'<li><a href="{e(h)}"><code>{e(t)}</code></a></li>' for h, t in b.items)
                    + "</ul>")
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(doc: Document) -> str:
    out = [f"# {doc.title}", ""] + [f"{s}  " for s in doc.subtitle] + [""]
    if doc.cards:
        out += [f"- **{c.value}** {c.label}" for c in doc.cards] + [""]
    out += [f"- [{s.title}](#{s.id})" for s in doc.sections] + [""]
    for s in doc.sections:
        out += [f'<a id="{s.id}"></a>', "", f"## {s.title}", ""]
        if s.intro:
            out += [s.intro, ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out += [_md_table(b), ""]
            elif isinstance(b, Figure):
                out += [f"![{b.title}]({b.path})", "", f"*{b.title}.* {b.caption}", ""]
            elif isinstance(b, Note):
                prefix = {"missing": "Missing: ", "warn": "Warning: "}.get(b.kind, "")
                out += [f"> {prefix}{b.text}" if prefix and not b.text.startswith(prefix)
                        else f"> {b.text}", ""]
            elif isinstance(b, Links):
                if b.note:
                    out += [b.note, ""]
                out += [f"- [`{t}`]({h})" for h, t in b.items] + [""]
    return "\n".join(out).rstrip() + "\n"


def write(doc: Document, out: Path) -> Path:
    """Write OUT/index.html and OUT/report.md; return the path of index.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    index = out / "index.html"
    index.write_text(render_html(doc), encoding="utf-8")
    return index
