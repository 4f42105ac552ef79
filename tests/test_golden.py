"""Golden outputs recorded before the redesign (tests/golden/record.py): every preset and the variants
that reach the other code paths give the same greedy tokens, the same bytes held and the same tiers.
Re-recorded since, one case each, for a deliberate change: uniform-int2's tokens when its preset began
holding blocks at 4 bits until the prompt ends (``prefill_bits=4``; its bytes and tiers unchanged);
``agacc@4`` and ``agacc@8`` when the preset dropped markers (docs/tuning.md round 8): the recording
with markers is ``agacc@4-markers``, and the other cases that evict pin ``markers=True``; ``agacc``,
``agacc@4`` and ``agacc@8`` when the preset's recent window went from 32 to 16 tokens (docs/tuning.md
round 11): the recording with 32 is ``agacc@4-rw32``, and the other ``agacc`` variants pin
``recent_window=32``; the same three when its sink blocks went to 8 bits (round 12): the recording at 16
is ``agacc@4-sink16``, and the other ``agacc`` variants pin ``sink_bits=16``; ``agacc@4`` when its decode
evidence became a decaying maximum (round 16; ``agacc`` and ``agacc@8`` came out the same on this short run):
the recording with the EMA is ``agacc@4-ema``, and the other ``agacc`` variants pin ``decode_evidence="ema"``;
``agacc``, ``agacc@4`` and ``agacc@8`` when its decode evidence became the mean of the last 8 steps instead of 16
(``n_w=8``, round 24): the recording with 16 is ``agacc@4-nw16``, and the other ``agacc`` variants pin ``n_w=16``;
the same three when the preset began re-planning the prompt by 16 pseudo tokens (``lookahead=16``, round 27): the
recording without is ``agacc@4-nolook``, and the other ``agacc`` variants pin ``lookahead=0``; ``agacc@4`` and
``agacc@8`` when its hot region went to 8 bits from a fitted ratio of 4 on (``hot_bits=None``, round 29; ``agacc``,
without a target, holds it at 16): the recording at 16 is ``agacc@4-hot16``, and the other variants pin ``hot_bits=16``;
``agacc@8`` when above 4x the preset began reading the prompt again before its pseudo tokens (``repeat_weight=None``,
round 32: one re-plan more, the same tokens, bytes and tiers on this short run): the recording without is
``agacc@8-norepeat``.
The trackers keep every token's state here, all of it outside the plan, as when these were recorded (since
round 23 they forget evicted blocks' tokens and the plan prices the state of its blocks' tokens, and since round 34
above a fitted 4x they hold a tiered block's state as its largest and summed I_i: fewer bytes, so other plans at a
target ratio; ``tests/test_cache.py`` checks that forgetting changes nothing else, and that packing keeps the block
maxima)."""
import json
from pathlib import Path

import pytest

import agacc
from agacc.importance import ImportanceTracker

from tests.golden.record import cases, run_case

GOLDEN = json.loads((Path(__file__).parent / "golden" / "presets.json").read_text())


@pytest.mark.parametrize("label,preset,overrides", cases(), ids=[c[0] for c in cases()])
def test_preset_bit_identical(label, preset, overrides, monkeypatch):
    monkeypatch.setattr(ImportanceTracker, "forget", lambda self, blocks: None)
    monkeypatch.setattr(ImportanceTracker, "pack", lambda self, n_blocks: None)
    monkeypatch.setattr(agacc.CompressedCache, "tracker_prices", lambda self: (0, 0))  # all of it overhead, as then
    want = GOLDEN[label]
    got = run_case(preset, overrides)
    assert got["tokens"] == want["tokens"]
    assert got["bytes"] == want["bytes"]
    assert got["by_tier"] == want["by_tier"]
    for key in ("entries", "tier", "bits", "keep", "markers", "reevaluations"):
        assert got[key] == want[key], key
