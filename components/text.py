"""The app's text: the status line, the statistics of a run, the comparison summary, the model line
and the reproduction snippet (Markdown / HTML strings from what the library recorded)."""
from __future__ import annotations

import html

import kernels
from agacc.trace import Trace, config_snippet

MIB = 2 ** 20
COMPARE_HINT = "Tick *compare with the full cache* (or press **Re-run + compare**) to run a full cache in lockstep."


def model_line(name: str | None, model, label: str = "SmolLM2-135M-Instruct (embedded)") -> str:
    """The model, its device and dtype, and the decode kernels that run for it (``kernels.backend``)."""
    dev = str(model.device)
    return (f"Model: <b>{html.escape(name or label)}</b> on {dev}, {str(model.dtype).replace('torch.', '')}; "
            f"decode kernels: {kernels.LABELS[kernels.backend(model.device)]}.")


def mem_text(mem: dict | None) -> str:
    if not mem:
        return ""
    saved = (mem["bytes_fp16"] - mem["bytes"]) / MIB
    out = (f"KV {mem['bytes'] / MIB:.2f} MiB held vs {mem['bytes_fp16'] / MIB:.2f} MiB at 16 bits: "
           f"{saved:.2f} MiB saved ({mem['ratio']:.2f}x)")
    if mem.get("host_bytes"):
        out += f" + host copy {mem['host_bytes'] / MIB:.2f} MiB"
    return out


def stats_md(state: str, s=None, mem: dict | None = None, reevals: int | None = None, extra: str = "") -> str:
    """The status line while a run goes on; ``s``: its ``GenerationSession``."""
    parts = [f"**{state}**"]
    if s is not None:
        parts += [f"prompt {s.n_prompt} tokens", f"{len(s.gen_ids)} new"]
        if s.ttft is not None:
            parts.append(f"time to first token {s.ttft:.2f} s")
        rate = s._rate()
        if rate:
            parts.append(f"{rate:.1f} tokens/s")
    if mem:
        parts.append(mem_text(mem))
    if reevals is not None:
        parts.append(f"{reevals} re-evaluations")
    return " · ".join(parts) + (f"\n\n{extra}" if extra else "")


def final_stats(tr: Trace, label: str, mem: dict | None, reevals) -> str:
    """The status line of a finished (stopped, imported) run, from its trace."""
    m = tr.meta
    parts = [f"**{label}**", f"prompt {tr.n_prompt} tokens", f"{m.get('new_tokens', len(tr.steps))} new"]
    if m.get("ttft") is not None:
        parts.append(f"time to first token {m['ttft']:.2f} s")
    if m.get("tokens_per_s"):
        parts.append(f"{m['tokens_per_s']:.1f} tokens/s")
    if mem:
        parts.append(mem_text(mem))
    if reevals is not None:
        parts.append(f"{reevals} re-evaluations")
    return " · ".join(parts)


def snippet(tr: Trace, cfg) -> str:
    """The Python snippet that reproduces run ``tr`` with settings ``cfg``."""
    m = tr.meta
    return config_snippet(cfg, model=m.get("model_arg"), prompt=m.get("prompt", ""),
                          max_new_tokens=m.get("max_new_tokens", 64), temperature=m.get("temperature", 0.0),
                          seed=m.get("seed", 0), chat_template=m.get("chat_template", True),
                          compare=m.get("compare", False), trust_remote_code=m.get("trust_remote_code", False),
                          packed_weights=m.get("packed_weights", False))


def compare_md(summary: dict | None, tokenizer=None, trace: Trace | None = None) -> str:
    """The full-cache comparison in one paragraph (``GenerationSession.result()["compare"]``)."""
    if not summary:
        return COMPARE_HINT
    d = summary.get("diverged_at")
    agree, kl = summary.get("agreement"), summary.get("mean_kl")
    parts = []
    if d is None:
        parts.append("**Outputs identical** so far")
    else:
        comp_tok = ref_tok = None
        if trace is not None and d < len(trace.steps):
            comp_tok = trace.tokens[trace.n_prompt + d] if trace.n_prompt + d < len(trace.tokens) else None
            rid = trace.steps[d].get("ref_token_id")
            if rid is not None and tokenizer is not None:
                ref_tok = tokenizer.decode([rid])
        what = f" (compressed {comp_tok!r} vs full {ref_tok!r})" if comp_tok is not None and ref_tok is not None else ""
        parts.append(f"**First divergence at token {d}**{what}")
    if agree is not None:
        parts.append(f"top-1 agreement {100 * agree:.1f}%")
    if kl is not None:
        parts.append(f"mean KL(full‖compressed) {kl:.4f} nats")
    return " · ".join(parts) + ("\n\nAgreement and KL compare the next-token distributions on the compressed "
                                "run's context (the full cache is teacher-forced after the outputs diverge).")
