"""keras_bpq: train Keras models with random choices inside, by Backprop-Q.

Stochastic nodes wrap TensorFlow Probability distributions as Keras 3 layers;
`BackpropQModel` trains the stochastic computation graph they form with
`compile()` / `fit()` (arXiv 1807.09511).
"""

from keras_bpq import diagnostics
from keras_bpq import estimators
from keras_bpq import export
from keras_bpq import graph
from keras_bpq import logged
from keras_bpq import replay
from keras_bpq import saving
from keras_bpq.costs import add_cost
from keras_bpq.model import BackpropQModel
from keras_bpq.nodes import Bernoulli
from keras_bpq.nodes import Categorical
from keras_bpq.nodes import Normal
from keras_bpq.nodes import StochasticNode
from keras_bpq.replay import Replay

__version__ = "0.2.0"

__all__ = [
    "BackpropQModel",
    "Bernoulli",
    "Categorical",
    "Normal",
    "Replay",
    "StochasticNode",
    "add_cost",
    "diagnostics",
    "estimators",
    "export",
    "graph",
    "logged",
    "replay",
    "saving",
]
