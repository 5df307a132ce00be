"""A LoRA training step of SmolLM2-135M (random weights from its config): ATA and loss variants side by side.

Run with ``pytest --benchmark`` (skipped without CUDA). One group per shape, four entries on the
same model architecture and inputs, each a whole optimizer step (queries and documents forward,
pooling, InfoNCE with in-batch + one hard negative, backward, AdamW), in the precision the trainer's
defaults take on the device (``mgh_train.precision.resolve``: on a GPU, bfloat16 base weights and
float32 LoRA weights under bfloat16 autocast):

* ``ATA fused + fused loss`` (ours): ``enable_ata`` in the last layer, SDPA elsewhere,
  ``infonce_loss``;
* ``ATA fused + eager loss``: the same with ``eager_infonce`` (the trainer's ``--loss eager``);
* ``eager output_attentions + eager loss`` (eager): every layer eager with ``output_attentions``,
  ``ata_pool`` on the last layer's probabilities, ``eager_infonce``;
* ``SDPA + mean pooling + fused loss`` (fused): no ATA at all: the floor ATA is judged against;
* ``ATA fused + fused loss, float32 base weights``: ours with the base weights kept float32 under
  the same autocast, which re-casts every frozen weight in every forward (autocast caches only the
  casts of weights that take gradients): the measurement behind the trainer's default of
  bfloat16 base weights on a GPU.

Throughput is ``batch / median``; the ratio table prints the medians. The GGUF of SmolLM2 cannot
travel to a GPU machine, and speed does not depend on the weights, so the model is built from its
config.
"""

import dataclasses
import gc
import json
from pathlib import Path

import pytest
import torch

from mgh_kernels import ata_pool, eager_infonce, enable_ata, hf_private, infonce_loss, mean_pool

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
VARIANTS = {
    "ours": ("ATA fused + fused loss", "ours"),
    "ata_eager_loss": ("ATA fused + eager loss", "other"),
    "eager": ("eager output_attentions + eager loss", "eager"),
    "sdpa_mean": ("SDPA + mean pooling + fused loss", "fused"),
    "ours_fp32_weights": ("ATA fused + fused loss, float32 base weights", "other"),
}
CASES = [(32, 128), (32, 512), (128, 256)]  # (queries per batch, tokens per text)


def make_step(variant: str, device, dims: dict, batch: int, length: int, seed: int = 0, precision=None):
    """A closure running one optimizer step of ``variant`` (a key of VARIANTS) on fixed inputs, in
    ``precision`` (default: the trainer's default on ``device``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    from mgh_train.precision import resolve

    precision = precision or resolve(device)
    if variant == "ours_fp32_weights":
        precision = dataclasses.replace(precision, weights=torch.float32)
    config = LlamaConfig(**dims, attention_dropout=0.0)
    hf_private.set_attn_implementation(config, "eager" if variant == "eager" else "sdpa")
    torch.manual_seed(seed)
    base = LlamaModel(config).to(precision.weights)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.to(device).train()
    capture = enable_ata(model) if variant in ("ours", "ata_eager_loss", "ours_fp32_weights") else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(seed)

    def inputs(rows):
        ids = torch.randint(0, dims["vocab_size"], (rows, length), generator=gen)
        lengths = torch.randint(length // 2, length + 1, (rows,), generator=gen)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # right padding
        return ids.to(device), mask.to(device)

    queries, documents = inputs(batch), inputs(2 * batch)  # positives, then one hard negative each
    loss_fn = eager_infonce if variant in ("eager", "ata_eager_loss") else infonce_loss
    scaler = precision.grad_scaler()

    def embed(ids, mask):
        if variant == "eager":
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            return ata_pool(out.last_hidden_state.float(), mask, attentions=out.attentions)
        out = model(input_ids=ids, attention_mask=mask)
        if capture is None:
            return mean_pool(out.last_hidden_state.float(), mask)
        return ata_pool(out.last_hidden_state.float(), mask, colsum=capture.colsum)

    def step():
        with precision.autocast_context():
            q = embed(*queries)
            d = embed(*documents)
        loss = loss_fn(q.float(), d[:batch].float(), d[batch:].float()[:, None, :], tau=0.05)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-L{}".format(*c))
def bench_train_step(measure, device, case, variant):
    pytest.importorskip("peft")
    batch, length = case
    gc.collect()
    torch.cuda.empty_cache()
    step = make_step(variant, device, SMOLLM2_135M, batch, length)
    name, role = VARIANTS[variant]
    try:
        measure(step, group=f"SmolLM2-135M LoRA train step B{batch} L{length}", name=name, role=role)
        return
    except torch.OutOfMemoryError as oom:
        reason = str(oom).split(". ")[0]
    # Free this entry's model and activations (the exception's frames held them) before the next.
    del step
    gc.collect()
    torch.cuda.empty_cache()
    pytest.skip(f"{name}: out of memory on this device ({reason})")


# --------------------------------------------------------------------------------------------
# mgh's training step against sentence-transformers' own, on the same token ids
# --------------------------------------------------------------------------------------------

QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
SEED_LENGTHS = Path(__file__).resolve().parent / "seed_lengths.json"
TAU = 0.05


def seed_rows(count: int, max_length: int, vocab_size: int, seed: int = 0) -> list:
    """``count`` (anchor, positive, negative) rows of token ids with the lengths the seed set's rows
    have under SmolLM2's tokenizer (``seed_lengths.json``: query with its instruction prefix,
    positive, level-4 negative, EOS included), truncated to ``max_length``; ids are random (speed
    does not depend on them), the same for every entry of a run."""
    lengths = json.loads(SEED_LENGTHS.read_text())["rows"]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    rows = []
    for i in range(count):
        row = lengths[order[i % len(order)]]
        rows.append([torch.randint(3, vocab_size, (min(n, max_length),), generator=gen).tolist() for n in row])
    return rows


def _st_features(ids: list, pad_id: int = 0) -> dict:
    """One column as sentence-transformers' collator pads it: right padding to the column's longest."""
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, r in enumerate(ids):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _save_base(dims: dict, folder: Path, precision) -> None:
    """A random-weight Llama/Qwen3 of ``dims`` and a placeholder tokenizer, saved where both sides load it."""
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

    kind = "qwen3" if "head_dim" in dims else "llama"
    config = AutoConfig.for_model(kind, **dims, attention_dropout=0.0)
    torch.manual_seed(0)
    AutoModel.from_config(config).to(precision.weights).save_pretrained(folder)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(folder)


LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none")


def make_st_step(folder: Path, rows: list, device, precision, compile: bool = False):
    """sentence-transformers' own training step (``SentenceTransformerTrainer.training_step``: its
    MultipleNegativesRankingLoss forward and backward, then clipping and the fused AdamW step, as its
    training loop runs them) on a mean-pooling model with the same LoRA, over ``rows``."""
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.models import Pooling, Transformer

    transformer = Transformer(str(folder), model_kwargs={"dtype": precision.weights})
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")], device=str(device)
    )
    torch.manual_seed(0)
    transformer.model = get_peft_model(transformer.model, LoraConfig(**LORA))  # as Embedder.build does
    loss = MultipleNegativesRankingLoss(model, scale=1 / TAU)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(folder / "st-run"),
        per_device_train_batch_size=len(rows),
        learning_rate=1e-5,
        optim="adamw_torch_fused" if _fused_adamw_available(device) else "adamw_torch",
        report_to=[],
        bf16=precision.autocast == torch.bfloat16,
        fp16=precision.autocast == torch.float16,
        use_cpu=device.type == "cpu",
        torch_compile=compile,
        max_grad_norm=1.0,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, loss=loss)
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1  # what its training loop sets before each step
    trained = trainer.accelerator.prepare(model) if not compile else trainer._wrap_model(model)
    inputs = {}
    for column, ids in zip(("anchor", "positive", "negative"), zip(*rows)):
        for key, value in _st_features(list(ids)).items():
            inputs[f"{column}_{key}"] = value.to(device)
    model.train()

    def step():
        loss_value = trainer.training_step(trained, dict(inputs))
        trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        return loss_value.detach()

    return step


def make_mgh_step(folder: Path, rows: list, device, precision, pooling: str = "mean", compile: bool = False):
    """mgh's training step (``mgh_train.step.TrainStep``, as the trainer runs it) on the same base, LoRA
    and token ids: the micro-batch's queries and documents in length buckets, the fused loss."""
    from transformers import AutoModel, AutoTokenizer

    from mgh_kernels import infonce_loss
    from mgh_train.batches import Collate
    from mgh_train.model import Embedder, EmbedderConfig
    from mgh_train.step import TrainStep, make_optimizer

    config = EmbedderConfig(
        base_model=None,
        pooling=pooling,
        lora_r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
    )
    base = AutoModel.from_pretrained(folder, dtype=precision.weights)
    torch.manual_seed(0)
    embedder = Embedder.build(config, model=base, tokenizer=AutoTokenizer.from_pretrained(folder))
    embedder.to(device).set_precision(precision)
    embedder.train()
    ids = [r[0] for r in rows] + [r[1] for r in rows] + [r[2] for r in rows]
    batch = (
        Collate(embedder.tokenizer, config, multiple=64 if compile else 8)
        .assemble(ids, [[True] * len(r) for r in ids], queries=len(rows), k=1)
        .to(device)
    )
    optimizer = make_optimizer([p for p in embedder.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    train_step = TrainStep(
        embedder,
        optimizer,
        infonce_loss,
        tau=TAU,
        negatives="global",
        max_grad_norm=1.0,
        precision=precision,
        scaler=precision.grad_scaler(),
        compile=compile,
    )

    def step():
        return train_step([batch]).loss

    return step


def _fused_adamw_available(device) -> bool:
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return True
    except RuntimeError:
        return False


PEER_VARIANTS = {
    "st": ("sentence-transformers step (mean, MNRL)", "peer", make_st_step, {}),
    "mgh": ("mgh step (mean, fused loss)", "ours", make_mgh_step, {}),
    "mgh_ata": ("mgh step (ATA, fused loss)", "other", make_mgh_step, {"pooling": "ata"}),
    "st_compiled": ("sentence-transformers step, torch.compile", "other", make_st_step, {"compile": True}),
    "mgh_compiled": ("mgh step (mean), --compile", "other", make_mgh_step, {"compile": True}),
}
PEER_CASES = {  # (architecture, dims, rows per batch, max tokens per text) by device type
    "cpu": [("SmolLM2-135M", SMOLLM2_135M, 16, 128)],
    "cuda": [
        ("SmolLM2-135M", SMOLLM2_135M, 32, 128),
        ("SmolLM2-135M", SMOLLM2_135M, 128, 256),
        ("Qwen3-0.6B", QWEN3_06B, 32, 256),
    ],
}


@pytest.mark.parametrize("variant", list(PEER_VARIANTS))
@pytest.mark.parametrize(
    "case", [c for cases in PEER_CASES.values() for c in cases], ids=lambda c: f"{c[0]}-B{c[2]}-L{c[3]}"
)
def bench_step_against_sentence_transformers(measure, device, case, variant, tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    if case not in PEER_CASES[device.type]:
        pytest.skip(f"not a {device.type} case")
    from mgh_train.precision import resolve

    arch, dims, batch, length = case
    name, role, make, options = PEER_VARIANTS[variant]
    precision = resolve(device)
    folder = tmp_path_factory.mktemp(f"{arch}-base")
    _save_base(dims, folder, precision)
    rows = seed_rows(batch, length, dims["vocab_size"])
    tokens = sum(len(t) for row in rows for t in row)
    gc.collect()
    step = make(folder, rows, device, precision, **options)
    measure(
        step,
        group=f"{arch} LoRA step vs sentence-transformers B{batch} L<={length} ({tokens} real tokens, "
        f"{precision.describe()})",
        name=name,
        role=role,
        work={"tokens": tokens, "examples": batch},
        rounds=10 if device.type == "cuda" else 3,
    )
