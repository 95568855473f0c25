"""LITE's gradient estimate (single process, plain torch): exact with H = N, unbiased with H < N.

Tolerances (float32): H = N equals the full gradient to rtol 1e-5 / atol 1e-7; the mean over all C(6, 2) = 15
subsets equals it to rtol 1e-4 / atol 1e-6 (unbiasedness, exactly); the mean of 300 random draws is within 3
standard errors of it (the L2 distance, against sqrt(E||g_draw - g||^2 / 300)).
"""

from __future__ import annotations

import itertools

import torch

from metascale.config import ViTSpec
from metascale.models.vit import ViT
from metascale.sharding.first_order import per_example_loss
from metascale.sharding.lite import lite_outputs, lite_subset

N, H = 6, 2


def setup():
    torch.manual_seed(0)
    model = ViT(ViTSpec(dim=16, depth=1, heads=2), 3)
    x, y = torch.randn(N, 1, 28, 28), torch.arange(N) % 3
    return model, x, y


def grad(model, loss) -> torch.Tensor:
    gs = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in gs])


def lite_grad(model, x, y, mask) -> torch.Tensor:
    out = lite_outputs(model, x, mask, N / int(mask.sum()))
    return grad(model, per_example_loss(out, y).mean())


def test_whole_support_equals_full_gradient():
    model, x, y = setup()
    full = grad(model, per_example_loss(model(x), y).mean())
    torch.testing.assert_close(lite_grad(model, x, y, torch.ones(N, dtype=torch.bool)), full, rtol=1e-5, atol=1e-7)


def test_value_unchanged_and_mean_over_subsets_is_the_full_gradient():
    model, x, y = setup()
    full = grad(model, per_example_loss(model(x), y).mean())
    masks = []
    for subset in itertools.combinations(range(N), H):
        mask = torch.zeros(N, dtype=torch.bool)
        mask[list(subset)] = True
        masks.append(mask)
    with torch.no_grad():
        torch.testing.assert_close(lite_outputs(model, x, masks[0], N / H), model(x))
    exact = torch.stack([lite_grad(model, x, y, m) for m in masks]).mean(0)
    torch.testing.assert_close(exact, full, rtol=1e-4, atol=1e-6)
    one = lite_grad(model, x, y, masks[0])
    assert (one - full).norm() > 0.1 * full.norm()  # a single draw is a noisy estimate, not the full gradient


def test_random_draws_average_to_the_full_gradient():
    model, x, y = setup()
    full = grad(model, per_example_loss(model(x), y).mean())
    gen = torch.Generator().manual_seed(1)
    draws = [lite_subset(N, H, gen) for _ in range(300)]
    assert all(int(m.sum()) == H for m in draws)
    grads = torch.stack([lite_grad(model, x, y, m) for m in draws])
    standard_error = ((grads - full).norm(dim=1).pow(2).mean() / len(draws)).sqrt()
    assert (grads.mean(0) - full).norm() < 3 * standard_error
