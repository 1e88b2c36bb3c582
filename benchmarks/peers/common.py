"""What the peer scripts (pyro_sbn.py, storchastic_sbn.py) share: torch only.

Command-line arguments, the data file written by `benchmarks/sbn.py`, the SBN
architectures (the same layer sizes and initialisation as the keras_bpq
models), the per-example negative ELBO with one latent draw (the same formula
as the keras_bpq costs), the training loop with its evaluation schedule and
wall-clock accounting, and the one-line JSON output that `benchmarks/sbn.py`
parses (the last stdout line starting with `{`).

The peer scripts import it as `common` from their own folder (see their
`sys.path` line), so each still runs alone:
`python benchmarks/peers/pyro_sbn.py --data=... `.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch
from torch import nn

H = 200  # units of every Bernoulli and deterministic layer


def arg_parser(doc):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="npz from benchmarks/sbn.py: train (probabilities), test (binarised)")
    p.add_argument("--arch", choices=["linear", "two_layer", "nonlinear"], default="two_layer")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--out", default="")
    return p


def setup(args):
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)


def load(path):
    f = np.load(path)
    return {k: f[k] for k in f.files}


def _dense(d_in, d_out):
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)  # Keras Dense defaults: glorot_uniform, zero bias
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(d_in, d_out):
    return nn.Sequential(_dense(d_in, H), nn.Tanh(), _dense(H, H), nn.Tanh(), _dense(H, d_out))


class SBN(nn.Module):
    """linear: x -> z1[200]; two_layer: x -> z1[200] -> z2[200] (linear maps);
    nonlinear: x -> 200 tanh -> 200 tanh -> z1[200], decoder mirrored.
    q[i]: encoder logits of layer i+1; p[i]: prior logits of layer i+1 given layer i+2;
    prior: learned logits of the top layer; px: decoder logits of x."""

    def __init__(self, pixels, arch):
        super().__init__()
        self.num_layers = 2 if arch == "two_layer" else 1
        if arch == "nonlinear":
            self.q = nn.ModuleList([_mlp(pixels, H)])
            self.px = _mlp(H, pixels)
        else:
            self.q = nn.ModuleList([_dense(pixels, H)] + [_dense(H, H) for _ in range(self.num_layers - 1)])
            self.px = _dense(H, pixels)
        # p[i] maps z_{i+2} to the logits of z_{i+1}; index with p[i] for layer i+1 (i < num_layers - 1).
        self.p = nn.ModuleList([_dense(H, H) for _ in range(self.num_layers - 1)])
        self.prior = nn.Parameter(torch.zeros(H))
        self.encoder = nn.ModuleList([self.q])
        self.decoder = nn.ModuleList([self.p, self.px])
        self.decoder.register_parameter("prior", self.prior)


def bernoulli_log_prob(sample, logits):
    return (sample * logits - torch.nn.functional.softplus(logits)).sum(-1)


@torch.no_grad()
def negative_elbo(net, x):
    """Per-example -ELBO with one draw of every latent layer (same costs as keras_bpq)."""
    total = torch.zeros(x.shape[0])
    inp, zs, qs = x, [], []
    for i in range(net.num_layers):
        logits = net.q[i](inp)
        z = torch.bernoulli(torch.sigmoid(logits))
        zs.append(z)
        qs.append(logits)
        inp = z
    total -= bernoulli_log_prob(x, net.px(zs[0]))
    for i in range(net.num_layers):
        prior = net.prior.expand_as(zs[i]) if i == net.num_layers - 1 else net.p[i](zs[i + 1])
        total += bernoulli_log_prob(zs[i], qs[i]) - bernoulli_log_prob(zs[i], prior)
    return total


def train_and_evaluate(args, data, net, train_step):
    """Runs `train_step(x_batch)` for args.steps steps on dynamically binarised
    batches, evaluating the test (and train-subset) -ELBO every args.eval_every
    steps; wall time counts training only."""
    rng = np.random.RandomState(args.seed)
    train = data["train"].astype(np.float32)
    test = torch.from_numpy(data["test"].astype(np.float32))
    train_eval = torch.from_numpy(data["train_eval"].astype(np.float32))
    n = len(train)
    order, pos = rng.permutation(n), 0
    curve = []

    def evaluate(step, seconds):
        curve.append({
            "step": step, "train_seconds": seconds,
            "test_nelbo": float(negative_elbo(net, test).mean()),
            "train_nelbo": float(negative_elbo(net, train_eval).mean()),
        })
        print(json.dumps(curve[-1]), file=sys.stderr, flush=True)

    evaluate(0, 0.0)
    seconds, first_chunk = 0.0, None
    step = 0
    while step < args.steps:
        chunk = min(args.eval_every, args.steps - step)
        start = time.perf_counter()
        for _ in range(chunk):
            if pos + args.batch_size > n:
                order, pos = rng.permutation(n), 0
            probs = train[order[pos:pos + args.batch_size]]
            pos += args.batch_size
            x = torch.from_numpy((rng.uniform(size=probs.shape) < probs).astype(np.float32))
            train_step(x)
        elapsed = time.perf_counter() - start
        if first_chunk is None:
            first_chunk = (chunk, elapsed)
        seconds += elapsed
        step += chunk
        evaluate(step, seconds)
    rest = args.steps - first_chunk[0]
    return {
        "arch": args.arch, "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "curve": curve,
        "train_seconds": seconds,
        "steps_per_s": args.steps / seconds,
        "steps_per_s_after_first_chunk": rest / (seconds - first_chunk[1]) if rest > 0 else None,
    }


def emit(args, result):
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, flush=True)
