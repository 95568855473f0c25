"""Sinusoid regression (Finn et al. 2017, 5.1): after a short meta-training, MAML's post-adaptation MSE at K=10 is
well below that of the same network pretrained on all tasks jointly and adapted the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.config import AlgorithmSpec, InnerLoopSpec, MLPSpec, SinusoidData
from metascale.data import build_task_source
from metascale.models import build_model

# A faster schedule than the paper's (inner lr 0.01, Adam 1e-3, 70k steps) so that it fits in a test.
STEPS, META_BATCH, EVAL_TASKS, OUTER_LR = 300, 10, 200, 5e-3


def _post_adaptation_mse(alg, params, adapt_steps: int) -> float:
    test = build_task_source(SinusoidData(), "test", 0).batch(0, range(EVAL_TASKS))
    with torch.no_grad():
        losses = [float(alg.task_objective(params, t, steps=adapt_steps).objective) for t in test.tasks()]
    return sum(losses) / len(losses)


def test_maml_beats_joint_pretraining_after_adaptation():
    inner = InnerLoopSpec(steps=1, lr=0.02)
    train = build_task_source(SinusoidData(), "train", 0)

    torch.manual_seed(0)
    model = build_model(MLPSpec(), 1)
    maml = build_algorithm(AlgorithmSpec(name="maml", inner=inner), model)
    meta = {k: v.detach().clone().requires_grad_() for k, v in maml.init(dict(model.named_parameters())).items()}
    opt = torch.optim.Adam(meta.values(), lr=OUTER_LR)
    for step in range(STEPS):
        mg = meta_gradient(maml, meta, train.batch(step, range(META_BATCH)))
        for k, p in meta.items():
            p.grad = mg.grads[k] / mg.tasks
        opt.step()

    torch.manual_seed(0)
    joint_model = build_model(MLPSpec(), 1)
    joint = {k: v.detach().clone().requires_grad_() for k, v in joint_model.named_parameters()}
    opt = torch.optim.Adam(joint.values(), lr=OUTER_LR)
    for step in range(STEPS):  # the same tasks and data, fitted jointly: one regression over all of them
        b = train.batch(step, range(META_BATCH))
        x = torch.cat([b.support_x, b.query_x], 1).flatten(0, 1)
        y = torch.cat([b.support_y, b.query_y], 1).flatten(0, 1)
        loss = F.mse_loss(maml.f(joint, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    maml_mse = _post_adaptation_mse(maml, meta, 10)
    joint_mse = _post_adaptation_mse(maml, joint, 10)
    assert maml_mse < 0.5 * joint_mse, (maml_mse, joint_mse)
