"""Host-to-device copies that do not make the host wait for the GPU.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory synchronizes: the host waits
until the GPU has finished everything queued so far, then copies. Once per pack, that would
leave the GPU idle while the host builds the next pack. Staged through pinned memory the copy is
queued behind the GPU's work instead, and the host goes on building the next pack.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(data: np.ndarray | torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    """``data`` as a tensor on ``device``, copied without waiting for queued GPU work.

    On a CPU device the tensor shares ``data``'s memory where it can (no copy).
    """
    tensor = torch.as_tensor(data)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
