"""Host-to-device copies (ln_ray/score/transfer.py): on a CPU device nothing is copied (the GPU path
is in tests/equivalence/test_gpu.py)."""

from __future__ import annotations

import numpy as np
import torch

from ln_ray.score.transfer import to_device


def test_on_a_cpu_the_tensor_shares_the_array_memory():
    data = np.arange(6, dtype=np.int64)
    tensor = to_device(data, torch.device("cpu"))
    data[0] = 42
    assert tensor[0].item() == 42 and tensor.dtype == torch.int64


def test_lists_and_tensors_keep_their_values_and_dtype():
    assert to_device([0, 3, 7], torch.device("cpu")).tolist() == [0, 3, 7]
    positions = torch.arange(5, dtype=torch.int32)
    assert to_device(positions, torch.device("cpu")) is positions
