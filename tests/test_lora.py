"""LoRA adapters where diffusers and peft put them: a tiny StableDiffusionPipeline (tests/latent_fixtures.py)
and a fine-tuned adapter saved (i) beside its model_index.json by save_lora_weights, (ii) into its own
folder by save_lora_weights, (iii) as a peft adapter folder. `featurize --params lora` attributes exactly the
adapter's matrices in each case; an index built with an adapter refuses the model without it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from latent_fixtures import write_captioned_images, write_lora, write_text_pipeline
from safetensors import safe_open

from explorer.errors import ExplorerError
from precompute.__main__ import main as precompute

LAYOUTS = ("beside", "own", "peft")  # (i), (ii), (iii)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    paths = {"pipeline": write_text_pipeline(root / "pipeline", lora=False), "root": root}
    paths["beside"] = shutil.copytree(paths["pipeline"], root / "with_lora")
    write_lora(paths["pipeline"], paths["beside"])  # save_lora_weights(pipeline_dir)
    paths["own"] = write_lora(paths["pipeline"], root / "own", seed=2)
    paths["peft"] = write_lora(paths["pipeline"], root / "peft", form="peft", seed=3)
    paths["images"] = write_captioned_images(root / "images", per_pair=2)
    return paths


def _featurize(adapters, out: Path, model: Path, *extra: str, capsys=None) -> int:
    """`python -m precompute featurize` in this process (12 images, 1 bucket, k = 16); its exit status."""
    arguments = ["featurize", "--model", str(model), "--data", str(adapters["images"]), "--out", str(out)]
    arguments += ["--split", "all", "--buckets", "1", "--proj-dim", "16", "--workers", "1", *extra]
    return precompute(arguments)


@pytest.fixture(scope="module")
def indexes(adapters, tmp_path_factory) -> dict[str, Path]:
    """An index per layout, featurized with --params lora (and the raw features kept, for reindex)."""
    out, built = tmp_path_factory.mktemp("lora_indexes"), {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAX_CACHE", str(adapters["root"] / "cache"))
        for layout in LAYOUTS:
            model, given = _model_and_lora(adapters, layout)
            lora = [] if given is None else ["--lora", given]
            code = _featurize(adapters, out / layout, model, "--params", "lora", "--keep-features", *lora)
            assert code == 0, layout
            built[layout] = out / layout
    return built


def _model_and_lora(adapters, layout: str) -> tuple[Path, str | None]:
    """The --model and --lora of a layout: (i) the pipeline folder alone, (ii)/(iii) the base + --lora."""
    return (adapters["beside"], None) if layout == "beside" else (adapters["pipeline"], str(adapters[layout]))


def _adapter_matrices(adapters, layout: str) -> dict[str, int]:
    """The UNet matrices in the adapter's file, as the UNet names them without the adapter: size."""
    weights = {
        "beside": adapters["beside"] / "pytorch_lora_weights.safetensors",
        "own": adapters["own"] / "pytorch_lora_weights.safetensors",
        "peft": adapters["peft"] / "adapter_model.safetensors",
    }[layout]
    with safe_open(str(weights), "pt") as handle:
        sizes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    prefix = "base_model.model." if layout == "peft" else "unet."
    return {key.removeprefix(prefix): int(torch.Size(shape).numel()) for key, shape in sizes.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_params_lora_attributes_exactly_the_adapters_matrices(adapters, indexes, layout):
    from explorer.features import FeatureComputer
    from explorer.index import AttributionIndex
    from explorer.lora import ADAPTER, LoraRecord
    from explorer.model import load_model

    model_dir, given = _model_and_lora(adapters, layout)
    model = load_model(model_dir, lora=given)
    index = AttributionIndex.load(indexes[layout], model=model)
    names = FeatureComputer(model, index.meta.spec).names  # the parameters featurize took gradients of
    expected = _adapter_matrices(adapters, layout)
    assert sorted(name.replace(f".{ADAPTER}.", ".") for name in names) == sorted(expected)
    assert len(expected) == 64 and index.meta.num_params == sum(expected.values())
    recorded = given or str(adapters["beside"] / "pytorch_lora_weights.safetensors")
    assert index.meta.lora == LoraRecord(recorded, 1.0)
    meta = json.loads((indexes[layout] / "meta.json").read_text())
    assert meta["lora"] == {"path": recorded, "scale": 1.0}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_index_built_with_the_adapter_refuses_the_model_without_it(adapters, indexes, layout):
    from explorer.attribution import Explorer

    model_dir, given = _model_and_lora(adapters, layout)
    bare = ["none"] if layout == "beside" else [None]  # the pipeline folder's own adapter left out
    with pytest.raises(ExplorerError) as refused:
        Explorer.from_dirs(model_dir, [indexes[layout]], lora=bare[0])
    message = str(refused.value)
    recorded = given or str(adapters["beside"] / "pytorch_lora_weights.safetensors")
    assert f"({str(model_dir)!r} with LoRA {recorded!r})" in message  # what the index was built for
    assert f"loaded model {str(model_dir)!r} without a LoRA adapter" in message  # what was loaded
    assert f"--lora {recorded}" in message  # the fix


def test_the_adapters_are_the_models_and_their_hashes_differ(adapters):
    from explorer.model import load_model

    base = load_model(adapters["pipeline"])
    models = {}
    for layout in LAYOUTS:
        model_dir, given = _model_and_lora(adapters, layout)
        models[layout] = load_model(model_dir, lora=given)
    hashes = {base.weights_hash} | {model.weights_hash for model in models.values()}
    assert len(hashes) == 4  # each adapter is part of its model's hash
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = base.latent.encode_prompts(["a red square on the left"] * 2)
    for layout, model in models.items():
        assert not torch.allclose(model.eps(z, 300, context), base.eps(z, 300, context)), layout
    beside = adapters["beside"] / "pytorch_lora_weights.safetensors"
    explicit = load_model(adapters["pipeline"], lora=str(beside))
    assert explicit.weights_hash == models["beside"].weights_hash  # the same adapter by either route
    assert load_model(adapters["beside"], lora="none").weights_hash == base.weights_hash


def test_lora_scale_is_recorded_and_scales_the_update(adapters, tmp_path, monkeypatch):
    from explorer.attribution import Explorer
    from explorer.index import read_meta
    from explorer.model import load_model

    base, own = adapters["pipeline"], str(adapters["own"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = load_model(base)
    context = reference.latent.encode_prompts(["a blue square on the right"] * 2)
    off = load_model(base, lora=own, lora_scale=0.0)
    torch.testing.assert_close(off.eps(z, 500, context), reference.eps(z, 500, context))  # scale 0: no update
    assert off.weights_hash != reference.weights_hash != load_model(base, lora=own).weights_hash
    monkeypatch.setenv("DAX_CACHE", str(adapters["root"] / "cache"))
    half = ["--lora", own, "--lora-scale", "0.5", "--limit", "4"]
    assert _featurize(adapters, tmp_path / "half", base, *half) == 0
    assert read_meta(tmp_path / "half").lora.scale == 0.5
    with pytest.raises(ExplorerError, match=f"--lora {own} --lora-scale 0.5"):
        Explorer.from_dirs(base, [tmp_path / "half"], lora=own)
    Explorer.from_dirs(base, [tmp_path / "half"], lora=own, lora_scale=0.5)  # the same model: accepted


def test_params_lora_without_an_adapter_names_the_fix(adapters, tmp_path, capsys):
    assert _featurize(adapters, tmp_path / "none", adapters["pipeline"], "--params", "lora") == 2
    error = capsys.readouterr().err
    assert f"the model {str(adapters['pipeline'])!r} was loaded without one" in error
    assert "beside its model_index.json (pytorch_lora_weights.safetensors) or in lora/" in error
    assert "pass --lora PATH" in error and "(flags: --params)" in error
    assert _featurize(adapters, tmp_path / "s", adapters["pipeline"], "--lora-scale", "2") == 2
    assert "--lora-scale 2 scales a LoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "none").exists() and not (tmp_path / "s").exists()
    from explorer.features import FeatureComputer, FeatureSpec
    from explorer.model import load_model

    spec = FeatureSpec(params=("lora",), buckets=1, proj_dim=16)  # the engine's own check, without the CLI
    with pytest.raises(ExplorerError, match="has no LoRA adapter loaded; load one with --lora PATH"):
        FeatureComputer(load_model(adapters["pipeline"]), spec)


def test_reindex_keeps_the_adapter_record(adapters, indexes, tmp_path):
    from explorer.attribution import Explorer
    from explorer.index import read_meta

    assert precompute(["reindex", "--features-from", str(indexes["own"]), "--out", str(tmp_path / "re")]) == 0
    assert read_meta(tmp_path / "re").lora == read_meta(indexes["own"]).lora
    with pytest.raises(ExplorerError, match="without a LoRA adapter"):
        Explorer.from_dirs(adapters["pipeline"], [tmp_path / "re"])


def test_a_text_encoder_adapter_changes_the_prompts_and_not_the_attributed_params(adapters, tmp_path):
    from explorer.features import FeatureComputer, FeatureSpec
    from explorer.model import load_model

    write_lora(adapters["pipeline"], tmp_path / "text", seed=4, text=True)
    model = load_model(adapters["pipeline"], lora=str(tmp_path / "text"))
    base = load_model(adapters["pipeline"])
    prompts = ["a green square on the left"]
    assert not torch.allclose(model.latent.encode_prompts(prompts), base.latent.encode_prompts(prompts))
    names = FeatureComputer(model, FeatureSpec(params=("lora",), buckets=1, proj_dim=16)).names
    assert len(names) == 64  # the UNet's matrices: the text encoder's shape only the prompts


def test_bad_adapters_are_named(adapters, tmp_path):
    from explorer.model import load_model, tiny_config

    pipeline = adapters["pipeline"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExplorerError, match=r"holds no LoRA adapter \(0 .safetensors files there\)"):
        load_model(pipeline, lora=str(empty))
    (tmp_path / "weights.bin").write_bytes(b"not loaded")
    with pytest.raises(ExplorerError, match="is not a .safetensors file"):
        load_model(pipeline, lora=str(tmp_path / "weights.bin"))
    with pytest.raises(ExplorerError, match="--lora 'no/such/adapter/folder' does not exist"):
        load_model(pipeline, lora="no/such/adapter/folder")
    two = shutil.copytree(adapters["beside"], tmp_path / "two")
    shutil.copytree(adapters["own"], two / "lora")
    with pytest.raises(ExplorerError, match="holds two LoRA adapters.*choose one with --lora PATH"):
        load_model(two)
    assert load_model(two, lora=str(two / "lora")).lora.path == str(two / "lora")
    half = shutil.copytree(adapters["peft"], tmp_path / "half_peft")
    (half / "adapter_model.safetensors").unlink()
    with pytest.raises(ExplorerError, match="has no adapter_model.safetensors: only safetensors"):
        load_model(pipeline, lora=str(half))
    with pytest.raises(ExplorerError, match="--lora-scale nan must be a finite number"):
        load_model(pipeline, lora=str(adapters["own"]), lora_scale=float("nan"))
    tiny_config(8).build().save_pretrained(tmp_path / "pixel" / "unet")
    with pytest.raises(ExplorerError, match="'.*pixel' is a pixel DDPM: featurize it without --lora"):
        load_model(tmp_path / "pixel", lora=str(adapters["own"]))


def test_the_app_hands_lora_and_its_scale_to_the_engine(adapters, indexes):
    import subprocess
    import sys

    own = str(adapters["own"])
    command = [sys.executable, "app.py", "--model", str(adapters["pipeline"]), "--index", str(indexes["own"])]
    done = subprocess.run(
        [*command, "--lora", own, "--lora-scale", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2  # refused before anything is served
    assert f"the loaded model {str(adapters['pipeline'])!r} with LoRA {own!r} at scale 0.5" in done.stderr
    assert f"(--lora {own})" in done.stderr
