"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models", arXiv:2306.14048): accumulated attention of every query so far; the budget is split
half heavy hitters, half most recent tokens; evicted tokens are gone for good."""
from agacc.methods import SELECT, Method, register
from agacc.policy import select_recent, select_topk, selection_rule


def select_h2o(scores, k: int):
    """Bool mask [n]: half of ``k`` to the most recent blocks, the rest to the heaviest among the others."""
    n = scores.numel()
    k_recent = k // 2
    keep = select_recent(n, k_recent)
    rest = (~keep).nonzero().squeeze(1)
    if k - k_recent > 0 and rest.numel():
        keep[rest[select_topk(scores[rest], k - k_recent)]] = True
    return keep


NAME = "h2o"
register(Method(
    NAME, presets={NAME: dict(scoring="sum", recent_window=16, n_sink=0, n_r=8, n_w=8, **SELECT)},
    rule=selection_rule(select_h2o), order=0, citation="Zhang et al., 2023, H2O, arXiv:2306.14048",
))
