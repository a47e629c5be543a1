"""Neuron statistics against hand counts (PowerInfer's "x% of neurons cover 80%")."""
import numpy as np
import pytest

from minisparse.sparsity import coverage, neurons_for_coverage


def test_neurons_for_coverage_by_hand():
    # 10 activations: the hottest neuron has 6, the next 2: 2 of 4 neurons reach 80%
    assert neurons_for_coverage([6, 2, 1, 1], 0.8) == 0.5
    assert neurons_for_coverage([1, 6, 1, 2], 0.6) == 0.25          # order does not matter
    assert neurons_for_coverage([1, 6, 1, 2], 0.61) == 0.5
    # every neuron firing equally (SwiGLU counting h != 0): 80% of them, by construction
    assert neurons_for_coverage(np.full(10, 7), 0.8) == 0.8
    assert neurons_for_coverage([3, 0, 0, 0], 0.8) == 0.25           # dead neurons never help
    assert coverage([6, 2, 1, 1], 0.5) == pytest.approx(0.8)         # the inverse statistic agrees
    with pytest.raises(ValueError, match="share"):
        neurons_for_coverage([1, 2], 0.0)
    with pytest.raises(ValueError, match="zero"):
        neurons_for_coverage([0, 0], 0.8)
