"""The parts of `keras_bpq._keras_compat` that lean on the order of Keras' own
internals, checked against the installed Keras on a plain `keras.Model`."""

import keras
import numpy as np
import pytest

from keras_bpq import _keras_compat


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_skip_train_batches_passes_over_batches_before_compile_metrics_are_built(steps_per_execution):
    """`fit` draws the skipped batches without training on them; their logs
    are empty while `compile(metrics=...)` is not built yet (nothing traced),
    which is the one error `skip_train_batches` lets through as no logs."""
    rng = np.random.RandomState(0)
    x, y = rng.normal(size=(24, 3)).astype("float32"), rng.normal(size=(24, 1)).astype("float32")

    def model():
        keras.utils.set_random_seed(1)
        net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        net.compile(optimizer="sgd", loss="mse", metrics=["mae"], steps_per_execution=steps_per_execution)
        return net

    seen = []

    class Skip(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            _keras_compat.skip_train_batches(self.model, 2)

    class Log(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(sorted(logs))

    skipping = model()
    skipping.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[Skip(), Log()])
    straight = model()
    straight.fit(x[8:], y[8:], batch_size=4, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(skipping.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    skipped = 2 // steps_per_execution
    assert seen[:skipped] == [[]] * skipped
    assert seen[skipped:] and all(entry == ["loss", "mae"] for entry in seen[skipped:])
