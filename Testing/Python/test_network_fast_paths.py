"""The inference fast paths compute what the plain layers compute.

The matrix-product 1x1x1 convolution, the FiLM folded into the group norm, the image projection
computed once per view and the skipped coarse heads are speed changes only: each is compared here
with the plain PyTorch form on random weights and inputs.
"""
import torch
import pytest
from torch import nn

from msdseg.model.network import ModelConfig, MultiscaleDiffUNet, PointwiseConv3d, ResBlock

pytestmark = pytest.mark.unit

TOL = dict(rtol=1e-4, atol=1e-5)


def _small_model(refine_depths: int = 1) -> MultiscaleDiffUNet:
    torch.manual_seed(0)
    cfg = ModelConfig(channels=(4, 8, 8, 16), image_channels_per_depth=(4, 8, 8, 16), refine_depths=refine_depths)
    model = MultiscaleDiffUNet(cfg).eval()
    for p in model.parameters():  # zero-initialised refining heads would hide a wrong path
        nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_convolution_equals_conv3d(batch):
    torch.manual_seed(1)
    fast = PointwiseConv3d(5, 7)
    plain = nn.Conv3d(5, 7, 1)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(batch, 5, 6, 4, 3)
    torch.testing.assert_close(fast(x), plain(x), **TOL)
    assert set(fast.state_dict()) == set(plain.state_dict())


def test_pointwise_convolution_follows_autocast():
    fast = PointwiseConv3d(5, 7)
    x = torch.randn(1, 5, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fast(x), rtol=5e-2, atol=5e-2)


def test_pointwise_convolution_takes_gradients_like_conv3d():
    torch.manual_seed(2)
    fast = PointwiseConv3d(3, 2)
    plain = nn.Conv3d(3, 2, 1)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 3, 3, 3)
    fast(x).square().sum().backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, **TOL)
    torch.testing.assert_close(fast.bias.grad, plain.bias.grad, **TOL)


def test_film_folded_into_the_norm_equals_the_batched_form():
    """A batch of one takes the folded path, a batch of two the plain one: same answers."""
    torch.manual_seed(3)
    block = ResBlock(8, 8, groups=4, time_dim=16).eval()
    nn.init.normal_(block.norm2.weight)
    nn.init.normal_(block.norm2.bias)
    x = torch.randn(1, 8, 5, 6, 4)
    temb = torch.randn(1, 16)
    single = block(x, temb)
    pair = block(torch.cat([x, torch.randn_like(x)]), torch.cat([temb, torch.randn_like(temb)]))
    torch.testing.assert_close(single[0], pair[0], **TOL)


@pytest.mark.parametrize("entry", [0, 1, 2])
@pytest.mark.parametrize("refine_depths", [0, 1, 2])
def test_fused_finest_only_denoiser_equals_the_full_one(entry, refine_depths):
    model = _small_model(refine_depths)
    n = 16
    image, coords = torch.randn(1, 1, n, n, n), torch.randn(1, 3, n, n, n)
    x_t, t = torch.randn(1, model.cfg.n_classes, n, n, n), torch.tensor([600])
    with torch.inference_mode():
        feats = model.encode_image(image, coords, entry)
        full = model.denoise(feats, x_t, t, entry)
        fast = model.denoise(model.fuse_image(feats, entry), x_t, t, entry, fused=True, finest_only=True)
    assert len(fast) == 1
    assert len(full) == model.cfg.depths - entry
    torch.testing.assert_close(fast[0], full[0], **TOL)


@pytest.mark.parametrize("steps", [1, 2, 4, 6])
def test_ddim_step_from_probabilities_equals_monais_step(steps):
    from msdseg.model.diffusion import ddim_step_from_probs, make_sampling_scheduler, to_signed

    sched = make_sampling_scheduler(steps)
    gen = torch.Generator().manual_seed(steps)
    for t_val in sched.timesteps:
        probs = torch.softmax(torch.randn(5, 4, 3, 2, generator=gen), dim=0)
        x_t = torch.randn(1, 5, 4, 3, 2, generator=gen)
        expected, _ = sched.step(to_signed(probs)[None], int(t_val), x_t.clone())
        torch.testing.assert_close(ddim_step_from_probs(sched, int(t_val), probs, x_t.clone()), expected, **TOL)


def test_normalised_entropy_matches_the_textbook_formula():
    from msdseg.model.diffusion import normalised_entropy

    probs = torch.softmax(torch.randn(7, 5, 5) * 4, dim=0)
    probs[:, 0, 0] = torch.nn.functional.one_hot(torch.tensor(2), 7).float()  # exact zeros
    p = probs.clamp_min(1e-12)
    expected = -(p * p.log()).sum(0, keepdim=True) / torch.log(torch.tensor(7.0))
    torch.testing.assert_close(normalised_entropy(probs), expected, rtol=1e-5, atol=1e-6)
    assert float(normalised_entropy(probs)[0, 0, 0]) == 0.0


def test_each_view_is_released_after_its_last_sample():
    """Balanced sampling has one sample per view: the first view (and its image features) must be
    gone before the second view is built."""
    import gc
    import weakref

    from msdseg.model.diffusion import ddim_sample

    class View:
        def __call__(self, x, t):
            return torch.softmax(x[0] * 0.1, dim=0)[None]

    first = View()
    alive = weakref.ref(first)
    seen_alive_in_second = []

    class Second(View):
        def __call__(self, x, t):
            gc.collect()
            seen_alive_in_second.append(alive() is not None)
            return super().__call__(x, t)

    views = [first, Second()]
    del first
    result = ddim_sample(views, (3, 4, 4, 4), steps=2, samples=2)
    assert seen_alive_in_second == [False, False]
    assert views == [None, None]
    assert result.variance is not None  # tracked unless asked not to


def test_the_mean_without_variance_equals_the_mean_with_it():
    from msdseg.model.diffusion import RunningEnsemble

    xs = [torch.rand(3, 5) for _ in range(5)]
    with_var, without = RunningEnsemble(), RunningEnsemble(track_variance=False)
    for x in xs:
        with_var.add(x)
        without.add(x)
    torch.testing.assert_close(without.result(1).mean, with_var.result(1).mean)
    assert without.result(1).variance is None


def test_the_residual_keeps_the_wider_dtype_under_autocast():
    """An fp32 input added to a bf16 convolution output stays fp32, as in the plain form."""
    block = ResBlock(8, 8, groups=4).eval()
    x = torch.randn(1, 8, 4, 4, 4)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.float32
