"""Every prompt the synthesizer sends, as templates, with the JSON schemas of the answers.

Two stages, after E5 (Wang et al., 2024) and "Negative Matters" (Pan et al., 2025):

* **Stage 1, brainstorm** (:func:`brainstorm_messages`): a list of retrieval or matching tasks of
  one task type. Answer: ``{"tasks": [str, ...]}`` (:data:`BRAINSTORM_SCHEMA`).
* **Stage 2, one example per task** (:func:`example_messages`): a query, a positive and four
  negatives graded by similarity to the query (levels 1-4, :data:`LEVEL_DEFINITIONS`). Answer:
  ``{"query", "positive", "negatives": [{"text", "level"}]}`` (:data:`EXAMPLE_SCHEMA`). The length,
  clarity and difficulty knobs are drawn per request (:func:`draw_knobs`), as E5 does, and the
  word-count bounds the validator enforces follow from the task type (:func:`length_bounds`).

Bump :data:`PROMPT_VERSION` whenever a template changes: every written row records it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from .validate import LengthBounds

PROMPT_VERSION = "mgh-prompts-v2"

ASYMMETRIC_TYPES = ("short-short", "short-long", "long-short", "long-long")
TASK_TYPES = (*ASYMMETRIC_TYPES, "symmetric")

LEVEL_DEFINITIONS = {
    1: "easy: about the same broad topic as the query, and nothing more",
    2: "medium: the same sub-topic, but clearly about a different question",
    3: "medium-hard: shares the query's key entities, but answers a neighbouring question",
    4: "hard: shares most of the query's surface content and entities and looks like a match, "
    "but does not satisfy the query (the opposite condition, a wrong quantity or date, swapped "
    "roles, or the problem restated without its answer)",
}

# E5-style knobs, one value of each drawn per stage-2 request.
QUERY_LENGTHS = {"short": ("less than 5 words", "5 to 15 words"), "long": ("40 to 80 words", "at least 60 words")}
DOCUMENT_LENGTHS = {"short": ("less than 15 words", "one sentence"), "long": ("50 words", "100 words", "200 words")}
CLARITY = ("clear", "understandable with some effort", "ambiguous")
DIFFICULTY = ("high school", "college", "PhD")

# Word-count bounds the validator applies, per side length (generous: models miss targets a little).
_BOUNDS = {"short": (1, 40), "long": (20, 400)}

BRAINSTORM_SCHEMA = {
    "type": "object",
    "properties": {"tasks": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
    "required": ["tasks"],
}


def _negative_schema(level: int) -> dict:
    return {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 1}, "level": {"const": level}},
        "required": ["text", "level"],
    }


# The i-th negative is the level-i one (JSON Schema 2020-12 ``prefixItems``), so a grammar-constrained
# server cannot repeat or skip a level; the validator checks the same, and sorts by level anyway.
EXAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "minLength": 1},
        "positive": {"type": "string", "minLength": 1},
        "negatives": {
            "type": "array",
            "prefixItems": [_negative_schema(level) for level in (1, 2, 3, 4)],
            "minItems": 4,
            "maxItems": 4,
        },
    },
    "required": ["query", "positive", "negatives"],
}


def check_task_type(task_type: str) -> str:
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type: expected one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    return task_type


def _sides(task_type: str) -> tuple[str, str]:
    """(query side, document side) length classes: "short" or "long"."""
    if task_type == "symmetric":
        return "short", "short"
    query, document = task_type.split("-")
    return query, document


SYSTEM_PROMPT = "You write training data for text embedding models. Answer in JSON only."


def _chat(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def brainstorm_messages(task_type: str, count: int = 20) -> list[dict]:
    """Stage 1: ask for ``count`` tasks of ``task_type``. Chat messages for the OpenAI API."""
    check_task_type(task_type)
    if count < 1:
        raise ValueError(f"count: expected a positive number of tasks, got {count}")
    if task_type == "symmetric":
        kind = (
            "text matching tasks where the query and the matching text mean the same thing in "
            "different words (paraphrase, duplicate question, semantic similarity)"
        )
    else:
        query, document = _sides(task_type)
        kind = (
            f"text retrieval tasks where the query is {query} and the relevant document is {document} "
            f"({'a phrase or a sentence' if query == 'short' else 'a paragraph'} retrieves "
            f"{'a sentence, a title or a label' if document == 'short' else 'a passage'})"
        )
    return _chat(
        f"Brainstorm a list of {count} potentially useful {kind}. Cover many domains and "
        "audiences; each task is one sentence in the style 'Given a ..., retrieve ...' "
        "(or 'Retrieve ... that ...' for matching tasks). "
        'Answer with a JSON object: {"tasks": ["...", ...]}.'
    )


@dataclass(frozen=True)
class Knobs:
    """The randomised settings of one stage-2 request."""

    query_length: str
    document_length: str
    clarity: str
    difficulty: str


def draw_knobs(task_type: str, rng: random.Random) -> Knobs:
    query, document = _sides(check_task_type(task_type))
    return Knobs(
        rng.choice(QUERY_LENGTHS[query]),
        rng.choice(DOCUMENT_LENGTHS[document]),
        rng.choice(CLARITY),
        rng.choice(DIFFICULTY),
    )


def length_bounds(task_type: str) -> LengthBounds:
    query, document = _sides(check_task_type(task_type))
    return LengthBounds(query=_BOUNDS[query], positive=_BOUNDS[document], negative=_BOUNDS[document])


def example_messages(task: str, task_type: str, knobs: Knobs) -> list[dict]:
    """Stage 2: one example of ``task`` with four graded negatives. Chat messages for the OpenAI API."""
    check_task_type(task_type)
    if not isinstance(task, str) or not task.strip():
        raise ValueError("task: expected a non-empty task description")
    levels = "\n".join(f"  - level {level}: {text}" for level, text in LEVEL_DEFINITIONS.items())
    pair = (
        "the query and the positive must mean the same thing in different words"
        if task_type == "symmetric"
        else "the positive must fully satisfy the query"
    )
    return _chat(
        f"You have been assigned a task: {task.strip()}\n"
        "Write one example for it as a JSON object with the keys:\n"
        '  - "query": a string;\n'
        f'  - "positive": a string; {pair};\n'
        '  - "negatives": a list of exactly four objects {"text": string, "level": 1-4}, one per '
        "level, none of which satisfies the query:\n"
        f"{levels}\n"
        "Requirements:\n"
        f"  - the query is {knobs.query_length} long and {knobs.clarity};\n"
        f"  - the positive and each negative are {knobs.document_length} long;\n"
        f"  - the content needs {knobs.difficulty} level knowledge to understand;\n"
        "  - no text repeats another; do not explain anything outside the JSON object."
    )


def knobs_record(knobs: Knobs) -> dict:
    """The knobs as a dict, for the row written with the example."""
    return asdict(knobs)
