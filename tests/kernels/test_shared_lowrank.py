"""Triton shared/skip low-rank kernel against the float64 reference and the torch path.

On CPU the kernel runs under TRITON_INTERPRET=1 (see conftest), which is exact for fp32/fp16 and
wrong for bf16; bf16 is therefore checked on CUDA only. Small blocks make small shapes cover the
ragged edges, several rank slices (fp32 atomic accumulation) and the single-slice store path.
"""

from __future__ import annotations

import os

import pytest
import torch

from rankfold.kernels import choose_backend, shared_lowrank
from rankfold.kernels.reference import shared_lowrank_torch

triton = pytest.importorskip("triton")
from rankfold.kernels.triton_lowrank import default_blocks, shared_lowrank_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: Triton cannot run here", allow_module_level=True)

SMALL = {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 16, "BLOCK_N": 16}
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _problem(n: int, rank: int, rows: list[int], lead: tuple[int, ...], skip: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=gen, dtype=torch.float64)
    a = torch.randn(rank, n - rank if skip else n, generator=gen, dtype=torch.float64) / n ** 0.5
    bs = [torch.randn(m, rank, generator=gen, dtype=torch.float64) / rank ** 0.5 for m in rows]
    permutation = torch.randperm(n, generator=gen) if skip else None
    return x, a, bs, permutation


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).norm() / want.norm())


def _run(x, a, bs, permutation, dtype, blocks=SMALL, biases=None):
    cast = lambda t: t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return shared_lowrank_triton(cast(x), cast(a), [cast(b) for b in bs],
                                 permutation.to(DEVICE) if permutation is not None else None,
                                 [cast(b) for b in biases] if biases is not None else None, blocks=blocks)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, rank, rows, lead", [
    (48, 16, [32], (16,)),                # aligned, one rank slice: plain store
    (45, 19, [33, 17, 9], (3, 7)),        # ragged everywhere, three members, 3-D input
    (64, 40, [24, 24], (1,)),             # decode: one token
    (37, 30, [50, 7, 11, 5], (21,)),      # four members: two launches; skip leaves n - r = 7
    (70, 3, [2], (5,)),                   # rank and outputs smaller than a block
])
def test_kernel_matches_fp64_reference(n, rank, rows, lead, skip, dtype):
    x, a, bs, permutation = _problem(n, rank, rows, lead, skip)
    outputs = _run(x, a, bs, permutation, dtype)
    assert len(outputs) == len(bs)
    for b, got in zip(bs, outputs):
        assert got.shape == (*lead, b.shape[0]) and got.dtype == dtype
        assert _relative(got, shared_lowrank_torch(x, a, b, permutation)) < TOLERANCE[dtype]


@pytest.mark.parametrize("skip", [False, True])
def test_kernel_agrees_with_torch_path_in_fp16(skip):
    """Both round z to fp16 at the same point: they differ only by accumulation order."""
    x, a, bs, permutation = _problem(40, 24, [30, 10], (9,), skip, seed=3)
    half = lambda t: t.to(torch.float16)  # noqa: E731
    kernel = _run(x, a, bs, permutation, torch.float16)
    torch_path = shared_lowrank(half(x), half(a), [half(b) for b in bs], permutation, backend="torch")
    for got, want in zip(kernel, torch_path):
        assert _relative(got, want.double()) < 2e-3


def test_bias_and_default_blocks():
    x, a, bs, permutation = _problem(96, 40, [80, 24], (2, 20), skip=True, seed=5)
    gen = torch.Generator().manual_seed(6)
    biases = [torch.randn(b.shape[0], generator=gen, dtype=torch.float64) for b in bs]
    outputs = _run(x, a, bs, permutation, torch.float32, blocks=None, biases=biases)
    for b, bias, got in zip(bs, biases, outputs):
        assert _relative(got, shared_lowrank_torch(x, a, b, permutation, bias)) < TOLERANCE[torch.float32]


def test_empty_input_gives_empty_outputs():
    x, a, bs, permutation = _problem(32, 8, [16], (0,), skip=True)
    (out,) = _run(x, a, bs, permutation, torch.float32)
    assert out.shape == (0, 16)


@pytest.mark.skipif(DEVICE == "cpu", reason="the Triton interpreter computes bf16 wrongly; bf16 needs a GPU")
def test_kernel_bf16_on_gpu():
    x, a, bs, permutation = _problem(4096 // 16, 96, [256, 64], (33,), skip=True)
    for b, got in zip(bs, _run(x, a, bs, permutation, torch.bfloat16)):
        assert _relative(got, shared_lowrank_torch(x, a, b, permutation)) < TOLERANCE[torch.bfloat16]


def test_shape_and_dtype_errors_name_the_problem():
    x, a, bs, permutation = _problem(32, 8, [16], (4,), skip=True)
    with pytest.raises(ValueError, match=r"expected \(8, 24\)"):
        shared_lowrank_triton(x.float(), a[:, :-1].float(), [bs[0].float()], permutation)
    with pytest.raises(ValueError, match="every B must be"):
        shared_lowrank_triton(x.float(), a.float(), [bs[0][:, :-1].float()], permutation)
    with pytest.raises(ValueError, match="input is torch.float64"):
        shared_lowrank_triton(x, a.float(), [bs[0].float()], permutation)


def test_default_blocks_split_decode_finer():
    assert default_blocks(1, 2048)["BLOCK_R"] < default_blocks(512, 2048)["BLOCK_R"]


def test_dispatch_picks_torch_on_cpu_and_honours_override(monkeypatch):
    cpu = torch.zeros(2, 3)
    monkeypatch.delenv("RANKFOLD_KERNELS", raising=False)
    assert choose_backend(cpu) == "torch"
    assert choose_backend(cpu, "triton") == "triton"
    monkeypatch.setenv("RANKFOLD_KERNELS", "triton")
    assert choose_backend(cpu) == "triton"
    monkeypatch.setenv("RANKFOLD_KERNELS", "cuda")
    with pytest.raises(ValueError, match="RANKFOLD_KERNELS"):
        choose_backend(cpu)


@pytest.mark.parametrize("skip", [False, True])
def test_modules_give_the_same_logits_through_the_kernel(monkeypatch, skip):
    """A compressed attention block run through the Triton path equals the torch path."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from rankfold.modules.layout import CompressedModule, apply_layout

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                         vocab_size=16, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0)
    apply_layout(layer, [CompressedModule("shared", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                          12, "self_attn.attn_in", skip),
                         CompressedModule("shared", ("mlp.gate_proj", "mlp.up_proj"), 20, "mlp.mlp_in", skip),
                         CompressedModule("lowrank", ("mlp.down_proj",), 10)])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in layer.named_parameters():  # noqa: B007
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        for name, buffer in layer.named_buffers():
            if name.endswith("permutation"):
                buffer.copy_(torch.randperm(buffer.numel(), generator=gen))
    layer = layer.to(DEVICE)
    hidden = torch.randn(2, 6, 32, generator=gen).to(DEVICE)
    position = LlamaRotaryEmbedding(config).to(DEVICE)(hidden, torch.arange(6, device=DEVICE)[None])
    monkeypatch.setenv("RANKFOLD_KERNELS", "torch")
    want = layer(hidden, position_embeddings=position)
    monkeypatch.setenv("RANKFOLD_KERNELS", "triton")
    got = layer(hidden, position_embeddings=position)
    want = want[0] if isinstance(want, tuple) else want
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("skip", [False, True])
def test_torch_path_matches_fp64_reference(dtype, skip):
    """The CPU path of the compressed modules, in every dtype a model may run in."""
    x, a, bs, permutation = _problem(72, 24, [40, 12], (3, 11), skip, seed=9)
    cast = lambda t: t.to(dtype)  # noqa: E731
    outputs = shared_lowrank(cast(x), cast(a), [cast(b) for b in bs], permutation, backend="torch")
    for b, got in zip(bs, outputs):
        assert got.dtype == dtype
        assert _relative(got, shared_lowrank_torch(x, a, b, permutation)) < TOLERANCE[dtype]
