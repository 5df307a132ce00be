"""Kernel demo (`python -m mgh_train kernel-demo`): ATA pooling and InfoNCE on a toy batch, in about a
second.

A toy encoder (seeded token embeddings and one grouped-query self-attention layer run by
``ata_attention``; no download, no training) encodes a few query/passage pairs. The demo prints
which tokens ATA pooling weights most, shows that left and right padding give the same embeddings,
and reports the InfoNCE loss of the batch under mean and ATA pooling.
"""

from __future__ import annotations

import argparse
import zlib

import torch

from mgh_kernels import ata_attention, ata_pool, ata_weights, attention, infonce_loss, mean_pool

EMBEDDED_PAIRS = (
    (
        "how do vaccines train the immune system ?",
        "vaccines show the immune system a harmless antigen , so it learns to recognise the pathogen .",
    ),
    (
        "why is the sky blue ?",
        "air molecules scatter short blue wavelengths of sunlight more than red ones .",
    ),
    (
        "what limits the batch size of contrastive training ?",
        "the logit matrix of in-batch negatives grows with the square of the batch .",
    ),
)

HIDDEN = 32
HEADS, KV_HEADS = 4, 2


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the toy encoder (default: 0)")
    parser.add_argument("--causal", action="store_true", help="causal attention (default: bidirectional)")
    parser.add_argument("--tau", type=_positive_float, default=0.05, help="InfoNCE temperature (default: 0.05)")


class ToyEncoder:
    """Seeded token embeddings + one GQA self-attention layer; returns hidden states and colsum."""

    def __init__(self, seed: int, causal: bool):
        gen = torch.Generator().manual_seed(seed)
        head_dim = HIDDEN // HEADS
        self.seed, self.causal = seed, causal
        self.wq = torch.randn(HIDDEN, HEADS * head_dim, generator=gen) / HIDDEN**0.5
        self.wk = torch.randn(HIDDEN, KV_HEADS * head_dim, generator=gen) / HIDDEN**0.5
        self.wv = torch.randn(HIDDEN, KV_HEADS * head_dim, generator=gen) / HIDDEN**0.5

    def embed(self, token: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(token.encode()) ^ self.seed)
        return torch.randn(HIDDEN, generator=gen)

    def batch(self, texts, padding_side: str):
        tokens = [["<s>", *t.split()] for t in texts]
        length = max(len(t) for t in tokens)
        x = torch.zeros(len(texts), length, HIDDEN)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for row, toks in enumerate(tokens):
            start = 0 if padding_side == "right" else length - len(toks)
            x[row, start : start + len(toks)] = torch.stack([self.embed(t) for t in toks])
            mask[row, start : start + len(toks)] = True
        return tokens, x, mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        b, length, _ = x.shape
        head_dim = HIDDEN // HEADS

        def heads(w, n):
            return (x @ w).view(b, length, n, head_dim).transpose(1, 2)

        out, colsum = ata_attention(
            heads(self.wq, HEADS),
            heads(self.wk, KV_HEADS),
            heads(self.wv, KV_HEADS),
            causal=self.causal,
            key_padding_mask=mask,
        )
        hidden = x + out.transpose(1, 2).reshape(b, length, HIDDEN)
        return hidden, colsum


def run(args: argparse.Namespace) -> int:
    encoder = ToyEncoder(args.seed, args.causal)
    queries = [q for q, _ in EMBEDDED_PAIRS]
    passages = [p for _, p in EMBEDDED_PAIRS]
    mode = "causal" if args.causal else "bidirectional"
    print(
        f"mgh demo: toy encoder (hidden {HIDDEN}, {HEADS} query / {KV_HEADS} kv heads, {mode}), "
        f"{len(EMBEDDED_PAIRS)} query/passage pairs\n"
    )

    tokens, x, mask = encoder.batch(passages, "right")
    hidden, colsum = encoder.forward(x, mask)
    weights = ata_weights(colsum, mask)
    print("ATA weights of passage 0 (attention received, normalised over real tokens):")
    for token, w in zip(tokens[0], weights[0].tolist()):
        print(f"  {token:>12s} {w:6.3f} {'#' * round(w * 100)}")

    embeddings = {}
    for side in ("right", "left"):
        _, xs, ms = encoder.batch(passages, side)
        hs, cs = encoder.forward(xs, ms)
        embeddings[side] = ata_pool(hs, ms, colsum=cs)
    drift = (embeddings["right"] - embeddings["left"]).abs().max().item()
    print(f"\nATA embeddings, left vs right padding: max |difference| = {drift:.2e}")

    print(f"\nata_attention ran on the {attention.last_backend()} path ({hidden.device})")
    print(f"\nInfoNCE (tau={args.tau}, in-batch negatives) of queries against passages:")
    _, xq, mq = encoder.batch(queries, "right")
    hq, cq = encoder.forward(xq, mq)
    for name, q_emb, p_emb in (
        ("mean", mean_pool(hq, mq), mean_pool(hidden, mask)),
        ("ata", ata_pool(hq, mq, colsum=cq), ata_pool(hidden, mask, colsum=colsum)),
    ):
        loss = infonce_loss(q_emb, p_emb, tau=args.tau)
        print(f"  {name:>4s} pooling: loss {loss.item():.4f}")
    return 0
