"""The survey's other meta-representations and meta-optimisers against independent computations: iMAML against the
closed-form implicit gradient, learned hyperparameters and the learned loss against finite differences (float64)."""

from __future__ import annotations

import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.algorithms.imaml import conjugate_gradient, line_search_descent
from metascale.config import AlgorithmSpec, IMAMLSpec, InnerLoopSpec, MLPSpec, SinusoidData, SyntheticImagesData
from metascale.config import Conv4Spec
from metascale.data import build_task_source
from metascale.data.tasks import Task, TaskBatch
from metascale.models import build_model


def _setup(name, model_spec, out, **kw):
    torch.manual_seed(0)
    model = build_model(model_spec, out).double()
    alg = build_algorithm(AlgorithmSpec(name=name, **kw), model)
    return alg, alg.init(dict(model.named_parameters()))


def _fd_rel_error(alg, meta, batch: TaskBatch, names, eps=1e-6):
    """||autograd - central finite differences|| / ||FD|| over every coordinate of the named meta-parameters."""
    grads = meta_gradient(alg, meta, batch).grads

    def objective(p):
        with torch.no_grad():
            return sum(float(alg.task_objective(p, t).objective) for t in batch.tasks())

    fds, ans = [], []
    for name in names:
        for i in range(meta[name].numel()):
            plus = {k: v.detach().clone() for k, v in meta.items()}
            minus = {k: v.detach().clone() for k, v in meta.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            fds.append((objective(plus) - objective(minus)) / (2 * eps))
            ans.append(float(grads[name].view(-1)[i]))
    fd, an = torch.tensor(fds), torch.tensor(ans)
    assert fd.norm() > 1e-4, "the check is only meaningful on a non-trivial gradient"
    return float((fd - an).norm() / fd.norm())


def test_conjugate_gradient_solves_a_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a, b = m @ m.T + torch.eye(6, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=6)["x"]
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-10)


def test_conjugate_gradient_stops_at_non_positive_curvature():
    """An indefinite A (an inner loop short of its minimum): CG keeps its last iterate instead of dividing by p.Ap <= 0,
    which here would flip the second step's sign (diag(3, 1, -1)) or divide by zero (diag(1, -1))."""
    b = torch.ones(3, dtype=torch.float64)
    a = torch.diag(torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64))
    x = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=3)["x"]
    assert torch.equal(x, b)  # the first step (alpha = b.b / b.Ab = 1); the second direction has p.Ap < 0
    flat = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    x = conjugate_gradient(lambda v: {"x": flat @ v["x"]}, {"x": torch.ones(2, dtype=torch.float64)}, steps=2)["x"]
    assert torch.equal(x, torch.ones(2, dtype=torch.float64))  # b itself: no step has positive curvature


def test_line_search_descent_reaches_the_minimum_from_a_step_fixed_steps_diverge_with():
    """A quadratic with curvatures 1..10: fixed steps of 1.0 diverge (|1 - 10| > 1), backtracking converges."""
    curv = torch.linspace(1, 10, 5, dtype=torch.float64)
    loss = lambda p: 0.5 * (curv * (p["x"] - 3) ** 2).sum()  # noqa: E731
    start = {"x": torch.zeros(5, dtype=torch.float64)}
    x = line_search_descent(loss, start, steps=60, lr=1.0)["x"]
    assert torch.allclose(x, torch.full_like(x, 3.0), atol=1e-6), x
    fixed = start["x"]
    for _ in range(60):
        fixed = fixed - 1.0 * curv * (fixed - 3)
    assert fixed.abs().max() > 1e6


def _linear_regression_implicit_gradient(damping, inner=InnerLoopSpec(steps=150, lr=0.1), solver="gd"):
    """iMAML's meta-gradient and the closed form for linear regression, where L_s is quadratic: phi*(theta) =
    (H + reg I)^-1 (reg theta + c), and the damped system's solution is (I + (H + damping I)/reg)^-1 grad L_q(phi*)."""
    reg = 2.0
    alg, meta = _setup(
        "imaml",
        MLPSpec(in_features=3, hidden=[]),
        1,
        inner=inner,
        imaml=IMAMLSpec(reg=reg, cg_steps=4, damping=damping, solver=solver),
    )
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    task = Task(
        sx, torch.randn(8, 1, generator=g, dtype=torch.float64), qx, torch.randn(6, 1, generator=g, dtype=torch.float64)
    )
    got = meta_gradient(alg, meta, TaskBatch.stack([task])).grads

    theta = torch.cat([meta["head.weight"].view(-1), meta["head.bias"]]).detach().requires_grad_(True)
    xs = torch.cat([sx, torch.ones(8, 1, dtype=torch.float64)], 1)
    xq = torch.cat([qx, torch.ones(6, 1, dtype=torch.float64)], 1)
    hess = 2 * xs.T @ xs / 8  # of mean squared error
    phi = torch.linalg.solve(
        hess + reg * torch.eye(4, dtype=torch.float64), reg * theta + 2 * xs.T @ task.support_y[:, 0] / 8
    )
    query = ((xq @ phi - task.query_y[:, 0]) ** 2).mean()
    (gq,) = torch.autograd.grad(query, phi, retain_graph=True)
    (exact,) = torch.autograd.grad(query, theta)  # = (I + H/reg)^-1 grad L_q(phi*)
    eye = torch.eye(4, dtype=torch.float64)
    damped = torch.linalg.solve(eye + (hess + damping * eye) / reg, gq)
    return torch.cat([got["head.weight"].view(-1), got["head.bias"]]), exact, damped


def test_imaml_meta_gradient_equals_the_closed_form_implicit_gradient():
    """Undamped, autograd through the closed-form solve is the exact implicit meta-gradient (CG exact in d steps)."""
    ours, exact, _ = _linear_regression_implicit_gradient(0.0)
    assert torch.allclose(ours, exact, rtol=1e-7, atol=1e-9), (ours, exact)


def test_imaml_line_search_solver_reaches_the_implicit_gradient_from_an_unstable_step():
    """inner.lr 5 is past fixed-step GD's stability limit here (the proximal Hessian's top eigenvalue is > 0.4), so
    only the backtracking solver reaches phi* and the exact implicit gradient in 60 steps."""
    ours, exact, _ = _linear_regression_implicit_gradient(0.0, InnerLoopSpec(steps=60, lr=5.0), "line_search")
    assert torch.allclose(ours, exact, rtol=1e-7, atol=1e-9), (ours, exact)
    fixed, _, _ = _linear_regression_implicit_gradient(0.0, InnerLoopSpec(steps=60, lr=5.0), "gd")
    assert not torch.isfinite(fixed).all() or not torch.allclose(fixed, exact, rtol=1e-2)


def test_imaml_solves_the_damped_system_by_default():
    ours, exact, damped = _linear_regression_implicit_gradient(IMAMLSpec().damping)
    assert IMAMLSpec().damping > 0
    assert torch.allclose(ours, damped, rtol=1e-7, atol=1e-9), (ours, damped)
    assert not torch.allclose(ours, exact, rtol=1e-2)


def test_imaml_runs_on_conv4_and_differs_from_its_first_order_direction():
    spec = SyntheticImagesData(ways=3, shots=1, queries=2, image_size=28, classes=20)
    batch = build_task_source(spec, "train", 0).batch(0, range(2)).to("cpu", torch.float64)
    alg, meta = _setup("imaml", Conv4Spec(hidden=8), 3, inner=InnerLoopSpec(steps=3, lr=0.1))
    full = meta_gradient(alg, meta, batch).grads
    alg1, _ = _setup("imaml", Conv4Spec(hidden=8), 3, inner=InnerLoopSpec(steps=3, lr=0.1), imaml=IMAMLSpec(cg_steps=1))
    first = meta_gradient(alg1, meta, batch).grads  # one CG step from 0 is a scaled query gradient
    assert all(torch.isfinite(g).all() for g in full.values())
    assert any(not torch.allclose(full[k], first[k]) for k in full)


def test_learned_learning_rates_and_decays_hypergradients_match_finite_differences(float64):
    batch = build_task_source(SinusoidData(), "train", 0).batch(0, range(3)).to("cpu", torch.float64)
    alg, meta = _setup("learned_hparams", MLPSpec(hidden=[8, 8]), 1, inner=InnerLoopSpec(steps=3, lr=0.02))
    meta = {k: (v + 0.01 if k.startswith("hparams.wd.") else v) for k, v in meta.items()}  # a non-zero decay
    hparams = [k for k in meta if k.startswith("hparams.")]
    assert len(hparams) == 6  # lr and wd for each of the 3 layers
    assert _fd_rel_error(alg, meta, batch, hparams) < 1e-6


def test_learned_loss_starts_as_maml_and_its_meta_gradient_matches_finite_differences(float64):
    batch = build_task_source(SinusoidData(), "train", 0).batch(0, range(2)).to("cpu", torch.float64)
    alg, meta = _setup("learned_loss", MLPSpec(hidden=[8]), 1, inner=InnerLoopSpec(steps=2, lr=0.02))
    maml, _ = _setup("maml", MLPSpec(hidden=[8]), 1, inner=InnerLoopSpec(steps=2, lr=0.02))
    task = batch[0]
    weights = alg.model_params(meta)
    assert torch.allclose(alg.task_objective(meta, task).objective, maml.task_objective(weights, task).objective)
    meta = {k: (v + 0.05 if k == "loss_net.w2" else v) for k, v in meta.items()}  # away from the zero init
    assert _fd_rel_error(alg, meta, batch, ["loss_net.w2", "loss_net.b1"]) < 1e-6
