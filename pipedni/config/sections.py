"""The config sections: one dataclass per YAML section, every field with its one-line doc.

The defaults below are the lowest layer of the precedence (see pipedni.config.load). Every
field carries a one-line doc (``field.metadata["doc"]``) that the reference table prints
(see pipedni.config.reference).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a documented default (lists and dicts are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class RunConfig:
    name: str = _f("default", "Run name; also the default run directory name.")
    dir: Optional[str] = _f(None, "Output directory (default: runs/<name>).")
    seed: int = _f(0, "Seed for weights and data order; identical on every rank.")
    threads: int = _f(0, "Torch CPU threads per stage process (0: cores / local processes).")
    log_every: int = _f(10, "Steps between console updates (metrics are written every step).")
    activation_memory: bool = _f(
        False, "Count the bytes each stage keeps for backward (summary: peak_activation_bytes); costs a hook per saved tensor."
    )
    timeline_steps: int = _f(
        0, "Record what each stage did when (forward, backward, predictor, optimizer, waits, sends) during this "
           "many training steps after the first, and write timeline.json (Chrome/Perfetto trace) and timeline.png "
           "to run.dir (0: off).",
    )
    tensorboard: bool = _f(
        False, "Also write the metrics as TensorBoard scalars to <run.dir>/tensorboard/stage<i> (pip install "
               "'pipedni[tensorboard]'); the JSONL files are written either way.",
    )


@dataclass
class ModelConfig:
    name: Literal["mlp", "cnn", "transformer"] = _f(
        "mlp", "Built-in model: mlp (fully connected), cnn (conv) or transformer (causal character LM)."
    )
    depth: int = _f(3, "mlp: number of hidden Linear layers; transformer: number of blocks.")
    width: int = _f(256, "mlp: units per hidden layer; transformer: model width (d_model).")
    heads: int = _f(4, "transformer: attention heads per block (model.width must divide by it).")
    batchnorm: bool = _f(False, "mlp / cnn: add BatchNorm after each hidden Linear / conv layer.")
    channels: list[int] = _f([32, 64], "cnn: output channels of each 5x5 conv block.")
    hidden: int = _f(0, "cnn: width of a hidden Linear layer before the classifier (0: none).")
    factory: str = _f(
        "", "Your own model instead of model.name: 'package.module:function' returning an nn.Module (called with "
            "model.factory_args as keywords, weights drawn from run.seed); see docs/own_model.md.",
    )
    factory_args: dict = _f({}, "Keyword arguments of model.factory, e.g. {num_classes: 10}.")
    split_points: list[str] = _f(
        [], "Module names to cut your model before, one fewer than the stages (e.g. [layer2, layer4]); empty: "
            "partition.method chooses cuts between its blocks.",
    )


@dataclass
class DataConfig:
    name: Literal["fashion_mnist", "mnist", "mnist_5k", "kjv", "synthetic"] = _f(
        "fashion_mnist",
        "Data set: fashion_mnist, mnist (IDX files), mnist_5k (5000-digit CSV), kjv (King James Bible, "
        "characters) or synthetic (random, no I/O).",
    )
    root: str = _f("data", "Directory searched first for data files (IDX files, mnist_5k.csv.gz, kjv.jsonl).")
    batch_size: int = _f(128, "Training batch size (split into train.microbatches).")
    eval_batch_size: int = _f(1000, "Batch size of the forward-only evaluation pass.")
    normalize: bool = _f(True, "Standardise a float input with the training set's mean and std (not token ids, "
                               "nor a model's several inputs).")
    train_limit: int = _f(0, "Use only the first N training samples (0: all).")
    test_limit: int = _f(0, "Evaluate on only the first N test samples (0: all).")
    seq_len: int = _f(128, "kjv: characters per sample; targets are the same characters shifted by one.")
    synthetic_shape: list[int] = _f([1, 28, 28], "synthetic: shape of one input sample.")
    synthetic_classes: int = _f(10, "synthetic: number of classes.")
    synthetic_size: int = _f(8192, "synthetic: number of training samples (test: a quarter).")
    factory: str = _f(
        "", "Your own data instead of data.name: 'package.module:function' returning (train, test) torch Datasets "
            "of (input, integer label) pairs, called with data.factory_args; an input is a tensor, a tuple of them "
            "(forward's arguments in order) or a dict by forward's parameter names; see docs/own_model.md.",
    )
    factory_args: dict = _f({}, "Keyword arguments of data.factory.")
    num_classes: int = _f(0, "data.factory (and pipedni.fit): the number of classes (0: the largest label seen + 1).")


@dataclass
class PartitionConfig:
    balance: Optional[list[int]] = _f(None, "Layers per stage, e.g. [2, 2]; overrides method.")
    method: Literal["auto", "uniform", "parameters", "time"] = _f(
        "auto",
        "uniform: equal layer counts; parameters: exact min-max parameter split; time: exact min-max split of "
        "measured forward+backward+optimizer time (rank 0 times one microbatch; the balance, or a split model's "
        "split points, is saved in config.yaml); auto: time for decoupled schedules (dni, async, mixed) on several "
        "stages, else parameters. A model that is no nn.Sequential is cut between its blocks.",
    )


@dataclass
class TrainConfig:
    schedule: str = _f(
        "1f1b",
        "A schedule of pipedni.schedules.registry: single (one process, reference), naive, gpipe, 1f1b, "
        "dni (synthetic gradients), async (delayed true gradients), mixed (train.boundaries), or torch_gpipe / "
        "torch_1f1b (torch.distributed.pipelining's schedules on the same stages: the peer).",
    )
    boundaries: list[str] = _f(
        [], "mixed: how each stage i learns from stage i+1, one entry per boundary: locked (true gradient, same "
            "step), dni (synthetic gradient) or async (true gradient, delayed.delay steps later); e.g. [locked, dni, locked].",
    )
    steps: int = _f(0, "Optimizer steps to run (0: use train.epochs).")
    epochs: float = _f(1.0, "Passes over the training set when train.steps is 0.")
    microbatches: int = _f(4, "Microbatches per batch for naive / gpipe / 1f1b / mixed and dni's warm-up (M).")
    eval_every: int = _f(0, "Steps between test-set evaluations (0: only at the end).")
    loss: str = _f(
        "cross_entropy", "The loss of the model's output against the labels: cross_entropy, or 'package.module:function' "
                         "taking (scores, labels) and returning their mean (e.g. with label smoothing); accuracy is "
                         "the argmax's either way.",
    )
    tied_sync_every: int = _f(
        8, "Decoupled schedules on a split model whose tied weight (an embedding and its LM head) is held by several "
           "stages: every this many steps, each copy takes the sum of every copy's updates since the last sync "
           "(locked schedules keep the copies identical at every step).",
    )
    time_limit_sec: float = _f(
        0.0, "Stop at the first evaluation after this many seconds of training, evaluation excluded (0: off)."
    )
    precision: Literal["fp32", "bf16", "fp16"] = _f(
        "fp32", "Compute dtype of every forward (stages, predictors, synthetic inputs) under autocast; weights, "
                "optimizer state and the loss stay fp32. GPUs: bf16 (A100, H100; fp16 adds a loss scale and runs "
                "locked schedules only). See docs/gpu.md, 'Mixed precision'.",
    )
    activation_checkpointing: Literal["none", "blocks", "stage"] = _f(
        "none", "Recompute activations in the backward instead of keeping them: blocks (each block of an "
                "nn.Sequential stage: a built-in model's layers) or stage (the whole stage from its input: least "
                "memory, one more forward). Same gradients either way.",
    )
    compile: bool = _f(
        False, "torch.compile each stage as one graph before training (the time it takes is compile_sec in "
               "summary.json, not training time); a stage that cannot be compiled runs eager, saying why.",
    )
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop", "A non-finite loss or gradient (synthetic ones included): stop the run with an error naming the "
                "stage and step, the last checkpoint kept; or skip that update (a stage whose last "
                "10 updates were all skipped stops anyway).",
    )


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = _f("sgd", "Optimizer: sgd, adam or adamw.")
    lr: float = _f(0.05, "Peak learning rate.")
    momentum: float = _f(0.9, "sgd: momentum.")
    weight_decay: float = _f(0.0, "Weight decay (decoupled for adamw).")
    betas: list[float] = _f([0.9, 0.999], "adam / adamw: betas.")
    lr_schedule: Literal["constant", "cosine"] = _f(
        "constant", "constant, or cosine: linear warmup then cosine decay to min_lr."
    )
    warmup_steps: int = _f(0, "cosine: steps of linear warmup from 0 to lr.")
    min_lr: float = _f(0.0, "cosine: learning rate at the last step.")
    grad_clip: float = _f(
        0.0, "Clip the gradient norm to this (0: off): of the whole model when locked, per stage under dni."
    )


@dataclass
class DNIConfig:
    kind: Literal["auto", "linear", "lowrank", "mlp", "conv"] = _f(
        "auto", "Synthetic-gradient model: auto (the richest whose cost fits the stage: see dni/sizing.py), "
                "linear, lowrank, mlp (per position on [B, T, C]), or conv (4-D).",
    )
    condition_on_labels: bool = _f(
        True, "cDNI: give the predictor the one-hot label (of each position, on sequences) as extra input."
    )
    hidden_layers: int = _f(2, "mlp / conv: hidden layers of the predictor.")
    hidden_width: int = _f(1024, "mlp: units per hidden layer; conv: channels per hidden layer.")
    rank: int = _f(64, "lowrank: width of the bottleneck.")
    batchnorm: bool = _f(False, "mlp / conv: BatchNorm after each hidden layer of the predictor.")
    optimizer: Literal["adam", "sgd"] = _f("adam", "Optimizer of the predictors (their own, not optim.*).")
    lr: float = _f(3e-4, "Learning rate of the predictors.")
    output_scale: float = _f(1.0, "Multiply predicted gradients by this before backpropagating them.")
    clip: float = _f(0.0, "Clip each sample's predicted gradient to this L2 norm (0: off).")
    normalize_target: bool = _f(
        True, "Regress on (labels per batch) x gradient (O(1) values) and divide back before use."
    )
    min_cosine: float = _f(
        0.9, "A stage updates from its synthetic gradient only while its predictor's cosine with the "
             "true gradients (moving average over fits) is at least this; else see fallback (0: always).",
    )
    fallback: Literal["delayed", "frozen"] = _f(
        "delayed", "While the predictor is below min_cosine: delayed (update from the true gradient when it "
                   "arrives, as async) or frozen (no update). delayed needs stage i first or boundary i-1 dni.",
    )
    max_staleness: int = _f(2, "Most steps a stage may run ahead of the gradients it has received.")
    microbatches: int = _f(
        1, "Pieces each batch runs in, freed one by one (activation memory / M); one update per batch."
    )
    warmup_steps: int = _f(
        0, "Train locked (1F1B) this many steps first; predictors fit true gradients (per boundary under mixed)."
    )
    synthetic_inputs: bool = _f(
        False, "Forward unlocking: stage i+1 may train on its input predicted from the network input "
               "instead of waiting for stage i's activation (see si_* and docs/decoupled.md).",
    )
    si_policy: Literal["arrived", "always"] = _f(
        "arrived", "synthetic_inputs: arrived (the true activation when it is already there, else the "
                   "prediction) or always (the prediction, as the paper's complete unlock).",
    )
    si_gradient: Literal["true_input", "prediction"] = _f(
        "true_input", "synthetic_inputs: the gradient sent upstream for a step trained on a predicted input: at "
                      "the true input when it arrives (one more backward), or at the prediction (free, biased).",
    )
    si_min_r2: float = _f(
        0.5, "synthetic_inputs: predict only while the input model explains at least this share of the true "
             "activations' variance (moving average over fits); else wait for them (0: always).",
    )
    si_hidden_layers: int = _f(
        1, "synthetic_inputs: hidden layers of the input model (as wide as the boundary, at most hidden_width)."
    )
    si_lr: float = _f(
        3e-3, "synthetic_inputs: learning rate of the input model (it regresses activations, O(1), not gradients)."
    )
    si_idle_updates: int = _f(
        0, "synthetic_inputs: the most extra updates a step makes, on predicted inputs of batches the stage holds, "
           "while it waits for a true activation (a fast stage keeps training; 0: it waits idle).",
    )
    boundaries: list[dict] = _f(
        [], "Per-boundary overrides: entry i (stage i -> i+1) maps predictor keys above to values."
    )

    def for_boundary(self, index: int) -> "DNIConfig":
        """This config with boundary ``index``'s overrides applied."""
        if index >= len(self.boundaries):
            return self
        return dataclasses.replace(self, **self.boundaries[index])


# Keys a per-boundary entry may set (the predictor's own settings, not the schedule's).
DNI_BOUNDARY_KEYS = ("kind", "condition_on_labels", "hidden_layers", "hidden_width", "rank", "batchnorm",
                     "optimizer", "lr", "output_scale", "clip", "normalize_target", "min_cosine", "fallback",
                     "warmup_steps", "synthetic_inputs", "si_policy", "si_gradient", "si_min_r2", "si_hidden_layers",
                     "si_lr", "si_idle_updates")


@dataclass
class DelayedConfig:
    delay: int = _f(
        1, "async: steps of delay each later stage adds; stage i of N updates at step t with the true gradient "
           "of step t - delay x (N-1-i) (the last stage is exact).",
    )
    weight_stashing: bool = _f(
        True, "async: a delayed backward uses the weights its forward used (one copy per step in flight); "
              "false: recompute that forward with the current weights, keeping only its input.",
    )
    weight_prediction: bool = _f(
        True, "async: a delayed forward runs on the weights it will update, predicted as the current ones plus "
              "its delay x the last update (one more weight copy per stage); false: on the current weights.",
    )


@dataclass
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"] = _f(
        "auto", "auto: nccl when every rank has its own GPU, else gloo."
    )
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda when available, else cpu.")
    timeout_sec: float = _f(300.0, "Longest wait for any message before the job fails.")
    queue_size: int = _f(
        64, "Messages buffered per incoming direction before the sender waits (a locked schedule's stages: "
            "sends in flight per direction).")
    link_latency_ms: float = _f(
        0.0, "Emulated one-way latency of every link between neighbouring stages, per message (ms; 0: off). "
             "See docs/benchmarking.md, 'Emulated slow links'.",
    )
    link_bandwidth_mbps: float = _f(
        0.0, "Emulated bandwidth of every link, per direction (Mbit/s; 0: unlimited): a message occupies its "
             "link for its bytes / bandwidth, one message at a time.",
    )
    data_parallel: int = _f(
        1, "Replicas of the whole pipeline (D): torchrun starts stages x D processes; each replica trains on "
           "1/D of every batch (data.batch_size stays the global batch) and each stage's gradients are averaged "
           "over its D replicas at every update. Every schedule but dni.synthetic_inputs; see docs/gpu.md, "
           "'Data parallel'.",
    )
    wire_dtype: Literal["auto", "same", "bfloat16", "float16"] = _f(
        "auto", "Dtype floating activations and gradients travel in between stages, cast back on receipt "
                "(auto: train.precision's compute dtype; same: their own; bfloat16/float16: half the bytes of fp32).",
    )


@dataclass
class CheckpointConfig:
    enabled: bool = _f(True, "Write checkpoints to <run.dir>/checkpoints/step_<step>: at the end, and as every_* say.")
    every_steps: int = _f(0, "Also write one every this many steps (0: off).")
    every_minutes: float = _f(
        0.0, "Also write one at the first evaluation after this many minutes of training since the last (0: off; "
             "needs train.eval_every: ranks agree on the time there without an extra barrier).",
    )
    keep_last: int = _f(2, "Checkpoints kept: older step folders are deleted after a new one is complete (0: all).")
    resume: str = _f(
        "", "Resume from a checkpoint: latest (in run.dir), a step number, or a step folder path; '' : start "
            "fresh (after a torchrun restart the latest one is resumed). `--resume` is short for latest.",
    )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dni: DNIConfig = field(default_factory=DNIConfig)
    delayed: DelayedConfig = field(default_factory=DelayedConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}

