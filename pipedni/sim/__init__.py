"""A discrete-event pipeline simulator: a schedule's action streams replayed on per-stage costs
and emulated links, giving throughput, busy fractions and a timeline without running a process.

costs (what work and messages cost) -> streams (what each stage does, step after step) ->
replay (the event core; shared: stages sharing fewer cores than there are stages) -> pipeline (``simulate``: a run, measured as the engine's) ->
``python -m pipedni.sim`` (one run or a sweep over stage counts).
"""

from pipedni.schedules.steps import SimAction
from pipedni.schedules.streams import decoupled_stream, locked_stream, pipeline_streams
from pipedni.sim.costs import PipelineCost, StageCost, from_profile, uniform
from pipedni.sim.pipeline import SimResult, simulate
from pipedni.sim.replay import StageTrace
from pipedni.sim.shared import replay

__all__ = ["PipelineCost", "SimAction", "SimResult", "StageCost", "StageTrace", "decoupled_stream",
           "from_profile", "locked_stream", "pipeline_streams", "replay", "simulate", "uniform"]
