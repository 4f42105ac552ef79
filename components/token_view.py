"""Token view: the prompt and the output with every token coloured by its tier, evicted spans
collapsed into markers, importance and bits on hover (HTML ``title``).

Tiers are per layer and block; the view shows one layer, or (``layer=None``) for every block the
tier most layers gave it, with the split over layers on hover."""
from __future__ import annotations

import html
from collections import Counter

from agacc.tiers import EVICTED, HOT
from components.theme import TIER_COLORS, TIER_LABELS


def block_consensus(frame: dict, layer: int | None = None) -> list[tuple[int, str, float]]:
    """Per block (tier code, hover detail, mean bits) for one layer or the most common over layers."""
    tiers, bits = frame.get("tier") or [], frame.get("bits") or []
    if not tiers:
        return []
    nb = len(tiers[0])
    out = []
    if layer is not None:
        layer = max(0, min(int(layer), len(tiers) - 1))
        for b in range(nb):
            t = int(tiers[layer][b])
            bb = bits[layer][b] if bits else 16
            detail = f"layer {layer}: {TIER_COLORS[t][0]}" + (f", {bb} bits" if t in (1, 2, 3, 4) else "")
            out.append((t, detail, float(bb)))
        return out
    for b in range(nb):
        col = [int(row[b]) for row in tiers]
        cnt = Counter(col)
        top = max(cnt.items(), key=lambda kv: (kv[1], kv[0]))[0]
        split = " · ".join(f"{TIER_COLORS[c][0]} {n}" for c, n in sorted(cnt.items()))
        mb = sum(row[b] for row in bits) / len(bits) if bits else 16.0
        out.append((top, f"layers: {split}; mean {mb:.1f} bits", mb))
    return out


def token_codes(frame: dict | None, n_tokens: int, layer: int | None = None) -> list[int]:
    """Tier code per token (-1 hot) for the first ``n_tokens`` tokens; tokens past the frame's
    ``seq_len`` (generated since it was taken) are hot."""
    if not frame:
        return [HOT] * n_tokens
    B = frame.get("block_size", 1)
    blocks = block_consensus(frame, layer)
    seq_len = frame.get("seq_len", 0)
    out = []
    for p in range(n_tokens):
        b = p // B
        out.append(blocks[b][0] if (p < seq_len and b < len(blocks)) else HOT)
    return out


def _importance(frame: dict, p: int, layer: int | None):
    ti = frame.get("token_importance") or []
    if layer is None and p < len(ti) and ti[p] is not None:
        return ti[p], "token importance"
    imp = frame.get("importance") or []
    B = frame.get("block_size", 1)
    b = p // B
    if imp and layer is not None and layer < len(imp) and b < len(imp[layer]) and imp[layer][b] is not None:
        return imp[layer][b], "block importance"
    if p < len(ti) and ti[p] is not None:
        return ti[p], "token importance"
    return None, ""


def legend_html() -> str:
    chips = "".join(f"<span class='tv-chip tier-{TIER_COLORS[c][0]}'>{html.escape(TIER_LABELS[c])}</span>"
                    for c in sorted(TIER_COLORS) if c != EVICTED)
    chips += "<span class='tv-chip tv-marker-chip'>⟪n evicted⟫ marker</span>"
    return f"<div class='tv-legend'>{chips}</div>"


def render_token_view(tokens: list[str], n_prompt: int, frame: dict | None, layer: int | None = None,
                      max_tokens: int = 6000, caption: str = "") -> str:
    """HTML for the token view. ``tokens``: decoded text of each token (prompt then output)."""
    n = len(tokens)
    if n == 0:
        return "<div class='tv tv-empty'>The prompt and the output appear here, each token coloured by its tier.</div>"
    codes = token_codes(frame, n, layer)
    blocks = block_consensus(frame, layer) if frame else []
    B = frame.get("block_size", 1) if frame else 1
    seq_len = frame.get("seq_len", 0) if frame else 0
    lay = None if layer is None else max(0, min(int(layer), len(frame.get("tier") or [[0]]) - 1)) if frame else None
    keep_head = max_tokens // 4
    skip_from, skip_to = (keep_head, n - (max_tokens - keep_head)) if n > max_tokens else (n, n)
    parts = []
    p = 0
    while p < n:
        if p == skip_from:
            parts.append(f"<span class='tv-skip'>… {skip_to - skip_from} tokens not shown …</span>")
            p = skip_to
            continue
        if p == n_prompt:
            parts.append("<span class='tv-sep'>▸ output</span>")
        c = codes[p]
        if c == EVICTED:  # collapse the evicted run into one marker
            q = p + 1  # the run ends at the prompt/output boundary and at the skipped middle
            while q < n and codes[q] == EVICTED and q != n_prompt and q != skip_from:
                q += 1
            text = "".join(tokens[p:q])
            excerpt = text if len(text) <= 160 else text[:150] + " …"
            title = f"evicted: tokens {p}-{q - 1} ({q - p} tokens)\n{excerpt}"
            parts.append(f"<span class='tv-marker' title='{html.escape(title, quote=True)}'>⟪{q - p} evicted⟫</span>")
            p = q
            continue
        name = TIER_COLORS[c][0]
        cls = f"tv-t tier-{name}" + (" tv-out" if p >= n_prompt else "")
        if frame and p < seq_len:
            imp, what = _importance(frame, p, lay)
            b = p // B
            if b < len(blocks) and c != HOT:
                detail = blocks[b][1]
            else:  # the hot region's width, the same in every layer
                detail = f"recent window, {frame['bits'][lay or 0][b]}-bit"
            title = f"#{p} {tokens[p]!r}\n{name}: {detail}\nblock {b}" + (f"\n{what} {imp:.3g}" if imp is not None else "")
        else:
            title = f"#{p} {tokens[p]!r}\nnew: in the recent window"
        parts.append(f"<span class='{cls}' title='{html.escape(title, quote=True)}'>{html.escape(tokens[p])}</span>")
        p += 1
    head = legend_html()
    if caption:
        head += f"<div class='tv-caption'>{html.escape(caption)}</div>"
    return f"<div class='tv'>{head}<div class='tv-body'>{''.join(parts)}</div></div>"


def css() -> str:
    """Token-view CSS generated from the tier colours (light backgrounds, the colour as underline)."""
    rules = []
    for code, (name, color) in TIER_COLORS.items():
        r, g, b = int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)
        rules.append(f".tier-{name}{{background:rgba({r},{g},{b},0.22);border-bottom:2px solid {color};}}")
    return "\n".join(rules)
