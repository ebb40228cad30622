"""What a delayed gradient costs, and what weight prediction gives back, in one process.

Plain torch, no pipeline: the model of a config is cut in two after ``--split`` top-level
layers; every step the whole model runs forward and backward on the current weights, the second
part updates at once, and the first part's gradient is applied ``--delay`` steps later (what
stage 0 of a 2-stage ``async`` run does). With ``--predict`` the forward and backward run on the
first part's weights extrapolated ``--delay`` updates along its last one, as
``delayed.weight_prediction`` does. Prints test accuracy every ``--eval-every`` steps.

    python scripts/delay_sim.py --delay 0                # backprop
    python scripts/delay_sim.py --delay 1                # stage 0 one step late
    python scripts/delay_sim.py --delay 1 --predict      # ... with weight prediction

docs/results.md ("Delayed gradients with weight prediction") quotes it. It is the rule of the
engine's async schedule (tests/test_delayed.py checks the engine against its own one-process
reference), but not bit for bit: the engine applies the owed late updates before its last
evaluation, and runs on other thread counts.
"""

from __future__ import annotations

import argparse

import torch

from pipedni.config import load_config
from pipedni.data import eval_batches, load_datasets, train_batches
from pipedni.models import build_model
from pipedni.optim import build_optimizer
from pipedni.stage import loss_fn, num_correct


def accuracy(model: torch.nn.Module, test) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(num_correct(model(x), y) for x, y in eval_batches(test, 1000))
    model.train()
    return correct / test.targets.numel()  # per label: per sample, or per position of a sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench_mlp_fashion.yaml")
    parser.add_argument("--split", type=int, default=2, help="top-level layers in the first part")
    parser.add_argument("--delay", type=int, default=1)
    parser.add_argument("--predict", action="store_true")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = load_config(args.config)
    train, test = load_datasets(cfg.data, args.seed)
    model = build_model(cfg.model, tuple(train.inputs.shape[1:]), train.num_classes, args.seed)
    first = [p for layer in list(model)[:args.split] for p in layer.parameters()]
    second = [p for layer in list(model)[args.split:] for p in layer.parameters()]
    opt_first, opt_second = build_optimizer(first, cfg.optim), build_optimizer(second, cfg.optim)
    before = [p.detach().clone() for p in first]  # the first part's weights before its last update
    late: list[tuple[torch.Tensor, ...]] = []  # its gradients, oldest first

    for step, x, y in train_batches(train, cfg.data.batch_size, args.seed, args.steps):
        live = [p.detach().clone() for p in first]
        if args.predict:  # w + delay x (w - w_before), as Stage.stash(ahead=delay)
            with torch.no_grad():
                for p, b in zip(first, before):
                    p.copy_(torch.lerp(b, p, 1.0 + args.delay))
        grads = torch.autograd.grad(loss_fn(model(x), y), first + second)
        with torch.no_grad():
            for p, w in zip(first, live):
                p.copy_(w)
        for p, g in zip(second, grads[len(first):]):
            p.grad = g
        opt_second.step()
        late.append(grads[:len(first)])
        if len(late) > args.delay:
            before = [p.detach().clone() for p in first]
            for p, g in zip(first, late.pop(0)):
                p.grad = g
            opt_first.step()
        if (step + 1) % args.eval_every == 0:
            print(f"step {step + 1}: test accuracy {accuracy(model, test):.2%}", flush=True)


if __name__ == "__main__":
    main()
