"""Export to the formats the RWKV world uses: BlinkDL `.pth` (rwkv pip, ChatRWKV, RWKV-Runner) and HF `RwkvForCausalLM`."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .data.tokenizer import CONTROL_SYMBOLS, EOD_ID, MODEL_FILE, PAD_ID, UNK_ID, Tokenizer
from .errors import CheckpointError
from .model.config import RWKVConfig
from .model.state_dict import check_state_dict, config_from_state_dict, read_state_dict

FORMATS = ("blinkdl", "hf")

# BlinkDL name fragment -> transformers' RwkvForCausalLM name fragment (shapes and the raw time_decay are the same).
_HF_RENAMES = [
    (r"^emb\.", "rwkv.embeddings."),
    (r"^blocks\.", "rwkv.blocks."),
    (r"^ln_out\.", "rwkv.ln_out."),
    (r"\.ln0\.", ".pre_ln."),
    (r"\.att\.", ".attention."),
    (r"\.ffn\.", ".feed_forward."),
    (r"\.time_mix_k$", ".time_mix_key"),
    (r"\.time_mix_v$", ".time_mix_value"),
    (r"\.time_mix_r$", ".time_mix_receptance"),
]


def hf_name(blinkdl_name: str) -> str:
    for pattern, replacement in _HF_RENAMES:
        blinkdl_name = re.sub(pattern, replacement, blinkdl_name)
    return blinkdl_name


def hf_config(cfg: RWKVConfig) -> dict:
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.ctx_len,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "attention_hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_width,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        # HF halves activations every `rescale_every` layers at inference (an fp16 overflow guard); 0 keeps logits exact.
        "rescale_every": 0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
    }


def hf_tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained` loads and that encode and decode
    exactly as `tokenizer` (our sentencepiece model), for any text.

    How each sentencepiece setting is mirrored in the `tokenizers` pipeline:
      identity normalization, no dummy prefix, no whitespace collapsing -> the only normalizer step is " " -> "▁"
        (sentencepiece's whitespace escape), and no pre-tokenizer: sentencepiece merges over the whole text too;
      bpe: merging by piece score -> merges (left, right) for every split of a piece into two pieces, ordered by
        the merged piece's score (sentencepiece merges the adjacent pair whose concatenation scores highest);
      unigram -> a Unigram model with the same pieces and log-probabilities (reserved and byte pieces, which
        sentencepiece never matches in text, get a score no path takes). Exact for bpe (the default; tested token for
        token on the demo corpus); for unigram, equal-scoring segmentations (runs of spaces, mostly: ~0.2% of the demo
        corpus's lines) may be split differently, as the two Viterbi implementations break ties differently;
      byte fallback -> BPE byte_fallback with the <0xXX> pieces at their ids, ByteFallback + Fuse in the decoder
        (decoding ids that no text encodes to can still differ: a run of non-ASCII byte pieces that starts valid and
        turns invalid is all U+FFFD in transformers, only its invalid bytes in sentencepiece);
      user-defined "\n", "\r", "\t" -> added tokens matched on the raw text, never merged;
      reserved ids 0 <|endoftext|>, 1 <pad>, 2 <unk> -> special tokens at those ids; like sentencepiece's control
        pieces they are not recognized inside text (split_special_tokens), and decode to nothing by default.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    sp = tokenizer.sp
    proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.path.read_bytes())
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    if proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:  # Viterbi over the piece log-probabilities
        unmatched = lambda i: sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)  # noqa: E731
        model = models.Unigram([(sp.id_to_piece(i), -1e30 if unmatched(i) else sp.get_score(i))
                                for i in range(sp.vocab_size())], UNK_ID, byte_fallback=True)
    else:
        plain = {i for i in range(sp.vocab_size()) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
                                                           or sp.id_to_piece(i) in CONTROL_SYMBOLS)}
        mergeable = {sp.id_to_piece(i) for i in plain}
        merges = []
        for i in plain:
            piece = sp.id_to_piece(i)
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in mergeable and right in mergeable:
                    merges.append((-sp.get_score(i), i, vocab[left], left, right))
        merges.sort()
        model = models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in merges],
                           unk_token=sp.id_to_piece(UNK_ID), byte_fallback=True, fuse_unk=False)
    hf = HFTokenizer(model)
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    # sentencepiece decodes an ASCII byte piece to its character even next to invalid UTF-8 bytes; ByteFallback turns
    # a whole run of byte pieces that is not valid UTF-8 into U+FFFD each, so ASCII byte pieces are spelled out first
    ascii_bytes = [decoders.Replace(f"<0x{b:02X}>", chr(b)) for b in range(128)]
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), *ascii_bytes, decoders.ByteFallback(),
                                    decoders.Fuse()])
    special = [sp.id_to_piece(i) for i in (EOD_ID, PAD_ID, UNK_ID)]
    hf.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in special])
    hf.add_tokens([AddedToken(symbol, special=False, normalized=False) for symbol in CONTROL_SYMBOLS])
    for piece in special + CONTROL_SYMBOLS:
        if hf.token_to_id(piece) != vocab[piece]:
            raise CheckpointError(f"{tokenizer.path}: {piece!r} is not at id {vocab[piece]}; retrain the tokenizer")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,  # no BOS: lm-eval then conditions empty contexts on <|endoftext|>, as our backend does
        "eos_token": special[0], "pad_token": special[1], "unk_token": special[2],
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "split_special_tokens": True, "padding_side": "right",
        "rwkv_dist_tokenizer_sha256": tokenizer.sha256,
    }
    return {"tokenizer.json": hf.to_str(), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


HF_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MODEL_FILE}


def check_export_out(fmt: str, out: str | Path) -> None:
    """Refuse, before reading any weights, an --out the export would fail on or that holds something else: an hf
    export replaces a folder only when it is an earlier hf export (only its files), never another folder or a file."""
    from .errors import check_out_folder

    out = Path(out)
    if fmt == "blinkdl":
        if out.is_dir():
            raise CheckpointError(f"--out {out}: is a folder; a blinkdl export is one file (e.g. {out / 'model.pth'})")
        if out.suffix == ".safetensors":  # torch.save would write a pickle under that name, which no reader takes
            raise CheckpointError(f"--out {out}: a blinkdl export is a torch .pth file; name it "
                                  f"{out.with_suffix('.pth')}")
        check_out_folder(out.parent, "--out", CheckpointError)
    else:
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"--out {out}: exists and is not a folder; an hf export is a folder")
        if out.is_dir():
            other = sorted(p.name for p in out.iterdir() if p.name not in HF_FILES)
            if other:
                raise CheckpointError(f"--out {out}: a folder that is not an hf export (holds {other[0]}); it would be "
                                      f"replaced: choose a new or empty folder")
        check_out_folder(out.parent, "--out", CheckpointError)


def export_state_dict(sd: dict[str, torch.Tensor], fmt: str, out: str | Path, dtype: torch.dtype | None = None,
                      source: str = "state dict", ctx_len: int = 1024, tokenizer: Tokenizer | None = None) -> Path:
    """Write `sd` (BlinkDL names) as `fmt` to `out`, atomically: a failed export leaves no half-written output.

    An hf export also carries `tokenizer` (tokenizer.json, tokenizer_config.json and the sentencepiece file) when given."""
    if fmt not in FORMATS:
        raise CheckpointError(f"export: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_export_out(fmt, out)
    cfg = config_from_state_dict(sd, source, ctx_len=ctx_len)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens, more than the model's {cfg.vocab_size} "
                              f"({source}): not this model's tokenizer")
    from .model.rwkv import RWKV

    with torch.device("meta"):
        expected = RWKV(cfg, init=False).state_dict()
    check_state_dict(sd, expected, source)
    sd = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in sd.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "blinkdl":
            torch.save(sd, staging / "model.pth")
            os.replace(staging / "model.pth", out)
        else:
            from safetensors.torch import save_file

            save_file({hf_name(k): v for k, v in sd.items()}, str(staging / "model.safetensors"), metadata={"format": "pt"})
            (staging / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
            if tokenizer is not None:
                for name, text in hf_tokenizer_files(tokenizer).items():
                    (staging / name).write_text(text)
                shutil.copyfile(tokenizer.path, staging / MODEL_FILE)
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def export_file(src: str | Path, fmt: str, out: str | Path, dtype: torch.dtype | None = None,
                tokenizer: Tokenizer | None = None) -> Path:
    check_export_out(fmt, out)
    return export_state_dict(read_state_dict(src), fmt, out, dtype=dtype, source=str(src), tokenizer=tokenizer)
