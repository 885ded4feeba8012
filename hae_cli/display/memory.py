"""How much memory this process holds: on the GPU (NVML, and torch's allocator) and on the host,
now and at its peak.

The panel shows it next to the KV bytes so a user can see that eviction frees real memory. The
figures are the whole process's (the model, the images as they are decoded and resized, the
cache), and "now" is when the snapshot is taken: a large image can peak far above it while it
is read, so the peak is shown too (the host's from the kernel's own count, `ru_maxrss`).
NVML is optional: with no NVIDIA driver (a CPU machine, a container without the library)
the probe reports host memory only and says why, instead of failing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import psutil


NO_GPU = "none"  # the note when this machine has no NVIDIA GPU to read
# NVML's errors that mean there is no NVIDIA GPU here at all (a CPU machine), not a failure.
NO_GPU_ERRORS = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")


@dataclass(frozen=True)
class MemorySnapshot:
    host_rss_bytes: int  # this process's resident memory now
    gpu_process_bytes: int | None = None  # this process, summed over GPUs (NVML)
    torch_allocated_bytes: int | None = None  # torch.cuda.memory_allocated()
    gpu_note: str | None = None  # why there is no GPU reading
    host_peak_rss_bytes: int | None = None  # the most this process has held since it started
    torch_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated()

    @property
    def has_gpu(self) -> bool:
        return self.gpu_process_bytes is not None or self.torch_allocated_bytes is not None


class MemoryProbe:
    """Takes `MemorySnapshot`s. NVML is initialised once; any NVML failure disables it quietly."""

    def __init__(self) -> None:
        self._process = psutil.Process(os.getpid())
        self._pid = os.getpid()
        self._nvml = None
        self._handles: list = []
        self.gpu_note: str | None = None
        try:
            import pynvml
        except ImportError:
            self.gpu_note = "NVML unavailable (nvidia-ml-py not installed)"
            return
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError as error:
            no_gpu = tuple(getattr(pynvml, name, ()) for name in NO_GPU_ERRORS)
            self.gpu_note = NO_GPU if no_gpu and isinstance(error, no_gpu) else f"NVML unavailable ({error})"
            return
        if not self._handles:
            self.gpu_note = NO_GPU
            return
        self._nvml = pynvml

    def snapshot(self) -> MemorySnapshot:
        rss = self._process.memory_info().rss
        peak = _host_peak_bytes()
        return MemorySnapshot(
            host_rss_bytes=rss,
            gpu_process_bytes=self._gpu_process_bytes(),
            torch_allocated_bytes=_torch_allocated_bytes(),
            gpu_note=self.gpu_note,
            host_peak_rss_bytes=max(peak, rss) if peak is not None else None,
            torch_peak_bytes=_torch_allocated_bytes(peak=True),
        )

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None

    def __enter__(self) -> MemoryProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _gpu_process_bytes(self) -> int | None:
        if self._nvml is None:
            return None
        total, seen = 0, False
        try:
            for handle in self._handles:
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == self._pid and proc.usedGpuMemory is not None:
                        total += proc.usedGpuMemory
                        seen = True
        except self._nvml.NVMLError as error:
            self.gpu_note = f"NVML query failed ({error})"
            self.close()
            return None
        return total if seen else 0


def _host_peak_bytes() -> int | None:
    """The process's peak resident memory (`ru_maxrss`: kilobytes on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _torch_allocated_bytes(peak: bool = False) -> int | None:
    # Only if torch is already imported: probing must not pull torch into a process that has no model.
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        return int(torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated())
    except Exception:  # a broken CUDA setup must not break the display
        return None
