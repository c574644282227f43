"""FeatureSpec.precision mixed: timesteps below bf16_below in bfloat16, the rest in fp32, chosen by
calibration."""

import dataclasses
import json

import pytest
import torch
from cli import run_featurize

from explorer.attribution import Explorer
from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec
from explorer.index import META_NAME, AttributionIndex
from precompute.featurize.calibration import MAX_BF16_MOVE, bf16_moves, calibrate, choose_bf16_below
from precompute.featurize.workers import Featurizer

# timesteps of the tiny model (T = 1000): bucket 0 [83, 250], bucket 1 [416, 583], bucket 2 [750, 916]
SPEC = FeatureSpec(output="square", buckets=3, timesteps_per_bucket=2, projector="kronecker", proj_dim=256)
MIXED = dataclasses.replace(SPEC, precision="mixed", bf16_below=500)  # bucket 0 in bf16, 1 split, 2 in fp32


@pytest.fixture(scope="module")
def images(digits_splits):
    return torch.from_numpy(to_model_range(digits_splits[0].images[:6]))


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=1) / b.norm(dim=1)


def test_mixed_features_run_each_timestep_in_its_precision(tiny_model, images):
    buckets = torch.tensor([2, 0, 1, 1, 0, 2])  # interleaved: features() regroups them by bucket and back
    computer = FeatureComputer(tiny_model, MIXED)
    assert computer.timesteps == [[83, 250], [416, 583], [750, 916]]
    mixed = computer.features(images, buckets)
    fp32 = FeatureComputer(tiny_model, SPEC).features(images, buckets)
    bf16 = FeatureComputer(tiny_model, dataclasses.replace(SPEC, precision="bf16")).features(images, buckets)
    high, low, split = buckets == 2, buckets == 0, buckets == 1
    assert _relative(mixed[high], fp32[high]).max() < 1e-5  # bucket 2: fp32
    assert _relative(bf16[low], fp32[low]).min() > 1e-5  # bf16 moves them, and bucket 0 moves with it
    assert _relative(mixed[low], bf16[low]).max() < 0.1 * _relative(bf16[low], fp32[low]).min()
    # bucket 1: the square output is the mean over its two timesteps, so phi is the mean of each timestep's
    # phi alone: t = 416 in bf16, t = 583 in fp32
    parts = [computer.timestep_features(images[split], 1, t, bf16=t < 500) for t in (416, 583)]
    expected = (parts[0] + parts[1]) / 2
    assert _relative(mixed[split], expected).max() < 1e-4
    all_fp32 = (computer.timestep_features(images[split], 1, 416, bf16=False) + parts[1]) / 2
    assert _relative(expected, all_fp32).min() > 1e-5  # and that timestep's bf16 did change something


def test_mixed_with_two_workers_equals_one(tiny_model, images):
    buckets = torch.tensor([0, 1, 2, 1, 2, 0])
    one = FeatureComputer(tiny_model, MIXED, chunk_size=2).features(images, buckets)
    two = Featurizer(tiny_model, MIXED, chunk_size=2, workers=2).features(images, buckets)
    assert _relative(two, one).max() < 1e-5


def test_mixed_precision_is_checked(tiny_model):
    with pytest.raises(ExplorerError, match="spec.precision mixed with spec.bf16_below 0: calibrate it"):
        FeatureComputer(tiny_model, dataclasses.replace(MIXED, bf16_below=0))
    with pytest.raises(
        ExplorerError, match=r"runs a bucket's bf16 and fp32 timesteps as separate forwards: use features\(\)"
    ):
        FeatureComputer(tiny_model, MIXED).capture_rows(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ExplorerError, match="spec.bf16_below 500 applies to spec.precision mixed only"):
        FeatureComputer(tiny_model, dataclasses.replace(SPEC, bf16_below=500))
    with pytest.raises(ExplorerError, match="spec.precision mixed applies to the kronecker projector only"):
        calibrate(
            tiny_model,
            dataclasses.replace(MIXED, projector="countsketch", bf16_below=0),
            torch.zeros(2, 1, 8, 8),
        )
    with pytest.raises(ExplorerError, match="calibrate on at least 2 images"):
        calibrate(tiny_model, dataclasses.replace(MIXED, bf16_below=0), torch.zeros(1, 1, 8, 8))


def test_choose_bf16_below_stops_at_the_first_timestep_over_the_limit():
    assert choose_bf16_below({50: 0.01, 150: 0.02, 250: 0.2, 350: 0.01}) == 250  # not past a failing one
    assert choose_bf16_below({50: 0.01, 150: 0.02}) == 151
    assert choose_bf16_below({50: 0.3, 150: 0.02}) == 0


def test_bf16_moves_are_those_of_the_stored_bucket_features(tiny_model, images):
    computer = FeatureComputer(tiny_model, SPEC)
    moves = bf16_moves(computer, images)
    fp32 = computer.all_bucket_features(images)  # (N, buckets, k)
    spread = (fp32 - fp32.mean(0)).norm(dim=2)
    for t in (250, 416, 916):  # bf16 up to the end of bucket 0, inside bucket 1, everywhere
        mixed = FeatureComputer(tiny_model, dataclasses.replace(MIXED, bf16_below=t + 1)).all_bucket_features(
            images
        )
        per_bucket = ((mixed - fp32).norm(dim=2) / spread).median(dim=0).values  # (buckets,)
        assert moves[t] == pytest.approx(
            float(per_bucket.max()), rel=0.1
        )  # bf16 rounding varies with the batching
    assert moves[83] < moves[250] <= moves[416]  # bf16 over more timesteps of a bucket moves it more
    alone = [computer.timestep_features(images, 2, 916, bf16=bf16) for bf16 in (False, True)]
    alone_move = ((alone[1] - alone[0]).norm(dim=1) / (alone[0] - alone[0].mean(0)).norm(dim=1)).median()
    assert moves[916] < 0.5 * float(alone_move)  # averaged with t = 750, t = 916's rounding matters less


def test_calibration_measures_every_timestep_and_picks_bf16_below(tiny_model, images):
    calibration = calibrate(tiny_model, dataclasses.replace(MIXED, bf16_below=0), images)
    moves = calibration.bf16_moves
    assert sorted(moves) == [83, 250, 416, 583, 750, 916]
    assert all(move > 0 for move in moves.values())
    spec = calibration.spec
    below = spec.bf16_below if spec.precision == "mixed" else 0
    assert below == choose_bf16_below(moves)
    assert all(moves[t] <= MAX_BF16_MOVE for t in moves if t < below)
    assert "bf16 move / example-specific part with bf16 up to t" in calibration.summary()
    given = calibrate(tiny_model, MIXED, images)  # a given bf16_below is kept, nothing measured
    assert given.spec.bf16_below == 500 and not given.bf16_moves


def test_precompute_featurize_mixed_index_records_its_bf16_timesteps(tiny_model_dir, tmp_path):
    out = tmp_path / "mixed"
    result = run_featurize(
        tiny_model_dir,
        out,
        *"--limit 40 --buckets 2 --proj-dim 128 --output square".split(),
        *"--projector kronecker --precision mixed --bf16-below 500".split(),
    )
    assert result.returncode == 0, result.stderr
    spec = json.loads((out / META_NAME).read_text())["spec"]
    assert (spec["precision"], spec["bf16_below"]) == ("mixed", 500)
    explorer = Explorer.from_dirs(tiny_model_dir, [out])
    name = next(iter(explorer.indexes))
    assert name.endswith("(square, centered, normalized, kronecker, bf16 below t = 500)")
    index = explorer.indexes[name]
    for t in (index.meta.timesteps[0][0], index.meta.timesteps[1][0]):  # a bf16 bucket and an fp32 one
        result = explorer.attribute_image(index.train_images[7], t, top_k=3)
        assert (
            result.positive.positions[0] == 7
        )  # its own stored vector, featurized the same way, is its top-1
        assert result.positive.scores[0] == pytest.approx(1.0, abs=1e-3)
    meta = json.loads((out / META_NAME).read_text())
    meta["spec"]["bf16_below"] = -1
    (out / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(ExplorerError, match="spec.bf16_below is -1, must be an integer >= 0"):
        AttributionIndex.load(out)


def test_precompute_featurize_mixed_without_a_threshold_says_how_to_get_one(tiny_model_dir, tmp_path):
    result = run_featurize(
        tiny_model_dir, tmp_path / "none", "--limit", "8", "--projector", "kronecker", "--precision", "mixed"
    )
    assert result.returncode == 2
    assert "spec.precision mixed with spec.bf16_below 0: calibrate it" in result.stderr
    assert "(flags: --precision, --bf16-below, --calibrate N)" in result.stderr
    assert not (tmp_path / "none" / META_NAME).exists()


def test_mixed_warns_where_bf16_is_emulated(tiny_model, monkeypatch, caplog):
    import explorer.features as features

    monkeypatch.setattr(
        features, "native_bf16", lambda: False
    )  # this CPU may have it: the warning branch alone
    with caplog.at_level("WARNING", logger="explorer.features"):
        Featurizer(tiny_model, MIXED, workers=2)
    warnings = [record.getMessage() for record in caplog.records]
    assert sum("spec.precision mixed is emulated" in message for message in warnings) == 1, (
        warnings
    )  # not once per worker


@pytest.mark.parametrize(
    "spec", [SPEC, MIXED, dataclasses.replace(SPEC, projector="countsketch")], ids=["fp32", "mixed", "exact"]
)
def test_no_images_give_no_features(tiny_model, spec):
    phi = FeatureComputer(tiny_model, spec).features(
        torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
    )
    assert phi.shape == (0, spec.proj_dim)
