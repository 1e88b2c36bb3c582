"""Peer: a sigmoid belief net trained with Storchastic (score function + baseline, RELAX, DisARM).

Run by `benchmarks/sbn.py --peers` as a subprocess (same data file, architecture,
batch, Adam learning rate and step budget as keras_bpq); usable on its own:

    python benchmarks/peers/storchastic_sbn.py --data=/tmp/sbn_data.npz --arch=two_layer \
        --steps=3000 --eval_every=500 --method=sf --out=/tmp/storch.json

Methods (one `storch.method` object per Bernoulli layer, the public API:
`method(distribution)` samples, `storch.add_cost(cost, name)` registers the
per-example costs recon / kl per layer, `storch.backward()` builds the surrogate):
  * `sf`: `ScoreFunction(plate, n_samples=1, baseline_factory="moving_average")`
    (Storchastic's exponential moving-average baseline, its default decay 0.95);
  * `relax`: `RELAX(plate, in_dim=200)` (Storchastic's default control-variate
    network and learned temperature);
  * `disarm`: `DisARM(plate)`. Its samples are bool, cast to float for the next
    layer; it then fails inside Storchastic's estimator on torch 2.13 (the
    error is on benchmarks/results/sbn.md).
The data batch is `storch.denote_independent(x, 0, "data")`. An error is
recorded verbatim in the JSON (`error`) instead of patching the peer.

The test negative ELBO is evaluated with plain torch (one draw of z per image),
with the same formula as the keras_bpq costs. Data, architecture, evaluation and
output are shared with the Pyro peer in `common.py`.
"""

import os
import sys
import traceback

import torch

import storch
from storch.method import RELAX, DisARM, ScoreFunction
from torch.distributions import Bernoulli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, when run from anywhere
from common import H, SBN, arg_parser, bernoulli_log_prob, emit, load, setup, train_and_evaluate  # noqa: E402


def main():
    p = arg_parser(__doc__)
    p.add_argument("--method", choices=["sf", "relax", "disarm"], default="sf")
    args = p.parse_args()
    setup(args)
    data = load(args.data)
    D = data["train"].shape[1]
    net = SBN(D, args.arch)
    layers = net.num_layers
    if args.method == "sf":
        methods = [ScoreFunction(f"z{i + 1}", n_samples=1, baseline_factory="moving_average")
                   for i in range(layers)]
    elif args.method == "relax":
        methods = [RELAX(f"z{i + 1}", in_dim=H) for i in range(layers)]
    else:
        methods = [DisARM(f"z{i + 1}") for i in range(layers)]
    params = list(net.parameters()) + [q for m in methods for q in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)

    def train_step(x):
        optimizer.zero_grad()
        x = storch.denote_independent(x, 0, "data")
        inp, zs, qs = x, [], []
        for i in range(layers):
            logits = net.q[i](inp)
            z = methods[i](Bernoulli(logits=logits)).float()  # DisARM samples are bool
            zs.append(z)
            qs.append(logits)
            inp = z
        storch.add_cost(-bernoulli_log_prob(x, net.px(zs[0])), "recon")
        for i in range(layers):
            prior = net.prior if i == layers - 1 else net.p[i](zs[i + 1])
            storch.add_cost(bernoulli_log_prob(zs[i], qs[i]) - bernoulli_log_prob(zs[i], prior),
                            f"kl{i + 1}")
        storch.backward()
        optimizer.step()

    variant = {"sf": "ScoreFunction, moving_average baseline", "relax": "RELAX", "disarm": "DisARM"}[args.method]
    try:
        result = train_and_evaluate(args, data, net, train_step)
    except Exception as error:  # recorded verbatim, not patched
        result = {"arch": args.arch, "steps": args.steps, "seed": args.seed,
                  "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()}
    result.update(library="storchastic", library_version=_version(), torch_version=torch.__version__,
                  variant=variant)
    emit(args, result)


def _version():
    from importlib.metadata import version
    return version("storchastic")


if __name__ == "__main__":
    main()
