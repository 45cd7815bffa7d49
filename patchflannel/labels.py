"""The four classes and the names of the two ways predictions are combined.

Every model, metric and record uses these; a bundle records its own ``classes`` and
`Pipeline` labels its outputs with the bundle's, checked against these.
"""
from __future__ import annotations

__all__ = ["CLASSES", "FLANNEL_ENSEMBLE", "MEAN_OF_LEARNERS", "POSITIVE"]

#: The classes, in the order of every model's outputs.
CLASSES = ("covid", "viral", "bacterial", "normal")
#: The class the sensitivity/specificity figures are about.
POSITIVE = "covid"
#: ``Prediction.combiner`` when a FLANNEL weight module combined the learners.
FLANNEL_ENSEMBLE = "FLANNEL ensemble"
#: ``Prediction.combiner`` when the learners' probabilities were averaged (no weight module).
MEAN_OF_LEARNERS = "mean of learners"
