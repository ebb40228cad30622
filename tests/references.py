"""Single-process references written apart from the engine, shared by the tests that pin a
pipelined schedule to one: ``mixed_reference`` applies the rules of mixed boundaries (each
boundary locked, dni or async) with plain modules and optimizers; the async schedule is its
case "every boundary async, one microbatch" (tests/test_mixed.py, tests/test_delayed.py)."""

from __future__ import annotations

import copy

import torch

from pipedni import data as datasets
from pipedni.dni.predictors import SyntheticGradientTrainer
from pipedni.models import build_model
from pipedni.optim import build_optimizer, build_scheduler
from pipedni.schedules.modes import delays
from pipedni.split.partition import partition
from pipedni.stage import loss_fn


def stages_of(cfg, num_stages: int):
    train_set, _ = datasets.load_datasets(cfg.data, cfg.run.seed)
    model = build_model(cfg.model, tuple(train_set.inputs.shape[1:]), train_set.num_classes, cfg.run.seed)
    return train_set, model, partition(model, num_stages, None, cfg.partition.method)


def mixed_reference(cfg, num_stages: int, modes: list[str], microbatches: int, steps: int) -> tuple[dict, dict]:
    """One process applying each boundary's rule; returns the model's and the predictors' states."""
    train_set, model, stages = stages_of(cfg, num_stages)
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
