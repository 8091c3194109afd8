"""Experiment drivers: stage runs from files (runs), sweeps, the probe of checkpoints, model
selection, the replication study, the transfer control and the benchmarks. They sit on top of
the data/store layer (pipeline/*.py) and salt/; nothing below imports them."""
