"""``mgh_kernels.hf_private``, the one adapter over transformers internals: every name it reaches is
where it reaches it in the installed transformers, and transformers still reads them as mgh assumes.
A failure names the moved name and the transformers version."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mgh_kernels import hf_private
from tiny_models import tiny_decoder

VERSION = transformers.__version__


def test_every_required_name_is_where_mgh_reaches_it():
    moved = hf_private.moved()
    assert moved == [], (
        f"transformers {VERSION} moved or removed {', '.join(moved)}: update mgh_kernels/hf_private.py "
        "(and its REQUIRED list) to where this release keeps them"
    )


def test_moved_reports_a_missing_name(monkeypatch):
    """The check above can fail: a name that is not there is reported, with its module."""
    monkeypatch.setattr(
        hf_private,
        "REQUIRED",
        hf_private.REQUIRED
        + (
            ("transformers.masking_utils", "no_such_mask", None),
            ("transformers", "PretrainedConfig", "_no_such"),
            ("transformers.no_such_module", "x", None),
        ),
    )
    assert hf_private.moved() == [
        "transformers.masking_utils.no_such_mask",
        "transformers.PretrainedConfig._no_such",
        "transformers.no_such_module.x",
    ]


def _calls_of(model, name):
    """Run ``model`` once with the attention function ``name`` registered as a spy around SDPA's;
    return the layer indices that called it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def spy(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, *args, **kwargs)

    transformers.AttentionInterface.register(name, spy)
    transformers.masking_utils.AttentionMaskInterface.register(name, transformers.masking_utils.sdpa_mask)
    ids = torch.arange(1, 7)[None]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return calls


def test_transformers_reads_the_implementation_set_on_the_config():
    """Setting the attribute on the model's config switches every layer from its next call on, and
    a ``ConfigView`` switches one layer alone: the two assumptions ``enable_ata`` rests on."""
    model = tiny_decoder(layers=3)
    config = model.config
    assert hf_private.attn_implementation(config) == "sdpa", f"transformers {VERSION}: default implementation"
    hf_private.set_attn_implementation(config, "mgh_spy_all")
    assert hf_private.attn_implementation(config) == "mgh_spy_all"
    assert _calls_of(model, "mgh_spy_all") == [0, 1, 2], (
        f"transformers {VERSION} no longer picks attention by config.{hf_private.ATTN_IMPLEMENTATION}"
    )
    hf_private.set_attn_implementation(config, "sdpa")
    layer = model.layers[1].self_attn
    layer.config = hf_private.ConfigView(config, "mgh_spy_one")
    assert _calls_of(model, "mgh_spy_one") == [1], (
        f"transformers {VERSION} no longer reads {hf_private.ATTN_IMPLEMENTATION} from each module's own config"
    )
    assert hf_private.attn_implementation(layer.config) == "mgh_spy_one"
    assert hf_private.attn_implementation(config) == "sdpa"
    assert layer.config.hidden_size == config.hidden_size  # read through
    layer.config.output_attentions = False  # written through
    assert hf_private.model_config(layer.config) is config and hf_private.model_config(config) is config
    view = copy.deepcopy(layer.config)
    assert hf_private.attn_implementation(view) == "mgh_spy_one" and view.hidden_size == config.hidden_size


def test_registered_mask():
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    assert hf_private.registered_mask("sdpa") is sdpa_mask, f"transformers {VERSION}: sdpa's mask builder"
    assert hf_private.registered_mask("flash_attention_2") is flash_attention_mask
    assert hf_private.registered_mask("no_such_implementation") is None
    assert hf_private.registered_mask(None) is None
    assert hf_private.registered_mask({"text_config": "sdpa"}) is None
