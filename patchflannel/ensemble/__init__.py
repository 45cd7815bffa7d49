"""Stage 2's combiner: the FLANNEL neural weight module (`.module`) and its fitting on
out-of-fold learner probabilities (`.fit`); ``python -m patchflannel.ensemble`` fits one."""
from .fit import WeightModuleConfig, crossfit_temperature, fit_weight_module
from .module import FlannelWeightModule, load_weight_module, save_weight_module

__all__ = ["FlannelWeightModule", "WeightModuleConfig", "crossfit_temperature", "fit_weight_module",
           "load_weight_module", "save_weight_module"]
