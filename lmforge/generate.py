"""Autoregressive generation with a KV cache: token ids in, token ids out; plus `lmforge generate`.

`generate(model, prompts, ...)` decodes a batch of prompts together. Prompts of different lengths
are LEFT-padded; an attention mask hides the padding and position ids restart at 0 at each prompt's
first real token, so every row decodes exactly as it would alone. The prompt is run once (prefill)
into a preallocated KVCache; every later step feeds one token per row and projects only the last
position to logits.

Sampling, per step, in the order HF applies it: repetition penalty (CTRL: positive logits of seen
tokens divided by the penalty, negative ones multiplied) -> temperature (0 = greedy argmax) ->
top-k -> top-p (smallest set of tokens whose probability reaches p) -> multinomial draw.

    >>> generate(model, [[1, 2, 3], [4]], max_new_tokens=5, temperature=0)
    [[7, 7, 9, 2, 5], [3, 3, 1, 8, 8]]        # new tokens only; eos ends a row and is not included

    $ lmforge generate runs/small "Once upon a time" --max-new-tokens 100 --temperature 0.8 --top-k 50
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# logits processing (pure functions on (B, V) fp32 logits)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019) / HF: for tokens already seen, logit / penalty if > 0 else logit * penalty.

    >>> apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[1, 1, 0]]).bool(), 2.0)
    tensor([[ 1., -4.,  1.]])
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), set the rest to -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the most likely tokens until their mass reaches p.

    A token is dropped when the tokens ranked above it already hold >= p of the probability.
    probs [0.5, 0.3, 0.15, 0.05], p=0.7 -> keep the first two (0.5 < 0.7, 0.8 >= 0.7 stops after).
    """
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # (B, V) probability of the tokens ranked above
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # always keep the best token
    drop = drop_sorted.scatter(-1, idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    if temperature < 1e-4:  # logits / temperature could overflow: shift first (the same softmax)
        logits = logits - logits.amax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---------------------------------------------------------------------------------------------
# the decoding loop


def _check(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
           repetition_penalty: float, seed: int | None = None, flags: bool = False) -> None:
    """One-line ConfigErrors for bad decoding settings; flags=True names them as the CLI spells them."""
    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if flags else key

    if max_new_tokens < 1:
        raise ConfigError(f"{name('max_new_tokens')} must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:  # written so that NaN fails too
        raise ConfigError(f"{name('temperature')} must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        none = "" if flags else " or None"
        raise ConfigError(f"{name('top_k')} must be >= 0 (0{none} = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"{name('top_p')} must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ConfigError(f"{name('repetition_penalty')} must be > 0 (1 = off), got {repetition_penalty}")
    if seed is not None and not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ConfigError(f"{name('seed')} must fit in 64 bits (0 .. 2**64 - 1), got {seed}")


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | Iterable[int] | None = None,
    pad_id: int = 0,
    seed: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Continue each prompt; return the new token ids of each row (prompt not included).

    A row ends at eos_id, or at any of several (an instruct model's end-of-turn token beside eos; not
    included in its output), when stop(row_new_ids) returns True (the
    token that triggered it is included), after max_new_tokens, or when the context is full.
    on_token(row, token_id) is called for every token as it is produced (streaming), just before
    stop(row's new ids) is asked about the same row.
    vocab_size: only ids below it are produced (pass the tokenizer's size when the model's embedding
    table is larger, e.g. padded to a multiple of 64: the extra rows decode to nothing).
    """
    _check(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    if vocab_size is not None and vocab_size < 1:
        raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
    ends = set() if eos_id is None else set(torch.as_tensor(eos_id).flatten().tolist())  # int, list, array
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    ctx = model.cfg.max_seq_len
    lens = [len(p) for p in prompts]
    B, L = len(prompts), max(lens)
    if L > ctx:
        raise ConfigError(f"prompt has {L} tokens but the model's context is {ctx} tokens "
                          f"(model.max_seq_len); shorten the prompt")
    limits = [min(max_new_tokens, ctx - n) for n in lens]  # each row stops when its context is full
    n_new = max(limits)
    if n_new <= 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
    ids = ids.to(device)
    padded = min(lens) != L
    mask = pos = next_pos = None
    if padded:  # (B, L + n_new): 0 over each row's left padding, 1 over its prompt and new tokens
        mask = torch.ones(B, L + n_new, dtype=torch.long, device=device)
        for i, n in enumerate(lens):
            mask[i, : L - n] = 0
        pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)  # (B, L)
        next_pos = torch.tensor(lens, device=device)[:, None]  # (B, 1)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=device)] = True
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.make_cache(B, L + n_new)

    logits = model(ids, attention_mask=None if mask is None else mask[:, :L], position_ids=pos,
                   cache=cache, last_only=True)[:, -1]  # (B, V)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [lim <= 0 for lim in limits]
    for step in range(n_new):
        logits = logits.float()
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits[:, vocab_size:] = float("-inf")  # rows the tokenizer has no token for
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        nxt = sample_next(logits, temperature, top_k, top_p, gen)  # (B,)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in ends:
                done[i] = True
                continue
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
            if (stop is not None and stop(out[i])) or len(out[i]) >= limits[i]:
                done[i] = True
        if all(done) or step == n_new - 1:
            break
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        kw = {}
        if padded:
            # a finished row is still fed (its output is ignored); keep its position inside the context
            at = (next_pos + step).clamp(max=ctx - 1)  # (B, 1)
            kw = dict(attention_mask=mask[:, : L + step + 1], position_ids=at)
        logits = model(nxt[:, None], cache=cache, last_only=True, **kw)[:, -1]
    return out


# ---------------------------------------------------------------------------------------------
# text streaming with stop strings (used by the CLI and the API)


class TextStream:
    """Decode a growing list of token ids to text incrementally and cut at stop strings.

    Text is emitted only when it is final: never half of a multi-byte UTF-8 character (a decode
    ending in U+FFFD waits for the next token), never a tail that could still become a stop string.

        >>> s = TextStream(tok, stop=["\\n\\n"], write=print)
        >>> for t in ids: s.push(t)        # prints pieces as they become final
        >>> s.finish(); s.text            # the whole output, cut before the first stop string
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, write: Callable[[str], None] | None = None,
                 prefix_ids: list[int] | None = None):
        self.tok = tokenizer
        # the prompt's last ids, decoded in front and cut off again: decoders that drop a leading
        # space (Metaspace: Unigram, SentencePiece/Llama) must see that the output is not at the start
        self.prefix = list(prefix_ids or [])[-4:]
        if self.prefix and not tokenizer.decode(self.prefix, skip_special_tokens=True):
            self.prefix = []  # only bos / a separator before it (an empty prompt): the output starts the text
        self.head = tokenizer.decode(self.prefix) if self.prefix else ""
        self.stops = [s for s in (stop or []) if s]
        self.write = write
        self.ids: list[int] = []
        self.text = ""  # final text so far
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> None:
        if self.stopped:
            return
        self.ids.append(token_id)
        text = self._decode()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._emit(text[:cut], upto=cut)
            return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
            return
        hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._emit(text, upto=len(text) - hold)

    def finish(self) -> str:
        if not self.stopped:
            text = self._decode()
            self._emit(text, upto=len(text))
        return self.text

    def _decode(self) -> str:
        if self.prefix:
            full = self.tok.decode(self.prefix + self.ids)
            if full.startswith(self.head):
                return full[len(self.head):]
        return self.tok.decode(self.ids)

    def _emit(self, text: str, upto: int) -> None:
        self.text = text[:upto]
        if upto > self.emitted and self.write is not None:
            self.write(text[self.emitted:upto])
        self.emitted = max(self.emitted, upto)


# ---------------------------------------------------------------------------------------------
# CLI


def register(parser: argparse.ArgumentParser) -> None:
    from lmforge.config import GenerateConfig

    d = GenerateConfig()  # the defaults api.generate() uses too
    parser.add_argument("run_dir", help="a run dir (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help=f"at most this many new tokens, >= 1 (default {d.max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=d.temperature,
                        help=f">= 0; 0 = greedy (default {d.temperature:g})")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling, in (0, 1] (1 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                        help="> 0; 1 = off (default)")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help=r"stop at this string (repeatable); \n, \t and \\ are read as escapes")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--dtype", choices=("bf16", "fp32", "int8"), default="fp32",
                        help="weights: fp32 (default), bf16, or int8 (weight-only, bf16 activations; "
                        "fastest on CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.set_defaults(func=_cmd_generate)


def unescape(text: str) -> str:
    r"""The escapes a shell leaves alone, for --stop: '\n\n' (backslash, n, ...) -> two newlines (\r, \t too).

    >>> unescape(r"\n\n"), unescape(r"a\tb"), unescape(r"c:\\n"), unescape("héllo"), unescape(r"\r\n")
    ('\n\n', 'a\tb', 'c:\\n', 'héllo', '\r\n')
    """
    return re.sub(r"\\([nrt\\])", lambda m: {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.api import load
    from lmforge.runtime import pick_device

    _check(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
           args.seed, flags=True)  # before loading the model: a typo costs nothing
    device = pick_device(args.device, flag="--device")
    model, tok = load(args.run_dir, device=device, dtype=args.dtype, pack=device.type == "cpu",
                      need_tokenizer=True)
    if model.cfg.family != "gpt":
        raise ConfigError(f"{args.run_dir} holds a {model.cfg.family} model; generate needs a gpt run dir "
                          "(use fill-mask or embed for encoders)")
    ids = tok.encode_prompt(args.prompt)  # bos first where the tokenizer asks for it (Llama files)
    if len(ids) > model.cfg.max_seq_len:
        raise ConfigError(f"the prompt is {len(ids)} tokens but the model's context is "
                          f"{model.cfg.max_seq_len}; shorten the prompt")
    if len(ids) == model.cfg.max_seq_len:
        print(f"note: the prompt fills the model's context ({len(ids)} tokens): no room for new tokens; "
              "shorten the prompt", file=sys.stderr)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stream = TextStream(tok, [unescape(s) for s in args.stop], write, prefix_ids=ids)
    generate(model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
             eos_id=tok.stop_ids, pad_id=tok.pad_id or 0, seed=args.seed, vocab_size=tok.vocab_size,
             stop=lambda _row: stream.stopped, on_token=lambda _i, t: stream.push(t))
    stream.finish()
    write("\n")
    return 0
