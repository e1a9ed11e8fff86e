"""The `rwkv_dist` model of lm-evaluation-harness: RWKV-4 checkpoints of this system and BlinkDL `.pth` files.

An RNN needs no attention over the context for each answer: the context runs once (parallel mode, in time chunks
that carry the recurrent state) and its state is copied into every continuation, so a 4-choice question costs about
one context, not four. Whole documents (loglikelihood_rolling) stream through the state in chunks: memory does not
grow with their length. Generation is greedy, one recurrent step per token, batched over requests.

Tokenization is lm-eval's own (TemplateLM: trailing context spaces move to the continuation; the continuation is what
encoding context + continuation adds after the context's tokens; an empty context is <|endoftext|>), so the tokens
scored are exactly those lm-eval's `hf` backend scores on our HF export (which carries the same tokenizer).

    lm_eval --model rwkv_dist --model_args pretrained=runs/x/train,batch_size=16   (python -m rwkv_dist.evaluation)
    model_args: pretrained (checkpoint: step or run folder, or .pth/.safetensors), tokenizer (tokenizer.model, or a
    tokenizers .json such as the official models' 20B_tokenizer.json; default: the checkpoint's), batch_size, device,
    dtype (float32 | bfloat16 | float16), max_length (default none: the state carries any context; set it to truncate
    contexts and window documents as a transformer of that length would), chunk_len (tokens per parallel call),
    max_gen_toks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs

from ..errors import CheckpointError, ConfigError
from ..model.rwkv import RWKV, RWKVState

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class TokenizerFile:
    """A `tokenizers` JSON file (e.g. 20B_tokenizer.json of the official RWKV-4 Pile models), with our Tokenizer's API."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            data = self.path.read_bytes()
            self.tk = HFTokenizer.from_str(data.decode())
        except (OSError, UnicodeDecodeError, Exception) as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise CheckpointError(f"{self.path}: not a readable tokenizers JSON file ({str(e).splitlines()[0][:120]})")
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.eod_id = self.tk.token_to_id("<|endoftext|>")
        if self.eod_id is None:
            raise CheckpointError(f"{self.path}: no <|endoftext|> token")

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(list(ids))


def load_for_eval(pretrained: str | Path, tokenizer: str | Path | None = None):
    """(fp32 RWKV in eval mode, tokenizer) of a checkpoint; the tokenizer must fit the model's vocabulary."""
    from ..inference import load_model

    tok_path = Path(tokenizer) if tokenizer else None
    json_tok = tok_path is not None and (tok_path.suffix == ".json" or (
        tok_path.is_dir() and (tok_path / "tokenizer.json").is_file() and not (tok_path / "tokenizer.model").is_file()))
    model, tok = load_model(pretrained, None if json_tok else tokenizer)
    if json_tok:
        tok = TokenizerFile(tok_path if tok_path.suffix == ".json" else tok_path / "tokenizer.json")
    if tok is None:
        raise CheckpointError(f"{pretrained}: a weights file carries no tokenizer; pass tokenizer=PATH (--tokenizer)")
    if tok.vocab_size > model.cfg.vocab_size:
        raise CheckpointError(f"{tok.path}: {tok.vocab_size} tokens, more than the model's {model.cfg.vocab_size}: "
                              f"not this checkpoint's tokenizer")
    return model, tok


def _take(state: RWKVState, rows: torch.Tensor) -> RWKVState:
    return RWKVState(*(t.index_select(1, rows) for t in state))


def _put(state: RWKVState, rows: torch.Tensor, part: RWKVState) -> None:
    for t, p in zip(state, part):
        t[:, rows] = p


def _batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        return 16
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"rwkv_dist model: batch_size must be a positive integer or auto, got {value!r}") from None
    if size < 1:
        raise ConfigError(f"rwkv_dist model: batch_size must be positive, got {value}")
    return size


@register_model("rwkv_dist")
class RWKVDistLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, tokenizer: str | None = None, batch_size=8, max_batch_size=None,
                 device: str | None = None, dtype: str = "float32", max_length: int | None = None, chunk_len: int = 512,
                 max_gen_toks: int = 256, model: RWKV | None = None, **unknown):
        super().__init__()
        unknown = {k: v for k, v in unknown.items() if v is not None}
        if unknown:
            raise ConfigError(f"rwkv_dist model: unknown argument(s) {', '.join(sorted(unknown))} (known: pretrained, "
                              "tokenizer, batch_size, device, dtype, max_length, chunk_len, max_gen_toks)")
        if str(dtype) not in DTYPES:
            raise ConfigError(f"rwkv_dist model: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if model is None:  # `model` + `tokenizer` objects: an in-memory model (training-time evaluation)
            if pretrained is None:
                raise ConfigError("rwkv_dist model: pass pretrained=CHECKPOINT")
            model, tokenizer = load_for_eval(pretrained, tokenizer)
        elif tokenizer is None or isinstance(tokenizer, (str, Path)):
            raise ConfigError("rwkv_dist model: an in-memory model needs its tokenizer object")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda" and not torch.cuda.is_available():  # lm-eval's command line defaults to cuda
            logging.getLogger(__name__).warning("rwkv_dist model: no CUDA device here; running on the CPU")
            self._device = torch.device("cpu")
        self.model = model.to(self._device, DTYPES[str(dtype)]).eval()
        self.tok = tokenizer
        self.batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else None
        self.chunk_len = int(chunk_len)
        self._max_gen_toks = int(max_gen_toks)
        self.name = str(pretrained or "in-memory model")
        # tokens the model ran on, by kind (the state-reuse test counts context tokens)
        self.stats = {"context": 0, "continuation": 0, "rolling": 0, "generated": 0}

    # ---- lm-eval's model interface -----------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id

    @property
    def max_length(self) -> int | None:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"rwkv_dist-{self.tok.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode([string])[0]

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict:
        cfg = self.model.cfg
        return {"model_num_parameters": cfg.num_params(), "model_dtype": str(next(self.model.parameters()).dtype),
                "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size}

    # ---- the model, in parallel mode with a carried state ----------------------------------------------------------
    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor, state: RWKVState | None, last_only: bool):
        """tokens [B, T] -> (fp32 logits of the last position [B, V] or of all [B, T, V], the state after them)."""
        m = self.model
        x = m.emb(tokens)
        layers = []
        for i, block in enumerate(m.blocks):
            x, layer_state = block(x, None if state is None else state.layer(i))
            layers.append(layer_state)
        if last_only:
            x = x[:, -1]
        return m.head(m.ln_out(x)).float(), RWKVState.stack(layers)

    @torch.no_grad()
    def _prefill(self, seqs: list[list[int]]) -> tuple[torch.Tensor, RWKVState]:
        """Run sequences of any lengths: (logits after each one's last token [n, V], each one's state). The batch
        advances together up to the shortest remaining length, those rows keep their state, the rest go on: no
        padding, so every state is exact."""
        n = len(seqs)
        state = RWKVState.fresh(self.model.cfg, n, self._device)
        last = torch.empty(n, self.model.cfg.vocab_size, device=self._device)
        pos = 0
        for end in sorted({len(s) for s in seqs}):
            rows = [i for i, s in enumerate(seqs) if len(s) >= end]
            index = torch.tensor(rows, device=self._device)
            tokens = torch.tensor([seqs[i][pos:end] for i in rows], device=self._device)
            part = _take(state, index)
            for t0 in range(0, end - pos, self.chunk_len):
                logits, part = self._forward(tokens[:, t0:t0 + self.chunk_len], part, last_only=True)
            _put(state, index, part)
            done = [j for j, i in enumerate(rows) if len(seqs[i]) == end]
            last[index[done]] = logits[done]
            self.stats["context"] += tokens.numel()
            pos = end
        return last, state

    @torch.no_grad()
    def _score(self, inputs: list[list[int]], targets: list[list[int]], state: RWKVState | None):
        """Sum of log p(target_t | ..., input_t) per row and whether every target is the argmax; rows may differ in
        length (right-padded: a causal model's earlier positions do not see the padding). Runs in time chunks with
        the state carried, so memory is one chunk's logits whatever the length."""
        width = max(map(len, inputs))
        pad = lambda rows: torch.tensor([r + [0] * (width - len(r)) for r in rows], device=self._device)  # noqa: E731
        x, y = pad(inputs), pad(targets)
        valid = torch.arange(width, device=self._device)[None] < torch.tensor([len(r) for r in inputs],
                                                                              device=self._device)[:, None]
        total = torch.zeros(len(inputs), dtype=torch.float64, device=self._device)
        greedy = torch.ones(len(inputs), dtype=torch.bool, device=self._device)
        for t0 in range(0, width, self.chunk_len):
            t1 = t0 + self.chunk_len
            logits, state = self._forward(x[:, t0:t1], state, last_only=False)
            logp = torch.log_softmax(logits, dim=-1)
            target, mask = y[:, t0:t1], valid[:, t0:t1]
            total += (logp.gather(-1, target[..., None])[..., 0] * mask).sum(1, dtype=torch.float64)
            greedy &= ((logp.argmax(-1) == target) | ~mask).all(1)
        return total, greedy

    # ---- requests --------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        prepared = []
        for _, context, continuation in requests:
            context, continuation = list(context), list(continuation)
            if self._max_length and len(context) + len(continuation) > self._max_length + 1:
                if len(continuation) > self._max_length:
                    raise ConfigError(f"rwkv_dist model: a continuation of {len(continuation)} tokens is longer than "
                                      f"max_length {self._max_length}")
                context = context[len(context) + len(continuation) - self._max_length - 1:]  # as lm-eval's hf does
            prepared.append((tuple(context), continuation))
        by_context: dict[tuple, list[int]] = {}
        for i, (context, _) in enumerate(prepared):
            by_context.setdefault(context, []).append(i)
        contexts = sorted(by_context, key=len, reverse=True)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for c0 in range(0, len(contexts), self.batch_size):
            batch = contexts[c0:c0 + self.batch_size]
            last, state = self._prefill([list(c) for c in batch])
            first = torch.log_softmax(last, dim=-1)
            items = sorted(((j, i) for j, c in enumerate(batch) for i in by_context[c]), key=lambda t: -len(prepared[t[1]][1]))
            for s0 in range(0, len(items), self.batch_size):
                part = items[s0:s0 + self.batch_size]
                rows = torch.tensor([j for j, _ in part], device=self._device)
                conts = [prepared[i][1] for _, i in part]
                head = torch.tensor([c[0] for c in conts], device=self._device)
                total = first[rows].gather(1, head[:, None])[:, 0].double()
                greedy = first[rows].argmax(-1) == head
                if max(map(len, conts)) > 1:  # the rest of each continuation, from a copy of its context's state
                    more, more_greedy = self._score([c[:-1] for c in conts], [c[1:] for c in conts], _take(state, rows))
                    total, greedy = total + more, greedy & more_greedy
                    self.stats["continuation"] += sum(len(c) - 1 for c in conts)
                for k, (_, i) in enumerate(part):
                    out[i] = (float(total[k]), bool(greedy[k]))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0]) for req in requests]
        if self._max_length:  # a transformer's view: windows of max_length, scored like lm-eval's hf backend does
            windows = [(i, w) for i, doc in enumerate(docs) for w in map(lm_utils.make_disjoint_window,
                       lm_utils.get_rolling_token_windows(doc, self.prefix_token_id, self._max_length, 1))]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for _, (ctx, cont) in windows])
            totals = [0.0] * len(docs)
            for (i, _), (ll, _) in zip(windows, scores):
                totals[i] += ll
        else:  # the whole document through the recurrent state, after <|endoftext|>
            totals = [0.0] * len(docs)
            order = sorted((i for i, d in enumerate(docs) if d), key=lambda i: -len(docs[i]))
            for b0 in range(0, len(order), self.batch_size):
                batch = order[b0:b0 + self.batch_size]
                inputs = [[self.prefix_token_id] + docs[i][:-1] for i in batch]
                total, _ = self._score(inputs, [docs[i] for i in batch], None)
                self.stats["rolling"] += sum(map(len, inputs))
                for k, i in enumerate(batch):
                    totals[i] = float(total[k])
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self._max_gen_toks)
            until = [s for s in kwargs.pop("until", []) if s]
            max_new = int(kwargs.pop("max_gen_toks"))
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise ConfigError(f"rwkv_dist model: generation is greedy only; the task asks for {kwargs}")
            contexts = {i: self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in indices}
            order = sorted(indices, key=lambda i: -len(contexts[i]))
            for b0 in range(0, len(order), self.batch_size):
                batch = order[b0:b0 + self.batch_size]
                for i, text in zip(batch, self._greedy([contexts[i] for i in batch], until, max_new)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    @torch.no_grad()
    def _greedy(self, contexts: list[list[int]], until: list[str], max_new: int) -> list[str]:
        """Greedy continuations, stopped at <|endoftext|>, at max_new tokens or before the first stop sequence."""
        logits, state = self._prefill(contexts)
        tokens: list[list[int]] = [[] for _ in contexts]
        texts: list[str | None] = [None] * len(contexts)
        active = list(range(len(contexts)))
        while active and max_new > 0:
            chosen = logits.argmax(-1)
            keep = []
            for k, row in enumerate(active):
                token = int(chosen[k])
                if token == self.eot_token_id:
                    texts[row] = self.tok.decode(tokens[row])
                    continue
                tokens[row].append(token)
                text = self.tok.decode(tokens[row])
                hits = [text.find(s) for s in until if s in text]
                if hits or len(tokens[row]) >= max_new:
                    texts[row] = text[:min(hits)] if hits else text
                    continue
                keep.append(k)
            self.stats["generated"] += len(active)
            if not keep:
                break
            index = torch.tensor(keep, device=self._device)
            active = [active[k] for k in keep]
            logits, state = self.model.step(chosen[index], _take(state, index))
            logits = logits.float()
        return [t if t is not None else self.tok.decode(tokens[r]) for r, t in enumerate(texts)]
