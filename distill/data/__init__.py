"""Token blocks from text: files and hub datasets (corpus), and text the teacher writes (sampling)."""
