"""Critic targets, routed along each cost's chain of stochastic ancestors.

For a cost `c` with stochastic ancestors `a_1 ... a_m` in execution order, the
head `Q^c_{a_j}` (j < m) regresses on one of (docs/method.md, "Critic targets"):

| kind       | target for `Q^c_{a_j}`                                          |
|------------|-----------------------------------------------------------------|
| `mc`       | the realised cost `c`                                           |
| `td`       | `Qbar^c_{a_{j+1}}(x_{a_{j+1}}, s_{a_{j+1}})`                    |
| `expected` | `Vbar^c_{a_{j+1}}(s) = sum_x' p(x') Qbar^c_{a_{j+1}}(x', s)`     |
| `lambda`   | `G_j = (1 - lam) Qbar^c_{a_{j+1}} + lam G_{j+1}`, `G_{m} = c`    |

The head `Q^c_{a_m}` is exact (the cost itself), so `Qbar^c_{a_m} = c` and a
chain of one cost is episodic RL with reward `-c` and no discount. All targets
are stop-gradient. These are pure functions of recorded tensors.
"""

import tensorflow as tf

KINDS = ("mc", "td", "expected", "lambda")


def check_kind(kind, lam):
    if kind not in KINDS:
        raise ValueError(f"Unknown critic target {kind!r}; choose one of {list(KINDS)}.")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"critic target lambda must be in [0, 1]; got {lam}.")


def learned_heads(scg):
    """`{node: (cost, ...)}`: the heads of each node that must be learned (the
    node is not its cost's last stochastic ancestor)."""
    heads = {}
    for info in scg.nodes:
        heads[info.name] = tuple(c for c in info.costs if scg.cost_ancestors[c][-1] != info.name)
    return heads


def critic_targets(kind, scg, costs, q_at_sample, value=None, lam=0.9):
    """`{(node, cost): target [batch]}` for every learned head.

    Args:
      kind: one of `KINDS`.
      scg: the model's `graph.SCG`.
      costs: `{cost: realised per-example cost}`.
      q_at_sample: `{node: {cost: Qbar^c_node(x_node, s_node)}}` from the target
        copies (exact heads hold the realised cost); needed for `td`/`lambda`.
      value: `{node: {cost: Vbar^c_node(s_node)}}`; needed for `expected`.
      lam: the lambda of `lambda` targets.
    """
    targets = {}
    for cost in scg.costs:
        chain = scg.cost_ancestors[cost]
        following = costs[cost]  # G_{j+1}, starting from G_m = c
        for j in range(len(chain) - 2, -1, -1):
            successor = chain[j + 1]
            if kind == "mc":
                target = costs[cost]
            elif kind == "td":
                target = q_at_sample[successor][cost]
            elif kind == "expected":
                target = value[successor][cost]
            else:
                target = (1.0 - lam) * q_at_sample[successor][cost] + lam * following
                following = target
            targets[(chain[j], cost)] = tf.stop_gradient(target)
    return targets
