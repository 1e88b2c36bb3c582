"""Critic targets, routed along each cost's chain of stochastic ancestors.

For a cost `c` with stochastic ancestors `a_1 ... a_m` in execution order, the
head `Q^c_{a_j}` (j < m) regresses on one of (docs/method.md, "Critic targets"):

| kind       | target for `Q^c_{a_j}`                                          |
|------------|-----------------------------------------------------------------|
| `mc`       | the realised cost `c`                                           |
| `td`       | `Qbar^c_{a_{j+1}}(x_{a_{j+1}}, s_{a_{j+1}})`                    |
| `expected` | `Vbar^c_{a_{j+1}}(s) = sum_x' p(x') Qbar^c_{a_{j+1}}(x', s)`     |
| `lambda`   | `G_j = (1 - lam) Qbar^c_{a_{j+1}} + lam G_{j+1}`, `G_{m} = c`    |

Replayed rows (`keras_bpq.replay`) may also use, with the per-row truncated
importance ratios `t_X = min(1, pi_X(x_X) / mu_X(x_X))` (`truncated_ratios`):

| kind       | target for `Q^c_{a_j}`                                                        |
|------------|-------------------------------------------------------------------------------|
| `retrace`  | `G_j = Vbar_{a_{j+1}} + t_{a_{j+1}} (G_{j+1} - Qbar_{a_{j+1}}(x_{a_{j+1}}))`, `G_m = c` |

The head `Q^c_{a_m}` is exact (the cost itself), so `Qbar^c_{a_m} = c` and a
chain of one cost is episodic RL with reward `-c` and no discount. All targets
are stop-gradient. These are pure functions of recorded tensors and the
model's Q-function (`evaluate`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import tensorflow as tf

from keras_bpq import q_values

if TYPE_CHECKING:
    from keras_bpq import critics as critics_lib
    from keras_bpq import graph

KINDS = ("mc", "td", "expected", "lambda")
# Kinds that sum a successor's heads over its support.
EXPECTATION_KINDS = ("expected", "retrace")
MAX_SUPPORT = 256


def check_kind(kind: str, lam: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown critic target {kind!r}; choose one of {list(KINDS)}.")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"critic target lambda must be in [0, 1]; got {lam}.")


def check_supports(
    scg: graph.SCG, heads: Mapping[str, Tuple[str, ...]], what: str, instead: str
) -> None:
    """Raises a ValueError unless every successor on the chain of a cost with
    a learned head in `heads` (`{node: (cost, ...)}`) has a finite support of
    at most `MAX_SUPPORT` outcomes, which `expected` and `retrace` targets
    sum over. `what` names the option in the error, `instead` what to use."""
    for name in sorted({c for h in heads.values() for c in h}):
        for node in scg.cost_ancestors[name][1:]:
            size = scg.node(node).support_size
            if size is None or size > MAX_SUPPORT:
                raise ValueError(
                    f"{what} needs the full support of node {node!r} (a successor on cost "
                    f"{name!r}'s chain), which has {size or 'no finite'} outcomes (at most "
                    f"{MAX_SUPPORT} allowed). {instead}"
                )


def truncated_ratios(
    log_probs: Mapping[str, tf.Tensor], behaviour_log_probs: Mapping[str, tf.Tensor]
) -> Dict[str, tf.Tensor]:
    """`{node: min(1, rho) [rows]}`, Retrace's per-row trace coefficients.

    `rho = pi(x | pa) / mu(x | pa)` is the ratio of a stored sample's
    probability under the current policy (`log_probs`, `{node: log pi}`) to
    its behaviour probability when it was drawn (`behaviour_log_probs`,
    `{node: log mu}`), computed as `exp(min(0, log pi - log mu))` so that it
    never overflows. Stop-gradient."""
    return {
        name: tf.stop_gradient(tf.exp(tf.minimum(0.0, log_probs[name] - behaviour_log_probs[name])))
        for name in log_probs
    }


def inexact_heads(scg: graph.SCG) -> Dict[str, Tuple[str, ...]]:
    """`{node: (cost, ...)}`: the heads of each node that are not exact (the
    node is not its cost's last stochastic ancestor), which a critic learns
    unless common noise serves them (`critics.learned_heads`)."""
    heads = {}
    for info in scg.nodes:
        heads[info.name] = tuple(c for c in info.costs if scg.cost_ancestors[c][-1] != info.name)
    return heads


def critic_targets(
    kind: str,
    scg: graph.SCG,
    costs: Mapping[str, tf.Tensor],
    q_at_sample: Mapping[str, Mapping[str, tf.Tensor]],
    value: Optional[Mapping[str, Mapping[str, tf.Tensor]]] = None,
    lam: float = 0.9,
    traces: Optional[Mapping[str, tf.Tensor]] = None,
) -> Dict[Tuple[str, str], tf.Tensor]:
    """`{(node, cost): target [batch]}` for every learned head.

    Args:
      kind: one of `KINDS`, or `"retrace"`.
      scg: the model's `graph.SCG`.
      costs: `{cost: realised per-example cost}`.
      q_at_sample: `{node: {cost: Qbar^c_node(x_node, s_node)}}` from the target
        copies (exact heads hold the realised cost); needed for `td`/`lambda`.
      value: `{node: {cost: Vbar^c_node(s_node)}}`; needed for `expected`
        and `retrace`.
      lam: the lambda of `lambda` targets.
      traces: `{node: min(1, rho) [batch]}` (`truncated_ratios`); needed for
        `retrace`.
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
            elif kind == "retrace":
                correction = following - q_at_sample[successor][cost]
                target = value[successor][cost] + traces[successor] * correction
                following = target
            else:
                target = (1.0 - lam) * q_at_sample[successor][cost] + lam * following
                following = target
            targets[(chain[j], cost)] = tf.stop_gradient(target)
    return targets


def realised_heads(scg: graph.SCG, q_function: q_values.QFunction, info: graph.NodeInfo) -> Tuple[str, ...]:
    """The costs of node `info` whose heads at its sample are the realised
    cost: its exact and common-noise heads (`evaluate`'s `q_at_sample` holds
    these and the learned ones)."""
    return q_values.exact_costs(scg, info) + q_function.common_noise_costs(info)


def evaluate(
    kind: str,
    lam: float,
    scg: graph.SCG,
    costs: Mapping[str, tf.Tensor],
    records: Mapping[str, graph.NodeRecord],
    critics: Mapping[str, critics_lib.Critic],
    q_function: q_values.QFunction,
    x: Any,
    y: Any,
    traces: Optional[Mapping[str, tf.Tensor]] = None,
    seed: Optional[tf.Tensor] = None,
    of_pass: bool = False,
) -> Tuple[Dict[Tuple[str, str], tf.Tensor], Dict[str, Dict[str, tf.Tensor]]]:
    """`(targets, q_at_sample)`: `critic_targets` of this pass for every
    learned head, and `q_at_sample`, each node's heads at its sample (exact
    heads hold the realised cost, learned ones the target copy's value).

    `records` are the pass's `graph.NodeRecord`s, `critics` the model's
    `{node: critics.Critic}` and `q_function` its `q_values.QFunction`.
    `expected` and `retrace` targets need `Vbar` of the successors under the
    distribution of their recorded parameters: the sum of the heads over the
    support where it has at most `MAX_SUPPORT` outcomes, else (with `seed`,
    an int32 stateless seed `[2]`) the heads at one fresh draw from that
    distribution, an unbiased estimate. `traces` are `retrace`'s
    (`truncated_ratios`). `of_pass`: the rows are a training pass's, whose
    groups of equal context rows the critics read once per group
    (`q_values.QFunction.heads`)."""
    q_at_sample, value = {}, {}
    for info in scg.nodes:
        heads = {c: costs[c] for c in realised_heads(scg, q_function, info)}
        critic = critics.get(info.name)
        if critic is not None:
            groups = q_function.group_argument(info.name, critic, of_pass)
            learned = critic.q(q_values.context(info, x, records), records[info.name].sample, target=True, **groups)
            heads.update({c: learned[:, i] for i, c in enumerate(critic.heads)})
        q_at_sample[info.name] = heads
    if kind in EXPECTATION_KINDS:
        successors = {n for c in scg.costs for n in scg.cost_ancestors[c][1:]}
        for index, name in enumerate(n for n in scg.node_names if n in successors):
            info = scg.node(name)
            record = records[name]
            if info.support_size is None or info.support_size > MAX_SUPPORT:
                draw = record.redraw(tf.random.experimental.stateless_fold_in(seed, index))
                heads = q_function.heads(info, x, y, records, draw[:, None], target=True, of_pass=of_pass)
                value[name] = {c: v[:, 0] for c, v in heads.items()}
                continue
            support = tf.constant(record.layer.support(info.event_shape))
            batch = tf.shape(record.sample)[0]
            num = support.shape[0]
            values = tf.tile(support[None], [batch] + [1] * len(support.shape))
            repeat = lambda t: tf.repeat(t, num, axis=0)  # noqa: E731
            log_p = record.layer.log_prob(
                tf.reshape(values, [-1] + list(info.event_shape)),
                repeat(record.params),
                None if record.mask is None else repeat(record.mask),
            )
            probs = tf.reshape(tf.exp(log_p), [batch, num])
            heads = q_function.heads(info, x, y, records, values, target=True, of_pass=of_pass)
            value[name] = {c: tf.reduce_sum(probs * v, axis=1) for c, v in heads.items()}
    targets = critic_targets(kind, scg, costs, q_at_sample, value, lam, traces)
    return targets, q_at_sample
