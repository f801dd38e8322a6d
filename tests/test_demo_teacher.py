"""The real demo teacher (SmolLM2-135M-Instruct from PyPI): it loads, scores real text sensibly, and a
2:4 student built from it learns from it for a few steps."""

import pytest
import torch
from accelerate import Accelerator

from conftest import TEST_TEXT, VALID_TEXT
from distill.config import TeacherConfig
from distill.sections import LossConfig
from distill.data.corpus import pack, tokenize_files
from distill.eval.scoring import score_models
from distill.losses import distillation_loss
from distill.models import load_teacher, load_tokenizer
from distill.sparsity.masks import install_masks, nm_mask
from distill.targets import target_linears

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_and_tokenizer(demo_teacher_dir):
    config = TeacherConfig(source="demo")
    return load_teacher(config, torch.device("cpu")), load_tokenizer(config)


def test_demo_teacher_is_the_expected_model_and_scores_wikitext(teacher_and_tokenizer):
    teacher, tokenizer = teacher_and_tokenizer
    assert teacher.config.num_hidden_layers == 30 and teacher.config.hidden_size == 576
    assert teacher.config.vocab_size == 49152 == len(tokenizer)
    blocks = pack(tokenize_files([str(TEST_TEXT)], tokenizer), 512)[:4]
    scores = score_models({"teacher": teacher}, blocks, Accelerator(cpu=True), batch_size=2)
    # about 25.6 on the whole test text (DESIGN.md); four windows land near it
    assert 12 < scores["teacher"]["ppl"] < 45, scores


def test_a_2_4_student_of_the_demo_teacher_trains_towards_it(teacher_and_tokenizer):
    teacher, tokenizer = teacher_and_tokenizer
    student = type(teacher)(teacher.config)
    student.load_state_dict(teacher.state_dict())
    masks = {name: nm_mask(linear.weight.abs(), 2, 4) for name, linear in target_linears(student, ["q_proj", "up_proj", "down_proj"])}
    install_masks(student, masks)
    blocks = pack(tokenize_files([str(VALID_TEXT)], tokenizer), 64)
    train, probe = blocks[:12], blocks[-4:]
    loss_config = LossConfig(temperature=1.0, kd_weight=1.0)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-4)

    def probe_loss():
        with torch.no_grad():
            return float(distillation_loss(student(input_ids=probe).logits, teacher(input_ids=probe).logits, probe, loss_config)[0])

    before = probe_loss()
    for step in range(6):
        batch = train[2 * step: 2 * step + 2]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch).logits
        loss, _ = distillation_loss(student(input_ids=batch).logits, teacher_logits, batch, loss_config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()  # nothing re-applies the masks: their zero gradient keeps pruned weights at zero
    after = probe_loss()
    assert after < 0.9 * before, (before, after)
    for name, mask in masks.items():
        assert bool((student.get_submodule(name).weight[~mask] == 0).all()), name


def test_lm_eval_scores_the_teacher_above_chance_on_the_local_task(teacher_and_tokenizer):
    """Real lm-evaluation-harness, offline, on configs/lm_eval/wikitext_cloze (four choices). The
    pipeline tests score all three models of a run through the same function on the tiny teacher;
    this one checks, on the real teacher, that the task measures something."""
    from conftest import REPO
    from distill.config import LmEvalConfig
    from distill.eval.zero_shot import zero_shot_accuracy

    teacher, tokenizer = teacher_and_tokenizer
    config = LmEvalConfig(tasks=["wikitext_cloze"], include_path=str(REPO / "configs" / "lm_eval"), limit=16)
    scores = zero_shot_accuracy({"teacher": teacher}, tokenizer, config)["teacher"]["wikitext_cloze"]
    assert scores["samples"] == 16
    assert scores["acc"] - 2 * scores["acc_stderr"] > 0.25, scores  # chance is 1 in 4
