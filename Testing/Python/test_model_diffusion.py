"""Network shapes per depth, scheduler alignment, memory of the ensemble, and an overfit run."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from msdseg.model.diffusion import RunningEnsemble, ddim_sample, make_sampling_scheduler, suf_weight
from msdseg.core.geometry import ModelGrid
from msdseg.model.network import ModelConfig, MultiscaleDiffUNet, count_parameters
from msdseg.training.synth import TrainingSample
from msdseg.training.trainer import TrainConfig, Trainer, TrainMode

pytestmark = pytest.mark.unit


def test_default_model_is_small_enough_for_cpu():
    assert count_parameters(MultiscaleDiffUNet(ModelConfig())) < 10_000_000


@pytest.mark.parametrize("entry", [0, 1, 2, 3])
def test_every_depth_has_an_entry_and_a_head(entry):
    cfg = ModelConfig(channels=(4, 8, 8, 8), image_channels_per_depth=(4, 4, 8, 8))
    model = MultiscaleDiffUNet(cfg)
    n = 16
    img = torch.randn(1, 1, n, n, n)
    xt = torch.randn(1, cfg.n_classes, n, n, n)
    out = model(img, xt, torch.tensor([10]), entry=entry, coords=torch.randn(1, 3, n, n, n))
    assert len(out) == cfg.depths - entry
    for i, o in enumerate(out):
        assert o.shape == (1, cfg.n_classes, n >> i, n >> i, n >> i)


def test_ddim_timesteps_land_on_each_other_and_end_at_x0():
    for steps in (1, 2, 3, 4, 7):
        s = make_sampling_scheduler(steps)
        stride = 1000 // steps
        t = s.timesteps.tolist()
        assert all(a - b == stride for a, b in zip(t, t[1:]))
        assert t[-1] - stride == -1  # the last step goes to alpha = 1 (x0)


def test_sampling_is_seeded_and_deterministic():
    def denoise(x, t):
        return torch.softmax(x * 0.5, dim=1)

    a = ddim_sample(denoise, (3, 4, 4, 4), steps=3, samples=2, seed=5)
    b = ddim_sample(denoise, (3, 4, 4, 4), steps=3, samples=2, seed=5)
    c = ddim_sample(denoise, (3, 4, 4, 4), steps=3, samples=2, seed=6)
    assert torch.equal(a.mean, b.mean) and not torch.equal(a.mean, c.mean)
    assert torch.allclose(a.mean.sum(0), torch.ones(4, 4, 4), atol=1e-5)
    assert a.entropy.min() >= 0 and a.entropy.max() <= 1 + 1e-6


def test_running_ensemble_matches_batch_statistics():
    xs = [torch.rand(3, 5) for _ in range(6)]
    ens = RunningEnsemble()
    for x in xs:
        ens.add(x)
    stack = torch.stack(xs)
    res = ens.result(1)
    assert torch.allclose(res.mean, stack.mean(0), atol=1e-6)
    assert torch.allclose(res.variance[0], stack.var(0, unbiased=True).mean(0), atol=1e-6)


def test_suf_weights_favour_late_and_certain_steps():
    sure = torch.tensor([0.98, 0.01, 0.01]).view(3, 1)
    unsure = torch.full((3, 1), 1 / 3)
    assert suf_weight(0, 4, sure) > suf_weight(0, 4, unsure)
    assert suf_weight(3, 4, sure) > suf_weight(0, 4, sure)


_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from msdseg.model.diffusion import ddim_sample
    torch.set_num_threads(1)
    samples = int(sys.argv[1])
    def denoise(x, t):
        return torch.softmax(x, dim=1)
    ddim_sample(denoise, (33, 48, 48, 48), steps=2, samples=samples, seed=0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


@pytest.mark.slow
def test_sampling_memory_does_not_grow_with_sample_count():
    def peak_kb(samples: int) -> int:
        # mmap every large block so freed tensors leave the resident set (glibc otherwise keeps
        # fragmented arenas and the peak says more about the allocator than about the sampler)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(samples)], capture_output=True, text=True,
                             check=True, env=env)
        return int(out.stdout.strip().splitlines()[-1])

    # From the second sample on, the running mean/variance and their temporaries are allocated;
    # more samples must not add anything (a stacked ensemble would add one volume per sample).
    one_volume_kb = 33 * 48**3 * 4 / 1024  # one (C, X, Y, Z) float32 tensor
    p2, p8 = peak_kb(2), peak_kb(12)
    assert p8 - p2 < one_volume_kb, (p2, p8)


def _phantom(rng: np.random.Generator, tree, n: int = 32) -> TrainingSample:
    """Symmetric image (both blobs equally bright) whose blobs carry left/right labels: the
    network must use position to tell the sides apart."""
    grid = ModelGrid.centred(np.zeros(3), 2.0, fov_mm=(2.0 * n,) * 3)
    coords = torch.from_numpy(grid.coordinates())
    x, y, z = (coords * 100.0).unbind(0)
    shift = torch.from_numpy(rng.normal(0, 1.0, 3).astype(np.float32))
    r = n  # field of view is 2n mm: head radius ~0.9 n, blobs at +-0.4 n
    head = (x / (0.9 * r)) ** 2 + (y / (0.9 * r)) ** 2 + (z / (0.9 * r)) ** 2 < 1
    right = ((x - 0.4 * r - shift[0]) / (0.3 * r)) ** 2 + ((y - shift[1]) / (0.35 * r)) ** 2 + ((z - shift[2]) / (0.3 * r)) ** 2 < 1
    left = ((x + 0.4 * r - shift[0]) / (0.3 * r)) ** 2 + ((y - shift[1]) / (0.35 * r)) ** 2 + ((z - shift[2]) / (0.3 * r)) ** 2 < 1
    image = 0.4 * head.float() + 0.5 * (left | right).float() + 0.03 * torch.randn(x.shape)
    ch = torch.zeros(x.shape, dtype=torch.long)
    ch[left] = tree.aseg_to_channel[10]
    ch[right] = tree.aseg_to_channel[49]
    target = torch.nn.functional.one_hot(ch, tree.n_classes).permute(3, 0, 1, 2).float()
    full = tree.defined_nodes(range(1, tree.n_classes))
    return TrainingSample(image[None], coords, target, torch.ones(1, *x.shape),
                          torch.from_numpy(tree.channel_mask(full)), torch.from_numpy(tree.internal_mask(full)))


@pytest.mark.slow
def test_overfit_left_right_phantom_through_ddim(tmp_path, tree):
    """A tiny model trained for well under a minute of CPU reaches Dice >= 0.9 on both sides."""
    torch.manual_seed(0)
    n = 24
    cfg = ModelConfig(spacings_mm=(2.0, 4.0, 8.0), channels=(8, 8, 8), image_channels_per_depth=(8, 8, 8), time_dim=32)
    tcfg = TrainConfig(out_dir=str(tmp_path), max_steps=200, lr=1.5e-2, warmup_steps=5,
                       modes=(TrainMode(2.0, None, 1.0),), depth_weights=(1.0, 0.3, 0.1), checkpoint_minutes=99)
    trainer = Trainer(tcfg, tree, lambda rng, mode: _phantom(rng, tree, n), model_cfg=cfg)
    trainer.run(handle_signals=False)  # 200 steps; speed belongs to docs/benchmarks.md, not a test
    sample = _phantom(np.random.default_rng(123), tree, n)
    model = trainer.model.eval()
    with torch.inference_mode():
        feats = model.encode_image(sample.image[None], sample.coords[None], 0)
        res = ddim_sample(lambda x, t: torch.softmax(model.denoise(feats, x, t, 0)[0], 1),
                          (tree.n_classes, n, n, n), steps=3, samples=2, seed=1)
    pred = res.mean.argmax(0)
    ref = sample.target.argmax(0)
    for lab in (10, 49):
        c = tree.aseg_to_channel[lab]
        p, r = pred == c, ref == c
        dice = 2 * (p & r).sum().item() / (p.sum().item() + r.sum().item())
        assert dice >= 0.9, (lab, dice, trainer.step)


def test_mirrored_view_answers_in_the_original_frame(tree):
    """A denoiser that is exactly mirror-equivariant gives the same ensemble with or without the
    mirrored view; the sequence of views alternates between samples."""
    from msdseg.inference.sampling import _mirrored

    perm = torch.as_tensor(tree.flip_permutation)
    c = tree.n_classes
    left, right = tree.aseg_to_channel[10], tree.aseg_to_channel[49]
    shape = (c, 8, 6, 5)
    # image: a blob on the left half (low x); the "network" labels bright voxels left thalamus when
    # they lie at low x, right thalamus at high x (a sided rule, as the real network learns)
    image = torch.zeros(1, 1, 8, 6, 5)
    image[0, 0, 1:3, 2:4, 1:4] = 1.0

    def make(img):
        def denoise(x_t, t):
            p = torch.zeros(1, *shape)
            p[:, 0] = 1.0 - img[0]
            lo = img[0, 0].clone()
            lo[4:] = 0
            hi = img[0, 0] - lo
            p[:, left], p[:, right] = lo, hi
            return p
        return denoise

    plain, mirrored = make(image), _mirrored(make(image.flip(2)), perm)
    x = torch.randn(1, *shape)
    t = torch.tensor([10])
    torch.testing.assert_close(mirrored(x, t), plain(x, t))
    calls = []

    def counting(tag, fn):
        def wrapped(x_t, t_):
            calls.append(tag)
            return fn(x_t, t_)
        return wrapped

    ddim_sample([counting("a", plain), counting("b", mirrored)], shape, steps=2, samples=3)
    assert calls == ["a", "a", "b", "b", "a", "a"]


def test_training_timesteps_cover_every_preset_step():
    """Training skips the smallest timesteps; no preset may sample one of them."""
    from msdseg.model.diffusion import make_train_scheduler, noisy_labels
    from msdseg.core.settings import PRESETS
    from msdseg.training.trainer import TrainConfig

    t_min = TrainConfig(out_dir=".").t_min
    for name, p in PRESETS.items():
        if p.steps > 0:
            assert int(make_sampling_scheduler(p.steps).timesteps.min()) >= t_min, name
    gen = torch.Generator().manual_seed(0)
    ts = [int(noisy_labels(make_train_scheduler(), torch.zeros(1, 2, 2, 2, 2), gen, t_min)[1]) for _ in range(300)]
    assert min(ts) >= t_min and max(ts) > 900


def test_top_timestep_share_draws_signal_free_noise_levels():
    """``top_prob`` of the items come from [top_min, T); the rest stay uniform over [t_min, T)."""
    from msdseg.model.diffusion import make_train_scheduler, noisy_labels

    sched = make_train_scheduler()
    onehot = torch.zeros(4000, 2, 1, 1, 1)
    onehot[:, 0] = 1.0
    gen = torch.Generator().manual_seed(0)
    t_plain = noisy_labels(sched, onehot, gen, 150)[1]
    t_top = noisy_labels(sched, onehot, gen, 150, top_prob=0.5, top_min=950)[1]
    share_plain = float((t_plain >= 950).float().mean())  # 50 / 850 of a uniform draw
    share_top = float((t_top >= 950).float().mean())  # 0.5 + 0.5 * 50 / 850
    assert abs(share_plain - 50 / 850) < 0.02
    assert abs(share_top - (0.5 + 0.5 * 50 / 850)) < 0.03
    assert int(t_top.min()) >= 150 and int(t_top.max()) <= 999
    # at t >= 950 the clean label is ~0.01 of the noise: the network cannot read it from x_t
    x_t, t = noisy_labels(sched, onehot, torch.Generator().manual_seed(1), 950, top_prob=1.0, top_min=950)
    assert int(t.min()) >= 950
    assert abs(float(x_t[:, 0].mean() - x_t[:, 1].mean())) < 0.1


def test_refining_head_starts_as_the_upsampled_coarser_answer_and_round_trips(tmp_path):
    """Converting a model's finest head to a refining head (zero weights) leaves every coarser
    output unchanged and makes the fine output exactly the coarser logits upsampled x2; the
    layout survives save/load, and a model without the key loads as before."""
    import torch.nn.functional as F

    from msdseg.model.network import ModelConfig, MultiscaleDiffUNet
    from msdseg.model.modelfile import load_model, save_model

    torch.manual_seed(0)
    cfg = ModelConfig(n_classes=5, channels=(4, 8, 8), image_channels_per_depth=(4, 4, 8),
                      spacings_mm=(1.0, 2.0, 4.0), time_dim=16)
    model = MultiscaleDiffUNet(cfg).eval()
    image, coords = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 3, 16, 16, 16)
    x_t, t = torch.randn(1, 5, 16, 16, 16), torch.tensor([500])
    with torch.no_grad():
        before = model(image, x_t, t, 0, coords)
        assert model.enable_refining_heads(1) == [0] and model.enable_refining_heads(1) == []
        after = model(image, x_t, t, 0, coords)
    for b, a in zip(before[1:], after[1:]):
        torch.testing.assert_close(a, b)
    up = F.interpolate(before[1], scale_factor=2, mode="trilinear", align_corners=False)
    torch.testing.assert_close(after[0], up)
    assert not torch.allclose(before[0], after[0])
    path = save_model(model, tmp_path / "m.safetensors", {"name": "t"})
    loaded = load_model(path).model
    assert loaded.cfg.refine_depths == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, x_t, t, 0, coords)[0], after[0])
    assert ModelConfig.from_dict({"n_classes": 5}).refine_depths == 0  # older model files
