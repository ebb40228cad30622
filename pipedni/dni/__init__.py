"""Decoupled Neural Interfaces: the synthetic-gradient predictors and the ``dni`` schedule's worker."""
