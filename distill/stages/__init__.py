"""The pipeline's stages in order, each with the config keys and upstream stages it depends on."""

from distill.config import SourceKind
from distill.export.model_card import CARD_FILE
from distill.models import teacher_files
from distill.run.artifacts import BLOCKS_DIR, TOPK_DIR
from distill.run.pipeline import Stage
from distill.stages import evaluate, export, prune, teacher, teacher_logits, train

# the activations keys prune calibrates the thresholds with, and those only distill reads (so a change
# of how the student trains under them does not calibrate them again)
CALIBRATED_ACTIVATIONS = tuple(f"activations.{key}" for key in ("target", "allocation", "where", "greedy_step", "greedy_blocks"))
TRAINED_ACTIVATIONS = ("activations.straight_through", "activations.recalibrate_every", "activations.ramp_steps")

STAGES = [
    Stage("teacher", ("run.seed", "teacher", "data", "calibration", "prune.targets", "prune.exclude"), (), teacher.run,
          input_files=lambda config: teacher_files(config.teacher) + teacher.source_files(config),
          depends_on_precision=lambda config: any(source.kind is SourceKind.TEACHER for source in config.data.sources),
          checked_by_reader=(f"{BLOCKS_DIR}/*/shard-*",)),
    Stage("teacher_logits", ("teacher", "train.loss.teacher_topk", "train.loss.teacher_cache",
                             "train.loss.teacher_cache_shard", "train.micro_batch_size"), ("teacher",),
          teacher_logits.run, depends_on_precision=lambda config: config.train.loss.teacher_topk > 0,
          checked_by_reader=(f"{TOPK_DIR}/shard-*",)),
    Stage("prune", ("teacher", "prune", *CALIBRATED_ACTIVATIONS, "attention"), ("teacher",), prune.run),
    Stage("distill", ("run.seed", "teacher", "train", *TRAINED_ACTIVATIONS), ("prune", "teacher_logits"), train.run,
          depends_on_precision=lambda config: True),
    Stage("export", ("export",), ("distill",), export.run,
          completed_later=tuple(f"*/{name}" for name in (CARD_FILE, evaluate.CARD_PLOT))),
    Stage("evaluate", ("teacher", "eval"), ("teacher", "prune", "export"), evaluate.run,
          input_files=lambda config: list(config.eval.files)),
]
