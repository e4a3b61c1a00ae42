"""Hugging Face Marian (OPUS-MT) directories: their config, weights and tokenizer, in and out.

The Helsinki-NLP `opus-mt-*` models (Tiedemann & Thottingal 2020) were trained with Marian NMT
(Junczys-Dowmunt et al. 2018) and converted by transformers to `MarianMTModel`. Each is the
Transformer of Vaswani et al. (2017) — post-norm layers, biases on every projection, LayerNorm
ε = 1e-5, attention scores scaled by 1/√d_k — with these `TransformerConfig` switches, read
from `config.json`:

    activation           activation_function (OPUS-MT: swish; relu, gelu and quick_gelu also map)
    positions="halves"   the sinusoid table MarianMTModel computes: sines of all frequencies first,
                         then the cosines (checked against `*.embed_positions.weight` when stored)
    scale_embeddings     scale_embedding (√d_model, §3.4)
    logits_bias=True     final_logits_bias, a learned bias on the output logits
    decoder_start_id     decoder_start_token_id (OPUS-MT: the padding token)
    pad_id, eos_id       pad_token_id, eos_token_id; bos_id: bos_token_id, else the start token
    max_seq_len          max_position_embeddings
    share_embeddings     share_encoder_decoder_embeddings and tie_word_embeddings (both or neither)
    dropout              dropout (training only; attention_dropout and activation_dropout, 0 in
                         OPUS-MT, are not applied: we drop only where §5.4 does)

Refused, with the key named: pre-norm or other BART-family switches that MarianMTModel would
silently ignore (normalize_before, normalize_embedding, add_final_layer_norm, learned positions),
a decoder vocabulary of its own (decoder_vocab_size ≠ vocab_size), different encoder/decoder
head counts or FFN sizes, activations we do not have (e.g. gelu_new).

Tensor names map one to one (`key_map`): self_attn → self_attention, encoder_attn →
cross_attention, fc1/fc2 → feed_forward.w_1/w_2, the layer norms in order → norms.0/1/2.
`write_marian` writes the reverse, for any post-norm Transformer of ours: one trained by
`translate train` (the paper's interleaved table) is written in Marian's layout by reordering
the d_model coordinates (`to_halves`), which leaves its outputs unchanged.

`MarianTokenizer` is Marian's tokenizer: two SentencePiece models (source.spm for the source
language, target.spm for the target) whose pieces map to ids through one shared vocab.json.
"""

import json
import re
import shutil
from pathlib import Path

import sentencepiece
import torch

from fromscratch.checkpoints.huggingface import read_weights, weight_files, write_model_directory
from fromscratch.checkpoints.safe import read_json_object, save_safetensors
from fromscratch.config import json_field
from fromscratch.errors import UserError
from fromscratch.transformer.config import TransformerConfig
from fromscratch.transformer.model import Transformer, sinusoidal_positions

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
ENCODER_LAYER = {**{f"self_attn.{p}": f"self_attention.{p}" for p in PROJECTIONS},
                 "self_attn_layer_norm": "norms.0", "fc1": "feed_forward.w_1", "fc2": "feed_forward.w_2",
                 "final_layer_norm": "norms.1"}
DECODER_LAYER = {**{f"self_attn.{p}": f"self_attention.{p}" for p in PROJECTIONS},
                 **{f"encoder_attn.{p}": f"cross_attention.{p}" for p in PROJECTIONS},
                 "self_attn_layer_norm": "norms.0", "encoder_attn_layer_norm": "norms.1",
                 "fc1": "feed_forward.w_1", "fc2": "feed_forward.w_2", "final_layer_norm": "norms.2"}
# One matrix under up to four names when shared (transformers 5 saves only model.shared.weight).
TIED_EMBEDDINGS = ("model.shared.weight", "model.encoder.embed_tokens.weight",
                   "model.decoder.embed_tokens.weight", "lm_head.weight")
OUR_EMBEDDINGS = ("src_embedding.weight", "tgt_embedding.weight", "output_projection.weight")
UNTIED_EMBEDDINGS = dict(zip(TIED_EMBEDDINGS[1:], OUR_EMBEDDINGS))
POSITIONS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")
# transformers' activation names (ACT2FN) → ours, for the ones that compute the same function.
ACTIVATIONS_IN = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu", "quick_gelu": "quick_gelu"}
ACTIVATIONS_OUT = {"relu": "relu", "swish": "swish", "gelu": "gelu", "quick_gelu": "quick_gelu"}
MARIAN_NORM_EPS = 1e-5  # the ε of every MarianMTModel layer norm, fixed by transformers
# Switches of the BART family that older conversions wrote and MarianMTModel ignores: any other
# value means weights MarianMTModel (and we) would compute wrongly.
MARIAN_LAYOUT = {"normalize_before": (False, "pre-norm layers"),
                 "normalize_embedding": (False, "a LayerNorm on the embeddings"),
                 "add_final_layer_norm": (False, "a LayerNorm after each stack"),
                 "static_position_embeddings": (True, "learned positions instead of the sinusoid table")}
TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json")
TOKENIZER_CONFIG = "tokenizer_config.json"


def key_map(config: TransformerConfig) -> dict[str, str]:
    """transformers' name → ours for every tensor of the layers, and the logits bias (the token
    embeddings are TIED_EMBEDDINGS / UNTIED_EMBEDDINGS; positions are not weights for us)."""
    names = {"final_logits_bias": "logits_bias"}
    for side, n_layers, layer in (("encoder", config.n_encoder_layers, ENCODER_LAYER),
                                  ("decoder", config.n_decoder_layers, DECODER_LAYER)):
        for i in range(n_layers):
            for theirs, ours in layer.items():
                for param in ("weight", "bias"):
                    names[f"model.{side}.layers.{i}.{theirs}.{param}"] = f"{side}_layers.{i}.{ours}.{param}"
    return names


# --- reading --------------------------------------------------------------------------------


def read_config(path: Path) -> TransformerConfig:
    """The TransformerConfig of a Marian config.json (module docstring), every key type-checked."""
    values = read_json_object(path)
    where = str(path)
    model_type = json_field(values, "model_type", str | None, where, None)
    if model_type not in (None, "marian"):
        raise UserError(f"{where}: model_type {model_type!r} is not a Marian model ('marian')")
    for key, (marian, what) in MARIAN_LAYOUT.items():
        if json_field(values, key, bool, where, marian) != marian:
            raise UserError(f"{where}: {key}={not marian} asks for {what}, which MarianMTModel does not compute; "
                            "not a Marian checkpoint this Transformer can run")
    both = {}
    for ours, key in (("n_heads", "attention_heads"), ("d_ff", "ffn_dim")):
        encoder, decoder = (json_field(values, f"{side}_{key}", int, where) for side in ("encoder", "decoder"))
        if encoder != decoder:
            raise UserError(f"{where}: encoder_{key}={encoder} but decoder_{key}={decoder}; this Transformer "
                            f"has one {ours} for both stacks")
        both[ours] = encoder
    vocab_size = json_field(values, "vocab_size", int, where)
    decoder_vocab_size = json_field(values, "decoder_vocab_size", int | None, where, None)
    if decoder_vocab_size not in (None, vocab_size):
        raise UserError(f"{where}: decoder_vocab_size={decoder_vocab_size} differs from vocab_size={vocab_size}: "
                        "a separate target vocabulary, which this Transformer (one joint vocabulary, §3.4) lacks")
    share = json_field(values, "share_encoder_decoder_embeddings", bool, where, True)
    tie = json_field(values, "tie_word_embeddings", bool, where, True)
    if share != tie:
        raise UserError(f"{where}: share_encoder_decoder_embeddings={share} with tie_word_embeddings={tie}: this "
                        "Transformer ties the source, target and output matrices all together (§3.4) or none")
    activation = json_field(values, "activation_function", str, where, "gelu")  # transformers' default
    if activation not in ACTIVATIONS_IN:
        raise UserError(f"{where}: activation_function {activation!r} is not one this Transformer has "
                        f"({', '.join(ACTIVATIONS_IN)})")
    ids = {key: json_field(values, key, int, where)
           for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id")}
    bos = json_field(values, "bos_token_id", int | None, where, None)
    for key, token in {**ids, "bos_token_id": bos}.items():
        if token is not None and not 0 <= token < vocab_size:
            raise UserError(f"{where}: {key}={token} is not a token of its {vocab_size}-token vocabulary")
    fields = dict(
        vocab_size=vocab_size, d_model=json_field(values, "d_model", int, where), **both,
        n_encoder_layers=json_field(values, "encoder_layers", int, where),
        n_decoder_layers=json_field(values, "decoder_layers", int, where),
        dropout=json_field(values, "dropout", float, where, 0.1),
        max_seq_len=json_field(values, "max_position_embeddings", int, where, 1024),
        pad_id=ids["pad_token_id"], eos_id=ids["eos_token_id"], decoder_start_id=ids["decoder_start_token_id"],
        bos_id=ids["decoder_start_token_id"] if bos is None else bos,
        norm_first=False, share_embeddings=share, activation=ACTIVATIONS_IN[activation], positions="halves",
        scale_embeddings=json_field(values, "scale_embedding", bool, where, False), logits_bias=True,
    )
    return TransformerConfig.from_dict(fields, source=where)


def check_positions(table: torch.Tensor, config: TransformerConfig, origin: str) -> None:
    """A stored positions table must be the one MarianMTModel computes (and we do)."""
    expected = sinusoidal_positions(config.max_seq_len, config.d_model, "halves")
    if tuple(table.shape) != tuple(expected.shape):
        raise UserError(f"{origin} has shape {tuple(table.shape)} but config.json implies {tuple(expected.shape)} "
                        "(max_position_embeddings × d_model)")
    difference = (table.float() - expected).abs().max().item()
    if difference > max(1e-5, 2 * torch.finfo(table.dtype).eps):
        raise UserError(f"{origin} is not Marian's sinusoid table (it differs by up to {difference:.3g}): "
                        "learned or other positions, which this Transformer does not have")


def read_state(directory: Path, config: TransformerConfig) -> dict[str, torch.Tensor]:
    """The weights of a Marian directory under our names, each checked against `config`."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Transformer(config).state_dict().items()}
    names = key_map(config) if config.share_embeddings else {**key_map(config), **UNTIED_EMBEDDINGS}
    hf_shapes = {theirs: shapes[ours] for theirs, ours in names.items()}
    hf_shapes["final_logits_bias"] = (1, config.vocab_size)
    state: dict[str, torch.Tensor] = {}
    embedding, embedding_origin = None, None  # the shared matrix, under whichever names it is stored
    for key, tensor, origin in read_weights(directory):
        if key in POSITIONS:
            check_positions(tensor, config, origin)
            continue
        if config.share_embeddings and key in TIED_EMBEDDINGS:
            expected = shapes["src_embedding.weight"]
        elif key in names:
            expected = hf_shapes[key]
        else:
            raise UserError(f"{origin} is not a tensor of the MarianMTModel its config.json describes")
        if tuple(tensor.shape) != expected:
            raise UserError(f"{origin} has shape {tuple(tensor.shape)} but config.json implies {expected}")
        if key not in names:  # one name of the shared embedding matrix
            if embedding is not None and not torch.equal(tensor, embedding):
                raise UserError(f"{origin} differs from {embedding_origin}, but config.json ties them "
                                "(share_encoder_decoder_embeddings, tie_word_embeddings)")
            embedding, embedding_origin = tensor, origin
        else:
            state[names[key]] = tensor.reshape(shapes[names[key]])  # final_logits_bias (1, V) → (V,)
    files = ", ".join(str(f) for f in weight_files(directory))
    if config.share_embeddings:
        if embedding is None:
            raise UserError(f"{files}: has no token embeddings (any of {', '.join(TIED_EMBEDDINGS)})")
        state.update(dict.fromkeys(OUR_EMBEDDINGS, embedding))
    state.setdefault("logits_bias", torch.zeros(config.vocab_size))  # as transformers: absent means zero
    for theirs, ours in names.items():
        if ours not in state:
            raise UserError(f"{files}: missing tensor {theirs!r} (expected shape {hf_shapes[theirs]})")
    return state


def read_marian(directory: str | Path) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(config, state dict under our names) of a Hugging Face Marian directory."""
    directory = Path(directory)
    config = read_config(directory / "config.json")
    return config, read_state(directory, config)


# --- writing --------------------------------------------------------------------------------


def to_halves(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same network with its d_model coordinates reordered (2i → i, 2i + 1 → d_model/2 + i),
    which turns the paper's interleaved sinusoid table into Marian's halves table. Every vector
    of the residual stream is permuted alike — the matrices that read it by their columns, those
    that write it (and their biases and the LayerNorms) by their rows — and LayerNorm commutes
    with a permutation, so every output is unchanged."""
    d_model = state["src_embedding.weight"].size(1)
    order = torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])
    reads = ("embedding.weight", "output_projection.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
             "w_1.weight")
    writes = ("out_proj.weight", "out_proj.bias", "w_2.weight", "w_2.bias")
    out = {}
    for name, tensor in state.items():
        if name.endswith(reads):
            tensor = tensor[:, order]
        elif name.endswith(writes) or ".norms." in name:
            tensor = tensor[order]
        out[name] = tensor
    return out


def marian_config(config: TransformerConfig) -> dict:
    """The config.json of a MarianMTModel that computes what a Transformer of `config` does."""
    return {
        "architectures": ["MarianMTModel"], "model_type": "marian", "is_encoder_decoder": True,
        "vocab_size": config.vocab_size, "decoder_vocab_size": config.vocab_size, "d_model": config.d_model,
        "encoder_layers": config.n_encoder_layers, "decoder_layers": config.n_decoder_layers,
        "encoder_attention_heads": config.n_heads, "decoder_attention_heads": config.n_heads,
        "encoder_ffn_dim": config.d_ff, "decoder_ffn_dim": config.d_ff,
        "activation_function": ACTIVATIONS_OUT[config.activation], "max_position_embeddings": config.max_seq_len,
        "scale_embedding": config.scale_embeddings, "dropout": config.dropout, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
        "pad_token_id": config.pad_id, "eos_token_id": config.eos_id, "bos_token_id": config.bos_id,
        "decoder_start_token_id": config.start_id,
        "forced_eos_token_id": None,  # MarianConfig's default (0) would force token 0 at the length limit
        "share_encoder_decoder_embeddings": config.share_embeddings,
        "tie_word_embeddings": config.share_embeddings, "use_cache": True,
    }


def generation_config(config: TransformerConfig) -> dict:
    """generation_config.json: what makes `MarianMTModel.generate` decode as we do by default
    (never the padding or start token, no forced EOS, our context as the length limit)."""
    return {
        "bad_words_ids": [[token] for token in sorted({config.pad_id, config.start_id})],
        "decoder_start_token_id": config.start_id, "eos_token_id": config.eos_id, "pad_token_id": config.pad_id,
        "forced_eos_token_id": None, "max_length": config.max_seq_len,
    }


def marian_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names, with the positions table it computes."""
    config = model.config
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if config.positions == "interleaved":
        state = to_halves(state)
    if not config.logits_bias:
        state["logits_bias"] = torch.zeros(config.vocab_size, dtype=state["src_embedding.weight"].dtype)
    names = key_map(config) if config.share_embeddings else {**key_map(config), **UNTIED_EMBEDDINGS}
    tensors = {theirs: state[ours] for theirs, ours in names.items()}
    tensors["final_logits_bias"] = state["logits_bias"].reshape(1, -1)
    if config.share_embeddings:
        tensors["model.shared.weight"] = state["src_embedding.weight"]
    table = sinusoidal_positions(config.max_seq_len, config.d_model, "halves").to(state["src_embedding.weight"].dtype)
    tensors.update({name: table.clone() for name in POSITIONS})
    return {name: tensor.contiguous().clone() for name, tensor in tensors.items()}


def write_marian(model, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face Marian directory that `MarianMTModel.from_pretrained` loads
    with equal logits (config.json, generation_config.json, model.safetensors), all at once or
    not at all; with the Marian tokenizer of `tokenizer_dir` (source.spm, target.spm, vocab.json,
    tokenizer_config.json) copied along. Our `translate train` runs tokenise with a byte-level
    BPE, not Marian's SentencePiece: their directories hold the model only."""
    config = model.config
    if config.norm_first:
        raise UserError("a pre-norm (norm_first) Transformer has no Marian equivalent: transformers' "
                        "MarianMTModel is post-norm")
    if config.activation not in ACTIVATIONS_OUT:
        raise UserError(f"activation {config.activation!r} has no transformers equivalent for MarianMTModel")
    if config.norm_eps != MARIAN_NORM_EPS:  # config.json has no field for it: it would be lost
        raise UserError(f"norm_eps={config.norm_eps}: MarianMTModel's LayerNorms take {MARIAN_NORM_EPS}, and its "
                        "config.json has no field for another")
    if tokenizer_dir is not None:
        MarianTokenizer.from_directory(tokenizer_dir, config)  # refuses one that does not belong to the model
    tensors = marian_tensors(model)

    def write_files(out: Path) -> None:
        save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(marian_config(config), indent=2) + "\n")
        (out / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in (*TOKENIZER_FILES, TOKENIZER_CONFIG):
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, out / name)

    return write_model_directory(out_dir, write_files)


# --- the tokenizer --------------------------------------------------------------------------


def _token_text(value, key: str, where: str) -> str:
    """A special token in tokenizer_config.json: a string, or transformers' {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise UserError(f"{where}: {key} must be a token string, got {value!r}")
    return value


class MarianTokenizer:
    """Marian's tokenizer, as transformers' MarianTokenizer (same ids, same text):

    encode: the text is cut at the special tokens written in it (</s>, <unk>, <pad>, ...); a
      leading language code ">>xx<<" is kept whole; the rest goes through source.spm, and each
      piece becomes its vocab.json id (<unk> when vocab.json lacks it). No EOS is appended:
      the batcher does that.
    decode: the ids up to the first EOS, special tokens dropped (transformers'
      skip_special_tokens=True, <unk> included), their pieces joined by target.spm.
    """

    def __init__(self, source_spm: Path, target_spm: Path, vocab: dict[str, int], unk: str = "<unk>",
                 eos: str = "</s>", pad: str = "<pad>", extra_special: tuple[str, ...] = (),
                 clean_up_spaces: bool = False):
        self.source, self.target = (self._load_spm(path) for path in (source_spm, target_spm))
        self.vocab = vocab
        self.pieces = {i: piece for piece, i in vocab.items()}
        self.unk_id, self.eos_id, self.pad_id = vocab[unk], vocab[eos], vocab[pad]
        specials = [token for token in (eos, unk, pad, *extra_special) if token in vocab]
        self.special_ids = {vocab[token] for token in specials}
        self._specials = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
        self.clean_up_spaces = clean_up_spaces

    @staticmethod
    def _load_spm(path: Path):
        try:
            return sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path} is not a SentencePiece model: {e}") from None

    @classmethod
    def from_directory(cls, directory: str | Path, config: TransformerConfig | None = None) -> "MarianTokenizer":
        """The tokenizer of a Marian directory; with `config`, checked to belong to that model."""
        directory = Path(directory)
        missing = [name for name in TOKENIZER_FILES if not (directory / name).is_file()]
        if missing:
            raise UserError(f"{directory}: no {', '.join(missing)}; a Marian tokenizer is source.spm, "
                            "target.spm and vocab.json")
        settings = read_json_object(directory / TOKENIZER_CONFIG) if (directory / TOKENIZER_CONFIG).is_file() else {}
        where = str(directory / TOKENIZER_CONFIG)
        if json_field(settings, "separate_vocabs", bool, where, False):
            raise UserError(f"{where}: separate_vocabs is true: a target vocabulary of its own, which this "
                            "Transformer (one joint vocabulary) lacks")
        tokens = {key: _token_text(settings.get(key, default), key, where)
                  for key, default in (("unk_token", "<unk>"), ("eos_token", "</s>"), ("pad_token", "<pad>"))}
        extra = settings.get("additional_special_tokens", settings.get("extra_special_tokens")) or []
        if not isinstance(extra, list):
            raise UserError(f"{where}: additional_special_tokens must be a list, got {extra!r}")
        extra = tuple(_token_text(token, "additional_special_tokens", where) for token in extra)
        vocab = read_json_object(directory / "vocab.json")
        vocab_path = directory / "vocab.json"
        for piece, i in vocab.items():
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise UserError(f"{vocab_path}: {piece!r} maps to {i!r}, not a token id")
            if config is not None and i >= config.vocab_size:
                raise UserError(f"{vocab_path}: {piece!r} has id {i}, beyond the model's {config.vocab_size} tokens")
        for key, token in tokens.items():
            if token not in vocab:
                raise UserError(f"{vocab_path}: has no {token!r} ({key})")
        if config is not None:
            for key, token, ours in (("eos_token", tokens["eos_token"], config.eos_id),
                                     ("pad_token", tokens["pad_token"], config.pad_id)):
                if vocab[token] != ours:
                    raise UserError(f"{vocab_path}: {token!r} ({key}) is id {vocab[token]} but the model's is {ours}: "
                                    "the tokenizer and the model do not belong together")
        clean_up = json_field(settings, "clean_up_tokenization_spaces", bool, where, False)
        return cls(directory / "source.spm", directory / "target.spm", vocab, tokens["unk_token"],
                   tokens["eos_token"], tokens["pad_token"], extra, clean_up)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of source-language `text`, without EOS."""
        ids = []
        for segment in self._specials.split(text):
            if segment in self.vocab and self.vocab[segment] in self.special_ids:
                ids.append(self.vocab[segment])
                continue
            pieces = []
            if segment.startswith(">>") and (end := segment.find("<<")) != -1:  # a language code: >>ind<<
                pieces, segment = [segment[: end + 2]], segment[end + 2 :]
            pieces += self.source.encode(segment, out_type=str) if segment else []
            ids += [self.vocab.get(piece, self.unk_id) for piece in pieces]
        return ids

    def decode(self, ids) -> str:
        """Target-language text of `ids`, up to the first EOS, without special tokens."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        # An id vocab.json lacks is target.spm's piece of that number, as in transformers.
        in_spm = range(self.target.get_piece_size())
        pieces = [self.pieces[i] if i in self.pieces else self.target.id_to_piece(i)
                  for i in ids if i not in self.special_ids and (i in self.pieces or i in in_spm)]
        text = self.target.decode_pieces(pieces).replace("▁", " ").strip()
        return clean_up_tokenization(text) if self.clean_up_spaces else text


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`, for a tokenizer_config.json that asks for it."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
