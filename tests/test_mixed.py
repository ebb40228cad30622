"""Mixed boundaries (``train.schedule: mixed``) equal one process applying the same rules.

The reference below is written apart from the engine: plain modules and optimizers, stage i's
true backward of step s at "time" s + d_i (a deep copy of the stage for each delayed forward
under weight stashing, a recomputation under features replay; with weight prediction the
delayed forward runs on the weights extrapolated d_i updates along the last one), and for a
dni boundary a predictor of the same kind (zero-initialised, so equal at the start)
predicting at each forward and fitting each true gradient once stage i+1 has sent it. A pipelined run over real gloo
processes must match it parameter by parameter, predictors included, send every message
exactly once and end with nothing in flight. The async schedule is the case "every boundary
async, one microbatch" (tests/test_delayed.py checks it against this same reference).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from pipedni import data as datasets
from pipedni.config import load_config
from pipedni.dni.predictors import SyntheticGradientTrainer
from pipedni.engine import Trainer
from pipedni.errors import ConfigError, LaunchError
from pipedni.export import merge_checkpoints
from pipedni.models import build_model
from pipedni.optim import build_optimizer, build_scheduler
from pipedni.partition import partition
from pipedni.runtime import Runtime
from pipedni.schedules import registry
from pipedni.schedules.boundary_rules import delays
from pipedni.stage import loss_fn
from test_dni import assert_every_message_received, read_steps

STEPS = 6
NUM_STAGES = 3


def make_config(run_dir: Path, *extra: str):
    return load_config(None, [
        f"--run.dir={run_dir}", "--run.seed=3", "--run.log_every=1000", "--model.name=mlp", "--model.depth=4",
        "--model.width=24", "--data.name=synthetic", "--data.synthetic_size=256", "--data.batch_size=20",
        "--partition.method=uniform", "--train.schedule=mixed", f"--train.steps={STEPS}", "--train.microbatches=2",
        "--optim.name=sgd", "--optim.lr=0.1", "--optim.momentum=0.9", "--dni.kind=linear", "--dni.lr=0.01",
        *extra,
    ])


def _stages(cfg, num_stages: int):
    train_set, _ = datasets.load_datasets(cfg.data, cfg.run.seed)
    model = build_model(cfg.model, tuple(train_set.inputs.shape[1:]), train_set.num_classes, cfg.run.seed)
    return train_set, model, partition(model, num_stages, None, cfg.partition.method)


def mixed_reference(cfg, num_stages: int, modes: list[str], microbatches: int, steps: int) -> tuple[dict, dict]:
    """One process applying each boundary's rule; returns the model's and the predictors' states."""
    train_set, model, stages = _stages(cfg, num_stages)
    optims = [build_optimizer(s.parameters(), cfg.optim) for s in stages]
    scheds = [build_scheduler(o, cfg.optim, steps) for o in optims]
    d = delays(modes, cfg.delayed.delay)
    last = num_stages - 1
    # a dni stage whose predictor is untrusted updates from the true gradient 1 + d_{i+1} steps late,
    # where nobody upstream waits for its input gradient of the same step (else it is frozen)
    fallback = [1 + d[i + 1] if modes[i] == "dni" and cfg.dni.for_boundary(i).fallback == "delayed"
                and (i == 0 or modes[i - 1] == "dni") else 0 for i in range(last)]
    batches = [(torch.tensor_split(x, microbatches), torch.tensor_split(y, microbatches))
               for _, x, y in datasets.train_batches(train_set, cfg.data.batch_size, cfg.run.seed, steps)]
    sgs: dict[int, SyntheticGradientTrainer] = {}
    kept: list[dict] = [{} for _ in stages]  # stage -> step -> per microbatch (input, output, module, labels, sent)
    due: list[dict] = [{} for _ in stages]  # stage -> step -> when its true backward runs
    trusted: list[dict] = [{} for _ in stages]  # dni stage -> step -> its predictor trusted at its forward
    grads: list[dict] = [{} for _ in stages]  # stage -> (step, microbatch) -> gradient of its input
    store: list[dict] = [{} for _ in stages]  # dni stage -> step -> per microbatch (output, labels)
    before = [[p.detach().clone() for p in s.parameters()] for s in stages]  # weights before the last update

    def synthetic(i: int, t: int) -> bool:
        return i < last and modes[i] == "dni" and t >= cfg.dni.for_boundary(i).warmup_steps

    def sg(i: int, h: torch.Tensor) -> SyntheticGradientTrainer:
        if i not in sgs:
            sgs[i] = SyntheticGradientTrainer(tuple(h.shape[1:]), train_set.num_classes, cfg.dni.for_boundary(i),
                                              torch.device("cpu"), cfg.data.batch_size)
        return sgs[i]

    def predicted(i: int, ahead: int) -> torch.nn.Module:
        """Stage i as it would be ``ahead`` updates on, were each like its last (weight prediction)."""
        moved = copy.deepcopy(stages[i])
        with torch.no_grad():
            for q, b in zip(moved.parameters(), before[i]):
                q.copy_(torch.lerp(b, q, 1.0 + ahead))
        return moved

    def update(i: int) -> None:
        before[i] = [p.detach().clone() for p in stages[i].parameters()]
        optims[i].step()
        optims[i].zero_grad(set_to_none=True)
        scheds[i].step()

    def true_backward(i: int, s: int) -> None:
        stage = stages[i]
        for mb, (x_in, out, ran, labels, sent) in enumerate(kept[i].pop(s)):
            if out is None:  # features replay: the forward again, on the current weights
                ran, out = stage, stage(x_in)
            grad = grads[i + 1].pop((s, mb))
            if modes[i] == "dni":  # warm-up or fallback: the predictor fits every true gradient
                sg(i, sent).fit(sent, labels, grad)
            out.backward(grad)
            if ran is not stage:
                for p, q in zip(stage.parameters(), ran.parameters()):
                    p.grad = q.grad if p.grad is None else p.grad + q.grad
                    q.grad = None
            grads[i][s, mb] = x_in.grad
        del due[i][s]
        update(i)

    for t in range(steps + 1):  # the last: the drain, as each stage's finish
        acts = list(batches[t][0]) if t < steps else []
        for i, stage in enumerate(stages):  # forwards of step t, in pipeline order
            if t >= steps:
                break
            late = d[i] if i < last else 0
            if synthetic(i, t):
                trusted[i][t] = sgs[i].trusted if i in sgs else cfg.dni.for_boundary(i).min_cosine <= 0
                late = 0 if trusted[i][t] else fallback[i]
            moved = predicted(i, late) if late > 0 and cfg.delayed.weight_prediction else stage
            stashing = late > 0 and cfg.delayed.weight_stashing
            stash = (copy.deepcopy(stage) if moved is stage else moved) if stashing else None
            entries = []
            for mb, x in enumerate(acts):
                x_in, labels = x.detach().requires_grad_(i > 0), batches[t][1][mb]
                if late > 0 and stash is None:  # features replay
                    with torch.no_grad():
                        acts[mb] = moved(x_in)
                    entries.append((x_in, None, None, labels, acts[mb]))
                    continue
                ran = stash if stash is not None else stage
                out = ran(x_in)
                acts[mb] = out.detach()
                if i == last:
                    (loss_fn(out, labels) * labels.shape[0] / cfg.data.batch_size).backward()
                    grads[i][t, mb] = x_in.grad
                elif synthetic(i, t) and late == 0:
                    out.backward(sg(i, out).predict(out.detach(), labels))
                    grads[i][t, mb] = x_in.grad
                entries.append((x_in, out, ran, labels, acts[mb]))
            kept[i][t], due[i][t] = entries, t + late
        for i in reversed(range(num_stages)):  # then each stage's backward and update
            if t < steps and (i == last or (synthetic(i, t) and due[i][t] == t)):  # at once
                if i < last and not trusted[i][t]:  # frozen while the predictor is untrusted
                    optims[i].zero_grad(set_to_none=True)
                update(i)
                if i < last:
                    store[i][t] = [(o.detach(), y) for _, o, _, y, _ in kept[i].pop(t)]
                else:
                    kept[i].pop(t)
                del due[i][t]
            for s in sorted(s for s in due[i] if due[i][s] <= t or t >= steps):  # true gradients due
                true_backward(i, s)
            if i < last and modes[i] == "dni" and not (t >= steps and due[i]):  # fit what stage i+1 has answered
                for s in sorted(store[i]):
                    if s <= t - d[i + 1] or t >= steps:
                        for mb, (h, labels) in enumerate(store[i].pop(s)):
                            sg(i, h).fit(h, labels, grads[i + 1].pop((s, mb)))
    return dict(model.state_dict()), {i: p.model.state_dict() for i, p in sgs.items()}


# (name, boundaries, extra overrides): each a different rule for some stage
CASES = [
    ("locked", ["locked", "locked"], ()),
    ("async_locked", ["async", "locked"], ()),
    ("locked_async_replay", ["locked", "async"], ("--delayed.weight_stashing=false",)),
    ("dni_async", ["dni", "async"], ("--dni.max_staleness=1", "--dni.condition_on_labels=true",
                                     "--dni.min_cosine=0")),
    ("dni_async_until_trusted", ["dni", "async"], ("--dni.max_staleness=1", "--dni.min_cosine=0.15")),
    ("dni_async_until_trusted_replay", ["dni", "async"], ("--dni.max_staleness=1", "--dni.min_cosine=0.15",
                                                          "--delayed.weight_stashing=false")),
    ("dni_async_frozen_until_trusted", ["dni", "async"], ("--dni.max_staleness=1", "--dni.min_cosine=0.15",
                                                          "--dni.fallback=frozen")),
    ("locked_dni_warmup", ["locked", "dni"], (f"--dni.warmup_steps={STEPS - 1}",)),
]


def _config(root: Path, name: str, modes: list[str], extra: tuple[str, ...]):
    return make_config(root / name, f"--train.boundaries=[{','.join(modes)}]", *extra)


def _train_cases(rank: int, world_size: int, root: str) -> list:
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    out = []
    for name, modes, extra in CASES:
        trainer = Trainer(_config(Path(root), name, modes, extra), runtime)
        trainer.fit()
        trainer.close()  # raises if any message was left unconsumed
        link = getattr(trainer.worker, "link", None)
        state = None if link is None else {k: v.numpy().copy() for k, v in link.sg.model.state_dict().items()}
        out.append((trainer.worker.transport.counts(), state))  # numpy: plain pickles across processes
    return out


def test_mixed_boundaries_equal_a_single_process_applying_the_same_rules(tmp_path):
    """Locked, async (stashed and replayed) and dni boundaries, with a warm-up, in three stages
    and two microbatches: every parameter and predictor weight equals the reference."""
    results = run_distributed(_train_cases, NUM_STAGES, str(tmp_path), timeout=300)
    for c, (name, modes, extra) in enumerate(CASES):
        cfg = _config(tmp_path, name, modes, extra)
        expected, predictors = mixed_reference(cfg, NUM_STAGES, modes, cfg.train.microbatches, STEPS)
        merged = merge_checkpoints(tmp_path / name)
        assert merged.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {key}: {m}")
        for i, state in predictors.items():
            for key, value in state.items():
                torch.testing.assert_close(torch.from_numpy(results[i][c][1][key]), value, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{name} predictor {i} {key}: {m}")
        assert_every_message_received([per_rank[c][0] for per_rank in results])
    for name in ("dni_async_until_trusted", "dni_async_frozen_until_trusted"):
        gate = [r["sg_untrusted"] for r in read_steps(tmp_path / name, 0) if "sg_untrusted" in r]
        assert 0 in gate and 1 in gate, (name, gate)  # the predictor was untrusted, then trusted


def test_all_locked_mixed_is_plain_backprop_and_the_rules_matter(tmp_path):
    """The reference with every boundary locked is one process's backprop (so the parity above
    covers locked exactly), and every other case trains something else."""
    cfg = _config(tmp_path, "x", ["locked", "locked"], ())
    locked, _ = mixed_reference(cfg, NUM_STAGES, ["locked", "locked"], 2, STEPS)
    train_set, model, _ = _stages(cfg, NUM_STAGES)
    opt = build_optimizer(model.parameters(), cfg.optim)
    for _, x, y in datasets.train_batches(train_set, cfg.data.batch_size, cfg.run.seed, STEPS):
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(locked[key], value, rtol=1e-5, atol=1e-6)
    for name, modes, extra in CASES[1:]:
        other, _ = mixed_reference(_config(tmp_path, name, modes, extra), NUM_STAGES, modes, 2, STEPS)
        assert any(not torch.allclose(other[k], locked[k]) for k in locked), name


@pytest.mark.parametrize("modes,extra,message", [
    (["dni"], (), "has 1 entries but 3 stages have 2 boundaries"),
    (["dni", "async"], (), "train.boundaries[0] = dni (stage 0 -> 1): stage 1 returns gradients 2 step(s) late"),
    (["dni", "async"], ("--dni.max_staleness=2", "--dni.warmup_steps=5"), "cannot warm up locked"),
    (["async", "async"], ("--delayed.delay=3", "--dist.queue_size=8", "--train.microbatches=2"),
     "raise dist.queue_size to at least 9"),
])
def test_impossible_mixes_name_the_boundary(modes, extra, message):
    cfg = load_config(None, ["--train.schedule=mixed", f"--train.boundaries=[{','.join(modes)}]",
                             "--delayed.delay=2", "--dni.max_staleness=1", *extra])
    with pytest.raises(LaunchError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        registry.check_layout(cfg, NUM_STAGES)


@pytest.mark.parametrize("overrides,message", [
    (["--train.schedule=mixed", "--train.boundaries=[locked,dnni]"], "train.boundaries[1] = 'dnni' is not a boundary mode"),
    (["--train.boundaries=[dni]"], "is read only by train.schedule: mixed (it is '1f1b')"),
    (["--train.schedule=dni", "--dni.boundaries=[{warmup_steps: -1}]"], "warmup_steps = -1; must be >= 0"),
])
def test_bad_boundary_lists_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_a_fallback_later_than_the_staleness_bound_is_refused():
    """Stage 1 (after a dni boundary, before an async one) falls back 2 steps late: stage 0 must
    be allowed to wait that long for its gradients, or the two would wait on each other."""
    cfg = load_config(None, ["--train.schedule=mixed", "--train.boundaries=[dni,dni,async]", "--dni.max_staleness=1"])
    with pytest.raises(LaunchError, match=r"train.boundaries\[1\] = dni \(stage 1 -> 2\): while its predictor is "
                                          r"untrusted stage 1 sends stage 0 its gradients 2 steps late"):
        registry.check_layout(cfg, 4)
    registry.check_layout(load_config(None, ["--train.schedule=mixed", "--train.boundaries=[dni,dni,async]",
                                             "--dni.max_staleness=1", "--dni.boundaries=[{}, {fallback: frozen}]"]), 4)


def test_per_boundary_warm_up_needs_mixed():
    cfg = load_config(None, ["--train.schedule=dni", "--dni.boundaries=[{}, {warmup_steps: 10}]"])
    with pytest.raises(LaunchError, match="use train.schedule: mixed"):
        registry.check_layout(cfg, NUM_STAGES)


def test_a_bad_boundary_mode_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipedni.train", "configs/mlp_fashion.yaml", "--train.schedule=mixed",
                           "--train.boundaries=[lockd]", f"--run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.boundaries[0] = 'lockd'" in lines[0] and "Traceback" not in proc.stderr
