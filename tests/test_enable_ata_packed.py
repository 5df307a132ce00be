"""enable_ata(model, packed=True): a packed row as transformers' flash-attention path takes one
(position ids restarting per text, optionally the cu_seq_lens_* / max_length_* arguments) gives,
token by token, the hidden states and ATA embeddings of padded eager attention on the same texts;
every layer attends within its texts through our kernels, and no total x total tensor is made."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from mgh_kernels import ATA_ATTENTION, VARLEN_ATTENTION, enable_ata, packed_pool
from mgh_kernels.attention import varlen
from test_enable_ata import DEVICE, bidirectional_mask, eager_embeddings, set_causal, tiny_model

LENGTHS = [9, 1, 14, 3, 10]  # 37 tokens: no dimension of the tiny models is 37


def texts(gen):
    ids = [torch.randint(0, 128, (n,), generator=gen) for n in LENGTHS]
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    packed = dict(
        input_ids=torch.cat(ids)[None].to(DEVICE),
        position_ids=torch.cat([torch.arange(n) for n in LENGTHS])[None].to(DEVICE),
    )
    longest = max(LENGTHS)
    padded = torch.zeros(len(LENGTHS), longest, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), longest, dtype=torch.long)
    for row, t in enumerate(ids):
        padded[row, : len(t)], mask[row, : len(t)] = t, 1
    return packed, cu, padded.to(DEVICE), mask.to(DEVICE)


class SquareTensors(TorchDispatchMode):
    """Records the shape of every tensor an op returns with two dimensions of size ``n``."""

    def __init__(self, n):
        super().__init__()
        self.n, self.found = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and list(t.shape).count(self.n) >= 2:
                self.found.append((str(func), tuple(t.shape)))
        return result


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("given", ["position_ids", "varlen_kwargs"])
def test_packed_row_equals_padded_eager(family, causal, given, gen):
    model = tiny_model(family)
    set_causal(model, causal)
    packed, cu, ids, mask = texts(gen)
    if given == "varlen_kwargs":
        on_device = cu.to(DEVICE)
        packed.update(
            cu_seq_lens_q=on_device, cu_seq_lens_k=on_device, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS)
        )
    with torch.no_grad():
        want, want_hidden = eager_embeddings(
            model, ids, mask, mask if causal else bidirectional_mask(mask, torch.float32)
        )
        with enable_ata(model, packed=True) as capture:
            assert model.config._attn_implementation == VARLEN_ATTENTION
            assert capture.module.config._attn_implementation == ATA_ATTENTION
            with SquareTensors(sum(LENGTHS)) as square:
                out = model(**packed)
            assert not square.found, square.found
            assert varlen.last_backend() in ("triton", "triton-interpreter")
            assert capture.colsum.shape == (1, sum(LENGTHS))
            assert capture.cu_seqlens.tolist() == cu.tolist()
            got = packed_pool(out.last_hidden_state[0], capture.cu_seqlens, "ata", colsum=capture.colsum[0])
            # a padded batch still runs, through ata_attention, with [B, L] column sums
            padded_out = model(input_ids=ids, attention_mask=mask)
            assert capture.colsum.shape == tuple(mask.shape) and capture.cu_seqlens is None
        assert model.config._attn_implementation == "sdpa"  # restored
    valid = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[0], want_hidden[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded_out.last_hidden_state[valid], want_hidden[valid], rtol=1e-4, atol=1e-4)


def test_packed_gradients_equal_padded(gen):
    """Gradients of the ATA embeddings reach the weights as through the padded eager model."""
    packed, cu, ids, mask = texts(gen)
    model = tiny_model("llama").train()
    weights = torch.randn(len(LENGTHS), model.config.hidden_size, generator=gen).to(DEVICE)
    with enable_ata(model, packed=True) as capture:
        out = model(**packed)
        emb = packed_pool(out.last_hidden_state[0], capture.cu_seqlens, "ata", colsum=capture.colsum[0])
        (emb * weights).sum().backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    want, _ = eager_embeddings(model, ids, mask, mask)
    (want * weights).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_packed_must_be_a_bool():
    with pytest.raises(ValueError, match="^packed: expected True or False"):
        enable_ata(tiny_model("llama"), packed=1)
