"""How models are judged: metrics per class and per source, calibration, patient-grouped
splits and folds, and the cross-validation protocol (fold roles, out-of-fold stacking)."""
