"""The MGH synthesizer: ``python -m mgh_train synth`` writes training data, ``verify`` checks it.

Modules, one job each: ``prompts`` (the stage-1 and stage-2 templates, their JSON schemas, the
randomised E5-style knobs), ``client`` (one AsyncOpenAI per run: structured output with fallback,
retries, usage), ``validate`` (checks on every generated example, JSON recovery from plain text),
``writer`` (append-only JSONL, fsync per row, resume after a kill), ``run`` (the two stages, the
budget, resume), ``verify`` (grading the negatives with a real encoder) and ``cli`` (the options).
"""
