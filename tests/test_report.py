"""The report's measurements and plot on small inputs: the per-layer hidden-state error against a
float64 computation, the held-out KL against given teacher log-probs, which panels the plot draws (a
constant series becomes a line of text), and the speed section from a real measurement."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from distill.eval.report import RUNTIME, markdown, plot
from distill.eval.speed import measure_speed
from distill.eval.scoring import heldout_scores, layer_errors, log_probs, score_models


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _float64_layer_outputs(model: LlamaForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output in float64: hidden_states after the embeddings, with the final
    norm removed so the last one is the last layer's own output."""
    plain = copy.deepcopy(model).double()
    plain.model.norm = nn.Identity()
    with torch.no_grad():
        return list(plain(input_ids=ids, output_hidden_states=True).hidden_states[1:])


def test_layer_errors_match_a_float64_computation():
    teacher, student = _llama(0), _llama(1)
    with torch.no_grad():  # a student near the teacher, as a pruned one is
        for mine, theirs in zip(student.parameters(), teacher.parameters()):
            mine.copy_(theirs + 0.05 * torch.randn_like(theirs))
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (5, 16))
    errors = layer_errors(teacher, {"student": student, "teacher": teacher}, ids, batch_size=2)  # 3 batches summed
    expected, actual = _float64_layer_outputs(teacher, ids), _float64_layer_outputs(student, ids)
    reference = [float((a - e).norm() / e.norm()) for a, e in zip(actual, expected)]
    assert errors["student"] == pytest.approx(reference, rel=1e-4)
    assert all(value > 0 for value in errors["student"])
    assert errors["teacher"] == [0.0, 0.0, 0.0]


def test_heldout_kl_against_given_log_probs_matches_scoring_both_models():
    teacher, student = _llama(0), _llama(1)
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (3, 12))
    accelerator = Accelerator(cpu=True)
    scores = heldout_scores(accelerator, student, ids, 2, log_probs(teacher, ids, 2))
    both = score_models({"teacher": teacher, "student": student}, ids, accelerator, 2)["student"]
    assert scores["heldout_kl"] == pytest.approx(both["kl"], rel=1e-5) and scores["heldout_kl"] > 0
    assert scores["heldout_ppl"] == pytest.approx(both["ppl"], rel=1e-6)
    assert set(heldout_scores(accelerator, student, ids, 2)) == {"heldout_ppl"}  # no teacher, no KL


def _report() -> dict:
    scores = {"teacher": {"ppl": 20.0}, "oneshot": {"ppl": 90.0, "kl": 1.2}, "student": {"ppl": 30.0, "kl": 0.3}}
    rows = [{"layer": layer, "input": name, "zero_fraction": 0.0, "q0.5": 1.0} for layer in range(2) for name in "ab"]
    return {
        "sources": {"wiki": {**scores, "tokens": 64}, "test": {**scores, "tokens": 64}},
        "export": {"verified": True, "masked": 2}, "sparsity": {"a": 0.5, "b": 0.5},
        "config": {"teacher": "t", "criterion": "wanda", "pattern": "2:4", "steps": 6},
        "activations": {"inputs": {"teacher": rows}, "teacher_training_free": {"wiki": {"0": 20.0, "0.5": 25.0}}},
        "attention": {"heads": {"teacher": {f"layers.{layer}": {"local_mass": [1.0, 1.0], "below_floor": [0.0, 0.0],
                                                                "entropy": [0.5, 0.7]} for layer in range(2)}},
                      "sink": 2, "window": 8},
        "recovery": {"blocks": 4, "steps": [3, 6], "heldout_ppl": [40.0, 32.0], "heldout_kl": [0.5, 0.35],
                     "teacher_ppl": 21.0, "oneshot_ppl": 95.0, "oneshot_kl": 1.3},
        "layer_errors": {"blocks": 4, "oneshot": [0.2, 0.4], "student": [0.1, 0.15]},
    }


def _speed() -> dict:
    """A real measurement of two tiny models, on one thread (on a shared machine, threads waiting on
    each other would make it seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure_speed({"teacher": _llama(0), RUNTIME: _llama(1)}, torch.arange(1, 41), new_tokens=4,
                             prefill_tokens=32, repeats=2)
    finally:
        torch.set_num_threads(threads)


def test_the_plot_draws_what_varies_and_names_what_is_constant(tmp_path):
    report = _report()
    report["speed"] = speed = _speed()
    history = [{"step": step, "loss": 1.0 / step, "tokens_per_s": 100.0} for step in range(1, 7)]
    drawn = plot(tmp_path / "report.png", report, history)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert [title.split(" (")[0] for title in drawn["panels"]] == [
        "recovery: held-out KL(teacher || student)", "recovery: held-out perplexity", "distillation loss",
        "perplexity per held-out source", "speed and bytes vs teacher, this machine", "layer output error vs teacher",
        "teacher, training-free activation sparsity"]
    assert all(len(set(series["values"])) > 1 for series in drawn["series"])
    references = {(line["panel"].split(" (")[0], line["label"]): line["value"] for line in drawn["references"]}
    assert references[("recovery: held-out perplexity", "one-shot")] == 95.0
    assert references[("recovery: held-out KL(teacher || student)", "teacher")] == 0.0
    assert references[("speed and bytes vs teacher, this machine", "teacher")] == 1.0
    ratios = speed["ratios"][RUNTIME]
    assert [series["values"] for series in drawn["series"] if series["panel"].startswith("speed")] == [
        [ratios["decode"], ratios["prefill"], ratios["bytes_projections"], ratios["bytes_total"]]]
    # the teacher's inputs hold no zeros and its heads keep all their mass inside: text, not panels
    assert len(drawn["omitted"]) == 2 and any("zeros in projection inputs" in line for line in drawn["omitted"])
    report["plot"] = drawn
    text = markdown(report, history)
    assert "## Not plotted" in text and all(line in text for line in drawn["omitted"])
    assert "| 1 | 0.4000 | 0.1500 |" in text and "at step 6 perplexity 32.00, KL 0.3500" in text
    assert "## Speed on this machine" in text and "not a promise" in text and f"{speed['threads']} threads" in text
    assert (speed["cpu"] or "an unnamed CPU") in text
    student = speed["models"][RUNTIME]
    assert (f"| distilled, runtime sparsity | {student['decode_tokens_per_s']:.1f} | {student['prefill_tokens_per_s']:.1f} | "
            f"{student['bytes_projections'] / 2**10:.1f} KiB | {student['bytes_total'] / 2**10:.1f} KiB | "
            f"{ratios['decode']:.2f} | {ratios['prefill']:.2f} | 1.00 | 1.00 |") in text
    assert "| teacher |" in text and " | 1.00 | 1.00 | 1.00 | 1.00 |" in text
