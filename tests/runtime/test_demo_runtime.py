"""The runtime on the real demo model (SmolLM2-135M, pruned 2:4 by magnitude): loaded from its packed
export on CPU, it holds less than the dense model, and its greedy tokens equal the masked dense
model's (fp32) for 64 new tokens. With input thresholds zeroing 70% of every projection's inputs (the input-major layout and its skipping kernel) an input that sits on its threshold may fall
on either side after a last-bit difference in the sums, so there the decode steps are compared
token by token on the same forced tokens: nearly every step's choice agrees, and the first steps'
logits agree to rounding."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import TEST_TEXT
from distill.config import PROJECTIONS, TeacherConfig
from distill.models import load_teacher, load_tokenizer
from distill.runtime import Sparse24Linear, load_sparse_model
from distill.runtime.cpu_kernels import available
from distill.sparsity.activations import set_thresholds
from distill.sparsity.masks import install_masks, nm_mask, remove_masks
from distill.sparsity.packing import save_packed
from distill.sparsity.patterns import NM
from distill.sparsity.spec import SparsitySpec
from distill.targets import target_linears

pytestmark = pytest.mark.slow


class Forced(LogitsProcessor):
    """Makes generate take the given tokens (each step still runs the model on one new token)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[0, input_ids.shape[1]]] = 0
        return forced
NEW_TOKENS = 64
ZEROED = 0.7  # enough for the input-major layout (distill.runtime.loading.INPUT_MAJOR_MIN_SPARSITY)


@pytest.fixture(scope="module")
def pruned_demo(demo_teacher_dir, tmp_path_factory):
    config = TeacherConfig(source="demo")
    model = load_teacher(config, torch.device("cpu")).float().eval()
    masks = {name: nm_mask(linear.weight.abs(), 2, 4) for name, linear in target_linears(model, PROJECTIONS)}
    dense = remove_masks(install_masks(model, masks))
    tokenizer = load_tokenizer(config)
    prompt = tokenizer(TEST_TEXT.read_text()[:2000], return_tensors="pt").input_ids[:, :48]
    return dense, sorted(masks), prompt, tmp_path_factory.mktemp("demo")


def _thresholds(model, names, prompt) -> dict[str, float]:
    """Per projection, the ZEROED quantile of its input magnitudes over the prompt: that share falls below."""
    seen = {}

    def record(module, args, name):
        seen.setdefault(name, float(args[0].abs().float().quantile(ZEROED)))

    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: record(module, args, name))
             for name in names]
    with torch.no_grad():
        model(input_ids=prompt)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("thresholded", [False, True], ids=["dense-inputs", "most-inputs-zero"])
def test_the_runtime_student_generates_the_masked_dense_students_tokens(pruned_demo, thresholded):
    if not available():
        pytest.skip("no C++ compiler here: the runtime computes in PyTorch and is covered elsewhere")
    dense, masked, prompt, directory = pruned_demo
    thresholds = _thresholds(dense, masked, prompt) if thresholded else {}
    target = directory / ("thresholded" if thresholded else "plain")
    allocation = {name: ZEROED for name in thresholds}
    save_packed(dense, SparsitySpec(NM(2, 4), masked, input_thresholds=thresholds, input_allocation=allocation), target)
    runtime = load_sparse_model(target)
    layouts = {module.layout for module in runtime.modules() if isinstance(module, Sparse24Linear)}
    assert layouts == ({"inputs"} if thresholded else {"grouped"})
    reference = dense
    if thresholded:
        set_thresholds(reference, thresholds)
    greedy = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        expected = reference.generate(prompt, **greedy)
        if not thresholded:
            assert torch.equal(runtime.generate(prompt, **greedy), expected)
        else:
            forced = dict(greedy, logits_processor=LogitsProcessorList([Forced(expected)]), output_logits=True,
                          return_dict_in_generate=True)
            actual_logits = torch.cat(runtime.generate(prompt, **forced).logits).double()
            expected_logits = torch.cat(reference.generate(prompt, **forced).logits).double()
            from distill.sparsity.activations import remove_thresholds

            remove_thresholds(reference)
            agreement = float((actual_logits.argmax(-1) == expected_logits.argmax(-1)).double().mean())
            # per step: the first steps agree to rounding; once an input has flipped, the KV cache differs
            # and later steps drift apart
            errors = (actual_logits - expected_logits).norm(dim=-1) / expected_logits.norm(dim=-1)
            assert agreement >= 0.95 and float(errors[:4].max()) < 1e-4, (agreement, errors.tolist())
    projections = sum(module.resident_bytes() for module in runtime.modules() if isinstance(module, Sparse24Linear))
    dense_bytes = sum(dense.get_submodule(name).weight.numel() * 4 for name in masked)
    assert projections <= 0.55 * dense_bytes, projections / dense_bytes
