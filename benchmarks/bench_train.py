"""A LoRA training step of SmolLM2-135M (random weights from its config): ATA and loss variants side by side.

Run with ``pytest --benchmark`` (skipped without CUDA). One group per shape, four entries on the
same model architecture and inputs, each a whole optimizer step (queries and documents forward,
pooling, InfoNCE with in-batch + one hard negative, backward, AdamW), in the precision the trainer's
defaults take on the device (``mgh_train.precision.resolve``: on a GPU, bfloat16 base weights and
float32 LoRA weights under bfloat16 autocast):

* ``ATA fused + fused loss`` (ours): ``enable_ata`` in the last layer, SDPA elsewhere,
  ``infonce_loss``;
* ``ATA fused + eager loss``: the same with ``reference.infonce``;
* ``eager output_attentions + eager loss`` (eager): every layer eager with ``output_attentions``,
  ``ata_pool`` on the last layer's probabilities, ``reference.infonce``;
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

import pytest
import torch

from mgh_kernels import ata_pool, enable_ata, infonce_loss, mean_pool, reference

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, tie_word_embeddings=True)
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
    config._attn_implementation = "eager" if variant == "eager" else "sdpa"
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
    loss_fn = reference.infonce if variant in ("eager", "ata_eager_loss") else infonce_loss
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
