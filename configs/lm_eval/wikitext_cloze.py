"""Documents of the wikitext_cloze task (wikitext_cloze.yaml) from the lines of wikitext-2 test."""

import random

import datasets

DOCUMENTS = 48
CONTEXT_WORDS, CHOICE_WORDS, CHOICES = 24, 6, 4


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Paragraph lines long enough for a context and a continuation; each document's distractors are
    the same span of three other paragraphs, and the answer's place is drawn with a fixed seed."""
    span = CONTEXT_WORDS + CHOICE_WORDS
    paragraphs = [line.split() for line in dataset["text"]
                  if not line.strip().startswith("=") and len(line.split()) >= span]
    rng = random.Random(0)
    documents = []
    for index, words in enumerate(paragraphs[:DOCUMENTS]):
        others = rng.sample([i for i in range(len(paragraphs)) if i != index], CHOICES - 1)
        choices = [" " + " ".join(words[CONTEXT_WORDS:span])]
        choices += [" " + " ".join(paragraphs[i][CONTEXT_WORDS:span]) for i in others]
        order = list(range(CHOICES))
        rng.shuffle(order)
        documents.append({"context": " ".join(words[:CONTEXT_WORDS]), "choices": [choices[k] for k in order],
                          "label": order.index(0)})
    return datasets.Dataset.from_list(documents)
