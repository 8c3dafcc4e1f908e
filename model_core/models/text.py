"""The text tower of the vision-language objectives: a WordPiece tokenizer and a BERT-style encoder.

No pretrained weights can be downloaded here, so by default the tokenizer is trained with
`tokenizers` on the report corpus and the encoder (`transformers`, BERT architecture) starts from a
random initialisation. A user with a local pretrained model (e.g. BiomedBERT) passes its folder
(`config.json`, weights, `tokenizer.json` or `vocab.txt`): `load_pretrained_text` reads it without
any network access.

The tokenizer is stored in a checkpoint folder as `tokenizer.json` (the `tokenizers` format);
the encoder's architecture in config.json (`heads.hlip.text`, a transformers config dict) and
its weights in model.safetensors. Needs the optional `[vlp]` extra (transformers, tokenizers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from model_core.errors import Ar3dEnvironmentError, Ar3dInputError, CheckpointError

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_VOCAB = 2000  # WordPiece vocabulary trained on the reports
DEFAULT_MAX_LENGTH = 128  # tokens of a report, [CLS] and [SEP] included
SMALL_BERT = {"model_type": "bert", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "intermediate_size": 1024, "type_vocab_size": 1}  # the random-init tower (max positions = max_length)
_VLP_HINT = "install the vision-language extra: pip install 'napari-ar3d[vlp]'"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise Ar3dEnvironmentError(f"the text tower needs the 'tokenizers' package; {_VLP_HINT}") from None
    return tokenizers


def _transformers():
    try:
        import transformers
    except ImportError:
        raise Ar3dEnvironmentError(f"the text tower needs the 'transformers' package; {_VLP_HINT}") from None
    return transformers


class ReportTokenizer:
    """A `tokenizers.Tokenizer` that pads and truncates every text to `max_length` ids."""

    def __init__(self, tokenizer, max_length: int = DEFAULT_MAX_LENGTH):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        pad = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]", length=self.max_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Texts -> input ids and attention mask, both (N, max_length) long."""
        encoded = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically (a temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH) -> ReportTokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"has no {path.name} (the tokenizer of the text tower)", path.parent)
        try:
            return cls(_tokenizers().Tokenizer.from_file(str(path)), max_length)
        except Exception as exc:  # noqa: BLE001 (the Rust side raises plain Exceptions)
            raise CheckpointError(f"cannot read the tokenizer ({exc})", path) from None


def _bert_pipeline(tokenizer, lowercase: bool = True):
    """BERT's normaliser, pre-tokenizer, decoder and [CLS] ... [SEP] template on a WordPiece tokenizer."""
    tk = _tokenizers()
    tokenizer.normalizer = tk.normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = tk.decoders.WordPiece()
    return tokenizer


def _add_template(tokenizer):
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise Ar3dInputError("the tokenizer has no [CLS] or [SEP] token; a BERT-style vocabulary needs both")
    tokenizer.post_processor = _tokenizers().processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tokenizer


def train_tokenizer(corpus: Iterable[str], vocab_size: int = DEFAULT_VOCAB,
                    max_length: int = DEFAULT_MAX_LENGTH) -> ReportTokenizer:
    """A WordPiece tokenizer (BERT's lower-casing normaliser and pre-tokenizer) trained on `corpus`.

    The corpus is sorted first, so the vocabulary depends on the set of texts, not on their order.
    """
    tk = _tokenizers()
    texts = sorted(set(corpus))
    if not texts:
        raise Ar3dInputError("no report text to train the tokenizer on")
    tokenizer = _bert_pipeline(tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]")))
    trainer = tk.trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                           show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return ReportTokenizer(_add_template(tokenizer), max_length)


def load_pretrained_tokenizer(folder: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH) -> ReportTokenizer:
    """The tokenizer of a local pretrained text model: its tokenizer.json, else its vocab.txt (WordPiece)."""
    folder = Path(folder)
    if (folder / TOKENIZER_FILE).is_file():
        return ReportTokenizer.load(folder / TOKENIZER_FILE, max_length)
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise Ar3dInputError(f"has no {TOKENIZER_FILE} or vocab.txt (a BERT-style tokenizer)", folder)
    lowercase = True
    config = folder / "tokenizer_config.json"
    if config.is_file():
        lowercase = bool(json.loads(config.read_text()).get("do_lower_case", True))
    tk = _tokenizers()
    tokenizer = _bert_pipeline(tk.Tokenizer(tk.models.WordPiece.from_file(str(vocab), unk_token="[UNK]")), lowercase)
    return ReportTokenizer(_add_template(tokenizer), max_length)


def small_text_config(vocab_size: int, max_length: int = DEFAULT_MAX_LENGTH, **overrides) -> dict:
    """The transformers config (as a dict) of the random-init BERT-style tower."""
    return {**SMALL_BERT, "vocab_size": int(vocab_size), "max_position_embeddings": int(max_length), **overrides}


def pretrained_text_config(folder: str | os.PathLike) -> dict:
    """The transformers config dict of a local pretrained text model (read from its config.json)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise Ar3dInputError("is not a transformers model folder (no config.json)", folder)
    config = _transformers().AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return _config_dict(config)


def _config_dict(config) -> dict:
    doc = config.to_diff_dict()
    doc["model_type"] = config.model_type
    for key in ("transformers_version", "architectures", "_name_or_path"):
        doc.pop(key, None)
    return json.loads(json.dumps(doc))


class TextTower(nn.Module):
    """A BERT-style encoder and a linear projection of its [CLS] token: (B, L) ids -> (B, embed_dim).

    config: a transformers config dict (with "model_type"); pretrained: a local model folder whose
    weights it starts from (None: random initialisation).
    """

    def __init__(self, config: dict, embed_dim: int, pretrained: str | os.PathLike | None = None):
        super().__init__()
        tf = _transformers()
        config = dict(config)
        model_type = config.pop("model_type", "bert")
        try:
            hf_config = tf.AutoConfig.for_model(model_type, **config)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"the text tower's config cannot be built ({exc})") from None
        if pretrained is not None:
            self.model = tf.AutoModel.from_pretrained(str(pretrained), local_files_only=True)
        else:
            self.model = tf.AutoModel.from_config(hf_config)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # [CLS] pooling; an unused pooler would have no gradient under DDP
        self.proj = nn.Linear(self.model.config.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=self.model.config.hidden_size**-0.5)

    @property
    def config_dict(self) -> dict:
        return _config_dict(self.model.config)

    def token_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) -> the encoder's last hidden states (B, L, hidden)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and mask -> (B, embed_dim): the projected [CLS] token (not normalised)."""
        return self.proj(self.token_features(input_ids, attention_mask)[:, 0])
