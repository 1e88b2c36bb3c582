"""Peer: a sigmoid belief net trained with Pyro's TraceGraph_ELBO.

Run by `benchmarks/sbn.py --peers` as a subprocess (same data file, architecture,
batch, Adam learning rate and step budget as keras_bpq); usable on its own:

    python benchmarks/peers/pyro_sbn.py --data=/tmp/sbn_data.npz --arch=two_layer \
        --steps=3000 --eval_every=500 --baseline=decaying --out=/tmp/pyro.json

Baselines (Pyro's score-function variance reduction, set per sample site with
`pyro.sample(..., infer=dict(baseline=...))`, as in Pyro's SVI part III / AIR docs):
  * `decaying`: `use_decaying_avg_baseline=True, baseline_beta=0.95` (a decaying
    average of the downstream cost, Pyro's tutorial value);
  * `neural`: `nn_baseline` MLPs (in -> 100 tanh -> 1) registered with
    `pyro.module`, input x for z1 and the previous layer for later layers; trained
    by Pyro's baseline loss with the same optimizer.

The test negative ELBO is evaluated with plain torch (one draw of z per image)
on the fixed binarised test subset from the data file; the formula is the same
as the keras_bpq costs (recon + kl per layer). Prints one JSON object (and
writes it to --out if given). Data, architecture, evaluation and output are
shared with the Storchastic peer in `common.py`.
"""

import os
import sys

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, TraceGraph_ELBO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, when run from anywhere
from common import H, SBN, arg_parser, emit, load, setup, train_and_evaluate  # noqa: E402


class BaselineNet(nn.Module):
    """x -> 100 tanh -> a scalar per example (shape [batch], Pyro's plate shape)."""

    def __init__(self, d_in, hidden=100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def main():
    p = arg_parser(__doc__)
    p.add_argument("--baseline", choices=["decaying", "neural"], default="decaying")
    p.add_argument("--baseline_beta", type=float, default=0.95)
    args = p.parse_args()
    setup(args)
    data = load(args.data)
    D = data["train"].shape[1]
    net = SBN(D, args.arch)
    layers = net.num_layers
    nn_bl = None
    if args.baseline == "neural":
        inputs = [D] + [H] * (layers - 1)
        nn_bl = nn.ModuleList([BaselineNet(i) for i in inputs])

    def site_baseline(i, inp):
        if args.baseline == "decaying":
            return dict(use_decaying_avg_baseline=True, baseline_beta=args.baseline_beta)
        return dict(nn_baseline=nn_bl[i], nn_baseline_input=inp)

    def model(x):
        pyro.module("decoder", net.decoder)
        B = x.shape[0]
        with pyro.plate("data", B):
            logits = net.prior.expand(B, H)
            z = None
            for i in reversed(range(layers)):
                if z is not None:
                    logits = net.p[i](z)
                z = pyro.sample(f"z{i + 1}", dist.Bernoulli(logits=logits).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=net.px(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", net.encoder)
        if nn_bl is not None:
            pyro.module("baselines", nn_bl)
        with pyro.plate("data", x.shape[0]):
            inp = x
            for i in range(layers):
                z = pyro.sample(
                    f"z{i + 1}",
                    dist.Bernoulli(logits=net.q[i](inp)).to_event(1),
                    infer=dict(baseline=site_baseline(i, inp)),
                )
                inp = z

    pyro.clear_param_store()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": args.learning_rate}), loss=TraceGraph_ELBO())

    def train_step(x):
        svi.step(x)

    result = train_and_evaluate(args, data, net, train_step)
    result.update(
        library="pyro", library_version=pyro.__version__, torch_version=torch.__version__,
        variant=f"TraceGraph_ELBO, {args.baseline} baseline"
        + (f" (beta {args.baseline_beta})" if args.baseline == "decaying" else " (MLP 100 tanh)"),
    )
    emit(args, result)


if __name__ == "__main__":
    main()
