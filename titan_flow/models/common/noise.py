"""The initial latent noise every Policy draws, the way diffusers' `randn_tensor` draws it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gaussian_noise(
    n: int,
    shape: tuple[int, ...],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device,
) -> torch.Tensor:
    """N(0, I) of shape (n, *shape) in fp32, drawn on the generator's device, then moved to `device`.

    With one generator per sample, sample i is drawn alone from generator i (a group sharing a
    seed shares its noise), as diffusers does for a list of generators.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"initial_noise: got {len(generator)} generators for {n} samples; pass one per sample")
        noise = torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in generator])
    else:
        noise = torch.randn((n, *shape), generator=generator, device=generator.device if generator is not None else device)
    return noise.to(device)
