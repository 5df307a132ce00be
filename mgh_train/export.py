"""``python -m mgh_train export``: re-save a model folder, merged, or as a stock sentence-transformers model.

    python -m mgh_train export --model runs/demo/model --output merged --merge
    python -m mgh_train export --model runs/x/model --output st --format sentence-transformers

``--format mgh`` (the default) writes mgh's own folder (:meth:`Embedder.save`): the adapter, or
with ``--merge`` the merged model; loading it needs mgh (``Embedder.load``, or
sentence-transformers with ``trust_remote_code=True``).

``--format sentence-transformers`` writes the merged model as sentence-transformers' own modules:
``Transformer`` (the merged weights in the embedder's dtype, the tokenizer set to append EOS to
every text as mgh does, the ``text`` modality alone so no chat template wraps the text, the
embedder's ``max_length``) + ``Pooling`` (mean -> ``mean``, last_token -> ``lasttoken``,
weighted_mean -> ``weightedmean``, first_token -> ``cls``; ``include_prompt=False`` under
``exclude_instruction``) + ``Normalize``; prompts ``query`` (the template with the default
instruction) and ``document`` (none). It loads with ``SentenceTransformer(path)`` where mgh is not
installed, without ``trust_remote_code``, and gives mgh's vectors. Two differences are kept
apart rather than hidden: ATA pooling needs the fused kernel, so an ATA model keeps our
``ATAPooling`` after the stock ``Transformer`` (loading needs mgh and ``trust_remote_code=True``;
the export says so); and bidirectional attention cannot be expressed by a stock decoder's config,
so such a model is refused (use ``--format mgh``). With ``exclude_instruction``,
sentence-transformers counts a prompt's tokens on their own: where the prompt ends in a space
that merges with the text's first word (the default template), that first token is left out of
queries' pooling too (mgh keeps it); and its ``weightedmean`` weighs tokens by their position in
the whole text, prompt included. The export reports both (documents are unaffected).

Every export gets a model card (``README.md``, :mod:`mgh_train.model_card`), with ``--eval`` an
mteb result folder's scores as ``model-index``. The folder is written under a temporary name and
renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from .files import atomic_folder
from .model import DEFAULT_INSTRUCTION, Embedder
from .model.saved import save_base

FORMATS = ("mgh", "sentence-transformers")
ST_POOLING_MODES = {"mean": "mean", "last_token": "lasttoken", "weighted_mean": "weightedmean", "first_token": "cls"}
TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


@dataclasses.dataclass
class Exported:
    """What an export wrote: the folder and whether loading it needs mgh (and trust_remote_code)."""

    path: Path
    needs_mgh: bool
    notes: list


def check_export_source(model) -> None:
    """``export --model``: an mgh model folder whose parts are all there (ValueError naming ``model``)."""
    from .checks import check_model_folder
    from .model import CONFIG_NAME

    path = Path(model)
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(
            f"model: {path} is not an mgh model folder (no {CONFIG_NAME}); export reads folders "
            "written by training (run/model)"
        )
    try:
        saved = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"model: {path / CONFIG_NAME} is not valid JSON ({error})") from None
    if isinstance(saved, dict):
        check_model_folder(path, saved, argument="model")


def export(
    model: str,
    output: str,
    *,
    format: str = "mgh",
    merge: bool = False,
    eval_results=None,
    log: Callable[[str], None] = print,
) -> Exported:
    """Export the mgh model folder ``model`` to ``output`` (see the module's docstring)."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if eval_results is not None and not Path(eval_results).is_dir():
        raise ValueError(f"eval: {eval_results} is not a folder of mteb results (eval --output)")
    check_export_source(model)  # the folder's faults under model:, before anything loads
    if eval_results is not None:
        check_results_model(eval_results, model)
    embedder = Embedder.load(model)
    if format == "mgh":
        path = embedder.save(output, merged=merge, eval_results=eval_results)
        return Exported(path, True, [])
    return export_sentence_transformers(embedder, output, eval_results=eval_results)


def mteb_label(model) -> str:
    """The name ``eval`` gives ``model`` in mteb's ``model_meta.json`` (as :mod:`mgh_train.evaluate`)."""
    path = Path(model)
    if not path.exists():
        return str(model)
    resolved = path.resolve()
    label = (
        f"{resolved.parent.name}-{resolved.name}" if resolved.name in ("model", "merged", "final") else resolved.name
    )
    return f"local/{label}" if "/" not in label else label


def check_results_model(eval_results, model) -> None:
    """Refuse result folders that mteb did not write for ``model``: every ``model_meta.json`` under
    ``eval_results`` must name it, so a card never carries another model's scores."""
    import json

    metas = sorted(Path(eval_results).rglob("model_meta.json"))
    if not metas:
        raise ValueError(
            f"eval: {eval_results} has no model_meta.json, so which model these scores are of is "
            f"unknown; pass the folder `eval --model {model} --output ...` wrote"
        )
    expected = mteb_label(model)
    for meta in metas:
        try:
            name = json.loads(meta.read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        if name != expected:
            raise ValueError(
                f"eval: {meta} names the model {name!r}, not this one ({expected!r}); pass the result "
                f"folder of `eval --model {model}`"
            )


def _check_exportable(embedder: Embedder) -> None:
    if embedder.config.bidirectional:
        raise ValueError(
            "format: a bidirectional model cannot be written as stock sentence-transformers modules "
            "(a stock decoder config attends causally where no padding mask is built); "
            "use --format mgh"
        )


def _prompt_notes(embedder: Embedder) -> list:
    """How sentence-transformers' prompt exclusion differs from mgh's for this model (queries only)."""
    cfg = embedder.config
    if not cfg.exclude_instruction:
        return []
    boundary = _boundary_note(embedder)
    notes = [] if boundary is None else [boundary]
    if cfg.pooling == "weighted_mean":
        notes.append(
            "queries: sentence-transformers' weightedmean weighs a token by its position in the whole "
            "text, prompt included, where mgh counts the pooled tokens only: query vectors differ, "
            "documents' are identical"
        )
    return notes


def _boundary_note(embedder: Embedder) -> str | None:
    cfg, tok = embedder.config, embedder.tokenizer
    prefix = cfg.query_template.format(instruction=DEFAULT_INSTRUCTION)
    ids = tok(prefix, add_special_tokens=True)["input_ids"]
    alone = len(ids) - (1 if ids and ids[-1] in tok.all_special_ids else 0)  # sentence-transformers' count
    features = embedder.tokenize(["word"], prefix=prefix)
    excluded = int((features["attention_mask"] - features["pool_mask"]).sum())  # mgh's, for a query "word"
    if alone == excluded:
        return None
    return (
        "queries: sentence-transformers excludes the prompt's tokens counted on their own; the query "
        "template's last token merges with the text's first word, so that first token is left out of "
        "queries' pooling too (mgh keeps it): query vectors differ slightly, documents' are identical"
    )


def export_sentence_transformers(embedder: Embedder, output, *, eval_results=None) -> Exported:
    """Write ``embedder`` as sentence-transformers modules (merged weights) to ``output``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from .model_card import card_name, write_model_card

    _check_exportable(embedder)
    cfg = embedder.config
    notes = []
    output = Path(output)
    with atomic_folder(output, markers=("modules.json", "mgh_config.json")) as tmp:
        save_base(embedder.merged_model(), None, tmp, cfg.dtype)
        tokenizer = _copy_tokenizer(embedder.tokenizer, tmp)
        if cfg.add_eos:
            tokenizer.add_eos_token = True  # the tokenizer's post-processor appends EOS, as mgh's tokenize does
        tokenizer.model_max_length = cfg.max_length
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(
            str(tmp), modality_config=TEXT_ONLY, module_output_name="token_embeddings", max_seq_length=cfg.max_length
        )
        include_prompt = not cfg.exclude_instruction
        if cfg.pooling == "ata":
            from .st_modules import ATAPooling

            pooling = ATAPooling(ata_layer=cfg.ata_layer, ata_mix=cfg.ata_mix, include_prompt=include_prompt)
            notes.append(
                "ATA pooling keeps mgh's ATAPooling module (the fused attention kernel): loading needs mgh "
                "installed and SentenceTransformer(path, trust_remote_code=True)"
            )
        else:
            pooling = Pooling(
                transformer.get_embedding_dimension(),
                pooling_mode=ST_POOLING_MODES[cfg.pooling],
                include_prompt=include_prompt,
            )
        modules = [transformer, pooling] + ([Normalize()] if cfg.normalize else [])
        prompts = {"query": cfg.query_template.format(instruction=DEFAULT_INSTRUCTION), "document": ""}
        model = SentenceTransformer(modules=modules, prompts=prompts, similarity_fn_name="cosine", device="cpu")
        model.save(str(tmp), create_model_card=False)
        notes += _prompt_notes(embedder)
        write_model_card(
            tmp,
            embedder=dataclasses.asdict(cfg),
            base_model=embedder.origin,
            training=embedder.run_options,
            results=eval_results,
            name=card_name(output),
            needs_mgh=cfg.pooling == "ata",
            notes=notes,
        )
    return Exported(output, cfg.pooling == "ata", notes)


def _copy_tokenizer(tokenizer, folder: Path):
    """A copy of ``tokenizer`` (saved to ``folder`` and read back), so the embedder's stays as it is."""
    import transformers

    tokenizer.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


__all__ = ["FORMATS", "Exported", "export", "export_sentence_transformers"]
