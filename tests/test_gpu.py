"""GPU paths: CUDA tensors through the transport, and pipelines on GPUs (skipped without CUDA).

With one GPU, two ranks share it: gloo with host staging. With two or more, NCCL carries the
payloads device to device and the receiver thread's CUDA stream is ordered by events.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_same_parameters, make_config, run_distributed, train_single


pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for NCCL")


def _cuda_round_trip(rank, world_size, backend, slow_link=False):
    """``slow_link``: through an emulated link (the receiver holds each message, whose payload
    travels at once on the sender's stream) in bfloat16 (integers up to 256 are exact in it)."""
    from pipedni.transport.link import LinkSpec
    from pipedni.transport import Kind, Transport

    device = torch.device("cuda", rank % torch.cuda.device_count())
    wire = device if backend == "nccl" else torch.device("cpu")
    link, wire_dtype = (LinkSpec(latency_sec=0.02), torch.bfloat16) if slow_link else (LinkSpec(), None)
    t = Transport(rank, world_size, device, wire, timeout=60.0, link=link, wire_dtype=wire_dtype)
    if rank == 0:
        x = torch.arange(3_000_000, dtype=torch.float32, device=device).view(1000, -1)
        if slow_link:
            x = x % 64
        for mb in range(4):
            t.send("next", Kind.ACTIVATION, 0, mb, x + mb)
        got = [t.recv("next", Kind.GRADIENT, 0, mb) for mb in range(4)]
        ok = all(g.device == device and torch.equal(g, (x + mb) * 2) for mb, g in enumerate(got))
    else:
        for mb in reversed(range(4)):  # out of order on purpose
            y = t.recv("prev", Kind.ACTIVATION, 0, mb)
            ok = y.device == device
            t.send("prev", Kind.GRADIENT, 0, mb, y * 2)
    torch.cuda.synchronize()
    t.close()
    return bool(ok)


def test_cuda_tensors_through_gloo_host_staging():
    assert run_distributed(_cuda_round_trip, 2, "gloo") == [True, True]


@two_gpus
def test_cuda_tensors_through_nccl():
    assert run_distributed(_cuda_round_trip, 2, "nccl", backend="nccl") == [True, True]


def test_cuda_tensors_through_an_emulated_link_in_bfloat16():
    assert run_distributed(_cuda_round_trip, 2, "gloo", True) == [True, True]
    if torch.cuda.device_count() >= 2:
        assert run_distributed(_cuda_round_trip, 2, "nccl", True, backend="nccl") == [True, True]


def _train_on_gpu(rank, world_size, root, backend, cases=(("gpu", "1f1b", 4, ()),)):
    """Each case (run folder, schedule, microbatches, extra flags) on the GPU(s); the summaries."""
    from pathlib import Path

    from pipedni.engine import Trainer
    from pipedni.runtime import Runtime

    device = torch.device("cuda", rank % torch.cuda.device_count())
    runtime = Runtime(rank, world_size, rank, world_size, device, backend)
    summaries = []
    for folder, schedule, m, extra in cases:
        trainer = Trainer(make_config(Path(root) / folder, schedule, m, "--dist.device=cuda", *extra), runtime)
        summaries.append(trainer.fit())
        trainer.close()
    return summaries[0] if len(summaries) == 1 else summaries


def _check_against_single(tmp_path, backend):
    from pipedni.export import merge_checkpoints

    expected, _ = train_single(tmp_path / "single")  # CPU reference
    summaries = run_distributed(_train_on_gpu, 2, str(tmp_path), backend, backend=backend)
    # GPU kernels sum in another order than the CPU ones: compare at float32 noise level
    assert_same_parameters(merge_checkpoints(tmp_path / "gpu"), expected, f"{backend} on GPU", atol=1e-4)
    for stage in summaries[1]["stages"]:
        assert stage["peak_memory_bytes"] > 0  # torch.cuda.max_memory_allocated
        assert stage["gpu_memory_used_bytes"] > 0 and 0 <= stage["gpu_util_percent"] <= 100  # NVML


def test_two_stages_sharing_one_gpu_match_single(tmp_path):
    _check_against_single(tmp_path, "gloo")


@two_gpus
def test_two_stages_on_two_gpus_over_nccl_match_single(tmp_path):
    _check_against_single(tmp_path, "nccl")


GPU_STACK = [("bf16", "naive", 1, ("--train.precision=bf16",)),
             ("fp16", "naive", 1, ("--train.precision=fp16",)),
             ("bf16_1f1b", "1f1b", 4, ("--train.precision=bf16", "--train.activation_checkpointing=blocks")),
             ("compiled", "1f1b", 4, ("--train.precision=bf16", "--train.compile=true")),
             ("dni_bf16", "dni", 1, ("--train.precision=bf16",))]


def test_the_gpu_stack_on_one_gpu(tmp_path):
    """bf16 and fp16 autocast on CUDA equal one GPU process at the same precision (the same
    kernels, microbatch for microbatch); recomputing, compiled (inductor's GPU kernels) and dni
    stages train in bf16 and report their compile time."""
    from pathlib import Path

    from pipedni.engine import Trainer
    from pipedni.export import merge_checkpoints
    from pipedni.runtime import Runtime

    references = {}
    for precision in ("bf16", "fp16"):
        cfg = make_config(Path(tmp_path) / f"single-{precision}", "single", 1, "--dist.device=cuda",
                          f"--train.precision={precision}")
        references[precision] = Trainer(cfg, Runtime(0, 1, 0, 1, torch.device("cuda"), "none")).fit()
    summaries = run_distributed(_train_on_gpu, 2, str(tmp_path), "gloo", GPU_STACK, timeout=300)[-1]
    for precision in ("bf16", "fp16"):
        assert_same_parameters(merge_checkpoints(tmp_path / precision), merge_checkpoints(tmp_path / f"single-{precision}"),
                               f"{precision} on one GPU", atol=1e-5)
    for (name, *_), summary in zip(GPU_STACK, summaries):
        assert summary["precision"] == ("fp16" if name == "fp16" else "bf16"), name
        assert math.isfinite(summary["test_loss"]), name
    assert all(stage["compile_sec"] > 0 and stage["compiled"] for stage in summaries[3]["stages"])


def test_dni_boundary_and_tbptt_on_cuda():
    """pipedni.dni.Boundary on CUDA: the predictor lives on the GPU, the oracle check (a perfect
    predictor trains exactly as backprop) holds there, and truncated BPTT with a boundary runs."""
    import copy

    import torch.nn.functional as F
    from torch import nn

    from pipedni.data.copy_task import CopyStream, bits_loss
    from pipedni.dni import Boundary
    from pipedni.dni.tbptt import RecurrentNet, TruncatedBPTT

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    x, y = torch.randn(64, 10, device=cuda), torch.randint(0, 3, (64,), device=cuda)
    before, after = nn.Linear(10, 16).to(cuda), nn.Linear(16, 3).to(cuda)
    ref_before = copy.deepcopy(before)

    class Oracle(nn.Module):
        def forward(self, h, context):
            with torch.enable_grad():
                h = h.detach().requires_grad_(True)
                return torch.autograd.grad(F.cross_entropy(after(h), y), h)[0]

    boundary = Boundary((16,), predictor=Oracle(), normalize_target=False, device=cuda)
    F.cross_entropy(after(boundary(before(x))), y).backward()
    F.cross_entropy(after(ref_before(x)), y).backward()
    torch.testing.assert_close(before.weight.grad, ref_before.weight.grad)

    net = RecurrentNet(32, 8, inputs=9).to(cuda)
    sg = Boundary((net.state_features,), output_scale=0.1).to(cuda)
    run = TruncatedBPTT(net, bits_loss, boundary=sg)
    stream = CopyStream(8, 2, seed=0)
    for _ in range(5):
        inputs, targets = stream.window(3)
        run.step(inputs.to(cuda), targets.to(cuda))
    assert sg.num_fits == 5 and next(sg.predictor.parameters()).is_cuda
