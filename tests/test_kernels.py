"""The fused Triton ops of kernels/ against their PyTorch references, forward and backward.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with one they run on CUDA. Shapes stay tiny (the interpreter is slow) and use small
blocks so that even tiny tensors span many programs with a ragged last chunk. Each comparison prints its
max abs difference (`pytest -s` shows them).
"""

import math

import pytest
import torch

import kernels
from kernels import _triton
from kernels.ratio_loss import clipped_ratio_loss_reference
from kernels.ratio_loss_triton import clipped_ratio_loss_triton
from kernels.sde_logprob import sde_log_prob_reference
from kernels import sde_logprob_triton
from kernels.sde_logprob_triton import sde_log_prob_triton
from titan_flow.config.job_config import Training
from titan_flow.config.manager import ConfigError, job_config_from_dict
from titan_flow.rl.sde import sde_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 64  # elements per program in the SDE tests; samples per tile is 16 in the loss tests
SDE_OUTPUTS = ("log_prob", "mean", "kl", "ratio_bias")
LOSS_OUTPUTS = ("loss", "ratio", "clipfrac", "clipfrac_gt_one", "clipfrac_lt_one", "approx_kl")


def close(label, got, want, rtol, atol):
    """assert_close that also prints the max abs difference (NaN/inf must sit at the same places)."""
    assert got.dtype == want.dtype, f"{label}: dtype {got.dtype} != {want.dtype}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{label}: {m}")
    finite = torch.isfinite(want)
    diff = (got.double() - want.double())[finite].abs().max().item() if finite.any() else 0.0
    print(f"[max abs diff] {label}: {diff:.3g}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sde_inputs(batch, shape, dtype=torch.float32, seed=0, coef_dtype=torch.float32, dtypes=None):
    """v, x, x_next, v_ref, mean_old (in `dtype`, or per name in `dtypes`) and positive (B,) coefficients.

    x_next and mean_old lie near the step mean, as in training, so the log-prob is O(1).
    """
    g = gen(seed)
    dtypes = dtypes or {}
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    coef_x, coef_v = 1 + 0.1 * rand(batch), -0.3 + 0.1 * rand(batch)
    uniform = lambda: torch.rand(batch, generator=g, dtype=torch.float64)  # noqa: E731
    std, kl_std = 0.3 + uniform(), 1 + uniform()
    v, x, v_ref = rand(batch, *shape), rand(batch, *shape), rand(batch, *shape)
    mean = coef_x.view(-1, *[1] * len(shape)) * x + coef_v.view(-1, *[1] * len(shape)) * v
    s = std.view(-1, *[1] * len(shape))
    tensors = dict(v=v, x=x, x_next=mean + s * rand(batch, *shape), v_ref=v_ref,
                   mean_old=mean + 0.2 * s * rand(batch, *shape))
    out = {k: t.to(device=DEVICE, dtype=dtypes.get(k, dtype)) for k, t in tensors.items()}
    out.update({k: t.to(device=DEVICE, dtype=coef_dtype) for k, t in
                dict(coef_x=coef_x, coef_v=coef_v, std=std, kl_std=kl_std).items()})
    return out


def sde_call(fn, inp, kind, with_ref=True, with_old=True, return_mean=True, **kw):
    return fn(inp["v"], inp["x"], inp["x_next"], inp["coef_x"], inp["coef_v"], inp["std"], kind,
              v_ref=inp["v_ref"] if with_ref else None, kl_std=inp["kl_std"] if with_ref else None,
              mean_old=inp["mean_old"] if with_old else None, return_mean=return_mean, **kw)


def compare_sde(label, inp, kind, fwd_tol, grad_tol, with_ref=True, with_old=True, return_mean=True, grad_x=True,
                block_size=BLOCK):
    """Forward outputs and d/dv, d/dx (under random upstream gradients on every output) vs the reference."""
    results = []
    for fn, kw in ((sde_log_prob_triton, dict(block_size=block_size)), (sde_log_prob_reference, {})):
        v = inp["v"].detach().clone().requires_grad_()
        x = inp["x"].detach().clone().requires_grad_(grad_x)
        out = sde_call(fn, dict(inp, v=v, x=x), kind, with_ref, with_old, return_mean, **kw)
        g = gen(99)
        pairs = [(o, torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)) for o in out if o is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], [v, x] if grad_x else [v], [u for _, u in pairs])
        results.append((out, grads))
    (got, got_grads), (want, want_grads) = results
    for name, a, b in zip(SDE_OUTPUTS, got, want):
        assert (a is None) == (b is None), f"{name}: present in one implementation only"
        if a is not None:
            close(f"{label} {name}", a, b, *fwd_tol)
    for name, a, b in zip(("grad_v", "grad_x"), got_grads, want_grads):
        close(f"{label} {name}", a, b, *grad_tol)


FP32 = (2e-6, 2e-6)
FP64 = (1e-12, 1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "squared"])
@pytest.mark.parametrize("batch, shape", [(1, (3, 5, 7)), (3, (4, 9, 11)), (2, (16, 8, 8)), (5, (6,))])
def test_sde_log_prob_matches_reference_fp32(batch, shape, kind):
    # 105 and 396 elements: ragged last chunk; 1024: exact multiple of the block; 6: one mostly empty chunk
    compare_sde(f"sde fp32 {kind} {batch}x{shape}", sde_inputs(batch, shape, seed=batch), kind, FP32, FP32)


@pytest.mark.parametrize("with_ref, with_old, return_mean", [(False, False, False), (True, False, False),
                                                            (False, True, True)])
def test_sde_log_prob_optional_outputs_match_reference(with_ref, with_old, return_mean):
    # the training call: gradient for v only (x is a stored latent), optional outputs absent
    inp = sde_inputs(2, (3, 7, 9), seed=1)
    compare_sde(f"sde fp32 ref={with_ref} old={with_old} mean={return_mean}", inp, "gaussian", FP32, FP32,
                with_ref, with_old, return_mean, grad_x=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sde_log_prob_half_inputs_accumulate_in_fp32(dtype):
    # both read the same half-precision values as fp32: outputs agree to fp32 rounding; the gradients are
    # rounded to the input dtype at the end, so they agree to one unit in its last place (Triton's
    # interpreter also truncates fp32 -> bf16 where GPUs and PyTorch round to nearest even)
    half_ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    inp = sde_inputs(3, (4, 9, 11), dtype=dtype, seed=2)
    compare_sde(f"sde {dtype}", inp, "gaussian", FP32, (half_ulp, 1e-5))
    compare_sde(f"sde {dtype} squared", inp, "squared", FP32, (half_ulp, 1e-5))
    # the real mix: bf16/fp16 velocities from the model, fp32 stored latents
    mixed = sde_inputs(3, (4, 9, 11), seed=3, dtypes=dict(v=dtype, v_ref=dtype))
    compare_sde(f"sde v={dtype} x=fp32", mixed, "gaussian", FP32, (half_ulp, 1e-5))


def test_sde_log_prob_fp64_matches_reference():
    inp = sde_inputs(3, (5, 13), dtype=torch.float64, coef_dtype=torch.float64, seed=4)
    for kind in ("gaussian", "squared"):
        compare_sde(f"sde fp64 {kind}", inp, kind, FP64, FP64)


@pytest.mark.parametrize("kind", ["gaussian", "squared"])
def test_sde_log_prob_gradcheck_fp64(kind):
    inp = sde_inputs(2, (3, 5), dtype=torch.float64, coef_dtype=torch.float64, seed=5)

    def fn(v, x):
        out = sde_call(sde_log_prob_triton, dict(inp, v=v, x=x), kind, block_size=16)
        return tuple(o for o in out if o is not None)

    v, x = inp["v"].clone().requires_grad_(), inp["x"].clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (v, x), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_sde_chunk_sums_over_several_finishing_tiles(monkeypatch):
    # more chunks per sample (41) than the finishing kernel reads at once (shrunk from 1024 to 16)
    monkeypatch.setattr(sde_logprob_triton, "MAX_FINISH_BLOCK", 16)
    inp = sde_inputs(2, (40 * 16 + 5,), seed=6)
    compare_sde("sde fp32 41 chunks", inp, "gaussian", FP32, FP32, block_size=16)


def test_sde_default_blocks_match_reference():
    # the block the op picks itself: 1024 for 1500 elements per sample, so two chunks, the second ragged
    assert sde_logprob_triton._block_for(2, 1500, None) == 1024
    compare_sde("sde fp32 default block", sde_inputs(2, (3, 500), seed=24), "gaussian", FP32, FP32, block_size=None)


def test_sde_log_prob_is_deterministic_and_on_policy_ratio_is_one():
    inp = sde_inputs(3, (4, 9, 11), seed=7)
    a = sde_call(sde_log_prob_triton, inp, "gaussian", block_size=BLOCK)
    b = sde_call(sde_log_prob_triton, inp, "gaussian", block_size=BLOCK)
    for name, p, q in zip(SDE_OUTPUTS, a, b):
        assert torch.equal(p, q), name
    loss = clipped_ratio_loss_triton(a.log_prob, b.log_prob, torch.randn(3, device=DEVICE), 1e-5, 1e-5, 5.0)
    assert torch.equal(loss.ratio, torch.ones(3, device=DEVICE)) and loss.clipfrac.item() == 0


def loss_inputs(batch, seed=0, dtype=torch.float32, spread=0.15):
    g = gen(seed)
    r = lambda: torch.randn(batch, generator=g, dtype=torch.float64)  # noqa: E731
    t = dict(log_prob=-1 + spread * r(), old_log_prob=-1 + spread * r(), advantages=2 * r(),
             ratio_scale=0.5 + torch.rand(batch, generator=g, dtype=torch.float64), ratio_bias=0.05 * r().abs())
    return {k: v.to(device=DEVICE, dtype=dtype) for k, v in t.items()}


def loss_call(fn, inp, ratio_norm, clip=(0.1, 0.05), adv_clip_max=2.5, loss_weight=1.0, **kw):
    return fn(inp["log_prob"], inp["old_log_prob"], inp["advantages"], *clip, adv_clip_max,
              ratio_scale=inp["ratio_scale"] if ratio_norm else None,
              ratio_bias=inp["ratio_bias"] if ratio_norm else None, loss_weight=loss_weight, **kw)


def compare_loss(label, inp, ratio_norm, fwd_tol, grad_tol, **call_kw):
    names = ["log_prob", "old_log_prob", "advantages"] + (["ratio_scale", "ratio_bias"] if ratio_norm else [])
    results = []
    for fn, kw in ((clipped_ratio_loss_triton, dict(block_size=16)), (clipped_ratio_loss_reference, {})):
        leaves = {k: v.detach().clone().requires_grad_(k in names) for k, v in inp.items()}
        out = loss_call(fn, leaves, ratio_norm, **call_kw, **kw)
        grads = torch.autograd.grad(out.loss, [leaves[k] for k in names], torch.tensor(0.7, device=DEVICE).to(out.loss))
        results.append((out, grads))
    (got, got_grads), (want, want_grads) = results
    for name, a, b in zip(LOSS_OUTPUTS, got, want):
        close(f"{label} {name}", a, b, *fwd_tol)
    for name, a, b in zip(names, got_grads, want_grads):
        close(f"{label} d/d{name}", a, b, *grad_tol)
    return got


@pytest.mark.parametrize("ratio_norm", [False, True])
@pytest.mark.parametrize("batch", [1, 5, 100])
def test_clipped_ratio_loss_matches_reference(batch, ratio_norm):
    # 100 samples: 7 tiles of 16, the last ragged; asymmetric clip range and Guard's 1/|dt| loss weight
    out = compare_loss(f"loss fp32 B={batch} rationorm={ratio_norm}", loss_inputs(batch, seed=batch), ratio_norm,
                       FP32, FP32, loss_weight=1 / 0.0467)
    if batch == 100:  # the data exercise both clip sides and the advantage clip
        assert 0 < out.clipfrac_gt_one.item() < 1 and 0 < out.clipfrac_lt_one.item() < 1


def test_clipped_ratio_loss_counts_are_exact():
    # clip fractions are counts / B: exactly the reference's (no ratio within rounding of a bound here)
    inp = loss_inputs(100, seed=8)
    for ratio_norm in (False, True):
        a = loss_call(clipped_ratio_loss_triton, inp, ratio_norm, block_size=16)
        b = loss_call(clipped_ratio_loss_reference, inp, ratio_norm)
        for name in ("clipfrac", "clipfrac_gt_one", "clipfrac_lt_one"):
            assert getattr(a, name).item() == getattr(b, name).item(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_clipped_ratio_loss_other_dtypes(dtype):
    tol = FP64 if dtype == torch.float64 else FP32
    grad_tol = tol if dtype == torch.float64 else (2**-7, 1e-6)
    compare_loss(f"loss {dtype}", loss_inputs(37, seed=9, dtype=dtype), True, tol, grad_tol)


@pytest.mark.parametrize("ratio_norm", [False, True])
def test_clipped_ratio_loss_gradcheck_fp64(ratio_norm):
    # hand-placed points away from the clip bounds (ratio 0.9 / 1.05) and the advantage bound (2.5),
    # where the loss is not differentiable; some inside, some beyond each bound
    diff = torch.tensor([-0.5, -0.05, 0.0, 0.02, 0.3, -0.2, 0.1], dtype=torch.float64, device=DEVICE)
    adv = torch.tensor([1.0, -2.0, 3.0, 0.5, -4.0, 1.5, -1.0], dtype=torch.float64, device=DEVICE)
    old = torch.full_like(diff, -1.0)
    scale = torch.full_like(diff, 1.0) if ratio_norm else None
    bias = torch.full_like(diff, 0.0) if ratio_norm else None
    args = [t.clone().requires_grad_() for t in (old + diff, old, adv) + ((scale, bias) if ratio_norm else ())]

    def fn(*a):
        return clipped_ratio_loss_triton(a[0], a[1], a[2], 0.1, 0.05, 2.5, *a[3:], loss_weight=3.0, block_size=16).loss

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_every_output_element_is_written(monkeypatch):
    # every buffer the Triton ops allocate starts as NaN; a chunk or tile left unwritten would show up
    allocated = []

    def poisoned(shape, dtype, device):
        t = torch.full(shape, float("nan"), dtype=dtype, device=device)
        allocated.append(t)
        return t

    monkeypatch.setattr(_triton, "empty", poisoned)
    compare_sde("poisoned sde", sde_inputs(3, (4, 9, 11), seed=10), "gaussian", FP32, FP32)
    bf16 = sde_inputs(2, (5, 7), dtype=torch.bfloat16, seed=11)
    compare_sde("poisoned sde bf16", bf16, "squared", FP32, (2**-7, 1e-5))
    compare_loss("poisoned loss", loss_inputs(40, seed=12), True, FP32, FP32)
    # sums, mean, log_prob, kl, ratio_bias, grad_v, grad_x (twice); ratio, 5 scalars, 5 gradients
    assert len(allocated) == 2 * 7 + 11


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nan_and_inf_propagate_like_the_reference():
    inp = sde_inputs(4, (3, 5, 7), seed=13)
    inp["v"][0, 1, 2, 3] = float("nan")  # sample 0: NaN everywhere downstream of its mean
    inp["x_next"][1, 0, 0, 0] = float("inf")  # sample 1: log-prob -inf
    inp["v_ref"][2, 2, 4, 6] = float("-inf")  # sample 2: KL inf, log-prob finite
    for kind in ("gaussian", "squared"):
        compare_sde(f"nan/inf sde {kind}", inp, kind, FP32, FP32)
    out = sde_call(sde_log_prob_triton, inp, "gaussian", block_size=BLOCK)
    assert out.log_prob[0].isnan() and out.log_prob[1] == -math.inf and out.kl[2] == math.inf
    assert out.log_prob[2:].isfinite().all() and out.kl[3].isfinite()

    loss = loss_inputs(6, seed=14)
    loss["log_prob"][0] = float("nan")  # ratio NaN -> loss NaN
    loss["advantages"][1] = float("inf")  # clipped to adv_clip_max: finite
    loss["old_log_prob"][2] = float("-inf")  # ratio +inf
    for ratio_norm in (False, True):
        out = compare_loss(f"nan/inf loss rationorm={ratio_norm}", loss, ratio_norm, FP32, FP32)
        assert out.loss.isnan() and out.ratio[0].isnan() and out.ratio[2] == math.inf and out.ratio[1].isfinite()
    # zero advantage times an infinite ratio: NaN in the unclipped branch, which the max must keep
    zero = loss_inputs(3, seed=15)
    zero["advantages"][0], zero["old_log_prob"][0] = 0.0, float("-inf")
    out = compare_loss("nan/inf loss 0*inf", zero, False, FP32, FP32)
    assert out.loss.isnan()


@pytest.fixture
def restore_backend():
    yield
    kernels.set_backend("auto")


def uses_triton(out):
    return type(out.grad_fn).__name__.startswith(("_SdeLogProb", "_ClippedRatioLoss"))


def test_dispatch_picks_triton_on_cuda_and_the_reference_elsewhere(restore_backend):
    inp = sde_inputs(2, (3, 4), seed=16)
    inp["v"].requires_grad_()
    loss = loss_inputs(4, seed=17)
    loss["log_prob"].requires_grad_()

    def backends():
        out = sde_call(kernels.sde_log_prob, inp, "gaussian")
        pl = loss_call(kernels.clipped_ratio_loss, loss, True)
        return uses_triton(out.log_prob), uses_triton(pl.loss)

    assert kernels.get_backend() == "auto" and backends() == (DEVICE == "cuda",) * 2
    for name, want in (("triton", True), ("torch", False)):
        kernels.set_backend(name)
        assert backends() == (want, want)
        out = sde_call(kernels.sde_log_prob, inp, "gaussian", backend="torch" if want else "triton")
        assert uses_triton(out.log_prob) != want  # the per-call override beats the process-wide one
    with pytest.raises(ValueError, match=r"kernel backend 'cuda' is not one of .*training.kernel_backend"):
        kernels.set_backend("cuda")


@pytest.mark.parametrize("latent", [(4, 6, 6), (4, 3, 4, 6)], ids=["image", "video"])
def test_rl_step_with_forced_triton_matches_torch(restore_backend, latent):
    # the caller in rl/sde.py: per-sample sigmas (the coefficients come from step_coefficients), image
    # latents (B, C, H, W) and video latents (B, C, F, H, W); d/dv through both backends
    sigmas = torch.tensor([1.0, 0.9601, 0.9133, 0.8577], device=DEVICE)
    v = torch.randn(3, *latent, generator=gen(18)).to(DEVICE)
    x, x_next = torch.randn(2, 3, *latent, generator=gen(19)).to(DEVICE)
    outs = {}
    for name in ("triton", "torch"):
        kernels.set_backend(name)
        for sde_type in ("sde", "cps", "wan"):
            v_in = v.clone().requires_grad_()
            out = sde_step(v_in, x, sigmas[:3], sigmas[1:], 0.7, sde_type, prev_sample=x_next,
                           sigma_fallback=sigmas[1], v_ref=v.flip(0), mean_old=x, return_mean=True)
            (grad_v,) = torch.autograd.grad(out.log_prob.sum() + out.kl.sum() + out.ratio_bias.sum(), v_in)
            outs[name, sde_type] = {"log_prob": out.log_prob, "mean": out.mean, "kl": out.kl,
                                    "ratio_bias": out.ratio_bias, "grad_v": grad_v}
    for sde_type in ("sde", "cps", "wan"):
        for name, a in outs["triton", sde_type].items():
            close(f"sde_step {latent} {sde_type} {name}", a.detach(), outs["torch", sde_type][name].detach(), *FP32)


def test_kernel_backend_config_field():
    assert Training().kernel_backend == "auto"
    assert job_config_from_dict({"training": {"kernel_backend": "triton"}}).training.kernel_backend == "triton"
    with pytest.raises(ConfigError, match="training.kernel_backend: 'cuda' is not allowed"):
        job_config_from_dict({"training": {"kernel_backend": "cuda"}})


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the Triton backend runs; this is about CPU tensors")
def test_forcing_triton_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRETED", False)
    inp = sde_inputs(2, (3, 4), seed=20)
    with pytest.raises(ValueError, match=r"Triton runs only on CUDA tensors .*TRITON_INTERPRET=1.*kernel_backend"):
        sde_call(kernels.sde_log_prob, inp, "gaussian", backend="triton")
    loss = loss_inputs(4, seed=21)
    with pytest.raises(ValueError, match="Triton runs only on CUDA tensors"):
        loss_call(kernels.clipped_ratio_loss, loss, False, backend="triton")


def test_bad_arguments_are_named():
    inp = sde_inputs(2, (3, 4), seed=22)
    with pytest.raises(ValueError, match="log-prob kind 'cps' is not one of"):
        sde_call(sde_log_prob_triton, inp, "cps")
    with pytest.raises(ValueError, match="kl_std is required with v_ref"):
        sde_log_prob_triton(inp["v"], inp["x"], inp["x_next"], inp["coef_x"], inp["coef_v"], inp["std"], "gaussian",
                            v_ref=inp["v_ref"])
    with pytest.raises(ValueError, match=r"x_next has shape \(2, 12\) but v has \(2, 3, 4\)"):
        sde_call(sde_log_prob_triton, dict(inp, x_next=inp["x_next"].flatten(1)), "gaussian")
    with pytest.raises(ValueError, match=r"std must have shape \(B,\) = \(2,\), got \(1,\)"):
        sde_call(sde_log_prob_triton, dict(inp, std=inp["std"][:1]), "gaussian")
    with pytest.raises(ValueError, match="coef_v requires grad, but the Triton op treats it as a constant"):
        sde_call(sde_log_prob_triton, dict(inp, coef_v=inp["coef_v"].clone().requires_grad_()), "gaussian")
    with pytest.raises(ValueError, match="block_size must be a power of two >= 16, got 48"):
        sde_call(sde_log_prob_triton, inp, "gaussian", block_size=48)
    loss = loss_inputs(4, seed=23)
    with pytest.raises(ValueError, match="RatioNorm needs both ratio_scale and ratio_bias"):
        clipped_ratio_loss_triton(loss["log_prob"], loss["old_log_prob"], loss["advantages"], 0.1, 0.1, 5.0,
                                  ratio_scale=loss["ratio_scale"])
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\) but log_prob has \(4,\)"):
        loss_call(clipped_ratio_loss_triton, dict(loss, advantages=loss["advantages"][:3]), False)
