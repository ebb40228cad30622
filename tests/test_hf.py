"""Hugging Face decoders under every locked schedule: GPT-2 (its LM head tied to the token
embedding, on the first and last stages) and a Llama-style model, built from small configs with
random weights, cut by ``torch.export`` at blocks so that attention masks, rotary tables and the
token ids cross and are relayed; each must equal one process on every parameter, and the tied
copies must stay bit-equal. ``dni`` and ``async`` train GPT-2 too (the hidden state learns from a
synthetic or delayed gradient, the mask and ids cross beside it; the tied copies sum their
updates every ``train.tied_sync_every`` steps). Needs the ``hf`` extra (transformers), which the
test install has.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipedni.checkpoint import find, load_folder
from pipedni.config import load_config
from pipedni.engine import Trainer
from pipedni.export import merge_checkpoints
from pipedni.models import build_model
from pipedni.runtime import Runtime
from helpers import assert_same_parameters, run_distributed, run_stages, write_kjv
from own_models import gpt2, padded_tokens

pytest.importorskip("transformers")

LOCKED = [("gpt2", "1f1b", 3), ("gpt2", "torch_1f1b", 3), ("llama", "gpipe", 3),
          ("llama", "torch_gpipe", 3),  # a rotary table without batch dimension crosses: torch's stage takes it
          ("masked", "1f1b", 3)]  # GPT-2 on padded sequences: the data gives input_ids and attention_mask
DECOUPLED = [("gpt2", "dni", 2), ("gpt2", "async", 2)]
ADAM = ("--train.steps=20", "--optim.name=adam", "--optim.lr=0.003")
SPLITS = {"gpt2": "[transformer.h.1, transformer.h.3]", "llama": "[model.layers.1, model.layers.3]",
          "masked": "[transformer.h.1, transformer.h.3]"}
MASKED_VOCAB = 24
DATA = {"gpt2": "kjv", "llama": "kjv", "masked": "factory"}


def make_config(root: Path, name: str, schedule: str, microbatches: int, vocab: int, *extra: str):
    data = (["--data.name=kjv", f"--data.root={root / 'data'}", "--data.seq_len=16"] if name != "masked" else
            ["--data.factory=own_models:padded_tokens", f"--data.num_classes={MASKED_VOCAB}"])
    model, vocab = ("gpt2", MASKED_VOCAB) if name == "masked" else (name, vocab)
    return load_config(None, [
        f"--run.dir={root / f'{name}-{schedule}'}", "--run.seed=5", "--run.log_every=1000",
        f"--model.factory=own_models:{model}", f"--model.factory_args={{vocab_size: {vocab}}}",
        *([f"--model.split_points={SPLITS[name]}"] if schedule != "single" else []), *data, "--data.batch_size=12",
        "--data.eval_batch_size=32", f"--train.schedule={schedule}", f"--train.microbatches={microbatches}",
        "--train.steps=3", "--optim.name=sgd", "--optim.lr=0.5", "--optim.momentum=0.9",
        "--optim.grad_clip=0.5",  # clipping bites: the tied weight must count once in the norm
        *extra,
    ])


def _train(rank: int, world_size: int, root: str, vocab: int) -> list:
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    out = []
    for name, schedule, m in LOCKED + DECOUPLED:
        extra = ADAM if (name, schedule, m) in DECOUPLED else ()
        trainer = Trainer(make_config(Path(root), name, schedule, m, vocab, *extra), runtime)
        out.append(trainer.fit())
        trainer.close()
    return out


@pytest.mark.slow
def test_gpt2_and_llama_match_one_process_the_tied_head_stays_the_embedding_and_decoupled_runs_learn(tmp_path):
    vocab = len(set(write_kjv(tmp_path / "data" / "kjv.jsonl")))
    summaries = run_distributed(_train, 3, str(tmp_path), vocab, timeout=600)
    cpu = Runtime(0, 1, 0, 1, torch.device("cpu"), "none")
    for name in ("gpt2", "llama", "masked"):
        Trainer(make_config(tmp_path, name, "single", 1, vocab), cpu).fit()
    for (name, schedule, m), summary in zip(LOCKED, summaries[-1]):
        expected = merge_checkpoints(tmp_path / f"{name}-single")
        merged = merge_checkpoints(tmp_path / f"{name}-{schedule}")
        assert merged.keys() == expected.keys()
        assert_same_parameters(merged, expected, f"{name} {schedule}", atol=2e-5)
        assert summary["test_loss"] < 10
    # GPT-2's embedding lives on stage 0 and its tied head on stage 2: after the steps both copies
    # are bit-equal, and they did move
    files = load_folder(find(tmp_path / "gpt2-1f1b" / "checkpoints", "latest"))
    first, last = files[0]["model"], files[-1]["model"]
    assert torch.equal(first["transformer.wte.weight"], last["lm_head.weight"])
    cfg = make_config(tmp_path, "gpt2", "single", 1, vocab)
    initial = build_model(cfg.model, (16,), vocab, cfg.run.seed).state_dict()["transformer.wte.weight"]
    assert not torch.allclose(first["transformer.wte.weight"], initial)
    check_masked_against_the_model_itself(tmp_path, summaries[-1][LOCKED.index(("masked", "1f1b", 3))])
    for name, schedule, _ in DECOUPLED:  # the loss falls, and the tied copies agree at the end
        rows = [json.loads(line) for line in (tmp_path / f"{name}-{schedule}" / "metrics" / "stage2.jsonl").open()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert len(losses) == 20 and sum(losses[-5:]) < 0.9 * sum(losses[:5]), (schedule, losses)
        merged = merge_checkpoints(tmp_path / f"{name}-{schedule}")  # raises if the copies differ
        assert torch.equal(merged["lm_head.weight"], merged["transformer.wte.weight"])


def check_masked_against_the_model_itself(root: Path, summary: dict) -> None:
    """The masked run's weights, loaded into GPT-2, give on the test set with its attention masks
    the loss the pipeline measured; without the masks the loss differs (the padding matters)."""
    model = gpt2(MASKED_VOCAB)
    model.load_state_dict(merge_checkpoints(root / "masked-1f1b"), strict=True)
    model.eval()
    _, test_set = padded_tokens()
    ids = torch.stack([x["input_ids"] for x, _ in test_set])
    mask = torch.stack([x["attention_mask"] for x, _ in test_set])
    labels = torch.stack([y for _, y in test_set])
    with torch.no_grad():
        masked = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.flatten(0, 1), labels.flatten())
        bare = F.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), labels.flatten())
    assert summary["test_loss"] == pytest.approx(float(masked), rel=1e-5)
    assert abs(float(bare) - float(masked)) > 1e-3


def test_the_library_route_splits_hugging_face_models_with_fixed_arguments_and_a_named_output():
    """``split(model, n, {"input_ids": ids, "use_cache": False}, output="logits")``: the plain value
    is fixed for every call, the stages give the model's logits in both modes, dropout included."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipedni.split import split

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=30, n_positions=32, n_embd=32, n_layer=4, n_head=2, bos_token_id=0, eos_token_id=0)
    model, ids = GPT2LMHeadModel(config), torch.randint(0, 30, (4, 16))  # dropout 0.1, a cache by default
    plan = split(model, 3, {"input_ids": ids, "use_cache": False}, output="logits")
    assert plan.tracer == "export" and plan.input_names == ["input_ids"]
    assert plan.split_points == [("transformer.h.1", "beginning"), ("transformer.h.3", "beginning")]
    assert [t.dtype for t in plan.boundaries[0]] == [torch.int64, torch.bool, torch.float32]  # ids, mask, hidden
    for training in (True, False):
        for module in [model, *plan.stages]:
            module.train(training)
        torch.manual_seed(1)
        got = run_stages(plan.stages, ids)
        torch.manual_seed(1)
        assert torch.equal(got, model(input_ids=ids, use_cache=False).logits)
