"""Decoupled Neural Interfaces: the synthetic-gradient predictors, a stage's end of a dni boundary
(``link``) and the ``dni`` schedule's worker."""
