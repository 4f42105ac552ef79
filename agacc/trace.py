"""Recorded runs: snapshots, per-step records, the importance history; JSON export / import;
policy replay under other thresholds; the config as a Python snippet.

A ``Trace`` is plain data (JSON-ready): what the app draws and what lets a run be re-examined
without the model. ``replay`` re-applies the policy (``agacc.plan_tiers``) to the recorded
importance history: tiers, bits and bytes under new thresholds, no generation. Importance itself
was measured under the run's own tiers, so a replay answers "what would these thresholds have
done with this importance"; a re-run checks the quality.

No gradio here: the app imports this module, never the other way round.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agacc import planner
from agacc.config import CALIBRATED, AGACCConfig, hot_width, replayable_fields
from agacc.importance import WINDOW_ITEMSIZE
from agacc.policy import fidelity_floor
from agacc.presets import PRESETS
from agacc.tiers import EVICTED, FULL, HOT, INT2, INT3, INT4, INT8, NAMES, PRUNED, evicted_runs

TRACE_FORMAT = "agacc-trace"
TRACE_VERSION = 2  # 2: the int3 tier (tier codes of int2 and below moved up by one)

# Config fields whose change can be replayed from the recorded importance (the policy only: the
# config's field metadata says which). Changing any other field (alpha, block size, N_r, recent
# window, scoring ...) changes the importance itself or the block layout: that needs a re-run.
POLICY_FIELDS = replayable_fields()


@dataclass
class Trace:
    """One generation run as plain data.

    meta: model, prompt, generation parameters, config dict, geometry, timing summary.
    tokens: decoded text of every token (prompt then output), for the token view.
    n_prompt: prompt tokens (including the chat template).
    steps: per generated token {i, token_id, t, bytes, bytes_fp16, host_bytes, reevaluations,
        [agree, kl, ref_token_id]}; t = seconds since the start.
    frames: cache snapshots (``CompressedCache.snapshot()`` without its config), one after every
        re-evaluation and one at the end; a frame's ``step`` counts the decode forwards before it
        (0 = right after the prefill) and its ``seq_len`` the tokens in the cache.
    history: the cache's importance history, one entry per re-evaluation:
        {step, seq_len, n_ready, prefill (it ended a prefill: the eviction guard applies), scores [L][n_ready],
        overhead (bytes the ratio fitter added to its plan), unplanned (bytes held outside the plan)}.
    compare: full-cache comparison summary (None when off).
    """

    meta: dict = field(default_factory=dict)
    tokens: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    n_prompt: int = 0
    steps: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    history: list = field(default_factory=list)
    compare: dict | None = None

    # --- building ------------------------------------------------------------------------------
    def add_frame(self, snapshot: dict) -> dict:
        snap = {k: v for k, v in snapshot.items() if k != "config"}
        self.frames.append(snap)
        return snap

    def add_history(self, entries: list[dict], overhead: int | None = None) -> None:
        """Append cache.history entries (tensors -> lists of the exact float32 values: a replay must
        see the numbers the run saw). ``overhead``: bytes the ratio fitter adds to the plan (tracker
        state ...) at the last of these entries, when the history does not carry it."""
        for j, h in enumerate(entries):
            e = {"step": int(h["step"]), "seq_len": int(h["seq_len"]), "n_ready": int(h["n_ready"]),
                 "prefill": bool(h.get("prefill", False)), "scores": [s.float().tolist() for s in h["scores"]]}
            if h.get("overhead") is not None:
                e["overhead"] = int(h["overhead"])
            elif overhead is not None and j == len(entries) - 1:
                e["overhead"] = int(overhead)
            for key in ("unplanned", "block_size"):
                if h.get(key) is not None:
                    e[key] = int(h[key])
            if h.get("tracker_prices") is not None:
                e["tracker_prices"] = [x if isinstance(x, int) else float(x) for x in h["tracker_prices"]]
            for key in CALIBRATED:
                if h.get(key) is not None:
                    e[key] = list(h[key])
            self.history.append(e)

    # --- access --------------------------------------------------------------------------------
    @property
    def config(self) -> AGACCConfig:
        return AGACCConfig.from_dict(self.meta["config"])

    @property
    def geometry(self) -> planner.Geometry:
        return planner.Geometry(**self.meta["geometry"])

    @property
    def text(self) -> str:
        return self.meta.get("text", "")

    def history_for_frame(self, frame: int) -> int:
        """Index of the last history entry at or before frame ``frame`` (by decode step)."""
        step = self.frames[frame]["step"] if self.frames else 0
        idx = 0
        for i, h in enumerate(self.history):
            if h["step"] <= step:
                idx = i
        return idx

    # --- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "meta": self.meta, "tokens": self.tokens,
                "token_ids": self.token_ids, "n_prompt": self.n_prompt, "steps": self.steps, "frames": self.frames,
                "history": self.history, "compare": self.compare}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=_json_default)

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        if not isinstance(d, dict) or d.get("format") != TRACE_FORMAT:
            raise ValueError("not an AGACC trace (expected a JSON object with format='agacc-trace')")
        if int(d.get("version", 0)) > TRACE_VERSION:
            raise ValueError(f"trace version {d.get('version')} is newer than this library ({TRACE_VERSION})")
        for key in ("meta", "frames", "history"):
            if key not in d:
                raise ValueError(f"trace is missing {key!r}")
        for key in ("config", "geometry"):
            if key not in d["meta"]:
                raise ValueError(f"trace meta is missing {key!r}")
        AGACCConfig.from_dict(d["meta"]["config"])  # validates
        frames = [_current_tier_codes(f) for f in d["frames"]]
        return cls(meta=d["meta"], tokens=d.get("tokens", []), token_ids=d.get("token_ids", []),
                   n_prompt=int(d.get("n_prompt", 0)), steps=d.get("steps", []), frames=frames,
                   history=d["history"], compare=d.get("compare"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Trace":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"trace is not valid JSON: {e}") from e
        return cls.from_dict(d)

    @classmethod
    def load(cls, path) -> "Trace":
        return cls.from_json(Path(path).read_text())


def _current_tier_codes(frame: dict) -> dict:
    """A frame whose ``tier_names`` differ from this library's (an older trace) with its tier codes
    renamed to today's codes, matched by name."""
    names = frame.get("tier_names")
    if not names or list(names) == list(NAMES):
        return frame
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"trace frame has unknown tiers {sorted(unknown)}")
    code = {i: NAMES.index(n) for i, n in enumerate(names)} | {HOT: HOT}
    return dict(frame, tier=[[code[int(t)] for t in row] for row in frame["tier"]], tier_names=list(NAMES))


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# --- replay -----------------------------------------------------------------------------------

def replay_frames(history: list[dict], cfg: AGACCConfig, geo, upto: int | None = None) -> list[dict]:
    """Re-apply the policy of ``cfg`` to a recorded importance history (no model, no generation).

    history: ``Trace.history`` (lists) or ``CompressedCache.history`` (tensors).
    upto: replay entries 0..upto (default: all). Without ``cfg.host_copy`` blocks only lose
    fidelity over time, as in the store, so the entries are applied in order. A ``cfg`` whose layer
    calibration is unresolved (``layer_calibration="auto"``, none of ``config.CALIBRATED``) takes what
    the run recorded.

    Returns one snapshot-like dict per entry (importance, tier, bits, keep, markers, seq_len,
    block_size, step, threshold_scale, planned_bytes = store bytes under the plan without the
    tracker, held_bytes = what the cache would hold (the plan, the tracker state of its blocks' tokens and
    the bookkeeping the run recorded), bytes_fp16, ratio = bytes_fp16 / held_bytes), the same keys as
    ``CompressedCache.snapshot()`` where they exist."""
    if not history:
        raise ValueError("nothing to replay: the run recorded no importance history")
    if cfg.layer_calibration == "auto":  # what the config leaves unresolved, as the run resolved it
        cfg = cfg.with_overrides(**{k: tuple(history[0][k]) for k in CALIBRATED
                                    if getattr(cfg, k) is None and history[0].get(k) is not None})
    last = len(history) - 1 if upto is None else max(0, min(int(upto), len(history) - 1))
    B = cfg.block_size
    current = None  # per layer (tier, bits, keep) as applied
    scale = 1.0
    out = []
    for i, h in enumerate(history[: last + 1]):
        scores = [s if isinstance(s, torch.Tensor) else torch.tensor(s, dtype=torch.float32) for s in h["scores"]]
        seq_len, n_ready = int(h["seq_len"]), int(h["n_ready"])
        if int(h.get("block_size", B)) != B or n_ready * B > seq_len:
            raise ValueError(f"this history was recorded with another block size than {B} tokens (entry {i}: "
                             f"{n_ready} ready blocks of {seq_len} tokens): the block size needs a re-run")
        prefill = bool(h.get("prefill", False))
        # sliding-window layers (recorded): the blocks their windows passed, and the 16-bit reference
        window = dict(dropped=h.get("dropped"), reference_bytes=h.get("bytes_fp16"))
        prices = tuple(h.get("tracker_prices") or (0, 0))  # (a trace recorded before: in its unplanned bytes)
        if cfg.compress and n_ready > 0:
            if cfg.target_ratio is not None:
                scale = planner.fit_threshold_scale(scores, cfg, geo, seq_len, cfg.target_ratio,
                                                    int(h.get("overhead", 0)), prev=None if cfg.host_copy else current,
                                                    start=scale, prefill=prefill, tracker=prices, **window)
            plans = planner.plan_tiers(scores, cfg, geo, seq_len, scale, prefill=prefill, stacked=True,
                                       dropped=window["dropped"])
            # a prompt chunk followed by another holds its evictions (the cache's hold_evictions); the
            # last chunk's plan is applied as made when the prompt ends (shown so in its frame)
            more_prompt = i + 1 < len(history) and bool(history[i + 1].get("prefill", False))
            if prefill and more_prompt and cfg.hold_evictions and not cfg.host_copy:
                if cfg.gentle_prefill:
                    gentle = planner.fit_threshold_scale(scores, cfg, geo, seq_len, cfg.prefill_ratio,
                                                         int(h.get("overhead", 0)), prev=current, start=scale,
                                                         prefill=prefill, tracker=prices, **window)
                    plans = planner.plan_tiers(scores, cfg, geo, seq_len, gentle, prefill=prefill, stacked=True,
                                               dropped=window["dropped"])
                plans = planner.held_plans(*plans, cfg, geo.head_dim, window["dropped"])
            plans = list(zip(*(x.unbind(0) for x in plans)))  # per layer
            if not cfg.host_copy and current is not None:
                plans = [fidelity_floor(prev, *p) for prev, p in zip(current, plans)]
            current = plans
        nb = -(-seq_len // B)
        imp, tiers, bits, keeps, markers = [], [], [], [], []
        for layer in range(geo.n_layers):
            s = scores[layer].tolist()
            imp.append([round(float(x), 5) for x in s] + [None] * (nb - len(s)))
            t, b, k = (x.tolist() for x in current[layer]) if current is not None else ([], [], [])
            n = len(t)
            tiers.append(t + [HOT] * (nb - n))
            bits.append(b + [hot_width(cfg)] * (nb - n))
            keeps.append(k + [geo.head_dim] * (nb - n))
            markers.append([list(r) for r in evicted_runs(current[layer][0])]
                           if (current is not None and cfg.markers) else [])
        planned = planner.planned_bytes(current, cfg, geo, seq_len)
        held = planner.planned_bytes(current, cfg, geo, seq_len, prices) + _unplanned(h, cfg, geo)
        fp16 = int(h["bytes_fp16"]) if h.get("bytes_fp16") is not None else geo.bytes_fp16(seq_len)
        out.append({"step": int(h["step"]), "seq_len": seq_len, "block_size": B, "n_layers": geo.n_layers,
                    "threshold_scale": scale, "importance": imp, "tier": tiers, "bits": bits, "keep": keeps,
                    "markers": markers, "tier_names": list(NAMES), "planned_bytes": planned, "held_bytes": held,
                    "bytes_fp16": fp16, "ratio": fp16 / max(1, held), "replayed": True})
    return out


def replay(history: list[dict], cfg: AGACCConfig, geo, upto: int | None = None) -> dict:
    """The replayed state after entry ``upto`` (default: the last); see ``replay_frames``."""
    return replay_frames(history, cfg, geo, upto)[-1]


def _unplanned(h: dict, cfg: AGACCConfig, geo) -> int:
    """Bytes held outside the plan at history entry ``h`` (tracker, scores, layout): recorded, or, in
    a trace recorded before they were, the fitter's overhead less the room it leaves for the tokens
    to come (their window slots and their K/V at full precision)."""
    if h.get("unplanned") is not None:
        return int(h["unplanned"])
    room = min(cfg.n_r, cfg.block_size) * geo.n_layers * WINDOW_ITEMSIZE + planner.headroom_bytes(cfg, geo)
    return max(0, int(h.get("overhead", 0)) - room)


def policy_changes(run_cfg: AGACCConfig, new_cfg: AGACCConfig) -> tuple[list[str], list[str]]:
    """-> (replayable changed fields, fields that need a re-run). A ``new_cfg`` whose layer calibration
    is still to be resolved (``layer_calibration="auto"``, none of ``config.CALIBRATED``: a
    preset as the app's controls build it) takes the run's resolved ones (the same model, the same gamma),
    and ``key_quant="auto"`` the run's keys' format (the store's, which a replay prices)."""
    a, b = run_cfg.to_dict(), new_cfg.to_dict()
    for key in CALIBRATED:
        if b[key] is None and b["layer_calibration"] == "auto" == a["layer_calibration"]:
            b[key] = a[key]
    if b["key_quant"] == "auto":
        b["key_quant"] = a["key_quant"]
    changed = [k for k in a if k != "name" and a[k] != b.get(k)]
    return [k for k in changed if k in POLICY_FIELDS], [k for k in changed if k not in POLICY_FIELDS]


# --- the run as a Python snippet ---------------------------------------------------------------

def config_snippet(cfg: AGACCConfig, *, model: str | None = None, prompt: str = "", max_new_tokens: int = 64,
                   temperature: float = 0.0, seed: int = 0, chat_template: bool = True,
                   compare: bool = False, trust_remote_code: bool = False, packed_weights: bool = False) -> str:
    """Python code that reproduces a run with the library (same config, prompt, sampling)."""
    base_name = cfg.name if cfg.name in PRESETS else "agacc"
    base = AGACCConfig.preset(base_name).to_dict()
    d = cfg.to_dict()
    overrides = {k: v for k, v in d.items() if k != "name" and base.get(k) != v}
    args = "".join(f", {k}={_py(v)}" for k, v in sorted(overrides.items()))
    load_args = []
    if model:
        load_args.append(repr(model))
    if trust_remote_code:
        load_args.append("trust_remote_code=True")
    if packed_weights:
        load_args.append("packed_weights=True")
    gen_args = f"max_new_tokens={int(max_new_tokens)}, temperature={float(temperature)!r}, seed={int(seed)}"
    if not chat_template:
        gen_args += ", chat_template=False"
    if compare:
        gen_args += ", compare=True"
    return (
        "import agacc\n"
        "from agacc.session import generate\n\n"
        f"model, tokenizer = agacc.load_model({', '.join(load_args)})\n"
        f"config = agacc.AGACCConfig.preset({base_name!r}{args})\n"
        f"prompt = {prompt!r}\n"
        f"result = generate(model, tokenizer, prompt, config, {gen_args})\n"
        "print(result['text'])\n"
        "mem = result['memory']\n"
        "print(f\"KV cache {mem['bytes'] / 2**20:.2f} MiB vs {mem['bytes_fp16'] / 2**20:.2f} MiB at 16 bits "
        "({mem['ratio']:.2f}x)\")\n"
    )


def _py(v):
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return f"float({str(v)!r})"
    if isinstance(v, list):
        return repr(tuple(v))
    return repr(v)


# --- one block over a run; a sweep of target ratios (the app's drill-down and quality-vs-memory curve) ----

# the tier classes of ``mass_shares``: tier code -> class
MASS_CLASSES = ("full", "quantised", "pruned", "evicted")
_MASS_CLASS = {FULL: "full", INT8: "quantised", INT4: "quantised", INT3: "quantised", INT2: "quantised",
               PRUNED: "pruned", EVICTED: "evicted"}


def block_bytes(frame: dict, layer: int, block: int, cfg: AGACCConfig, geo) -> int:
    """Bytes block ``block`` of layer ``layer`` holds in ``frame`` (a ``CompressedCache.snapshot()``, a
    trace frame or a ``replay_frames`` frame) by the planner's cost model (``planner.block_cost_bytes``:
    K/V codes, scales and per-block metadata). A hot block (not tiered yet) holds its tokens as the hot region
    does (``planner.hot_bytes``); an evicted block only its metadata (its run's marker entry is counted once per
    run, not per block). The tracker's per-entry window is not included."""
    tier = int(frame["tier"][layer][block])
    B = int(frame.get("block_size") or cfg.block_size)
    if tier == HOT:
        tokens = max(0, min(B, int(frame["seq_len"]) - block * B))
        return planner.hot_bytes(cfg, geo, tokens)
    return planner.block_cost_bytes(tier, int(frame["bits"][layer][block]), int(frame["keep"][layer][block]),
                                    **planner.cost_settings(cfg, geo, B))


def block_history(trace: "Trace", layer: int, block: int) -> dict:
    """Block ``block`` of layer ``layer`` over a recorded run, from its frames (no replay).

    -> {layer, block, block_size, first, last (token positions), tokens (decoded text of each of its
    tokens), text, frames: [{frame, step, seq_len, importance (None while hot), tier (code), tier_name,
    bits, keep}] for every frame that holds the block, bytes (``block_bytes`` in the last frame)}.
    ValueError (a readable message) when the layer or the block is not in the run."""
    if not trace.frames:
        raise ValueError("the run has no frames yet")
    last = trace.frames[-1]
    n_layers = len(last["tier"])
    layer, block = int(layer), int(block)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is not in this run (layers 0-{n_layers - 1})")
    nb = len(last["tier"][layer])
    if not 0 <= block < nb:
        raise ValueError(f"block {block} is not in this run (blocks 0-{nb - 1} at the end)")
    B = int(last.get("block_size") or trace.config.block_size)
    first, end = block * B, min((block + 1) * B, int(last["seq_len"]))
    tokens = list(trace.tokens[first:end])
    rows = []
    for k, f in enumerate(trace.frames):
        if block >= len(f["tier"][layer]):
            continue  # not in the cache yet at this frame
        t = int(f["tier"][layer][block])
        imp = f["importance"][layer][block] if block < len(f["importance"][layer]) else None
        rows.append({"frame": k, "step": int(f["step"]), "seq_len": int(f["seq_len"]), "importance": imp, "tier": t,
                     "tier_name": "hot" if t == HOT else NAMES[t], "bits": int(f["bits"][layer][block]),
                     "keep": int(f["keep"][layer][block])})
    return {"layer": layer, "block": block, "block_size": B, "first": first, "last": end - 1, "tokens": tokens,
            "text": "".join(tokens), "frames": rows,
            "bytes": block_bytes(last, layer, block, trace.config, trace.geometry)}


def mass_shares(scores, tiers) -> dict:
    """Share of the block importance (normalised attention mass, summed over layers) on blocks in each
    class of ``MASS_CLASSES`` (full / quantised / pruned / evicted). ``scores`` [L][n_ready] (a history
    entry's), ``tiers`` [L][>= n_ready] (tier codes; a block past a layer's scores is not counted)."""
    tot = dict.fromkeys(MASS_CLASSES, 0.0)
    for s_row, t_row in zip(scores, tiers):
        s_row = s_row.tolist() if isinstance(s_row, torch.Tensor) else s_row
        for s, t in zip(s_row, t_row):
            if int(t) != HOT:
                tot[_MASS_CLASS[int(t)]] += max(0.0, float(s))
    z = sum(tot.values())
    return {c: (v / z if z > 0 else 0.0) for c, v in tot.items()}


SWEEP_RATIOS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


def ratio_sweep(history: list[dict], cfg: AGACCConfig, geo, ratios=SWEEP_RATIOS) -> list[dict]:
    """The policy of ``cfg`` replayed on a recorded importance history (``replay_frames``) at each target
    ratio of ``ratios`` (no model, no generation): a quality-vs-memory curve from one run.

    -> per ratio {target, ratio (bytes_fp16 / held_bytes at the end, as replayed), held_bytes, bytes_fp16,
    shares: ``mass_shares`` averaged over the re-evaluations (each entry's importance under the plan
    replayed at that entry), final_shares: those of the last entry alone}. The quality proxy: the share
    of the attention mass that falls on blocks kept at 16 bits, quantised, pruned or evicted.
    ValueError when ``cfg`` does not compress (nothing to sweep) or the history is empty."""
    if not cfg.compress:
        raise ValueError(f"the {cfg.name!r} preset does not compress: there is no ratio to sweep")
    out = []
    for r in ratios:
        frames = replay_frames(history, cfg.with_overrides(target_ratio=float(r)), geo)
        per = [mass_shares(h["scores"], f["tier"]) for h, f in zip(history, frames) if int(h["n_ready"]) > 0]
        mean = {c: (sum(p[c] for p in per) / len(per) if per else 0.0) for c in MASS_CLASSES}
        f = frames[-1]
        out.append({"target": float(r), "ratio": f["ratio"], "held_bytes": int(f["held_bytes"]),
                    "bytes_fp16": int(f["bytes_fp16"]), "shares": mean, "final_shares": per[-1] if per else mean})
    return out
