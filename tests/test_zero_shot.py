"""lm-eval's task index: a config whose tasks are all local indexes only its include_path."""

from conftest import REPO
from distill.config import LmEvalConfig
from distill.eval.zero_shot import task_manager


def test_local_tasks_index_only_the_include_path():
    manager = task_manager(LmEvalConfig(tasks=["wikitext_cloze"], include_path=str(REPO / "configs" / "lm_eval")))
    assert manager.all_tasks == ["wikitext_cloze"]
