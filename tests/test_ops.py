"""The chunked sign path for large CPU tensors gives bitwise the plain ``grad + coef * sgn(p)``."""

import pytest
import torch

from torchreg import _ops


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
def test_large_tensor_sign_update_is_bitwise_the_plain_one(scaled):
    n = (_ops._LARGE // 4) + 12345  # just over the threshold, not a multiple of the chunk
    g = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=g)
    p[::7] = 0.0  # sgn(0) = 0
    grad = torch.randn(n, generator=g)
    scale = torch.tensor(1024.0) if scaled else None
    expected = grad.clone()
    _ops.add_scaled_(expected, torch.sgn(p), 0.3, scale)
    _ops.add_sign_(grad, p, 0.3, scale)
    assert torch.equal(grad, expected)
