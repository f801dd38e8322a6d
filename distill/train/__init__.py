"""The distill step and what it needs: the objective (student + loss), the step itself, FSDP2
sharding, checkpoints, throughput accounting."""
