"""The packed export through transformers' own loader (distill.export.hf_quantizer): after
`distill.enable_transformers_loading()`, AutoModelForCausalLM.from_pretrained returns the runtime model
(Sparse24Linear projections, input thresholds, streaming heads), pipeline() runs it, and
save_pretrained writes the same packed tensors again."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import distill
from distill.sparsity.spec import SparsitySpec, StreamingHeads
from distill.config import PROJECTIONS
from distill.runtime import Sparse24Linear, StreamingCache, load_sparse_model
from distill.sparsity.activations import thresholded
from distill.sparsity.attention import streaming_heads
from distill.sparsity.masks import install_masks, nm_mask, remove_masks
from distill.sparsity.spec import QUANT_METHOD
from distill.sparsity.packing import save_packed
from distill.sparsity.patterns import NM
from distill.targets import target_linears


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, tiny_teacher):
    """A packed 2:4 export of the tiny Llama with input thresholds on two projections and one
    streaming KV head, plus its tokenizer; transformers loads it once the method is registered."""
    distill.enable_transformers_loading()
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    masks = {name: nm_mask(linear.weight.abs(), 2, 4) for name, linear in target_linears(model, PROJECTIONS)}
    dense = remove_masks(install_masks(model, masks))
    spec = SparsitySpec(NM(2, 4), sorted(masks),
                        input_thresholds={"model.layers.0.mlp.down_proj": 0.01, "model.layers.1.self_attn.o_proj": 0.02},
                        streaming=StreamingHeads(2, 6, {"model.layers.1.self_attn": [0]}))
    directory = tmp_path_factory.mktemp("packed")
    save_packed(dense, spec, directory)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(directory)
    return directory, spec


def test_from_pretrained_returns_the_runtime_model(packed_dir):
    directory, spec = packed_dir
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert config["quantization_config"]["spec"]["pattern"] == {"kind": "nm", "n": 2, "m": 4}
    model = AutoModelForCausalLM.from_pretrained(directory)
    runtime = load_sparse_model(directory)
    assert sum(isinstance(module, Sparse24Linear) for module in model.modules()) == len(spec.masked) == 14
    assert thresholded(model) == pytest.approx(spec.input_thresholds)
    assert streaming_heads(model) == spec.streaming.heads
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, runtime(input_ids=ids).logits)
        out = model.generate(ids[:1, :5], max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True)
        expected = runtime.generate(ids[:1, :5], max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert isinstance(out.cache, StreamingCache) and torch.equal(out.sequences, expected)
    generator = pipeline("text-generation", model=str(directory), device="cpu")
    assert isinstance(generator.model.model.layers[0].mlp.down_proj, Sparse24Linear)
    assert len(generator("The", max_new_tokens=4, do_sample=False)[0]["generated_text"]) > len("The")


def test_import_distill_is_light_and_loading_needs_the_one_explicit_call(packed_dir):
    """In a fresh interpreter: `import distill` loads neither torch nor transformers (the CLI
    reports a bad config before they load) and changes no import machinery; from_pretrained knows
    the method after distill.enable_transformers_loading(), and not before (transformers then loads
    the pruned projections as plain, randomly initialized Linear layers)."""
    directory, _ = packed_dir
    script = f"""
import sys
finders = list(sys.meta_path)
import distill
assert "torch" not in sys.modules and "transformers" not in sys.modules, "import distill loaded torch"
assert sys.meta_path == finders, "import distill installed an import hook"
from transformers import AutoModelForCausalLM
before = AutoModelForCausalLM.from_pretrained({str(directory)!r})
distill.enable_transformers_loading()
distill.enable_transformers_loading()  # a second call does nothing
after = AutoModelForCausalLM.from_pretrained({str(directory)!r})
print(type(before.model.layers[0].mlp.down_proj).__name__, type(after.model.layers[0].mlp.down_proj).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["Linear", "Sparse24Linear"]


def test_save_pretrained_writes_the_packed_format_again(packed_dir, tmp_path):
    directory, _ = packed_dir
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path)
    before, after = load_file(directory / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == json.loads((directory / "config.json").read_text())["quantization_config"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_dtype_casts_the_values_and_keeps_the_positions(packed_dir):
    directory, _ = packed_dir
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    projection = model.model.layers[0].self_attn.q_proj
    assert projection.values.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
