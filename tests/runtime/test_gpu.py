"""GPU checks of the 2:4 runtime (marked `gpu`; skipped without CUDA): bf16 kernels against a float64
reference at Llama-like shapes, PyTorch's cuSPARSELt path, and a CUDA-graph-captured projection."""

import pytest
import torch

from conftest import random_2_4_weight
from distill.runtime import CrossoverTable, Sparse24Linear
from distill.runtime.layout import compress_2_4
from distill.runtime.triton_kernels import sparse24_matmul

pytestmark = pytest.mark.gpu


def relative_error(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("m", [1, 4, 16, 33, 256])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (576, 1536)])
def test_triton_kernel_bf16_matches_float64(m, n, k):
    weight = random_2_4_weight(n, k, torch.bfloat16).cuda()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    values, meta = compress_2_4(weight)
    out = sparse24_matmul(x, values, meta, out=torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16))
    assert not torch.isnan(out).any()
    assert relative_error(out, x.double() @ weight.double().T) < 1e-2


@pytest.mark.parametrize("path", ["triton", "cusparselt", "dense"])
def test_every_path_of_sparse24_linear_matches_the_reference(path):
    n, k, m = 2048, 4096, 64
    weight = random_2_4_weight(n, k, torch.bfloat16).cuda()
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    table = CrossoverTable("test", {f"{n}x{k}": [{"max_m": None, "path": path}]})
    layer = Sparse24Linear.from_dense(weight, bias, "probe", table)
    x = torch.randn(3, m, k, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    assert layer.kernel_path(x) == path
    assert relative_error(out, x.double() @ weight.double().T + bias.double()) < 1e-2


def test_projection_replays_inside_a_cuda_graph():
    n, k, m = 4096, 4096, 8
    weight = random_2_4_weight(n, k, torch.bfloat16).cuda()
    layer = Sparse24Linear.from_dense(weight, None, "probe", CrossoverTable("test", {f"{n}x{k}": [{"max_m": None, "path": "triton"}]}))
    static_x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(static_x)  # warm up (compiles the kernel) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    fresh = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(static_out, fresh.double() @ weight.double().T) < 1e-2


def test_static_cache_generate_runs_the_sparse_model_in_cuda_graphs():
    """Hugging Face generate with a static KV cache compiles the decode step ("reduce-overhead": CUDA
    graphs) on CUDA; the sparse model's per-step logits follow the dense-with-zeros model's. (A
    random model built here: the device machines cannot fetch the demo teacher.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.config import PROJECTIONS
    from distill.runtime import sparsify
    from distill.sparsity.masks import nm_mask
    from distill.targets import target_linears

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    dense = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    names = []
    with torch.no_grad():
        for name, linear in target_linears(dense, PROJECTIONS):
            linear.weight.mul_(nm_mask(linear.weight.abs(), 2, 4))
            names.append(name)
    import copy

    sparse = copy.deepcopy(dense)
    shapes = {f"{dense.get_submodule(n).out_features}x{dense.get_submodule(n).in_features}" for n in names}
    sparsify(sparse, names, CrossoverTable("test", {s: [{"max_m": None, "path": "triton"}] for s in shapes}))
    ids = torch.randint(0, dense.config.vocab_size, (2, 9), device="cuda")
    greedy = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        expected = dense.generate(ids, **greedy)
        actual = sparse.generate(ids, cache_implementation="static", **greedy)
    first_dense, first_sparse = expected.logits[0].double(), actual.logits[0].double()
    assert actual.sequences.shape == (2, 14)
    assert float((first_sparse - first_dense).norm() / first_dense.norm()) < 2e-2
