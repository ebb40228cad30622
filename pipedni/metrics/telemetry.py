"""GPU telemetry from NVML (utilisation, device memory); a null object on CPU stages."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class NullTelemetry:
    """CPU stages, or no NVML: samples nothing, reports nothing."""

    def sample(self) -> None:
        pass

    def summary(self) -> dict:
        return {}


class NvmlTelemetry(NullTelemetry):
    """Samples the stage's GPU through NVML (the driver's view: all processes on that GPU)."""

    def __init__(self, pynvml, handle):
        self.nvml, self.handle = pynvml, handle
        self.util_samples: list[int] = []
        self.peak_used = 0

    def sample(self) -> None:
        self.util_samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        self.peak_used = max(self.peak_used, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def summary(self) -> dict:
        if not self.util_samples:
            return {}
        return {"gpu_util_percent": sum(self.util_samples) / len(self.util_samples),
                "gpu_memory_used_bytes": int(self.peak_used)}


def make_telemetry(device: torch.device) -> NullTelemetry:
    if device.type != "cuda":
        return NullTelemetry()
    try:
        import pynvml

        pynvml.nvmlInit()
        # NVML numbers GPUs physically; torch's index is relative to CUDA_VISIBLE_DEVICES.
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        return NvmlTelemetry(pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid))
    except Exception as err:  # no driver library, MIG, old driver: run on without telemetry
        log.warning("NVML telemetry off for %s: %s", device, err)
        return NullTelemetry()
