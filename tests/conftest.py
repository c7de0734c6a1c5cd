"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def fused_attention_calls(monkeypatch) -> list[bool]:
    """Count calls of PyTorch's fused attention kernel: one entry per call, True when grad was enabled
    (a training forward), False otherwise (evaluation). The kernel itself still runs."""
    kernel = torch.nn.functional.scaled_dot_product_attention
    calls: list[bool] = []

    def counted(*args, **kwargs) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls
