"""EK-FAC (explorer.ekfac) against brute force: factors from explicitly unfolded activations and per-sample
autograd gradients, scores against a dense (H + lambda I)^-1, the sketch against the exact inner products,
and the factor store round-tripped. An untrained tiny UNet on 8x8 digits, plus a small net with a grouped
convolution (a diagonal block) and a narrower UNet for the mismatch errors."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call, grad, vmap

from explorer.data import load_builtin, to_model_range
from explorer.ekfac import EkfacFactors, EkfacProjector, plan_blocks
from explorer.ekfac_fit import draw_samples, fit_ekfac
from explorer.errors import ExplorerError
from explorer.model import DiffusionModel, UNetConfig, make_scheduler, tiny_config

SAMPLES_PER_IMAGE, SEED, BATCH = 2, 7, 3  # 3 does not divide the draws: the stream's last batch is short
# every kind of block the UNet has: a conv weight without its bias, a bias alone, a Linear, GroupNorm
# (diagonal), a conv with its bias (homogeneous coordinate); 1377 entries, so H is dense-able
DENSE_PREFIXES = ("conv_in.weight", "up_blocks.1.resnets.1.conv2.bias", "up_blocks.1.resnets.1.time_emb_proj")
DENSE_PREFIXES += ("conv_norm_out", "conv_out")


def frozen(unet: nn.Module, name: str) -> DiffusionModel:
    unet = unet.eval().requires_grad_(False)
    return DiffusionModel(unet=unet, scheduler=make_scheduler(), weights_hash=name, path=name)


def tiny_unet(config: UNetConfig | None = None) -> DiffusionModel:
    torch.manual_seed(0)
    return frozen((config or tiny_config(8)).build(), "tiny")


class GroupedNet(nn.Module):
    """conv -> grouped conv -> GroupNorm -> Linear, an eps-prediction net on (1, 4, 4) inputs."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(sample_size=4, in_channels=1)  # what DiffusionModel reads
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.grouped(torch.tanh(self.conv(x)))) * (1 + t.view(-1, 1, 1, 1) / 1000)
        return self.head(torch.tanh(h).flatten(1)).view_as(x)


def grouped_net() -> DiffusionModel:
    torch.manual_seed(0)
    return frozen(GroupedNet(), "grouped")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run fastest on one thread (and far faster than two on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.from_numpy(to_model_range(load_builtin("digits").images[:40]))  # (40, 1, 8, 8)


@pytest.fixture(scope="module")
def unet() -> DiffusionModel:
    return tiny_unet()


@pytest.fixture(scope="module")
def full_factors(unet, digits) -> EkfacFactors:
    return fit_ekfac(unet, digits[:8], SAMPLES_PER_IMAGE, SEED, batch_size=8)


def dense_names(model: DiffusionModel) -> list[str]:
    return [n for n, _ in model.unet.named_parameters() if any(n.startswith(p) for p in DENSE_PREFIXES)]


def sizes_of(model: DiffusionModel) -> dict[str, int]:
    return {name: p.numel() for name, p in model.unet.named_parameters()}


def brute_force(model: DiffusionModel, names: list[str], images: torch.Tensor):
    """One plain autograd forward + backward per draw: A, S (float64) of every kronecker block from F.unfold
    and the layer-output gradients, and the per-sample gradients {name: (n, *shape)} of (eps_theta . v)."""
    blocks = [b for b in plan_blocks(model.unet, names) if b.kind == "kronecker"]
    modules = {b.key: model.unet.get_submodule(b.key) for b in blocks}
    names_of = {module: key for key, module in modules.items()}
    params = {
        n: p.detach().clone().requires_grad_(True) for n, p in model.unet.named_parameters() if n in names
    }
    A = {b.key: torch.zeros(b.shape[1], b.shape[1], dtype=torch.float64) for b in blocks}
    S = {b.key: torch.zeros(b.shape[0], b.shape[0], dtype=torch.float64) for b in blocks}
    positions, per_sample = {}, {n: [] for n in names}
    for x_t, t, v, _ in draw_samples(model, images, SAMPLES_PER_IMAGE, SEED, BATCH):
        for row in range(len(x_t)):
            seen = {}

            def record(module, args, output, seen=seen):
                seen.setdefault(names_of[module], (args[0], output))  # returns None: the output stays

            hooks = [m.register_forward_hook(record) for m in modules.values()]
            out = functional_call(model.unet, params, (x_t[row : row + 1], t[row : row + 1]))
            for hook in hooks:
                hook.remove()
            total = (getattr(out, "sample", out) * v[row : row + 1]).sum()
            grads = torch.autograd.grad(total, [seen[b.key][1] for b in blocks] + list(params.values()))
            for b, g in zip(blocks, grads):
                module, a = modules[b.key], seen[b.key][0].detach()
                if isinstance(module, nn.Conv2d):
                    a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)[0]
                    g = g.flatten(2)[0]  # (d_out, L); a: (C_in kh kw, L)
                else:
                    a, g = a.reshape(-1, a.shape[-1]).T, g.reshape(-1, g.shape[-1]).T
                a = torch.cat([a] * bool(b.weight) + [torch.ones(1, a.shape[1])] * bool(b.bias)).double()
                A[b.key] += a @ a.T
                S[b.key] += g.double() @ g.double().T
                positions[b.key] = a.shape[1]
            for name, g in zip(params, grads[len(blocks) :]):
                per_sample[name].append(g)
    count = len(images) * SAMPLES_PER_IMAGE
    A = {key: value / (count * positions[key]) for key, value in A.items()}
    return (
        A,
        {key: value / count for key, value in S.items()},
        {n: torch.stack(g) for n, g in per_sample.items()},
    )


def block_matrix(block, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """G~ = [dW | db] (n, d_out, d_in') of a kronecker block, (n, *shape) of a diagonal one."""
    if block.kind == "diagonal":
        return grads[block.key].double()
    names = [name for name in (block.weight, block.bias) if name]
    return torch.cat(
        [grads[name].flatten(2) if grads[name].ndim > 2 else grads[name][..., None] for name in names], dim=2
    ).double()


def loss_gradients(
    model: DiffusionModel, names: list[str], images: torch.Tensor, seed: int
) -> list[torch.Tensor]:
    """Per-example gradients of ||eps_theta(x_t, t) - eps||^2 at a random (t, eps) each, in `names` order."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, model.num_train_timesteps, (len(images),), generator=generator)
    eps = torch.randn(images.shape, generator=generator)
    abar = model.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * images + (1 - abar).sqrt() * eps
    params = {n: p.detach() for n, p in model.unet.named_parameters() if n in names}

    def loss(params, x, step, noise):
        return (functional_call(model.unet, params, (x[None], step[None])).sample - noise[None]).pow(2).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x_t, t, eps)
    return [grads[name] for name in names]


def flat(blocks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([b.flatten(1) for b in blocks], dim=1).double()


@pytest.mark.parametrize("which", ["unet", "grouped"])
def test_factors_match_brute_force(which, digits):
    """Q_A and Q_S diagonalize A and S from explicitly unfolded inputs and output gradients, and Lambda is
    the mean squared rotated per-sample gradient (E[g^2] for the diagonal blocks)."""
    model = tiny_unet() if which == "unet" else grouped_net()
    images = digits[:4] if which == "unet" else F.avg_pool2d(digits[:4], 2)
    names = [name for name, _ in model.unet.named_parameters()]
    factors = fit_ekfac(model, images, SAMPLES_PER_IMAGE, SEED, batch_size=BATCH)
    A, S, per_sample = brute_force(model, names, images)
    kinds = {b.key: b.kind for b in factors.blocks}
    if which == "grouped":  # a grouped conv and the GroupNorm have no Kronecker factors
        diagonal = ["grouped.weight", "grouped.bias", "norm.weight", "norm.bias"]
        assert list(kinds.items()) == [
            ("conv", "kronecker"),
            *((k, "diagonal") for k in diagonal),
            ("head", "kronecker"),
        ]
    assert set(A) == {key for key, kind in kinds.items() if kind == "kronecker"} and len(A) >= 2
    for key in A:
        for q, brute in ((factors.q_a[key].double(), A[key]), (factors.q_s[key].double(), S[key])):
            eye = torch.eye(len(q), dtype=torch.float64)
            assert torch.allclose(q.T @ q, eye, atol=1e-5), key
            rotated = q.T @ brute @ q  # diagonal iff q is an eigenbasis of the brute-force factor
            off = (rotated - torch.diag(torch.diagonal(rotated))).abs().max()
            assert off <= 1e-4 * brute.abs().max(), (key, float(off), float(brute.abs().max()))
    for block in factors.blocks:
        g = block_matrix(block, per_sample)  # (n, ...)
        if block.kind == "kronecker":
            g = factors.q_s[block.key].double().T @ g @ factors.q_a[block.key].double()
        expected = g.pow(2).mean(0)
        got = factors.eigenvalues[block.key].double()
        assert got.shape == expected.shape and torch.allclose(
            got, expected, rtol=1e-3, atol=1e-5 * expected.max()
        )


def test_preconditioned_inner_products_equal_dense_inverse(unet, digits):
    names = dense_names(unet)
    factors = fit_ekfac(unet, digits[:6], SAMPLES_PER_IMAGE, SEED, batch_size=BATCH, names=names)
    assert {b.kind for b in factors.blocks} == {"kronecker", "diagonal"}
    assert any(b.weight is None for b in factors.blocks if b.kind == "kronecker")  # the bias-only block
    assert any(b.bias is None for b in factors.blocks if b.kind == "kronecker")  # the weight-only block
    # H_dense = blockdiag_l (Q_S kron Q_A) diag(vec Lambda) (Q_S kron Q_A)^T
    parts = []
    for b in factors.blocks:
        lam = factors.eigenvalues[b.key].double().flatten()
        if b.kind == "kronecker":
            q = torch.kron(factors.q_s[b.key].double(), factors.q_a[b.key].double())
            parts.append(q @ torch.diag(lam) @ q.T)
        else:
            parts.append(torch.diag(lam))
    H = torch.block_diag(*parts)
    width = sum(sizes_of(unet)[n] for n in names)
    assert H.shape == (width, width) and width <= 5000
    damping = 0.1 * float(torch.cat([v.flatten() for v in factors.eigenvalues.values()]).double().mean())
    queries, train = (
        loss_gradients(unet, names, digits[10:13], 1),
        loss_gradients(unet, names, digits[20:25], 2),
    )
    q_by_name, i_by_name = dict(zip(names, queries)), dict(zip(names, train))
    gq = torch.cat([block_matrix(b, q_by_name).flatten(1) for b in factors.blocks], dim=1)  # (3, width)
    gi = torch.cat([block_matrix(b, i_by_name).flatten(1) for b in factors.blocks], dim=1)  # (5, width)
    exact = gq @ torch.linalg.solve(H + damping * torch.eye(width, dtype=torch.float64), gi.T)  # (3, 5)
    projector = EkfacProjector(factors, names, sizes_of(unet), dim=width, seed=0, relative_damping=0.1)
    assert math.isclose(projector.damping, damping, rel_tol=1e-9)
    got = flat(projector.precondition(queries)) @ flat(projector.precondition(train)).T
    assert torch.allclose(got, exact, rtol=1e-3, atol=1e-4 * exact.abs().max()), (got, exact)
    unsketched = projector.project(queries).double() @ projector.project(train).double().T  # dim == width
    assert torch.allclose(unsketched, exact, rtol=1e-3, atol=1e-4 * exact.abs().max())
    plain = gq @ gi.T  # preconditioning changes the scores: the test could not pass with H = I
    assert not torch.allclose(plain / plain.abs().max(), exact / exact.abs().max(), atol=0.05)


def test_count_sketch_approximates_exact_scores(unet, digits, full_factors):
    """At k = 32768 of 160k entries. Preconditioned gradients are nearly orthogonal (cosines ~0.02 here, raw
    gradients ~0.25), so the sketch needs a larger k than raw gradients do: 8192 gives ~0.83."""
    names, sizes = full_factors.names, sizes_of(unet)
    queries, train = (
        loss_gradients(unet, names, digits[8:12], 3),
        loss_gradients(unet, names, digits[12:36], 4),
    )
    projector = EkfacProjector(full_factors, names, sizes, dim=32768, seed=5, relative_damping=0.1)
    exact = flat(projector.precondition(queries)) @ flat(projector.precondition(train)).T  # (4, 24)
    sketched = projector.project(queries) @ projector.project(train).T
    assert sketched.shape == (4, 24) and sketched.dtype == torch.float32
    correlation = torch.corrcoef(torch.stack([exact.flatten(), sketched.double().flatten()]))[0, 1]
    assert correlation > 0.9, float(correlation)
    again = EkfacProjector(full_factors, names, sizes, dim=32768, seed=5, relative_damping=0.1)
    assert torch.equal(again.project(queries), projector.project(queries))  # rebuilt from the seed
    other = EkfacProjector(full_factors, names, sizes, dim=32768, seed=6, relative_damping=0.1)
    assert not torch.equal(other.project(queries), projector.project(queries))


def test_fit_is_deterministic_in_its_seed(unet, digits, full_factors):
    again = fit_ekfac(unet, digits[:8], SAMPLES_PER_IMAGE, SEED, batch_size=8)
    other = fit_ekfac(unet, digits[:8], SAMPLES_PER_IMAGE, SEED + 1, batch_size=8)
    key = "conv_out"
    assert torch.equal(again.eigenvalues[key], full_factors.eigenvalues[key])
    assert not torch.allclose(other.eigenvalues[key], full_factors.eigenvalues[key])
    x_t, t, v, context = next(draw_samples(unet, digits[:3], 2, SEED, 4))  # rows: images 0 0 1 1
    generator = torch.Generator().manual_seed(SEED)  # the documented order: t, then eps, then v
    t_hand = torch.randint(0, 1000, (4,), generator=generator)
    eps, v_hand = torch.randn(4, 1, 8, 8, generator=generator), torch.randn(4, 1, 8, 8, generator=generator)
    abar = unet.scheduler.alphas_cumprod[t_hand].float().view(-1, 1, 1, 1)
    x0 = digits[torch.tensor([0, 0, 1, 1])]
    assert torch.equal(t, t_hand) and torch.equal(v, v_hand) and context is None
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    steps = torch.cat([t for _, t, _, _ in draw_samples(unet, digits, 5, SEED, 64)])
    assert len(steps) == 200 and 0 <= int(steps.min()) and int(steps.max()) < unet.num_train_timesteps
    assert full_factors.samples == 16 and full_factors.names == [n for n, _ in unet.unet.named_parameters()]


def test_factors_round_trip(tmp_path, unet, digits, full_factors):
    full_factors.save(tmp_path / "ekfac")
    loaded = EkfacFactors.load(tmp_path / "ekfac", unet, full_factors.names)
    assert loaded.blocks == full_factors.blocks and loaded.names == full_factors.names
    assert (loaded.samples, loaded.seed, loaded.weights_hash) == (16, SEED, "tiny")
    for field in ("eigenvalues", "q_a", "q_s"):
        saved = getattr(full_factors, field)
        assert set(getattr(loaded, field)) == set(saved)
        assert all(torch.equal(getattr(loaded, field)[key], saved[key]) for key in saved)
    grads = loss_gradients(unet, full_factors.names, digits[:2], 0)
    sizes = sizes_of(unet)
    before = EkfacProjector(full_factors, full_factors.names, sizes, 512, 0, 0.1).project(grads)
    assert torch.equal(EkfacProjector(loaded, loaded.names, sizes, 512, 0, 0.1).project(grads), before)


def test_load_refuses_factors_that_do_not_fit(tmp_path, unet, full_factors):
    full_factors.save(tmp_path / "ekfac")
    narrow = tiny_unet(UNetConfig(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4))
    names = [n for n, _ in narrow.unet.named_parameters()]
    assert names == full_factors.names  # the same layers, other shapes
    with pytest.raises(ExplorerError, match=r"conv_in.*does not fit.*fit the factors again"):
        EkfacFactors.load(tmp_path / "ekfac", narrow, names)
    with pytest.raises(
        ExplorerError, match=r"cover other parameters \(missing \[\], extra \['conv_out.bias'\]"
    ):
        EkfacFactors.load(tmp_path / "ekfac", unet, full_factors.names[:-1])
    with pytest.raises(ExplorerError, match="unreadable.*fit the factors again"):
        EkfacFactors.load(tmp_path / "nowhere", unet, full_factors.names)
    tensors = load_file(str(tmp_path / "ekfac" / "ekfac.safetensors"))
    save_file({**tensors, "q_a/conv_out": torch.eye(3)}, str(tmp_path / "ekfac" / "ekfac.safetensors"))
    with pytest.raises(ExplorerError, match=r"q_a of 'conv_out' is \(3, 3\), not \(145, 145\)"):
        EkfacFactors.load(tmp_path / "ekfac", unet, full_factors.names)


def test_errors_name_the_bad_value(unet, digits, full_factors):
    names, sizes = full_factors.names, sizes_of(unet)
    with pytest.raises(ExplorerError, match=r"images of shape \(2, 1, 16, 16\) do not fit"):
        fit_ekfac(unet, torch.zeros(2, 1, 16, 16), 1, 0)
    with pytest.raises(ExplorerError, match="samples_per_image 0 must be"):
        fit_ekfac(unet, digits[:2], 0, 0)
    with pytest.raises(ExplorerError, match=r"\['nope'\] are not parameters of this model"):
        fit_ekfac(unet, digits[:2], 1, 0, names=["nope"])
    with pytest.raises(ExplorerError, match="relative_damping 0 must be > 0"):
        EkfacProjector(full_factors, names, sizes, 64, 0, 0)
    with pytest.raises(ExplorerError, match="cover 104 parameters, not these 103"):
        EkfacProjector(full_factors, names[1:], sizes, 64, 0, 0.1)
    with pytest.raises(ExplorerError, match="'conv_in.weight' has 3 entries, the factors 144"):
        EkfacProjector(full_factors, names, {**sizes, "conv_in.weight": 3}, 64, 0, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: run with -m gpu on a machine that has one"
)
def test_cuda_fit_and_projection_match_the_cpu(unet, digits, full_factors):
    on_gpu = frozen(copy.deepcopy(unet.unet).cuda(), "tiny")
    factors = fit_ekfac(on_gpu, digits[:8], SAMPLES_PER_IMAGE, SEED, batch_size=8)
    assert factors.blocks == full_factors.blocks and factors.eigenvalues["conv_out"].device.type == "cpu"
    for block in factors.blocks:  # trace(Lambda) = E ||G_n||^2 whatever the eigenbasis (cuDNN convs: TF32)
        got, expected = factors.eigenvalues[block.key].sum(), full_factors.eigenvalues[block.key].sum()
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-6)
    grads = loss_gradients(unet, full_factors.names, digits[:3], 0)
    projector = EkfacProjector(full_factors, full_factors.names, sizes_of(unet), 4096, 0, 0.1)
    expected = projector.project(grads)
    got = projector.project([g.cuda() for g in grads])
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
