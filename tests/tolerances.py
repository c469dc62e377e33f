"""Numerical tolerances of the tests, derived from what they bound: float32 rounding over the operations involved.

Processes, ISA paths (AVX-512, or AVX2 with ATEN_CPU_CAPABILITY=avx2, DNNL_MAX_CPU_ISA=AVX2 and
MKL_ENABLE_INSTRUCTIONS=AVX2), batch sizes and fused kernels split and order the same float32 sums differently, so
two ways of computing one quantity agree only up to rounding. A bound on that rounding holds on any machine; one
machine's measured difference times a margin does not (1e-5 failed at 1.21e-5 on an AVX2-only machine).
"""
import math

import torch
from torch import nn

EPS32 = torch.finfo(torch.float32).eps  # 2^-23, the relative rounding of one float32 operation (1 ulp)


def rounding_tol(steps: int, terms: int) -> float:
    """Allowed max |a - b| / max |a| between two float32 results that differ only in summation order, after `steps`
    steps (training steps, layers, operations) each summing at most `terms` numbers.

    Summed in another order, `terms` float32 numbers change by about eps * sqrt(terms) of their magnitude (rounding
    errors as a random walk, Higham 2002, sec. 4.2), so each step moves the result by about that much of its scale;
    after `steps` steps the changes are at most their sum.
    """
    return EPS32 * math.sqrt(terms) * steps


def forward_tol(out: torch.Tensor, *nets: nn.Module, passes: int = 1) -> float:
    """Allowed max |a - b| between two float32 computations of `out` by `passes` forward passes through `nets` that
    differ only in summation order (another batch size, a fused kernel, another ISA path).

    Every convolution and linear layer is a step (their count bounds the depth of the longest path), each a sum of
    at most the largest fan-in of products; the scale is the largest magnitude of the output compared.
    """
    layers = [m for net in nets for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    terms = max(m.weight[0].numel() for m in layers)
    return rounding_tol(steps=passes * len(layers), terms=terms) * out.abs().max().item()
