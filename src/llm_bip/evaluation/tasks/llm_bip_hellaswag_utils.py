"""HellaSwag preprocessing, the same as lm-eval's tasks/hellaswag/utils.py, for the local-file variant."""

import re

import datasets


def preprocess(text: str) -> str:
    text = text.strip()
    # The bracketed tags are artifacts of HellaSwag's WikiHow portion.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def _process_doc(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)
