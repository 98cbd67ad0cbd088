"""Generator interface, network shapes, losses and DiffAugment (tiny models, no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthgen.device import inference_rows
from synthgen.models import build_generator, load_generator, save_generator
from synthgen.models import cgan, cvae, fused
from synthgen.models.diffaugment import cutout, diff_augment, parse_policy, translation

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 6, 10)]


@pytest.mark.parametrize("kind", ["cgan", "cvae", "vaegan"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sample_shapes_and_range(kind, shape):
    model = build_generator(kind, 3, shape, base_channels=4, latent_dim=8)
    labels = torch.tensor([0, 1, 2, 2])
    images = model.sample(labels, torch.Generator().manual_seed(0))
    assert images.shape == (4, *shape) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert not torch.equal(images[2], images[3])  # same class, own noise per row
    same_noise = [model.sample(torch.full((2,), k), torch.Generator().manual_seed(1)) for k in (0, 1)]
    assert (same_noise[0] - same_noise[1]).abs().max() > 1e-3  # the label reaches the output, even untrained
    assert model.n_classes == 3 and model.image_shape == shape
    assert model.has_discriminator == (kind != "cvae")
    if kind != "cvae":
        assert model.discriminator_score(images, labels).shape == (4,)
    else:
        with pytest.raises(ValueError, match="no discriminator"):
            model.discriminator_score(images, labels)


@pytest.mark.parametrize("shape", SHAPES)
def test_training_networks_shapes(shape):
    network = cgan.CGAN(cgan.CGANConfig(3, shape, latent_dim=8, base_channels=4))
    labels = torch.tensor([0, 2])
    raw = network.generator(torch.randn(2, 8), labels)
    assert raw.shape == (2, *shape)
    assert network.discriminator(raw, labels).shape == (2,)
    vae = cvae.CVAE(cvae.CVAEConfig(3, shape, latent_dim=8, base_channels=4))
    logits, mu, logvar = vae(torch.rand(2, *shape) * 2 - 1, labels, torch.randn(2, 8))
    assert logits.shape == (2, *shape) and mu.shape == logvar.shape == (2, 8)


def test_sampling_is_seeded_and_conditioned_on_labels():
    model = build_generator("cgan", 4, (1, 8, 8), base_channels=4, latent_dim=8)
    labels = torch.arange(4)
    first = model.sample(labels, torch.Generator().manual_seed(3))
    assert torch.equal(first, model.sample(labels, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, model.sample(labels, torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="0..3"):
        model.sample(torch.tensor([4]))


@pytest.mark.parametrize("kind", ["cgan", "cvae", "vaegan"])
def test_save_load_round_trip(tmp_path, kind):
    model = build_generator(kind, 3, (3, 16, 16), seed=1, base_channels=4, latent_dim=8)
    path = save_generator(model, tmp_path / "generator.pt", {"model": kind})
    loaded = load_generator(path, "cpu")
    labels = torch.tensor([0, 1, 2])
    assert loaded.kind == kind and loaded.image_shape == (3, 16, 16) and loaded.latent_dim == 8
    for name, tensor in model.network.state_dict().items():
        assert torch.equal(tensor, loaded.network.state_dict()[name]), name
    # loaded models sample through the fused network: the same function up to float rounding
    assert loaded.sampler is not None and model.sampler is None
    original, reloaded = (m.sample(labels, torch.Generator().manual_seed(0)) for m in (model, loaded))
    torch.testing.assert_close(reloaded, original, atol=1e-5, rtol=0)
    if kind == "cgan":
        images = model.sample(labels)
        assert torch.allclose(model.discriminator_score(images, labels), loaded.discriminator_score(images, labels))
    assert torch.load(path, weights_only=True)["train_config"] == {"model": kind}


def test_load_generator_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="synthgen train"):
        load_generator(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a synthgen generator"):
        load_generator(tmp_path / "other.pt")


def test_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert cgan.hinge_discriminator_loss(real, fake).item() == pytest.approx(0.25 + 0.5)
    assert cgan.hinge_generator_loss(fake).item() == pytest.approx(1.0)
    images = torch.full((2, 1, 2, 2), 1.0)
    logits = torch.full((2, 1, 2, 2), 20.0)  # confident and right: tiny reconstruction loss
    zeros = torch.zeros(2, 4)
    total, recon, kl = cvae.cvae_loss(logits, images, zeros, zeros, kl_weight=1.0)
    assert recon.item() < 1e-6 and kl.item() == pytest.approx(0.0) and total.item() == pytest.approx(recon.item())
    _, _, kl = cvae.cvae_loss(logits, images, torch.ones(2, 4), zeros, kl_weight=1.0)
    assert kl.item() == pytest.approx(2.0)  # 0.5 * sum(mu^2) over 4 dims
    assert [cvae.kl_weight_at(s, 2.0, 10) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]


def test_diffaugment():
    assert parse_policy(" translation, cutout ") == ("translation", "cutout") and parse_policy("") == ()
    with pytest.raises(ValueError, match="flip"):
        parse_policy("translation,flip")
    x = torch.rand(16, 3, 12, 12, requires_grad=True)
    out = diff_augment(x, parse_policy("color,translation,cutout"), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable
    again = diff_augment(x, parse_policy("color,translation,cutout"), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(diff_augment(x, (), torch.Generator()), x)
    ones = torch.ones(64, 1, 8, 8)
    cut = cutout(ones, torch.Generator().manual_seed(1))
    assert (cut == 0).any() and (cut == 1).any()
    assert ((cut == 0).flatten(1).sum(1) <= 16).all()  # at most a 4x4 square of an 8x8 image
    shifted = translation(ones, torch.Generator().manual_seed(1))
    assert set(shifted.unique().tolist()) <= {-1.0, 1.0} and (shifted == -1).any()


def _with_bank(model, codes_per_class):
    """Attach a latent bank: ``codes_per_class[k]`` codes for class k (0 leaves class k to the prior)."""
    labels = torch.repeat_interleave(torch.arange(len(codes_per_class)), torch.tensor(codes_per_class))
    model.latent_bank = (torch.randn(len(labels), model.latent_dim, generator=torch.Generator().manual_seed(9)), labels)
    return model


def test_interpolate_codes_stay_between_class_codes_and_fall_back_to_prior():
    from synthgen.models import interpolate_codes

    codes = torch.tensor([[0.0, 0.0], [2.0, 2.0], [10.0, -10.0]])
    bank = (codes, torch.tensor([0, 0, 1]))
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 5)
    noise = torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    z = interpolate_codes(bank, labels, noise, 0.0, torch.Generator().manual_seed(1))
    assert torch.all(z[:50] >= 0) and torch.all(z[:50] <= 2) and torch.allclose(z[:50, 0], z[:50, 1])  # on the 0-1 segment
    assert z[:50, 0].std() > 0.3  # spread along it, not piled on one code
    assert torch.equal(z[50:], noise[50:])  # one code (class 1) or none (class 2): prior noise, not copies of one image
    noisy = interpolate_codes(bank, labels, noise, 0.5, torch.Generator().manual_seed(1))
    assert torch.allclose(noisy[:50] - z[:50], 0.5 * noise[:50]) and torch.equal(noisy[50:], noise[50:])


def test_interpolate_sampling_seeded_saved_and_refused_without_bank(tmp_path):
    model = _with_bank(build_generator("cvae", 3, (1, 8, 8), base_channels=4, latent_dim=8), [4, 1, 0])
    labels = torch.tensor([0, 0, 1, 2])
    first = model.sample(labels, torch.Generator().manual_seed(3), latent="interpolate")
    assert first.shape == (4, 1, 8, 8)
    assert torch.equal(first, model.sample(labels, torch.Generator().manual_seed(3), latent="interpolate"))
    assert not torch.equal(first, model.sample(labels, torch.Generator().manual_seed(3)))  # prior differs
    loaded = load_generator(save_generator(model, tmp_path / "generator.pt"), "cpu")
    assert torch.equal(loaded.latent_bank[0], model.latent_bank[0]) and torch.equal(loaded.latent_bank[1], model.latent_bank[1])
    torch.testing.assert_close(loaded.sample(labels, torch.Generator().manual_seed(3), latent="interpolate"), first, atol=1e-5, rtol=0)
    gan = build_generator("cgan", 3, (1, 8, 8), base_channels=4, latent_dim=8)
    with pytest.raises(ValueError, match="latent bank"):
        gan.sample(labels, latent="interpolate")
    with pytest.raises(ValueError, match="unknown latent"):
        model.sample(labels, latent="posterior")


@pytest.mark.parametrize("kind", ["cvae", "vaegan"])
def test_interpolate_sampling_adds_the_models_own_noise_unless_given(kind):
    """latent_noise=None (generate.latent_noise: auto) is the model's default: 1.0 for the cVAE, more for the VAE-GAN."""
    from synthgen.config import GenerateConfig
    from synthgen.generate import generate_candidates

    model = _with_bank(build_generator(kind, 3, (1, 8, 8), base_channels=4, latent_dim=8), [4, 3, 2])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])

    def draw(noise):
        return model.sample(labels, torch.Generator().manual_seed(5), latent="interpolate", latent_noise=noise)

    expected = {"cvae": 1.0, "vaegan": 1.3}[kind]
    assert model.default_latent_noise == expected
    assert torch.equal(draw(None), draw(expected)) and not torch.equal(draw(None), draw(expected + 0.5))
    requests = np.array([2, 2, 2])
    auto, explicit, other = (generate_candidates(model, requests, 0, GenerateConfig(latent_noise=noise), "cpu", "interpolate")
                             for noise in ("auto", expected, expected + 0.5))
    assert np.array_equal(auto["x"], explicit["x"]) and not np.array_equal(auto["x"], other["x"])


@pytest.mark.parametrize("size", [(4, 4), (7, 7), (3, 5), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_as_one_transposed_conv_is_upsampling_then_the_3x3_conv(size, channels_last):
    """Values and gradients (input, 3x3 weight, bias) of the transposed form equal the direct one, borders included."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 3, 3, padding=1)
    x = torch.randn(2, 5, *size)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    outputs, grads = [], []
    for form in (cgan.upsample_conv, cgan.upsample_conv_reference):
        source = x.clone().requires_grad_()
        out = form(source, conv)
        outputs.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), [source, conv.weight, conv.bias]))
    assert outputs[0].shape == (2, 3, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for actual, expected in zip(*grads):  # sums of hundreds of O(1) terms: 1e-5 was beaten by rounding at 1 thread
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)  # a border bug is off by O(0.1)


def test_a_channels_last_generator_keeps_its_maps_channels_last():
    """The stem's rows are put in the convs' layout: fed NCHW maps, a channels-last conv stack hands its ReLUs
    gradients in the other layout, and that backward ran 10x slower (2 CPU cores)."""
    network = cgan.Generator(cgan.CGANConfig(3, (3, 32, 32), latent_dim=8, base_channels=4))
    z, labels = torch.randn(4, 8), torch.randint(0, 3, (4,))
    assert cgan.weight_layout(network.out_conv) == torch.contiguous_format
    assert network(z, labels).is_contiguous()
    network.to(memory_format=torch.channels_last)
    assert cgan.weight_layout(network.out_conv) == torch.channels_last
    seen = []  # the map each norm reads, coarsest first
    for norm in [*network.norms, network.out_norm]:
        norm.norm.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    network(z, labels)
    assert len(seen) == 4 and all(h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous() for h in seen)


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_generator_computes_the_training_generator(shape):
    """Folded BN + transposed convs == BN + class affine + upsample + 3x3 conv, on non-trivial stats."""
    torch.manual_seed(0)
    network = cgan.Generator(cgan.CGANConfig(3, shape, latent_dim=8, base_channels=4))
    for norm in [*network.norms, network.out_norm]:  # fresh BN stats and zero class gains would hide folding bugs
        norm.norm.running_mean.normal_()
        norm.norm.running_var.uniform_(0.5, 2.0)
        norm.gain.weight.data.normal_(0, 0.3)
        norm.bias.weight.data.normal_(0, 0.3)
    network.eval()
    z, labels = torch.randn(300, 8), torch.randint(0, 3, (300,))
    with torch.no_grad():
        expected = network(z, labels)
        actual = fused.FusedGenerator.from_generator(network)(z, labels)
    assert actual.shape == expected.shape == (300, *shape)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_sampling_in_cpu_chunks_equals_one_pass():
    model = build_generator("cgan", 3, (1, 28, 28), base_channels=4, latent_dim=8).fuse()
    labels = torch.randint(0, 3, (300,))
    assert inference_rows(torch.device("cpu"), 300, (28, 28)) < 300  # so this really runs in several chunks
    noise = torch.randn(300, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        one_pass = torch.tanh(model.sampler(noise, labels)).clamp(-1, 1)
    torch.testing.assert_close(model.sample(labels, torch.Generator().manual_seed(5)), one_pass, atol=1e-6, rtol=0)


def test_classifier_predicts_through_the_folded_copy_with_the_same_outputs():
    import numpy as np

    from synthgen.models.classifier import CNNClassifier

    rng = np.random.default_rng(0)
    X, y = rng.integers(0, 256, size=(60, 12, 12, 1), dtype=np.uint8), np.arange(60) % 3
    model = CNNClassifier(n_classes=3, width=8, steps=20, batch_size=16, device="cpu").fit(X, y)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.inference_model_.modules())
    with torch.no_grad():
        inputs = torch.from_numpy(X).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        expected = torch.softmax(model.model_(inputs), dim=1).numpy()  # the trained module, BN separate
        features = model.model_.features(inputs).numpy()
    np.testing.assert_allclose(model.predict_proba(X), expected, atol=1e-5)
    np.testing.assert_allclose(model.transform(X), features, atol=1e-4)


def test_condition_strength_fades_in_linearly_between_the_fractions():
    fade = (0.1, 0.5)
    assert [cgan.condition_strength(step, 100, fade) for step in (0, 9, 10, 30, 50, 99)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert cgan.condition_strength(0, 100, (0.0, 0.0)) == 1.0  # [0, 0]: conditional from the start
    network = cgan.CGAN(cgan.CGANConfig(3, (1, 8, 8), latent_dim=8, base_channels=4))
    torch.nn.init.normal_(network.generator.out_norm.gain.weight)  # make the class terms non-zero
    z = torch.randn(2, 8).repeat(2, 1)
    labels = torch.tensor([0, 0, 2, 2])
    network.generator.eval()
    unconditional = network.generator(z, labels, strength=0.0)
    assert torch.allclose(unconditional[:2], unconditional[2:])  # strength 0: the label has no effect
    conditional = network.generator(z, labels, strength=1.0)
    assert (conditional[:2] - conditional[2:]).abs().max() > 1e-3


def test_lecam_penalty_is_zero_on_the_right_side_of_the_anchors_and_tracks_them():
    anchors = torch.tensor([1.0, -1.0])  # running means of D on (real, fake)
    assert cgan.lecam_penalty(torch.tensor([-2.0, -1.5]), torch.tensor([2.0, 1.5]), anchors.clone()) == 0
    penalty = cgan.lecam_penalty(torch.tensor([0.0]), torch.tensor([0.0]), anchors)
    assert penalty == pytest.approx(1.0 + 1.0)  # relu(0 - (-1))^2 + relu(1 - 0)^2
    assert anchors.tolist() == pytest.approx([0.99, -0.99])  # moved 1% toward the batch means


def test_mode_seeking_loss_punishes_pairs_closer_than_their_noise():
    z_first, z_second = torch.zeros(4, 8), torch.ones(4, 8)
    images = torch.rand(4, 1, 8, 8)
    collapsed = cgan.mode_seeking_loss(images, images + 1e-3, z_first, z_second)
    diverse = cgan.mode_seeking_loss(images, -images, z_first, z_second)
    assert collapsed > 100 * diverse  # near-identical images from different noise cost far more
    assert cgan.generator_labels(torch.tensor([3, 1, 4, 1, 5])).tolist() == [3, 1, 3, 1, 5]  # pairs (i, i + N // 2) share a class


def test_cgan_train_step_with_mode_seeking_logs_the_term_and_trains():
    network = cgan.CGAN(cgan.CGANConfig(3, (1, 8, 8), latent_dim=8, base_channels=4))
    optimizers = cgan.build_optimizers(network, 2e-4, 2e-4)
    real, labels = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    before = [p.detach().clone() for p in network.generator.parameters()]
    losses = cgan.train_step(network, optimizers, real, labels, torch.Generator().manual_seed(0), 0, (), 0.999, mode_seeking_weight=1.0)
    assert torch.isfinite(losses["loss_ms"]) and losses["loss_ms"] > 0
    assert any((p - b).abs().max() > 0 for p, b in zip(network.generator.parameters(), before))
    assert "loss_ms" not in cgan.train_step(network, optimizers, real, labels, torch.Generator().manual_seed(0), 1, (), 0.999)
    single = cgan.train_step(network, optimizers, real[:1], labels[:1], torch.Generator().manual_seed(0), 2, (), 0.999, mode_seeking_weight=1.0)
    assert "loss_ms" not in single and torch.isfinite(single["loss_g"])  # a batch of one has no pair: no NaN


def test_batch_interpolations_pair_each_code_with_a_classmate_or_itself():
    from synthgen.models.vaegan import batch_interpolations

    codes = torch.tensor([[0.0, 0.0], [2.0, 2.0], [10.0, -10.0]] * 20)
    labels = torch.tensor([0, 0, 1] * 20)
    z = batch_interpolations(codes, labels, 0.0, torch.Generator().manual_seed(0))
    zeros, twos = z[0::3], z[1::3]
    for part in (zeros, twos):  # class 0's rows stay on the segment between its two codes
        assert torch.all(part >= 0) and torch.all(part <= 2) and torch.allclose(part[:, 0], part[:, 1])
    assert torch.cat([zeros, twos])[:, 0].std() > 0.3  # spread along it, not piled on the row's own code
    assert torch.equal(z[2::3], codes[2::3])  # class 1 has one code: no partner but itself
    noisy = batch_interpolations(codes, labels, 0.5, torch.Generator().manual_seed(0))
    assert (noisy - z).abs().max() > 0.1 and torch.isfinite(noisy).all()


@pytest.mark.parametrize("interpolation_noise", [None, 1.0])
def test_vaegan_discriminator_judges_decodes_between_codes_only_when_asked(interpolation_noise):
    from synthgen.models import vaegan

    config = vaegan.VAEGANConfig(n_classes=2, image_shape=(1, 8, 8), latent_dim=4, base_channels=4)
    torch.manual_seed(0)
    model = vaegan.VAEGAN(config)
    optimizers = vaegan.build_optimizers(model, 1e-3, 2e-4)
    decoded = []
    hook = model.vae.decoder.register_forward_hook(lambda module, inputs, output: decoded.append(len(output)))
    real, labels = torch.rand(8, 1, 8, 8) * 2 - 1, torch.tensor([0, 1] * 4)
    losses = vaegan.train_step(model, optimizers, real, labels, torch.Generator().manual_seed(0), 0, 0.5, 0.1, ("translation",),
                               0.999, 0.1, interpolation_noise)
    hook.remove()
    assert all(torch.isfinite(value) for value in losses.values())
    assert decoded == ([8] if interpolation_noise is None else [8, 8])  # reconstructions, then the decodes between codes
