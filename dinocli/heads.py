"""The DINO projection head (Caron et al. 2021, Sec. 3.1 and Appendix).

A 3-layer MLP (hidden 2048, GELU, optional BatchNorm) to a 256-d bottleneck, L2 normalisation, and
a weight-normalised linear layer to ``out_dim`` prototypes. State-dict keys match the reference
checkpoints: ``mlp.0/2/4`` (``mlp.0/1/3/4/6`` with BatchNorm), ``last_layer.weight_g/weight_v``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` (per output row), as ``weight_norm(dim=0)``.

    With ``fix_norm`` the norm ``g`` stays 1 (``--norm-last-layer``): no gradient flows to it.
    """

    def __init__(self, in_features: int, out_features: int, fix_norm: bool = True) -> None:
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=5**0.5)  # nn.Linear's default initialisation
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_norm)

    @property
    def weight(self) -> torch.Tensor:
        # The fused kernel behind torch.nn.utils.weight_norm: about 2x faster than the formula
        # written out with 65536 prototypes, and the same values.
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP projection, L2 normalisation and weight-normalised prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
