"""Paired comparisons across evaluation runs: the records of several ``python -m agacc eval --json``
files (the same task and samples, one method or one protocol a process), each method against a
reference method on the samples both scored (``agacc.eval.cli.add_paired``: the mean per-sample
difference and its 95% half-width), per context length and protocol.

    python bench/paired.py docs/ruler_niah_multikey_2k_query_agnostic.json \\
        docs/ruler_niah_multikey_2k_kvpress.json --vs agacc@4 agacc@8
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path


def groups(records: list[dict], ref: str) -> list[list[dict]]:
    """Per (task, context length, protocol) holding ``ref``: [that record, then every other method's]."""
    out = []
    keys = {(r["task"], r.get("context_tokens"), r.get("protocol")) for r in records if r["preset"] == ref}
    for key in sorted(keys, key=str):
        mine = [copy.deepcopy(r) for r in records if (r["task"], r.get("context_tokens"), r.get("protocol")) == key]
        out.append([r for r in mine if r["preset"] == ref][:1] + [r for r in mine if r["preset"] != ref])
    return out


def main(argv=None) -> int:
    from agacc.eval.cli import add_paired, format_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="records written by python -m agacc eval --json")
    p.add_argument("--vs", nargs="+", required=True, metavar="PRESET", help="reference method(s), as labelled in the records")
    args = p.parse_args(argv)
    records = [r for f in args.json for r in json.loads(Path(f).read_text())]
    missing = [v for v in args.vs if not any(r["preset"] == v for r in records)]
    if missing:
        p.error(f"no records of {missing} in those files (methods: {sorted({r['preset'] for r in records})})")
    for ref in args.vs:
        for g in groups(records, ref):
            add_paired(g)
            print(f"\n{g[0]['task']} @ {g[0].get('context_tokens')} tokens, {g[0].get('protocol') or 'query-aware'}, vs {ref}:")
            print(format_table(g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
