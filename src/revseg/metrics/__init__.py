"""The one implementation of the segmentation metrics, used by validation, evaluation and
TensorBoard alike: BraTS regions (:mod:`revseg.metrics.brats`) and video region IoU
(:mod:`revseg.metrics.video`). Imports neither ``revseg.training`` nor ``revseg.inference``."""
