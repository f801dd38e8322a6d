"""The model card's facts that do not need a run: the license inherited from the teacher."""

import shutil

from distill.config import TeacherConfig
from distill.export.model_card import StudentFacts, model_card, teacher_license


def test_the_license_comes_from_the_teachers_own_card(tmp_path, tiny_teacher):
    assert teacher_license(TeacherConfig(source="demo")) == "apache-2.0"
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    assert teacher_license(TeacherConfig(source=str(teacher))) is None  # no card: unknown, not guessed
    (teacher / "README.md").write_text("---\nlicense: mit\n---\n\n# a teacher\n")
    assert teacher_license(TeacherConfig(source=str(teacher))) == "mit"


def test_a_card_names_the_license_and_how_to_load_each_form():
    facts = StudentFacts("org/teacher", "org/teacher", "mit", "2:4", "wanda", 10, 5120, "forward_kl", "")
    hf, packed = model_card(facts, "hf"), model_card(facts, "packed")
    assert hf.data.license == "mit" and hf.data.base_model == "org/teacher"
    assert "`mit`, inherited from the teacher" in hf.text and "import distill" not in hf.text
    assert "distill.enable_transformers_loading()" in packed.text and "Runtime sparsity" not in packed.text
