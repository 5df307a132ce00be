"""torch.compile: the fused ops run as opaque custom ops inside compiled graphs.

Without a GPU the kernels run under Triton's interpreter, which dynamo cannot trace; the custom
ops (``mgh::ata_attention_*``, ``mgh::infonce_*``) keep dynamo out of the kernels on every
backend. Graphs are compiled with AOTAutograd and run eagerly (``compiled_graphs``), which checks
the ops' fake implementations and autograd registration without a C++ compiler's minutes; one
test runs inductor itself. Compiled and eager calls launch the same kernels on the same inputs,
so their results agree to the last bit, apart from the surrounding PyTorch ops.
"""

import shutil

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from mgh_kernels import ata_attention, attention, infonce, infonce_loss, testing
from mgh_kernels.attention import ops as attention_ops
from mgh_kernels.attention import tiles
from random_inputs import padding_mask

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def compiled_graphs():
    """(backend, graphs): an AOTAutograd backend that runs each graph eagerly and records the
    call_function targets of every forward and backward graph it was handed."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return make_boxed_func(gm.forward)

    yield aot_autograd(fw_compiler=record, bw_compiler=record), graphs
    torch._dynamo.reset()


def ops_in(graphs):
    return [[target for target in graph if target.startswith("mgh.")] for graph in graphs]


def randn(*shape, gen):
    return torch.randn(*shape, generator=gen).to(DEVICE)


def leaves(gen, *shapes, dtype=torch.float32):
    return [randn(*shape, gen=gen).to(dtype).requires_grad_() for shape in shapes]


def grads_of(fn, inputs, weights):
    """Outputs of fn(*inputs) and the gradients of sum(w * output) w.r.t. the inputs."""
    for x in inputs:
        x.grad = None
    outputs = fn(*inputs)
    sum((w * o.float()).sum() for w, o in zip(weights, outputs) if o is not None).backward()
    return [o.detach() for o in outputs if o is not None], [x.grad for x in inputs]


def assert_compiles_to(op, fn, inputs, weights, compiled_graphs):
    """fn compiled with fullgraph=True: its forward graph calls ``mgh::{op}_forward``, its backward
    graph ``mgh::{op}_backward``, and outputs and gradients equal the eager call's bit for bit."""
    backend, graphs = compiled_graphs
    want, want_grads = grads_of(fn, inputs, weights)
    got, got_grads = grads_of(torch.compile(fn, backend=backend, fullgraph=True), inputs, weights)
    assert ops_in(graphs) == [[f"mgh.{op}_forward.default"], [f"mgh.{op}_backward.default"]]
    for g, w in zip(got + got_grads, want + want_grads):
        assert torch.equal(g, w)


@pytest.mark.parametrize(
    "shape,causal,side",
    [
        ((2, 4, 2, 37, 16), True, "left"),
        ((1, 2, 2, 20, 24), False, "right"),
        ((2, 2, 1, 19, 16), False, None),
        ((2, 2, 1, 70, 16), True, "right"),
    ],
    ids=["gqa-causal-left", "bidir-right", "gqa-bidir-unpadded", "two-pass"],
)
def test_ata_attention_in_a_full_graph(compiled_graphs, shape, causal, side, gen):
    batch, hq, hkv, length, dim = shape
    q, k, v = leaves(gen, (batch, hq, length, dim), (batch, hkv, length, dim), (batch, hkv, length, dim))
    mask = None if side is None else padding_mask(batch, length, side, gen).to(DEVICE)

    def attend(q, k, v):
        return ata_attention(q, k, v, causal=causal, key_padding_mask=mask)

    weights = (randn(*q.shape, gen=gen), randn(batch, length, gen=gen))
    assert_compiles_to("ata_attention", attend, (q, k, v), weights, compiled_graphs)
    if length > tiles.SHORT_MAX_LENGTH["interpreter"]:  # past the one-sweep forward's lengths
        assert attention.last_forward() == "triton-flash"


def test_ata_attention_without_colsum_compiles(compiled_graphs, gen):
    backend, graphs = compiled_graphs
    q, k, v = leaves(gen, (1, 2, 21, 16), (1, 2, 21, 16), (1, 2, 21, 16))
    out, colsum = torch.compile(lambda *t: ata_attention(*t, return_colsum=False), backend=backend, fullgraph=True)(
        q, k, v
    )
    assert colsum is None
    torch.testing.assert_close(out, ata_attention(q, k, v, return_colsum=False)[0], rtol=0, atol=0)
    out.sum().backward()
    assert ops_in(graphs)[1] == ["mgh.ata_attention_backward.default"] and q.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("negatives", ["global", "own"])
@pytest.mark.parametrize("k", [0, 3])
def test_infonce_in_a_full_graph(compiled_graphs, dtype, negatives, k, gen):
    q, pos, neg = leaves(gen, (9, 40), (9, 40), (9, k, 40), dtype=dtype)

    def loss(q, pos, neg):
        return (infonce_loss(q, pos, neg, tau=0.05, negatives=negatives, reduction="none"),)

    weights = (torch.rand(9, generator=gen).to(DEVICE),)
    assert_compiles_to("infonce", loss, (q, pos, neg), weights, compiled_graphs)


def gradients_computed(launches, inputs):
    """Which of ``inputs`` (q, pos, neg) the global backward computed a gradient for: those whose
    rows its last kernel, the normalisation's gradient, was launched on."""
    projected = {launch.arguments["X"].data_ptr() for launch in launches if launch.name == "_unscale_project_kernel"}
    return tuple(x.data_ptr() in projected for x in inputs)


@pytest.mark.parametrize("trainable", ["q", "pos", "q-neg"])
def test_infonce_computes_only_the_gradients_asked_for(compiled_graphs, trainable, gen):
    """As in eager mode, the backward op is told which inputs need a gradient (frozen candidates:
    the global backward runs no candidate GEMMs), and those it computes equal eager's."""
    backend, _ = compiled_graphs
    inputs = [randn(12, 32, gen=gen), randn(12, 32, gen=gen), randn(12, 2, 32, gen=gen)]
    wanted = tuple(name in trainable.split("-") for name in ("q", "pos", "neg"))
    for x, want in zip(inputs, wanted):
        x.requires_grad_(want)
    asked = []
    with testing.recorded_launches() as launches:
        torch.compile(infonce_loss, backend=backend, fullgraph=True)(*inputs).backward()
    asked.append(gradients_computed(launches, inputs))
    got = [x.grad for x in inputs]
    for x in inputs:
        x.grad = None
    with testing.recorded_launches() as launches:
        infonce_loss(*inputs).backward()
    asked.append(gradients_computed(launches, inputs))
    assert asked == [wanted, wanted]  # compiled, then eager
    for g, x in zip(got, inputs):
        assert (g is None and x.grad is None) or torch.equal(g, x.grad)


def test_dynamic_shapes_compile_once(compiled_graphs, gen):
    """dynamic=True: one graph serves other batch sizes and lengths (the ops' fake implementations
    take symbolic sizes), each result equal to the eager call's."""
    backend, graphs = compiled_graphs

    def attend_and_pool(q, k, v):
        out, colsum = ata_attention(q, k, v, causal=True)
        return (out * colsum[:, None, :, None]).sum(2)

    compiled = torch.compile(attend_and_pool, backend=backend, dynamic=True, fullgraph=True)
    for batch, length in ((3, 23), (5, 41)):  # sizes unlike the head counts (no duck-sized guard)
        q, k, v = leaves(gen, (batch, 2, length, 16), (batch, 1, length, 16), (batch, 1, length, 16))
        with torch.no_grad():
            torch.testing.assert_close(compiled(q, k, v), attend_and_pool(q, k, v), rtol=0, atol=0)
    assert len(graphs) == 1


def test_the_pytorch_path_compiles_too(compiled_graphs, cpu_kernels, gen):
    """Without Triton (CPU, no interpreter) the ops are plain PyTorch, which dynamo traces."""
    if CUDA:
        pytest.skip("CUDA tensors take the kernels")
    backend, graphs = compiled_graphs
    q, pos, neg = leaves(gen, (9, 40), (9, 40), (9, 3, 40))
    got = torch.compile(infonce_loss, backend=backend, fullgraph=True)(q, pos, neg)
    assert infonce.last_backend() == "torch-chunked" and ops_in(graphs) == [[]]
    torch.testing.assert_close(got, infonce_loss(q, pos, neg), rtol=1e-6, atol=1e-6)
    qa, ka, va = leaves(gen, (1, 2, 19, 16), (1, 2, 19, 16), (1, 2, 19, 16))
    out, colsum = torch.compile(ata_attention, backend=backend, fullgraph=True)(qa, ka, va, causal=True)
    want_out, want_colsum = ata_attention(qa, ka, va, causal=True)
    assert attention.last_backend() == "torch-chunked"
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(colsum, want_colsum, rtol=1e-6, atol=1e-6)


def test_custom_ops_pass_opcheck(gen):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and
    AOT dispatch of each op, forward and backward (the backward ops on inputs without gradient:
    they have no gradient of their own, so no double backward)."""
    q, k, v = leaves(gen, (2, 4, 19, 16), (2, 2, 19, 16), (2, 2, 19, 16))
    ops = torch.ops.mgh
    bias = attention_ops.key_bias(padding_mask(2, 19, "left", gen).to(DEVICE), drop_unpadded=False)
    for args in [(q, k, v, bias, True, 0.25, True), (q, k, v, None, False, 0.25, False)]:
        torch.library.opcheck(ops.ata_attention_forward.default, args)
    out, _, lse = ops.ata_attention_forward(q, k, v, bias, True, 0.25, True)
    dout, dcolsum = randn(*out.shape, gen=gen), randn(2, 19, gen=gen)
    q, k, v, out, lse = (t.detach() for t in (q, k, v, out, lse))
    torch.library.opcheck(ops.ata_attention_backward.default, (q, k, v, out, lse, bias, dout, dcolsum, True, 0.25))

    a, p, n = leaves(gen, (8, 32), (8, 32), (24, 32), dtype=torch.float16)
    for own in (False, True):
        torch.library.opcheck(ops.infonce_forward.default, (a, p, n, 0.1, True, own, 0))
        statistics = [t.detach() for t in ops.infonce_forward(a, p, n, 0.1, True, own, 0)[1:]]
        for needs in ([True, True, True], [True, False, False]):
            torch.library.opcheck(
                ops.infonce_backward.default,
                (
                    a.detach(),
                    p.detach(),
                    n.detach(),
                    statistics,
                    torch.rand(8, generator=gen).to(DEVICE),
                    0.1,
                    True,
                    0,
                    needs,
                ),
            )


def test_compiled_model_with_enable_ata_matches_eager(compiled_graphs, gen):
    """A whole transformers model trained under torch.compile: the ATA layer's ops land in its
    forward and backward graphs (the mask's pattern check is a graph break, fine without
    fullgraph), and the pooled embeddings and every parameter's gradient equal the eager ones."""
    pytest.importorskip("transformers")
    from mgh_kernels import enable_ata
    from tiny_models import tiny_decoder

    backend, graphs = compiled_graphs
    model = tiny_decoder("qwen3", vocab_size=128, layers=3).to(DEVICE).train()
    ids = torch.randint(0, 128, (3, 19), generator=gen).to(DEVICE)
    mask = padding_mask(3, 19, "left", gen).to(DEVICE)
    target = randn(3, 32, gen=gen)

    def step(forward):
        model.zero_grad()
        embeddings = capture.pool(forward(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        (embeddings * target).sum().backward()
        return embeddings.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    with enable_ata(model) as capture:
        want, want_grads = step(model)
        got, got_grads = step(torch.compile(model, backend=backend))
    ops = sorted(op for graph in ops_in(graphs) for op in graph)
    assert ops == ["mgh.ata_attention_backward.default", "mgh.ata_attention_forward.default"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) > 10
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(
    not (CUDA or shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler on CPU"
)
def test_inductor_compiles_around_the_ops(gen):
    """The default backend (inductor) generates code for the PyTorch ops around ours."""
    torch._dynamo.reset()
    q, k, v = leaves(gen, (1, 2, 17, 16), (1, 2, 17, 16), (1, 2, 17, 16))
    pos, neg = randn(17, 16, gen=gen), randn(17, 16, gen=gen)

    def step(q, k, v):
        out, colsum = ata_attention(q, k, v, causal=True)
        pooled = (out[0].transpose(0, 1).reshape(17, 32)[:, :16] * colsum[0, :, None]).tanh()
        return infonce_loss(pooled, pos, neg[:, None])

    got = torch.compile(step, fullgraph=True)(q, k, v)
    got.backward()
    got_grad = q.grad
    q.grad = None
    want = step(q, k, v)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, q.grad, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
