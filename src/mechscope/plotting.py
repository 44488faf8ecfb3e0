"""Every plot mechscope draws, in one place. Functions take plain tensors/arrays and labels, write a PNG
(and return its path); nothing here computes interpretability results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _array(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _label_axes(ax, rows: int, cols: int, row_labels, col_labels) -> None:
    """Every row and column labelled (token labels go on the columns, rotated)."""
    ax.set_xticks(range(cols))
    ax.set_xticklabels(col_labels if col_labels is not None else range(cols), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(row_labels if row_labels is not None else range(rows), fontsize=8)


def cell_label(x: float, digits: int = 2) -> str:
    """A heatmap cell's annotation: `digits` decimals, "0.00" for values that round to zero (never "-0.00"),
    "nan" where undefined."""
    if x != x:
        return "nan"
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _text_colour(im, x: float) -> str:
    """Black or white, whichever contrasts more with the cell's colour (relative luminance, WCAG)."""
    if x != x:
        return "black"
    r, g, b, _ = im.cmap(im.norm(x))
    lum = sum(w * (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4)
              for w, c in zip((0.2126, 0.7152, 0.0722), (r, g, b)))
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def heatmap(values, path: Path, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
            title: str = "", xlabel: str = "", ylabel: str = "", colorbar_label: str = "",
            diverging: bool = True, annotate: bool | None = None) -> Path:
    """values: [rows, cols]. Diverging maps are centred on 0; token labels go on the columns."""
    data = _array(values)
    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * cols + 2), max(3.0, 0.4 * rows + 1.5)))
    if diverging:
        bound = float(np.nanmax(np.abs(data))) or 1.0
        im = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    else:
        im = ax.imshow(data, cmap="viridis", aspect="auto")
    _label_axes(ax, rows, cols, row_labels, col_labels)
    if annotate if annotate is not None else rows * cols <= 200:
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, cell_label(data[i, j]), ha="center", va="center", fontsize=6,
                        color=_text_colour(im, data[i, j]))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label=colorbar_label)
    return _save(fig, path)


def bars(values, labels: Sequence[str], path: Path, title: str = "", xlabel: str = "",
         interval: tuple | None = None) -> Path:
    """Horizontal bars, one per label, in the order given (sort before calling); interval = (low, high)
    draws each bar's interval (e.g. a 95% bootstrap CI) as an error bar."""
    data = _array(values)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.28 * len(labels) + 1)))
    xerr = None if interval is None else np.abs(np.stack([data - _array(interval[0]), _array(interval[1]) - data]))
    ax.barh(range(len(data)), data, color=["#c0392b" if v > 0 else "#2e86c1" for v in data], xerr=xerr,
            error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return _save(fig, path)


def lines(curves: dict, path: Path, x: Sequence[float] | None = None, x_labels: Sequence[str] | None = None,
          reference: float | None = None, reference_label: str = "", title: str = "",
          xlabel: str = "", ylabel: str = "") -> Path:
    """One line per named curve over a shared x axis (default 0..n-1, e.g. layers). curves[name] is the
    values, or (values, low, high) to shade a band (e.g. a 95% CI). `reference`: a dashed horizontal line."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        values, *band = curve if isinstance(curve, tuple) else (curve,)
        xs = _array(x) if x is not None else np.arange(len(_array(values)))
        line, = ax.plot(xs, _array(values), marker="o", label=name)
        if band:
            ax.fill_between(xs, _array(band[0]), _array(band[1]), color=line.get_color(), alpha=0.2)
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", lw=1, label=reference_label or None)
    if x_labels is not None:
        ax.set_xticks(_array(x) if x is not None else range(len(x_labels)))
        ax.set_xticklabels(x_labels, rotation=45, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1 or reference is not None:
        ax.legend(fontsize=8)
    return _save(fig, path)


def attention_patterns(patterns, tokens: Sequence[str], titles: Sequence[str], path: Path) -> Path:
    """patterns: [n_heads, seq (dest), seq (src)]: one panel per head, token labels on both axes (rows attend to columns)."""
    data = _array(patterns)
    n, seq = data.shape[0], data.shape[1]
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    side = max(3.0, 0.22 * seq + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, pattern, title in zip(axes.flat, data, titles):
        im = ax.imshow(pattern, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(seq))
        ax.set_xticklabels(tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(seq))
        ax.set_yticklabels(tokens, fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("source (key) token")
        ax.set_ylabel("destination (query) token")
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention")
    return _save(fig, path)


_ATTENTION_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:sans-serif;margin:1.5em;color:#222}
#heads button{margin:2px;padding:3px 8px;border:1px solid #888;background:#fff;cursor:pointer}
#heads button.on{background:#2e86c1;color:#fff}
#tokens span{display:inline-block;margin:2px 1px;padding:2px 4px;border:1px solid #ddd;border-radius:3px;cursor:default}
#tokens span.hover{outline:2px solid #c0392b}
#grid td{width:12px;height:12px;padding:0}
#grid th{font-weight:normal;font-size:10px;white-space:nowrap}
#grid th.col{writing-mode:vertical-rl}
#info{margin:.5em 0;min-height:1.2em;font-size:14px}
</style></head><body>
<h3>__TITLE__</h3>
<div>head: <span id="heads"></span></div>
<div style="margin:.5em 0">hover a token to show <label><input type="radio" name="dir" value="from" checked>
what it attends to (it as destination)</label> <label><input type="radio" name="dir" value="to">
what attends to it (it as source)</label></div>
<div id="tokens"></div><div id="info"></div><table id="grid"></table>
<script>
const DATA = __DATA__;
let head = 0;
const tokensEl = document.getElementById("tokens"), info = document.getElementById("info");
function shade(v){return "rgba(46,134,193,"+Math.min(1,Math.max(0,v)).toFixed(3)+")";}
function direction(){return document.querySelector("input[name=dir]:checked").value;}
function clearTokens(){for(const s of tokensEl.children){s.style.background="";s.classList.remove("hover");s.title="";}}
function hoverToken(i){
  clearTokens(); const p = DATA.patterns[head], from = direction()==="from";
  tokensEl.children[i].classList.add("hover");
  DATA.tokens.forEach((_, j) => {
    const v = from ? (j <= i ? p[i][j] : 0) : (j >= i ? p[j][i] : 0);
    tokensEl.children[j].style.background = shade(v);
    tokensEl.children[j].title = v.toFixed(3);
  });
  info.textContent = DATA.heads[head] + ": token " + i + " " + JSON.stringify(DATA.tokens[i]) +
    (from ? " attends to the shaded tokens" : " is attended to by the shaded tokens");
}
function drawGrid(){
  const grid = document.getElementById("grid"), p = DATA.patterns[head]; grid.innerHTML = "";
  const top = grid.insertRow(); top.appendChild(document.createElement("th"));
  DATA.tokens.forEach(t => {const th = document.createElement("th"); th.className = "col"; th.textContent = t; top.appendChild(th);});
  DATA.tokens.forEach((t, i) => {
    const row = grid.insertRow(), th = document.createElement("th"); th.textContent = t; row.appendChild(th);
    DATA.tokens.forEach((_, j) => {
      const td = row.insertCell(); td.style.background = shade(p[i][j]);
      td.title = JSON.stringify(t) + " -> " + JSON.stringify(DATA.tokens[j]) + ": " + p[i][j].toFixed(3);
    });
  });
}
function selectHead(h){
  head = h; clearTokens(); info.textContent = "";
  document.querySelectorAll("#heads button").forEach((b, k) => b.classList.toggle("on", k === h));
  drawGrid();
}
DATA.heads.forEach((name, h) => {
  const b = document.createElement("button"); b.textContent = name; b.onclick = () => selectHead(h);
  document.getElementById("heads").appendChild(b);
});
DATA.tokens.forEach((t, i) => {
  const s = document.createElement("span"); s.textContent = t; s.onmouseenter = () => hoverToken(i);
  tokensEl.appendChild(s);
});
selectHead(0);
</script></body></html>
"""


def attention_html(patterns, tokens: Sequence[str], titles: Sequence[str], path: Path, title: str = "attention") -> Path:
    """A self-contained interactive page (inline JS/CSS, no network): pick a head, hover a token to shade what it
    attends to (or what attends to it); a dest x src grid of the head below. patterns: [n_heads, seq, seq]."""
    import html
    import json

    data = {"tokens": list(tokens), "heads": list(titles),
            "patterns": np.round(_array(patterns), 4).tolist()}
    text = json.dumps(data).replace("</", "<\\/")  # keep token text from closing the <script> element
    page = _ATTENTION_PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", text)
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)


def scatter_agreement(points: dict[str, tuple], path: Path, title: str = "", xlabel: str = "exact",
                      ylabel: str = "estimate") -> Path:
    """One scatter per named (x, y) pair of equal-length vectors (e.g. exact effect vs AtP estimate), with y = x."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    low, high = 0.0, 0.0
    for name, (x, y) in points.items():
        x, y = _array(x).ravel(), _array(y).ravel()
        ax.scatter(x, y, s=12, alpha=0.7, label=name)
        low, high = min(low, np.nanmin(x), np.nanmin(y)), max(high, np.nanmax(x), np.nanmax(y))
    ax.plot([low, high], [low, high], color="black", lw=0.8, ls="--", label="y = x")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def token_heatmap(values, cell_text: Sequence[Sequence[str]], path: Path, row_labels: Sequence[str] | None = None,
                  col_labels: Sequence[str] | None = None, title: str = "", xlabel: str = "", ylabel: str = "",
                  colorbar_label: str = "", annotate: bool | None = None) -> Path:
    """values: [rows, cols] in [0, 1] (e.g. the logit lens' top-token probability), each cell labelled with
    cell_text[row][col] (e.g. that token) when the grid is small enough to read (<= 300 cells)."""
    data = _array(values)
    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * cols + 2), max(3.0, 0.45 * rows + 1.5)))
    im = ax.imshow(data, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    _label_axes(ax, rows, cols, row_labels, col_labels)
    if annotate if annotate is not None else rows * cols <= 300:
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, str(cell_text[i][j])[:8], ha="center", va="center", fontsize=6,
                        color=_text_colour(im, data[i, j]))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label=colorbar_label)
    return _save(fig, path)


def histogram(values, path: Path, bins: int = 40, title: str = "", xlabel: str = "", ylabel: str = "count") -> Path:
    """A histogram of values [n] (e.g. log10 feature densities)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    data = _array(values)
    if data.size:
        ax.hist(data, bins=bins, color="#2e86c1", alpha=0.85)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, path)


_FEATURE_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:70em}
section{border-top:1px solid #ccc;margin-top:1.2em;padding-top:.6em}
.ex{font-family:monospace;font-size:13px;margin:2px 0;white-space:nowrap;overflow-x:auto}
.ex span{padding:1px 2px;border-radius:2px}
.ex span.at{outline:1px solid #c0392b}
.val{display:inline-block;width:4.5em;color:#666}
.tok{display:inline-block;margin:1px 3px;padding:1px 4px;border-radius:3px;font-family:monospace;font-size:12px}
.up{background:#fadbd8}.down{background:#d6eaf8}
nav a{margin-right:.6em}
</style></head><body>
{% macro example(ex, top) %}<div class="ex"><span class="val">{{ "%.2f"|format(ex["values"][ex["at"]]) }}</span>
{%- for t in ex.tokens %}{% set v = ex["values"][loop.index0] %}<span{% if loop.index0 == ex["at"] %} class="at"{% endif %}
 style="background:rgba(192,57,43,{{ '%.3f'|format([v / top, 0]|max if top > 0 else 0) }})" title="{{ '%.3f'|format(v) }}">{{ t }}</span>
{%- endfor %}</div>{% endmacro %}
<h2>{{ title }}</h2>
<p>{{ subtitle }}</p>
<nav>{% for f in features %}<a href="#f{{ f.feature }}">{{ f.label }}</a>{% endfor %}</nav>
{% for f in features %}
<section id="f{{ f.feature }}">
<h3>{{ f.label }}</h3>
<p>density {{ "%.4f"|format(f.density) }} (active on {{ f.count }} of {{ f.n_tokens }} tokens), max activation
{{ "%.3f"|format(f.max) }}, mean when active {{ "%.3f"|format(f.mean_active) }}
{% if f.neuronpedia %} &middot; <a href="{{ f.neuronpedia }}">Neuronpedia</a>{% endif %}</p>
<p>pushes up: {% for t, v in f.logit_up %}<span class="tok up" title="{{ '%.3f'|format(v) }}">{{ t }}</span>{% endfor %}<br>
pushes down: {% for t, v in f.logit_down %}<span class="tok down" title="{{ '%.3f'|format(v) }}">{{ t }}</span>{% endfor %}</p>
<h4>top activations</h4>
{% for ex in f.top %}{{ example(ex, f.max) }}
{% endfor %}
{% for band in f.bands %}<h4>activation quantile {{ band.band }} ({{ "%.2f"|format(band.low) }} to {{ "%.2f"|format(band.high) }})</h4>
{% for ex in band.examples %}{{ example(ex, f.max) }}
{% endfor %}{% endfor %}
</section>
{% endfor %}
</body></html>
"""


def feature_pages_html(features: Sequence[dict], path: Path, title: str = "SAE features", subtitle: str = "") -> Path:
    """One self-contained offline page (no scripts, no network) with a section per feature: its density, logit
    effect (tokens pushed up / down) and example contexts, each token shaded by the feature's activation.
    features: [{feature, label, density, count, n_tokens, max, mean_active, neuronpedia, logit_up, logit_down,
    top: [{tokens, values, at}], bands: [{band, low, high, examples: [...]}]}]."""
    import jinja2

    page = jinja2.Environment(autoescape=True).from_string(_FEATURE_PAGE)
    Path(path).write_text(page.render(features=features, title=title, subtitle=subtitle), encoding="utf-8")
    return Path(path)


def circuit(edges: Sequence[tuple[str, str, float]], n_layers: int, n_heads: int, path: Path, title: str = "") -> Path:
    """An edge circuit: nodes by layer (input at the bottom, each layer's heads then its MLP, logits on top),
    one line per edge (sender, receiver, score) with width by |score| and colour by the receiver's input
    (a head's q / k / v, or an MLP / the logits). Names: "input", "L{l}H{h}", "MLP{l}", "logits";
    receivers add ".q" / ".k" / ".v" for heads."""
    def place(name):
        if name == "input":
            return (n_heads - 1) / 2, 0.0
        if name == "logits":
            return (n_heads - 1) / 2, 2.0 * n_layers + 1
        if name.startswith("MLP"):
            return (n_heads - 1) / 2, 2.0 * int(name[3:]) + 2
        layer, head = name[1:].split("H")
        return float(head), 2.0 * int(layer) + 1

    colours = {"q": "tab:blue", "k": "tab:orange", "v": "tab:green", "": "tab:gray"}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * n_heads), max(4.0, 1.1 * (2 * n_layers + 2))))
    top = max((abs(s) for _, _, s in edges), default=1.0) or 1.0
    nodes = {"input", "logits"}
    for sender, receiver, score in edges:
        node, _, part = receiver.partition(".")
        nodes |= {sender, node}
        (x0, y0), (x1, y1) = place(sender), place(node)
        ax.plot([x0, x1], [y0, y1], color=colours[part], lw=0.5 + 5 * abs(score) / top, alpha=0.7, zorder=1)
    for name in nodes:
        x, y = place(name)
        ax.scatter([x], [y], s=300, color="white", edgecolor="black", zorder=2)
        ax.annotate(name, (x, y), ha="center", va="center", fontsize=7, zorder=3)
    for part, colour in colours.items():
        ax.plot([], [], color=colour, label={"": "MLP / logits input"}.get(part, f"{part} input"))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_yticks([0] + [2 * l + 1 for l in range(n_layers)] + [2 * n_layers + 1])
    ax.set_yticklabels(["embed"] + [f"layer {l}" for l in range(n_layers)] + ["logits"])
    ax.set_xticks([])
    ax.set_xlim(-0.8, n_heads - 0.2)
    ax.set_title(title)
    return _save(fig, path)
