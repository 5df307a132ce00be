"""The MGH synthesizer (issue 7, in progress).

Here so far: ``prompts`` (the stage-1 and stage-2 templates, their JSON schemas and the
randomised E5-style knobs), ``validate`` (checks on every generated example, JSON recovery from
plain text) and ``writer`` (append-only JSONL, fsync per row, resume after a kill). Not yet: the
OpenAI-compatible client, the ``synth`` and ``verify`` commands.
"""
