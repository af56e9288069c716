"""The files that pass between stages, each with one writer and one reader.

* :mod:`~transferlab.artifacts.predictions`: ``predictions/<split>.npz`` (logits, targets, sample ids, class ids),
  written by train, evaluate, ensemble and study, read by ensemble, predict, the report and study;
* :mod:`~transferlab.artifacts.folders`: what kind of folder a path is (run, evaluation, ensemble, study,
  export), decided in one place;
* :mod:`~transferlab.artifacts.summary`: the headline metrics every ``metrics.json`` and the report share;
* :mod:`~transferlab.artifacts.lock`: the run lock that keeps two processes out of one output folder;
* :mod:`~transferlab.artifacts.curves`: the training-curves figure a run writes.

Nothing here imports models, training or the commands: stages meet through these files only.
"""
