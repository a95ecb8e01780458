"""White-box tests of meta-training's batched pass (`MetaNet.batched_episode_loss`): a step over B
episodes has the gradient of the mean of their single steps, for every parameter, even and uneven
shots alike; its bf16 and compiled variants; the representation loss's head with the authors' ReLU
(`MetaNetConfig.aux_relu`) and the paper's preset.

Tolerance of the equivalence: the batched pass sums the same terms in another order (one vmap over
every episode's examples, m and d over every episode's coordinates, grouped and batched matmuls), so
in float32 its gradients differ from the single steps' mean by rounding alone. Each parameter's
gradient is held to rtol 1e-4 with an atol of 1e-4 of that gradient's largest entry: near-zero
entries are sums with cancellation, whose rounding is relative to the tensor's scale, not to their
own (d's gradients are ~1e-6 in all, so a fixed atol of 1e-6 would test nothing there). Measured:
at most ~2e-5 of a tensor's scale. In float64 the same comparison holds to 1e-9, which shows that
the difference is rounding, not algebra.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import MetaNet, MetaNetConfig
from model.checkpoint import load_model, save_weights
from model.config import PRESETS, TrainConfig
from model.data import Episode, EpisodeSampler
from model.layers import conv_trunk, conv_trunk_per_task
from model.metanet import _mask_classes, read_batched
from tests.model.conftest import TINY

SHAPES = {"3-way 2-shot": 2, "uneven 2,1,3 shots": [2, 1, 3]}


def _episodes(split, shots, n: int, seed: int = 0) -> list[Episode]:
    sampler = EpisodeSampler(split, rotate=True)
    rng = np.random.default_rng(seed)
    return [sampler.sample(rng, 3, shots, 2) for _ in range(n)]


def _stacked(episodes: list[Episode], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    def stack(name: str) -> torch.Tensor:
        t = torch.stack([getattr(ep, name) for ep in episodes])
        return t.to(dtype) if t.is_floating_point() else t

    return stack("support_x"), stack("support_y"), stack("query_x"), stack("query_y")


def _gradients(model: MetaNet, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shots", SHAPES.values(), ids=SHAPES.keys())
def test_a_batched_steps_gradient_is_the_mean_of_its_episodes_single_gradients(tiny_split, shots, dtype):
    torch.manual_seed(0)
    model = MetaNet(TINY).to(dtype).train()
    episodes = _episodes(tiny_split, shots, 3)
    # The batched pass draws each episode's chunking in turn from one generator, as a run of single
    # steps sharing that generator would.
    singles, single_losses = [], []
    rng = np.random.default_rng(7)
    for ep in episodes:
        x, q = ep.support_x.to(dtype), ep.query_x.to(dtype)
        loss, _ = model.episode_loss(x, ep.support_y, q, ep.query_y, 3, rng)
        single_losses.append(loss.item())
        singles.append(_gradients(model, loss))
    losses, correct = model.batched_episode_loss(*_stacked(episodes, dtype), 3, np.random.default_rng(7))
    batched = _gradients(model, losses.mean())

    assert losses.shape == correct.shape == (3,)
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(losses.detach().numpy(), single_losses, rtol=rtol)
    for (name, _), got, per_episode in zip(model.named_parameters(), batched, zip(*singles, strict=True),
                                           strict=True):
        want = torch.stack(per_episode).mean(0)
        assert want.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item(), msg=name)


def test_the_per_task_trunk_is_each_tasks_own_trunk():
    torch.manual_seed(0)
    model = MetaNet(TINY)
    x = torch.rand(3, 4, 1, 28, 28)
    fast = [torch.randn(3, *w.shape) * 0.1 for w in model.u_convs]
    with torch.no_grad():
        got = conv_trunk_per_task(x, list(model.u_convs), fast)
        want = torch.stack([conv_trunk(x[b], list(model.u_convs), [f[b] for f in fast]) for b in range(3)])
    assert got.shape == (3, 4, TINY.channels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_batch_of_one_episode_gives_episode_loss_numbers(tiny_split):
    torch.manual_seed(0)
    model = MetaNet(TINY).train()
    [ep] = _episodes(tiny_split, [1, 3, 2], 1, seed=3)
    loss, correct = model.episode_loss(ep.support_x, ep.support_y, ep.query_x, ep.query_y, 3,
                                       np.random.default_rng(5))
    losses, corrects = model.batched_episode_loss(*_stacked([ep], torch.float32), 3, np.random.default_rng(5))
    torch.testing.assert_close(losses[0], loss, rtol=1e-5, atol=0)
    assert int(corrects[0]) == int(correct)


def test_bf16_keeps_the_loss_close_and_every_gradient_finite(tiny_split):
    torch.manual_seed(0)
    model = MetaNet(TINY).train()
    inputs = _stacked(_episodes(tiny_split, [2, 1, 3], 2), torch.float32)
    exact, _ = model.batched_episode_loss(*inputs, 3, np.random.default_rng(1))
    approx, _ = model.batched_episode_loss(*inputs, 3, np.random.default_rng(1), bf16=True)
    torch.testing.assert_close(approx, exact, rtol=0.03, atol=0)  # bf16 keeps 8 bits of mantissa
    grads = _gradients(model, approx.mean())
    assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads)
    assert all(g.abs().max() > 0 for g in grads)


@pytest.mark.slow
# torch's compiler warns on its own account (its tracer reads `.grad` of the non-leaf inputs Q* and
# M; inductor touches torch.jit's deprecated API): pytest's warnings-as-errors would make those
# failures of the compile.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning",
                            "ignore::DeprecationWarning")
def test_the_compiled_query_read_has_no_graph_break_and_the_eager_numbers(tiny_split):
    torch.manual_seed(0)
    model = MetaNet(TINY).train()
    inputs = _stacked(_episodes(tiny_split, [2, 1, 3], 2), torch.float32)
    eager, _ = model.batched_episode_loss(*inputs, 3, np.random.default_rng(1))
    eager_grads = _gradients(model, eager.mean())
    torch._dynamo.reset()
    read = torch.compile(read_batched, fullgraph=True)  # a graph break raises
    compiled, _ = model.batched_episode_loss(*inputs, 3, np.random.default_rng(1), read=read)
    compiled_grads = _gradients(model, compiled.mean())
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    torch._dynamo.reset()


# ------------------------------------------------------------------ the representation loss's head


def _u_gradient_by_hand(model: MetaNet, x: torch.Tensor, y: int, n_way: int, relu: bool) -> torch.Tensor:
    """u's representation-loss gradient for one example, written out with autograd."""
    q = [p.detach().clone().requires_grad_() for p in model.u_path_params()]
    h = x[None]
    for w in q[:-1]:
        h = F.max_pool2d(F.relu(F.conv2d(h, w, padding=1)), 2, ceil_mode=True)
    r = h.flatten(1) @ q[-1].T
    logits = _mask_classes((F.relu(r) if relu else r) @ model.u_aux.T, n_way)
    F.cross_entropy(logits, torch.tensor([y])).backward()
    return torch.cat([p.grad.flatten() for p in q])


@pytest.mark.parametrize("aux_relu", [False, True])
def test_the_representation_loss_head_applies_a_relu_only_with_aux_relu(tiny_split, aux_relu):
    torch.manual_seed(0)
    model = MetaNet(MetaNetConfig(**{**TINY.to_dict(), "aux_relu": aux_relu}))
    [ep] = _episodes(tiny_split, 1, 1)
    grads_u, _ = model._per_example_grads(ep.support_x, ep.support_y, 3)
    for i in range(3):
        want = _u_gradient_by_hand(model, ep.support_x[i], int(ep.support_y[i]), 3, relu=aux_relu)
        other = _u_gradient_by_hand(model, ep.support_x[i], int(ep.support_y[i]), 3, relu=not aux_relu)
        # float32 sums in another order: an absolute slack of 1e-5 of the gradient's largest entry
        torch.testing.assert_close(grads_u[i], want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        assert not torch.allclose(grads_u[i], other, rtol=1e-3, atol=1e-7)


def test_a_checkpoint_saved_without_aux_relu_loads_without_it(tmp_path, model):
    save_weights(model, tmp_path / "w")
    meta = json.loads((tmp_path / "w" / "config.json").read_text())
    del meta["model"]["aux_relu"]  # as every checkpoint saved before the flag existed
    (tmp_path / "w" / "config.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "w").config.aux_relu is False
    with pytest.raises(ValueError, match="aux_relu must be true or false"):
        MetaNetConfig(aux_relu=1)  # type: ignore[arg-type]


def test_the_paper_preset_is_the_authors_recipe_with_their_head():
    cfg = PRESETS["paper"]
    assert (cfg.lr, cfg.lr_patience, cfg.grad_clip, cfg.betas) == (1e-3, 0, 10.0, (0.9, 0.999))
    assert cfg.query_per_class == 10 and cfg.multi_shot_prob < 0.5 and cfg.model.aux_relu
    assert cfg.episodes_per_step == 1  # how many episodes a step is a choice of the machine, not the recipe
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
