"""The names of what the stages leave in a run dir, in one place: a stage writes them and later
stages read them through these names, so no stage imports another (see docs in the README's Layout).

    <run_dir>/teacher/DATA_FILE            training and held-out token blocks
    <run_dir>/teacher/CALIBRATION_FILE     per-projection input statistics (Wanda)
    <run_dir>/teacher_logits/TOPK_FILE     the teacher's top-k at every training position
    <run_dir>/prune/STUDENT_DIR            the one-shot student (distill.student's layout)
    <run_dir>/distill/STUDENT_DIR          the distilled student
    <run_dir>/distill/METRICS_FILE         the logged training rows, one JSON object per line
"""

DATA_FILE = "data.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
TOPK_FILE = "teacher_topk.safetensors"
STUDENT_DIR = "student"
METRICS_FILE = "metrics.jsonl"
