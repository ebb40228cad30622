"""Decoupled Neural Interfaces: the synthetic-gradient predictors, a stage's end of a dni boundary
(``link``) and the ``dni`` schedule's worker; ``Boundary``, the same predictor inside a user's
own model or loop (``interface``), and truncated BPTT with synthetic gradients (``tbptt``)."""

from pipedni.dni.interface import Boundary

__all__ = ["Boundary"]
