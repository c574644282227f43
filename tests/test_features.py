import pytest
import torch

from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec, bucket_of_timestep, bucket_timesteps, noise_bank
from precompute.featurize.workers import Featurizer, residual_norms


def test_bucket_timesteps_cover_their_ranges():
    spec = FeatureSpec(buckets=10, timesteps_per_bucket=2)
    timesteps = bucket_timesteps(spec, 1000)
    assert timesteps[0] == [25, 75] and timesteps[9] == [925, 975]
    for b, ts in enumerate(timesteps):
        assert all(bucket_of_timestep(t, 10, 1000) == b for t in ts)
    with pytest.raises(ExplorerError, match="timestep 1000 is out of range"):
        bucket_of_timestep(1000, 10, 1000)


def test_noise_bank_is_seeded_and_shared():
    spec = FeatureSpec(buckets=2, noise_draws=3)
    timesteps = bucket_timesteps(spec, 1000)
    bank = noise_bank(spec, timesteps, (1, 8, 8))
    assert bank.shape == (2, 3, 1, 8, 8)
    assert torch.equal(bank, noise_bank(spec, timesteps, (1, 8, 8)))
    assert not torch.equal(bank[0, 0], bank[0, 1])
    other = noise_bank(FeatureSpec(buckets=2, noise_draws=3, noise_seed=1), timesteps, (1, 8, 8))
    assert not torch.equal(bank, other)


@pytest.mark.parametrize("output", ["loss", "square", "mean", "l1", "l2"])
def test_vmap_features_equal_autograd_per_example(tiny_model, digits_splits, output):
    spec = FeatureSpec(output=output, buckets=3, timesteps_per_bucket=2, noise_draws=2, proj_dim=32)
    computer = FeatureComputer(tiny_model, spec)
    images = torch.from_numpy(to_model_range(digits_splits[0].images[:3]))
    features = computer.all_bucket_features(images)  # (3, 3, 32)
    unet = tiny_model.unet
    for i in range(3):
        for b in range(3):
            timesteps, noise = computer.draw_timesteps[b], computer.noise[b]
            with torch.enable_grad():
                params = [p.detach().requires_grad_(True) for p in unet.parameters()]
                value = computer._output(dict(zip(computer.names, params)), images[i], timesteps, noise)
                grads = torch.autograd.grad(value, params)
            expected = computer.projector.project([g.unsqueeze(0) for g in grads])[0]
            assert torch.allclose(features[i, b], expected, rtol=1e-4, atol=1e-6)


def test_features_reject_wrong_shapes_and_nan(tiny_model, tiny_spec):
    computer = FeatureComputer(tiny_model, tiny_spec)
    with pytest.raises(ExplorerError, match="do not fit the model"):
        computer.features(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ExplorerError, match="NaN"):
        computer.features(torch.full((1, 1, 8, 8), float("nan")), torch.zeros(1, dtype=torch.long))


def test_residual_norms_shape_and_positive(tiny_model, tiny_spec, digits_splits):
    computer = FeatureComputer(tiny_model, tiny_spec)
    images = torch.from_numpy(to_model_range(digits_splits[0].images[:5]))
    residuals = residual_norms(computer, images)
    assert residuals.shape == (5, tiny_spec.buckets) and (residuals > 0).all()


def test_features_reject_buckets_that_do_not_fit(tiny_model, tiny_spec, digits_splits):
    computer = FeatureComputer(tiny_model, tiny_spec)
    images = torch.from_numpy(to_model_range(digits_splits[0].images[:2]))
    with pytest.raises(ExplorerError, match="bucket 4 is out of range: this spec has buckets 0..3"):
        computer.features(images, torch.tensor([0, 4]))
    with pytest.raises(ExplorerError, match="do not pair with 2 images"):
        computer.features(images, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("projector", ["countsketch", "kronecker"])
def test_worker_threads_compute_the_same_features(tiny_model, digits_splits, projector):
    spec = FeatureSpec(output="square", buckets=3, timesteps_per_bucket=2, proj_dim=64, projector=projector)
    images = torch.from_numpy(to_model_range(digits_splits[0].images[:11]))
    buckets = torch.arange(11) % 3
    one = FeatureComputer(tiny_model, spec, chunk_size=2).features(images, buckets)
    threads = torch.get_num_threads()
    parallel = Featurizer(
        tiny_model, spec, chunk_size=2, workers=3
    )  # 6 chunks (or 1 per 40 rows), dealt 2 each
    for _ in range(2):  # the replicas are reused
        assert torch.allclose(
            parallel.features(images, buckets), one, rtol=1e-4, atol=1e-6 * float(one.abs().max())
        )
    assert torch.get_num_threads() == threads
    replicas = parallel._replicas
    assert len(replicas) == 2 and all(r.model.unet is not tiny_model.unet for r in replicas)
    assert all(p.requires_grad is False for r in replicas for p in r.model.unet.parameters())


def test_workers_must_be_positive(tiny_model, tiny_spec):
    with pytest.raises(ExplorerError, match="workers 0 must be >= 1"):
        Featurizer(tiny_model, tiny_spec, workers=0)
