"""The MGH synthesizer (issue 7, in progress): validation of generated examples and the
append-only, resumable JSONL writer. The prompts, the OpenAI-compatible client and the
``synth`` command are not here yet."""
