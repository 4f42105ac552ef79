"""The app's text: the status line, the statistics of a run, the comparison summary, the model line
and the reproduction snippet (Markdown / HTML strings from what the library recorded)."""
from __future__ import annotations

import html
import os

import kernels
from agacc.trace import Trace, config_snippet

MIB = 2 ** 20
COMPARE_HINT = "Tick *compare with the full cache* (or press **Re-run + compare**) to run a full cache in lockstep."


_BUILDING = ("building", "not built yet")  # kernels.cpu.status() while the CPU kernel is still to come


def _cpu_kernel_state(device) -> str | None:
    """``kernels.cpu.status()`` when the CPU kernel decides what decodes on ``device``, else None."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind != "cpu" or os.environ.get(kernels.FORCE_TRITON_ENV, "") == "1":
        return None
    from kernels import cpu

    return cpu.status()


def kernel_building(device) -> bool:
    """Whether the CPU kernel for ``device`` is still to be built (the header says so until it is)."""
    return _cpu_kernel_state(device) in _BUILDING


def kernel_label(device) -> str:
    """The decode kernels that run for ``device``, without waiting for the CPU kernel's build
    (``kernels.backend`` would: it loads the extension). On the CPU: the fused C++ kernel once built
    (while it builds, a decode waits for it), the PyTorch reference when it is off or failed."""
    state = _cpu_kernel_state(device)
    if state is None:
        return kernels.LABELS[kernels.backend(device)]
    if state == "ready":
        return kernels.LABELS["cpp"]
    if state in _BUILDING:
        return f"{kernels.LABELS['cpp']} (building: once per Python environment)"
    why = "turned off (AGACC_CPU_KERNEL=0)" if state == "disabled" else "the C++ build failed"
    return f"{kernels.LABELS['torch']} ({why})"


def model_line(name: str | None, model, label: str = "SmolLM2-135M-Instruct (embedded)") -> str:
    """The model, its device and dtype, and the decode kernels that run for it."""
    dev = str(model.device)
    return (f"Model: <b>{html.escape(name or label)}</b> on {dev}, {str(model.dtype).replace('torch.', '')}; "
            f"decode kernels: {kernel_label(model.device)}.")


# why a run holds more than a 16-bit cache would (a "negative saving"), by the config that ran
def more_than_16_bit(cfg: dict | None, dtype: str | None = None) -> str:
    """One sentence on why the held bytes exceed a 16-bit cache's (ratio < 1): ``cfg`` the run's config
    dict, ``dtype`` the model's dtype name."""
    cfg = cfg or {}
    if not cfg.get("compress", True) and cfg.get("store_dtype") == "model" and dtype in ("float32", "fp32"):
        return ("`full` keeps the model's own K/V and this model runs in fp32: 32 bits a value, twice a 16-bit "
                "cache (the 16-bit line is the reference every method is measured against)")
    if not cfg.get("compress", True):
        return "`full` compresses nothing: every entry at full precision"
    if cfg.get("rule") in ("h2o", "streamingllm", "snapkv", "pyramidkv", "fastkv", "dynamickv") \
            and cfg.get("target_ratio") is None and (cfg.get("c_max") or 1.0) >= 1.0:
        return (f"`{cfg.get('rule')}` evicts only to meet a budget: without a target ratio it keeps every token at "
                "16 bits, and its importance tracker adds a little; tick *use a target memory ratio*")
    return ("nothing is compressed yet: the prompt fits in the recent window (or no block scored low enough), "
            "so every token is at 16 bits and the importance tracker adds a little")


def mem_text(mem: dict | None, cfg: dict | None = None, dtype: str | None = None) -> str:
    """The bytes line; a run that holds more than a 16-bit cache says so and why (``more_than_16_bit``)."""
    if not mem:
        return ""
    saved = (mem["bytes_fp16"] - mem["bytes"]) / MIB
    if saved >= 0:
        out = (f"KV {mem['bytes'] / MIB:.2f} MiB held vs {mem['bytes_fp16'] / MIB:.2f} MiB at 16 bits: "
               f"{saved:.2f} MiB saved ({mem['ratio']:.2f}x)")
    else:
        out = (f"KV {mem['bytes'] / MIB:.2f} MiB held vs {mem['bytes_fp16'] / MIB:.2f} MiB at 16 bits: "
               f"{-saved:.2f} MiB more ({mem['ratio']:.2f}x)")
        if cfg is not None:
            out += f" <span class='why-more'>(why: {more_than_16_bit(cfg, dtype)})</span>"
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
        parts.append(mem_text(mem, s.cfg.to_dict() if s is not None else None,
                              str(s.model.dtype).replace("torch.", "") if s is not None else None))
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
        parts.append(mem_text(mem, m.get("config"), m.get("dtype")))
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
