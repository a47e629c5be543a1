"""Sparsity science: record FFN activations, measure sparsity, ReLUfy models.

* :mod:`~minisparse.sparsity.recorder` -- :class:`Recorder`, an ``ffn_hook`` keeping
  bounded streaming statistics; :func:`ffn_input_tap` for the FFN inputs.
* :mod:`~minisparse.sparsity.metrics` -- exact zeros, ``|h| < eps``, top-k, CETT (by output
  norm, as ReLU^2 Wins), TEAL-uniform (FFN inputs only).
* :mod:`~minisparse.sparsity.neurons` -- activation frequency, hot/cold neurons, reuse.
* :mod:`~minisparse.sparsity.quality` -- validation loss under a sparsification rule.
* :mod:`~minisparse.sparsity.relufy` -- :func:`relufy` (ReLUfication, dReLU, shifted ReLU,
  ProSparse L1 + FATReLU).
* :mod:`~minisparse.sparsity.plots` -- figures (matplotlib, lazily imported).

Papers: TurboSparse (Song et al. 2024), ReLU^2 Wins (Zhang et al. 2024), ProSparse (Song
et al. 2024), ReLU Strikes Back (Mirzadeh et al. 2023), TEAL (Liu et al. 2024),
PowerInfer (Song et al. 2023), Deja Vu (Liu et al. 2023).
"""
from .metrics import (below_eps_fraction, cett, cett_h_thresholds, cett_mask, cett_per_token, cett_threshold,
                      exact_zero_fraction, neuron_output_norms, teal_threshold, teal_thresholds, threshold_sparsify,
                      topk_mask, topk_sparsify)
from .neurons import (activation_frequency, consecutive_reuse, coverage, coverage_curve, hot_cold_ranking,
                      neurons_for_coverage, powerlaw_slope)
from .quality import (Mask, Rule, Threshold, TopK, calibrate_cett, calibrate_teal, calibrate_thresholds,
                      evaluate_rule, evaluate_teal, loss_vs_sparsity)
from .recorder import Recorder, ffn_input_tap
from .relufy import RelufyResult, ensure_activation, format_report, measure, progressive_l1, relufy, \
    shifted_activation, swap_activation

__all__ = [
    "Recorder", "ffn_input_tap",
    "exact_zero_fraction", "below_eps_fraction", "topk_mask", "topk_sparsify", "threshold_sparsify",
    "cett", "cett_per_token", "cett_threshold", "neuron_output_norms", "cett_mask", "cett_h_thresholds",
    "teal_threshold", "teal_thresholds",
    "activation_frequency", "hot_cold_ranking", "coverage", "coverage_curve", "neurons_for_coverage",
    "consecutive_reuse", "powerlaw_slope",
    "Rule", "TopK", "Threshold", "Mask", "evaluate_rule", "loss_vs_sparsity", "calibrate_cett",
    "calibrate_thresholds", "calibrate_teal", "evaluate_teal",
    "relufy", "RelufyResult", "swap_activation", "shifted_activation", "ensure_activation", "measure",
    "format_report", "progressive_l1",
]
