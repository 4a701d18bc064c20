"""Document functions of the bench tasks (bench/eval.sh)."""


def schema_gold(doc):
    # An int from doc_to_text tells lm-eval the choices are contexts
    # (its winogrande task does the same).
    return int(doc["gold"])


def schema_options(doc):
    return list(doc["context_options"])


def schema_continuation(doc):
    return doc["continuation"]


def lambada_target(doc):
    # lm-eval's lambada_openai: "{{' '+text.split(' ')[-1]}}"; a function
    # so that a numeric or bracketed word is not parsed as a literal.
    return " " + doc["continuation"]
