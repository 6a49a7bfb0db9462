"""How a scoring failure is sorted: out of memory, a device error that poisons the process, or
anything else (``pipeline/score_stage.ScoreStage`` retries, restarts or rejects accordingly)."""

from __future__ import annotations

import torch

# Errors after which a CUDA context is unusable: every later call in the process fails the same way.
_DEVICE_FATAL = (
    "cuda error",
    "cublas_status",
    "cudnn_status",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "misaligned address",
    "ecc error",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device (or the host) running out of memory."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    message = str(exc).lower()
    return "out of memory" in message or "not enough memory" in message


def is_device_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the device unusable for the rest of the process (memory aside:
    running out of it leaves the device usable)."""
    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    message = str(exc).lower()
    return any(marker in message for marker in _DEVICE_FATAL)
