"""The chunked paths for large CPU tensors give bitwise the plain updates (sign; elastic net)."""

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


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("l1, l2", [(0.3, 0.0), (0.0, 0.7), (0.3, 0.7)], ids=["l1", "l2", "both"])
def test_large_tensor_elastic_update_is_bitwise_the_two_plain_ones(l1, l2, scaled):
    n = (_ops._LARGE // 4) + 54321
    g = torch.Generator().manual_seed(1)
    p = torch.randn(n, generator=g)
    p[::5] = 0.0
    grad = torch.randn(n, generator=g)
    scale = torch.tensor(512.0) if scaled else None
    expected = grad.clone()
    if l2:
        _ops.add_scaled_(expected, p, l2, scale)
    if l1:
        _ops.add_scaled_(expected, torch.sgn(p), l1, scale)
    _ops.add_elastic_(grad, p, l1, l2, scale)
    assert torch.equal(grad, expected)
