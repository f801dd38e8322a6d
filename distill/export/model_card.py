"""The model card (README.md) of the export dirs, made with huggingface_hub's model card tools: what the
student is (teacher, pattern, criterion, recipe, tokens trained, runtime sparsity), how to load each
form, the license inherited from the teacher, and, once the evaluate stage has run, the report's
quality table and plot. Also the optional upload of an export dir to the hub (export.push_to_hub).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from distill.config import TeacherConfig
from distill.errors import DistillError
from distill.io import write_text
from distill.models import DEMO_LICENSE, DEMO_MODEL_ID, resolve_teacher

CARD_FILE = "README.md"


@dataclass(frozen=True)
class StudentFacts:
    """What the card says the student is."""

    teacher: str  # as configured (a hub id, a path, or "demo")
    teacher_id: str | None  # a hub id for base_model, when there is one
    license: str | None
    pattern: str  # e.g. "2:4"
    criterion: str
    steps: int
    tokens: int
    recipe: str  # loss and optimizer in a line
    runtime: str  # input thresholds and streaming heads in a line ("" when none)


def teacher_license(config: TeacherConfig) -> str | None:
    """The teacher's license: the demo's, or the license in its own model card (a local README.md, or
    the hub's when reachable); None when no card says."""
    if config.source == "demo":
        return DEMO_LICENSE
    where, _ = resolve_teacher(config)
    card_path = Path(where) / CARD_FILE
    try:
        card = ModelCard.load(card_path if card_path.is_file() else where)
    except Exception:  # noqa: BLE001 - no card, no network, or not a hub id: the card says it does not know
        return None
    return getattr(card.data, "license", None)


def teacher_hub_id(config: TeacherConfig) -> str | None:
    if config.source == "demo":
        return DEMO_MODEL_ID
    return None if Path(config.source).expanduser().exists() else config.source


def model_card(facts: StudentFacts, form: str, report_markdown: str | None = None, plot: str | None = None) -> ModelCard:
    """The card of one export dir: `form` is "hf" (dense with zeros, loads anywhere) or "packed"."""
    data = ModelCardData(license=facts.license, base_model=facts.teacher_id, library_name="transformers",
                         pipeline_tag="text-generation", tags=["distill", "sparse", f"{facts.pattern}-sparsity",
                                                               "knowledge-distillation"])
    load = ("```python\nfrom transformers import AutoModelForCausalLM\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this dir>\")\n```\n\n"
            "Dense weights with zeros where pruned: it loads anywhere and runs at dense speed, without the "
            "student's runtime sparsity.") if form == "hf" else (
            "```python\nimport distill  # the package this student was made with\n"
            "distill.enable_transformers_loading()  # registers the packed format with transformers\n"
            "from transformers import AutoModelForCausalLM\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this dir>\")\n```\n\n"
            "Only the kept weights and their positions; the projections load as `distill.runtime.Sparse24Linear` "
            "(2:4 kernels on CUDA, the exact reference on CPU), with the input thresholds and streaming heads "
            "named in `config.json`'s `quantization_config`.")
    body = [f"# {facts.pattern}-sparse student of {facts.teacher}", "",
            f"A structurally sparse student of `{facts.teacher}`, made with distill: "
            f"{facts.criterion} {facts.pattern} masks on the decoder's linear projections, recovered by "
            f"knowledge distillation against the teacher for {facts.steps} steps ({facts.tokens:,} tokens).", "",
            f"- Recipe: {facts.recipe}."]
    if facts.runtime:
        body.append(f"- Runtime sparsity: {facts.runtime}.")
    body += ["", "## How to load", "", load, ""]
    if report_markdown:
        body += ["## Quality", "", report_markdown, ""]
    if plot:
        body += [f"![report]({plot})", ""]
    license_line = (f"`{facts.license}`, inherited from the teacher." if facts.license else
                    f"The teacher's license applies; its card does not say which (see `{facts.teacher}`).")
    body += ["## License", "", license_line, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_model_card(directory: Path, card: ModelCard) -> None:
    write_text(Path(directory) / CARD_FILE, str(card))


def push_to_hub(directory: Path, repo_id: str) -> str:
    """Upload `directory` to the hub model repo `repo_id` (created if needed); its URL. Any failure
    (no network, no token, no rights) is one DistillError line, and the directory stays as it is."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(folder_path=str(directory), repo_id=repo_id,
                                   commit_message="distill export")
    except Exception as error:  # noqa: BLE001 - network, auth and hub errors alike end in one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DistillError(f"export.push_to_hub: could not upload {directory} to {repo_id}: {type(error).__name__}: "
                           f"{first}; the run dir is intact, upload it later with `hf upload {repo_id} {directory}`") from None
    return str(getattr(commit, "commit_url", repo_id))
