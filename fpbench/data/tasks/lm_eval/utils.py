"""Document processing for the local HellaSwag config (lm-eval's own cleanup, reused)."""

import re


def preprocess(text):
    # Same as lm_eval/tasks/hellaswag/utils.py: strip WikiHow bracket artifacts.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_hellaswag(dataset):
    def _process_doc(doc):
        return {
            "query": preprocess(doc["ctx"]),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "label": int(doc["label"]),
        }

    return dataset.map(_process_doc)
