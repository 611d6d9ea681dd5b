"""Inference on top of a trained run: volume prediction (:mod:`revseg.inference.prediction`),
video prediction (:mod:`revseg.inference.video_prediction`) and evaluation of label maps against
ground truth (:mod:`revseg.inference.evaluation`)."""
