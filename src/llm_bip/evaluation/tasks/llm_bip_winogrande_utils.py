"""WinoGrande prompt functions, as lm-eval's tasks/winogrande/preprocess_winogrande.py, for the local variant.

The context is the sentence up to the blank with each option filled in; the target is the rest of the
sentence, scored after each context (partial evaluation). `str(...)` lets a JSON file store the answer as
1/2 as well as "1"/"2" (the hub copy's form); the prompts are unchanged.
"""


def doc_to_text(doc: dict) -> int:
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[str(doc["answer"])]


def doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
