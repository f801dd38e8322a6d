"""The runtime on a whole model: a packed 2:4 export of a tiny Llama loads with Sparse24Linear
projections, the dispatcher picks paths per M, and the logits match the dense-with-zeros model."""

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.errors import DistillError
from distill.sparsity.spec import SparsitySpec
from distill.sparsity.packing import save_packed
from distill.sparsity.patterns import NM
from distill.runtime import CrossoverTable, Sparse24Linear, load_sparse_model, sparsify
from distill.sparsity.masks import install_masks, nm_mask, remove_masks
from distill.targets import target_linears
from distill.config import PROJECTIONS


@pytest.fixture(scope="module")
def packed_student(tmp_path_factory, tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    masks = {name: nm_mask(linear.weight.abs(), 2, 4) for name, linear in target_linears(model, PROJECTIONS)}
    dense = remove_masks(install_masks(model, masks))
    directory = tmp_path_factory.mktemp("packed")
    save_packed(dense, SparsitySpec(NM(2, 4), sorted(masks)), directory)
    return directory, dense.eval(), sorted(masks)


def test_the_cpu_runtime_reproduces_the_dense_model(packed_student):
    """Loaded on CPU, every projection is held compressed once; prefill (M = 48) unpacks into the
    scratch buffer, decode (M = 2) runs the CPU kernel; both give the dense model's logits."""
    directory, dense, masked = packed_student
    model = load_sparse_model(directory)
    assert sum(isinstance(module, Sparse24Linear) for module in model.modules()) == len(masked) == 14
    assert not any(name.endswith(("dense_weight", ".weight")) for name, _ in model.named_buffers()
                   if any(name.startswith(projection) for projection in masked))
    for ids, expected_path in ((torch.randint(0, dense.config.vocab_size, (2, 24)), "cpu_unpack"),
                               (torch.randint(0, dense.config.vocab_size, (2, 1)), "cpu_kernel")):
        with torch.no_grad(), paths_taken(model) as paths:
            actual, expected = model(input_ids=ids).logits.double(), dense(input_ids=ids).logits.double()
        assert paths == {expected_path}
        assert float((actual - expected).norm() / expected.norm()) < 1e-5


def _gpu_layout(dense, masked, table):
    """The dense model with its 2:4 projections in the GPU layout, on CPU tensors: Triton's CPU
    interpreter runs its kernels (on a GPU machine, tests/runtime/test_gpu.py covers them)."""
    import copy

    if not _interpreted():
        pytest.skip("the GPU layout on CPU tensors runs in Triton's CPU interpreter only")
    model = copy.deepcopy(dense)
    sparsify(model, masked, table, layout="gpu")
    return model


def test_table_paths_per_m_and_the_triton_path_on_a_whole_model(packed_student):
    directory, dense, masked = packed_student
    # decode-sized M on the Triton kernel, anything larger dense: shapes of the tiny model
    shapes = {f"{m.out_features}x{m.in_features}" for m in (dense.get_submodule(name) for name in masked)}
    table = CrossoverTable(device="test", shapes={shape: [{"max_m": 16, "path": "triton"}, {"max_m": None, "path": "dense"}]
                                                  for shape in shapes})
    model = _gpu_layout(dense, masked, table)
    ids = torch.randint(0, dense.config.vocab_size, (1, 12))
    with torch.no_grad(), paths_taken(model) as paths:
        actual, expected = model(input_ids=ids).logits, dense(input_ids=ids).logits.double()
    assert paths == {"triton"}
    assert float((actual.double() - expected).norm() / expected.norm()) < 1e-5
    with torch.no_grad(), paths_taken(model) as paths:
        model(input_ids=torch.randint(0, dense.config.vocab_size, (2, 12)))  # M = 24 > 16
    assert paths == {"dense"}


@contextmanager
def paths_taken(model):
    """The kernel paths the model's Sparse24Linear projections take in the block's forwards, as the
    dispatcher answers for each input they receive."""
    paths = set()
    hooks = [module.register_forward_pre_hook(lambda module, args: paths.add(module.kernel_path(args[0])))
             for module in model.modules() if isinstance(module, Sparse24Linear)]
    try:
        yield paths
    finally:
        for hook in hooks:
            hook.remove()


def _interpreted():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def test_a_projection_that_is_not_2_4_is_named_or_left_dense_when_allowed(tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    with pytest.raises(DistillError, match="model.layers.0.self_attn.q_proj: not 2:4 sparse"):
        sparsify(model, ["model.layers.0.self_attn.q_proj"])
    kept = sparsify(model, ["model.layers.0.self_attn.q_proj"], allow_dense=True)
    assert "not 2:4 sparse" in kept["model.layers.0.self_attn.q_proj"]
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear


def test_static_cache_generation_compiles_into_one_graph_and_matches_dense(packed_student):
    """The path benchmarks/end_to_end.py times on GPU: generate with a static KV cache and the decode
    step compiled with fullgraph=True (any graph break fails), Triton kernel included. On CPU the
    compile backend is aot_eager and the kernel runs in Triton's interpreter."""
    from transformers import CompileConfig

    directory, dense, masked = packed_student
    shapes = {f"{m.out_features}x{m.in_features}" for m in (dense.get_submodule(name) for name in masked)}
    table = CrossoverTable(device="test", shapes={shape: [{"max_m": None, "path": "triton"}] for shape in shapes})
    model = _gpu_layout(dense, masked, table)
    ids = torch.randint(0, dense.config.vocab_size, (2, 7))
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        sparse_tokens = model.generate(ids, cache_implementation="static", compile_config=compile_config, **greedy)
        dense_tokens = dense.generate(ids, **greedy)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "the decode step was not compiled"
    assert sparse_tokens.shape == (2, 13)
    assert torch.equal(sparse_tokens, dense_tokens)
    if _interpreted():  # what a decode step's inputs (M = 2) run on
        assert {module.kernel_path(torch.zeros(2, module.in_features)) for module in model.modules()
                if isinstance(module, Sparse24Linear)} == {"triton"}
