"""Decoupled Neural Interfaces, the parts with no schedule in them: the synthetic-gradient
predictors (``predictors``), choosing one by cost (``sizing``), synthetic input models
(``inputs``); ``Boundary``, the same predictor inside a user's own model or loop
(``interface``), and truncated BPTT with synthetic gradients (``tbptt``). The schedules that
use them live in ``pipedni.schedules`` (``dni``, ``decoupled``, ``synthetic_gradients``)."""

from pipedni.dni.interface import Boundary

__all__ = ["Boundary"]
