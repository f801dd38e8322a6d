"""The distill step and what it needs: the objective (student + loss), the step itself, FSDP2
sharding, checkpoints, throughput accounting; and the same step training attention-head gates
against the teacher (head_gates, for the prune stage's select=distill)."""
