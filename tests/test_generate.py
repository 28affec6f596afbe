"""Generation: sampling vs HF processors + hand examples, cache == recompute, padded == alone, CLI."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.generate import (
    TextStream,
    apply_repetition_penalty,
    generate,
    sample_next,
    top_k_filter,
    top_p_filter,
    unescape,
)
from lmforge.models.gpt import GPT

GPT2 = dict(vocab_size=97, max_seq_len=48, n_layer=2, n_head=4, d_model=32)
LLAMA = dict(GPT2, n_kv_head=2, d_ff=48, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False,
             tie_embeddings=False)


class FixedLogits(torch.nn.Module):
    """A mock model: the same next-token logits at every step, whatever the input."""

    def __init__(self, logits: list[float], max_seq_len: int = 64):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=len(logits), max_seq_len=max_seq_len, n_layer=1, n_head=1,
                               d_model=4)
        self.logits = torch.nn.Parameter(torch.tensor(logits), requires_grad=False)
        self.calls = []

    def make_cache(self, batch_size, max_len):
        return None

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False):
        self.calls.append(input_ids.shape)
        B, T = input_ids.shape
        return self.logits.expand(B, 1 if last_only else T, -1)


def test_greedy_is_argmax_and_max_tokens():
    m = FixedLogits([0.1, 3.0, 0.2, 2.9])
    out = generate(m, [[0, 2], [3]], max_new_tokens=5, temperature=0)
    assert out == [[1] * 5, [1] * 5]
    assert m.calls[0] == (2, 2) and all(c == (2, 1) for c in m.calls[1:]) and len(m.calls) == 5
    assert generate(m, [[0]], max_new_tokens=3, temperature=0, vocab_size=1) == [[0] * 3]  # id 1 is cut off
    with pytest.raises(ConfigError, match="vocab_size must be >= 1"):
        generate(m, [[0]], vocab_size=0)


def test_seed_reproducible_and_uniform():
    m = FixedLogits([0.0] * 50)
    a = generate(m, [[1]], max_new_tokens=30, seed=123)
    assert a == generate(m, [[1]], max_new_tokens=30, seed=123)
    assert a != generate(m, [[1]], max_new_tokens=30, seed=124)
    many = generate(m, [[1]] * 40, max_new_tokens=25, seed=0)
    counts = torch.bincount(torch.tensor(many).flatten(), minlength=50)
    assert (counts > 0).sum() >= 45  # 1000 draws from uniform(50) cover (almost) all tokens


def test_top_k_top_p_hand_examples():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lg = probs.log()
    keep = lambda p: (~torch.isinf(top_p_filter(lg, p))).int().tolist()[0]  # noqa: E731
    assert keep(0.5) == [1, 0, 0, 0]  # 0.5 already reaches 0.5
    assert keep(0.7) == [1, 1, 0, 0]
    assert keep(0.81) == [1, 1, 1, 0]
    assert keep(1.0) == [1, 1, 1, 1]
    # only allowed tokens are ever drawn
    m = FixedLogits([0.0, 1.0, 2.0, 3.0, 4.0])
    out = generate(m, [[0]] * 20, max_new_tokens=10, top_k=2, seed=0)
    assert {t for row in out for t in row} == {3, 4}


def test_processors_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    ids = torch.randint(0, 40, (3, 7))
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter(1, ids, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), ref)
    for k in (1, 5, 40):
        ref = TopKLogitsWarper(k)(ids, logits.clone())
        assert torch.equal(torch.isinf(top_k_filter(logits, k)), torch.isinf(ref))
    for p in (0.1, 0.5, 0.9, 0.99):
        ref = TopPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(torch.isinf(top_p_filter(logits, p)), torch.isinf(ref))


def test_repetition_penalty_hand_example():
    out = apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[True, True, False]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    # greedy with a strong penalty cannot repeat the favourite token forever
    m = FixedLogits([1.0, 1.5, 0.9])
    assert generate(m, [[2]], max_new_tokens=3, temperature=0, repetition_penalty=2.0) == [[1, 0, 1]]


def test_temperature_sharpens():
    m = FixedLogits([0.0, 1.0])
    cold = sum(sum(r) for r in generate(m, [[0]] * 50, max_new_tokens=10, temperature=0.1, seed=0))
    hot = sum(sum(r) for r in generate(m, [[0]] * 50, max_new_tokens=10, temperature=10.0, seed=0))
    assert cold > 495 and 200 < hot < 320  # p(1) = 1/(1+e^-10) vs 1/(1+e^-0.1) = 0.525
    # a temperature so small that logits / temperature overflows is the greedy limit, not a crash
    assert generate(m, [[0]] * 3, max_new_tokens=4, temperature=1e-45, seed=0) == [[1] * 4] * 3


def test_eos_stop_and_streaming():
    m = FixedLogits([0.0, 5.0, 0.0])
    assert generate(m, [[0]], max_new_tokens=5, temperature=0, eos_id=1) == [[]]
    assert generate(m, [[0]], max_new_tokens=5, temperature=0, eos_id=[7, 1]) == [[]]  # any of several
    assert generate(m, [[0]], max_new_tokens=2, temperature=0, eos_id=[7, 2]) == [[1, 1]]
    for one in (np.int64(1), torch.tensor(1), torch.tensor([7, 1])):  # ids as numpy / torch give
        assert generate(m, [[0]], max_new_tokens=5, temperature=0, eos_id=one) == [[]]
    seen, m.calls = [], []
    out = generate(m, [[0], [2, 2]], max_new_tokens=6, temperature=0, stop=lambda ids: len(ids) >= 3,
                   on_token=lambda i, t: seen.append((i, t)))
    assert out == [[1, 1, 1], [1, 1, 1]] and seen == [(0, 1), (1, 1)] * 3
    assert len(m.calls) == 3  # stopped early for every row: no wasted steps


def test_context_limits():
    m = FixedLogits([0.0, 1.0], max_seq_len=8)
    assert len(generate(m, [[0] * 5], max_new_tokens=10, temperature=0)[0]) == 3
    with pytest.raises(ConfigError, match="prompt has 9 tokens but the model's context is 8"):
        generate(m, [[0] * 9], max_new_tokens=1)
    with pytest.raises(ConfigError, match="temperature"):
        generate(m, [[0]], temperature=-1)
    for bad in (0, -1):  # no silent empty output
        with pytest.raises(ConfigError, match=f"max_new_tokens must be >= 1, got {bad}"):
            generate(m, [[0]], max_new_tokens=bad)


def _model(flavour):
    torch.manual_seed(0)
    return GPT(ModelConfig(**flavour)).eval()


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_cached_equals_full_recompute(flavour):
    m = _model(flavour)
    prompt = [5, 17, 3, 88, 41]
    out = generate(m, [prompt], max_new_tokens=20, temperature=0)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]
    # sampled, same seed: the cached logits feed the same draws
    a = generate(m, [prompt], max_new_tokens=10, seed=7, top_p=0.9)[0]
    seq, g = list(prompt), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _ in range(10):
            logits = m(torch.tensor([seq]))[:, -1].float()
            seq.append(int(sample_next(logits, 1.0, None, 0.9, g)[0]))
    assert a == seq[len(prompt):]


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_left_padded_batch_equals_each_alone(flavour):
    m = _model(flavour)
    prompts = [[5, 17, 3, 88, 41, 9, 2], [60], [11, 12, 13]]
    batch = generate(m, prompts, max_new_tokens=15, temperature=0, pad_id=0, repetition_penalty=1.2)
    alone = [generate(m, [p], max_new_tokens=15, temperature=0, repetition_penalty=1.2)[0] for p in prompts]
    assert batch == alone


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_each_row_of_a_batch_runs_to_its_own_context_limit(flavour):
    """A short prompt beside a long one still gets ctx - len(prompt) tokens, as it would alone."""
    m = _model(dict(flavour, max_seq_len=12))
    prompts = [[1] * 10, [2], [3] * 12]  # the last one already fills the context
    batch = generate(m, prompts, max_new_tokens=50, temperature=0)
    alone = [generate(m, [p], max_new_tokens=50, temperature=0)[0] for p in prompts]
    assert [len(r) for r in batch] == [2, 11, 0] and batch == alone


def test_causal_mask_is_built_on_the_inputs_device():
    from lmforge.models.layers import build_attn_mask

    mask = build_attn_mask(None, 2, 5, causal=True, device=torch.device("meta"))  # chunked prefill
    assert mask.device.type == "meta" and mask.shape == (1, 1, 2, 5)


class _CharTok:
    """A byte-level stand-in tokenizer: one id per UTF-8 byte (decode like byte-level BPE)."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_packed_weights_generate_the_same_tokens(flavour):
    import copy

    from lmforge.models.layers import pack_linears_
    m = _model(flavour)
    packed = copy.deepcopy(m)
    assert pack_linears_(packed)
    assert type(packed.head).__name__ == "PackedLinear" and type(m.head).__name__ == "Linear"
    prompts = [[5, 17, 3, 88, 41], [60], [11, 12, 13]]  # left-padded batch and single rows
    assert generate(packed, prompts, max_new_tokens=15, temperature=0) == generate(
        m, prompts, max_new_tokens=15, temperature=0)
    assert generate(packed, prompts[:1], max_new_tokens=10, seed=3, top_p=0.9) == generate(
        m, prompts[:1], max_new_tokens=10, seed=3, top_p=0.9)


def test_text_stream_utf8_and_stop_strings():
    text = "héllo 🙂 wörld"
    pieces = []
    s = TextStream(_CharTok(), write=pieces.append)
    for b in text.encode("utf-8"):
        s.push(b)
    assert s.finish() == text and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    pieces = []
    s = TextStream(_CharTok(), stop=["END", "\n\n"], write=pieces.append)
    for b in b"ab EN cd\n\nignored":
        s.push(b)
    assert s.stopped and s.finish() == "ab EN cd" and "".join(pieces) == "ab EN cd"


def _run_dir(tmp_path, family_cfg=GPT2, vocab=300):
    from lmforge.models.store import save_model
    from lmforge.tokenizer import train
    tok = train("bpe", ["the cat sat on the mat. héllo wörld 🙂"] * 30, vocab_size=vocab)
    run = tmp_path / "run"
    save_model(_model(family_cfg), run)
    tok.save(run)
    return run, tok


def test_package_level_api_is_the_text_functions_in_a_fresh_interpreter(tmp_path):
    """README: lmforge.load + lmforge.generate, also after the submodule lmforge/generate.py is imported."""
    import subprocess
    import sys

    run, _ = _run_dir(tmp_path, dict(GPT2, vocab_size=300))
    script = f"""
import sys, lmforge
assert "torch" not in sys.modules  # import lmforge stays light for the CLI
model, tok = lmforge.load({str(run)!r})
from lmforge.generate import generate as generate_ids
import lmforge.generate
a = lmforge.generate(model, tok, "the cat", max_new_tokens=4, temperature=0)
from lmforge import generate
b = generate(model, tok, "the cat", max_new_tokens=4, temperature=0)
assert a == b and isinstance(a, str) and callable(generate_ids), (a, b)
import lmforge.config, lmforge.train.trainer
for name in ("load_config", "RunConfig", "ModelConfig", "TrainConfig", "DataConfig", "GenerateConfig"):
    assert getattr(lmforge, name) is getattr(lmforge.config, name), name
assert lmforge.Trainer is lmforge.train.trainer.Trainer
print(len(a))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_cli_into_a_closed_pipe_stops_quietly(tmp_path, monkeypatch, capsys):
    import os
    import sys

    from lmforge.cli import main
    run, _ = _run_dir(tmp_path, dict(GPT2, vocab_size=300))
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` has already exited
    closed = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", closed)
    assert main(["generate", str(run), "the cat", "--max-new-tokens", "6", "--temperature", "0"]) == 141
    closed.write("x" * 10_000)
    closed.flush()  # now goes to /dev/null: no second error when Python flushes stdout at exit
    closed.close()
    assert "Traceback" not in capsys.readouterr().err


def test_cli_and_api(tmp_path, capsys):
    from lmforge import api
    from lmforge.cli import main
    run, tok = _run_dir(tmp_path, dict(GPT2, vocab_size=300))
    assert main(["generate", str(run), "the cat", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    cli_text = capsys.readouterr().out
    model, tok2 = api.load(run)
    text = api.generate(model, tok2, "the cat", max_new_tokens=6, temperature=0)
    assert cli_text == text + "\n"  # the CLI packs the Linear weights on CPU: same tokens
    packed, _ = api.load(run, pack=True)
    assert type(packed.blocks[0].mlp.fc).__name__ == "PackedLinear"
    assert api.generate(packed, tok2, "the cat", max_new_tokens=6, temperature=0) == text
    ids = generate(model, [tok.encode("the cat")], max_new_tokens=6, temperature=0, eos_id=tok.eos_id)[0]
    assert text == tok.decode(ids)
    both = api.generate(model, tok2, ["the cat", "a"], max_new_tokens=4, temperature=0, stop=[text[2:4]])
    assert both[0] == text[:2]
    # --stop is repeatable and reads \n-style escapes, which a shell passes through as two characters
    assert main(["generate", str(run), "the cat", "--max-new-tokens", "6", "--temperature", "0",
                 "--stop", "\\n\\n", "--stop", text[2:4]]) == 0
    assert capsys.readouterr().out == text[:2] + "\n"
    assert unescape("\\n\\n") == "\n\n" and unescape("a\\\\n") == "a\\n" and unescape("\\r\\n") == "\r\n"
    with pytest.raises(ConfigError, match="unknown config key 'generate.top_q'"):
        api.generate(model, tok2, "x", top_q=0.5)
    # errors: prompt longer than the context; tokenizer bigger than the model's vocab
    assert main(["generate", str(run), "the cat " * 40, "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "the prompt is" in err and "context is 48" in err
    assert main(["generate", str(run), "the \udcff cat", "--max-new-tokens", "2"]) == 2  # non-UTF-8 argv
    err = capsys.readouterr().err
    assert err.startswith("error: the text is not valid UTF-8 (byte 0xff") and err.count("\n") == 1, err
    full = next(p for p in (" ".join(["the"] * k) for k in range(40, 60)) if len(tok2.encode_prompt(p)) == 48)
    assert main(["generate", str(run), full, "--max-new-tokens", "3"]) == 0  # nothing to add: says so
    captured = capsys.readouterr()
    assert captured.out == "\n" and "note: the prompt fills the model's context (48 tokens)" in captured.err
    over = next(p for p in (" ".join(["the"] * k) for k in range(40, 60)) if len(tok2.encode_prompt(p)) == 49)
    assert main(["generate", str(run), over, "--max-new-tokens", "3"]) == 2  # one token too many
    err = capsys.readouterr().err
    assert err.startswith("error: the prompt is 49 tokens but the model's context is 48")
    assert err.count("\n") == 1
    # bad decoding flags: one line naming the flag, checked before the model is loaded
    for flag, value, message in [("--max-new-tokens", "-1", "--max-new-tokens must be >= 1, got -1"),
                                 ("--max-new-tokens", "0", "--max-new-tokens must be >= 1, got 0"),
                                 ("--top-k", "-1", "--top-k must be >= 0 (0 = off), got -1"),
                                 ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
                                 ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
                                 ("--temperature", "-1", "--temperature must be >= 0 (0 = greedy), got -1.0"),
                                 ("--temperature", "nan", "--temperature must be >= 0 (0 = greedy), got nan"),
                                 ("--repetition-penalty", "0", "--repetition-penalty must be > 0"),
                                 ("--repetition-penalty", "nan", "--repetition-penalty must be > 0"),
                                 ("--seed", str(2**64), "--seed must fit in 64 bits")]:
        assert main(["generate", str(tmp_path / "nowhere"), "the cat", flag, value]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: {message}") and captured.err.count("\n") == 1, captured.err
        assert captured.out == ""
    # int8 weights: same API, and on this tiny model the greedy text agrees with fp32
    model8, _ = api.load(run, dtype="int8")
    assert type(model8.head).__name__ == "Int8Linear" and model8.tok_emb.weight.dtype == torch.bfloat16
    ids8 = generate(model8, [tok.encode("the cat")], max_new_tokens=6, temperature=0, eos_id=tok.eos_id)[0]
    assert ids8[:2] == ids[:2]


def test_cli_errors(tmp_path, capsys):
    from lmforge.cli import main
    run, _ = _run_dir(tmp_path, GPT2, vocab=300)  # model vocab 97 < tokenizer 300
    assert main(["generate", str(run), "the cat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "vocab_size is 97" in err and err.count("\n") == 1
    import importlib.util
    if importlib.util.find_spec("lmforge.models.bert") is None:
        return
    from lmforge.models.store import build_model, save_model
    bert = tmp_path / "bert"
    save_model(build_model(ModelConfig(family="bert", vocab_size=300, max_seq_len=16, n_layer=1, n_head=2,
                                       d_model=16)), bert)
    (bert / "tokenizer.json").write_bytes((run / "tokenizer.json").read_bytes())
    assert main(["generate", str(bert), "the cat"]) == 2
    assert "holds a bert model" in capsys.readouterr().err


def test_text_keeps_the_space_a_metaspace_decoder_drops_at_the_start():
    """Unigram / SentencePiece decoders strip the first space of a decode; generated text is not the
    start of anything, so prompt + output must read as the decode of prompt + new ids."""
    from lmforge import api
    from lmforge.tokenizer import train

    docs = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog sat together"] * 50
    tok = train("unigram", docs, vocab_size=80, extra_ids=0)
    word = next(t for t in ("▁the", "▁sat", "▁a", "▁t") if tok.token_to_id(t) is not None)
    w = tok.token_to_id(word)
    model = FixedLogits([10.0 if i == w else 0.0 for i in range(tok.vocab_size)])  # always that word
    prompt = tok.encode("the cat")
    text = api.generate(model, tok, "the cat", max_new_tokens=2, temperature=0)
    expect = 2 * word.replace("▁", " ")
    assert text == expect and tok.decode(prompt) + text == tok.decode(prompt + [w, w])


def test_generate_without_cuda_names_its_own_device_flag(tmp_path, monkeypatch, capsys):
    from lmforge.cli import main

    run, _ = _run_dir(tmp_path, dict(GPT2, vocab_size=300))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", str(run), "the cat", "--device", "cuda"]) == 2
    assert "use --device=cpu" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# mutation-audit additions


class Scripted(torch.nn.Module):
    """A mock model: row r's favourite next token at decoding step s is script[r][s] (then 0)."""

    def __init__(self, script, vocab_size=10):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab_size, max_seq_len=64, n_layer=1, n_head=1, d_model=4)
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.script, self.step = script, 0

    def make_cache(self, batch_size, max_len):
        return None

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False):
        logits = torch.zeros(input_ids.shape[0], 1, self.cfg.vocab_size)
        for r, seq in enumerate(self.script):
            logits[r, 0, seq[self.step] if self.step < len(seq) else 0] = 1.0
        self.step += 1
        return logits


class RepeatLast(torch.nn.Module):
    """A mock model: each row's next token is its last input token (prompts repeat their last word)."""

    def __init__(self, vocab_size):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab_size, max_seq_len=64, n_layer=1, n_head=1, d_model=4)
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.calls = 0

    def make_cache(self, batch_size, max_len):
        return None

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False):
        self.calls += 1
        return F.one_hot(input_ids[:, -1:], self.cfg.vocab_size).float() * 5.0


def test_eos_ends_its_row_and_only_its_row():
    """Tokens the model would produce after eos are not output; the other row runs on to its limit."""
    m = Scripted([[3, 9, 4, 5, 6, 7], [3, 4, 5, 6, 7, 8]])
    streamed = []
    out = generate(m, [[1], [1, 2]], max_new_tokens=6, temperature=0, eos_id=9,
                   on_token=lambda i, t: streamed.append((i, t)))
    assert out == [[3], [3, 4, 5, 6, 7, 8]]
    assert [t for i, t in streamed if i == 0] == [3]  # eos itself is not streamed either


def test_seed_zero_is_a_seed_like_any_other():
    """seed=0 must not fall back to the global RNG (a truthiness test on the seed would)."""
    m = FixedLogits([0.0] * 50)
    torch.manual_seed(1)
    a = generate(m, [[1]], max_new_tokens=30, seed=0)
    torch.manual_seed(2)
    assert generate(m, [[1]], max_new_tokens=30, seed=0) == a


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 2, 0.6), (2.0, None, 0.7), (0.5, 3, 0.9)])
def test_sampling_draws_from_what_the_hf_warper_chain_keeps(temperature, top_k, top_p):
    """temperature -> top-k -> top-p, the order HF's generate applies its warpers in: the tokens drawn
    are exactly those HF keeps, at HF's probabilities. (Probabilities 0.5, 0.22, 0.18, 0.1: top-k 2 then
    top-p 0.6 keeps one token, top-p first would keep two; temperature 2 before top-p 0.7 keeps three,
    after it two.)"""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    logits = torch.tensor([[0.5, 0.22, 0.18, 0.1]]).log()
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    ref = TopPLogitsWarper(top_p)(None, ref).softmax(-1)[0]
    n = 4000
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(logits.expand(n, -1), temperature, top_k, top_p, g)
    freq = torch.bincount(drawn, minlength=4).float() / n
    assert set(drawn.tolist()) == set(torch.nonzero(ref).flatten().tolist())
    torch.testing.assert_close(freq, ref, atol=0.03, rtol=0)  # 4000 draws: std <= 0.008


class _PieceTok:
    """A stand-in tokenizer whose ids decode to whole strings."""

    pieces = ["ab", "\ncd END", " more"]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_text_stream_cuts_at_the_earliest_of_several_stop_strings():
    """One token can complete two stop strings at once; the text ends before the earlier one."""
    for stops in (["END", "\n"], ["\n", "END"]):
        pieces = []
        s = TextStream(_PieceTok(), stop=stops, write=pieces.append)
        for t in (0, 1, 2):
            s.push(t)
        assert s.stopped and s.finish() == "ab" and "".join(pieces) == "ab"


def test_api_stop_strings_end_only_their_own_row(tmp_path):
    """A row that meets its stop string ends there (no more forward passes for it); the other rows of
    the batch decode on exactly as they would alone."""
    from lmforge import api

    _, tok = _run_dir(tmp_path, dict(GPT2, vocab_size=300))
    cat, mat = tok.encode_prompt("the cat")[-1], tok.encode_prompt("the mat")[-1]
    stop = tok.decode([cat]).strip()
    assert stop and stop not in tok.decode([mat] * 6)
    alone = api.generate(RepeatLast(tok.vocab_size), tok, "the mat", max_new_tokens=6, temperature=0)
    assert alone == tok.decode([mat] * 6)
    both = api.generate(RepeatLast(tok.vocab_size), tok, ["the cat", "the mat"], max_new_tokens=6,
                        temperature=0, stop=[stop])
    assert both == [tok.decode([cat]).split(stop)[0], alone]
    m = RepeatLast(tok.vocab_size)
    api.generate(m, tok, "the cat", max_new_tokens=6, temperature=0, stop=[stop])
    assert m.calls == 1  # the prefill only: the first new token met the stop string


def test_api_empty_prompt_starts_from_bos(tmp_path):
    """encode_prompt gives an empty prompt its bos token, so generation has something to continue."""
    from lmforge import api

    _, tok = _run_dir(tmp_path, dict(GPT2, vocab_size=300))
    mat = tok.encode_prompt("the mat")[-1]
    model = FixedLogits([5.0 if i == mat else 0.0 for i in range(tok.vocab_size)])
    assert api.generate(model, tok, "", max_new_tokens=2, temperature=0) == tok.decode([mat, mat])
    assert model.calls[0] == (1, 1)  # the prefill saw bos alone


@pytest.mark.parametrize("kind", ["unigram", "wordpiece"])
def test_without_bos_or_eos_generation_starts_and_ends_at_the_separator(kind):
    """Unigram has no bos, WordPiece neither bos nor eos; prepare puts their separator (</s>, [SEP])
    after every document. An empty prompt starts from that separator (it was an error: 'every prompt
    needs at least one token') and its text starts as decode(new ids) does, with no space for the
    separator; a WordPiece GPT's [SEP] ends the text (it ran on, printing '[SEP]')."""
    from lmforge import api
    from lmforge.tokenizer import train

    docs = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog sat together"] * 50
    tok = train(kind, docs, vocab_size=120, extra_ids=0)
    assert tok.bos_id is None
    sep = tok.separator_id
    cat = tok.encode("cat")[-1]
    model = FixedLogits([5.0 if i == cat else 0.0 for i in range(tok.vocab_size)])
    assert api.generate(model, tok, "", max_new_tokens=2, temperature=0) == tok.decode([cat, cat])
    assert model.calls[0] == (1, 1) and tok.encode_prompt("") == [sep]
    ends = Scripted([[cat, sep, cat, cat]], vocab_size=tok.vocab_size)
    assert api.generate(ends, tok, "the", max_new_tokens=4, temperature=0) == api.generate(
        Scripted([[cat]], vocab_size=tok.vocab_size), tok, "the", max_new_tokens=1, temperature=0)
    assert ends.step == 2  # the separator ended the row: no forward pass after it


def test_top_k_larger_than_the_vocab_filters_nothing():
    m = FixedLogits([0.0, 0.1, 0.2, 0.3, 0.4])
    out = generate(m, [[0]] * 40, max_new_tokens=10, top_k=50, seed=0)
    assert {t for row in out for t in row} == {0, 1, 2, 3, 4}


def test_top_k_zero_means_off():
    """top_k=0 (the CLI's --top-k 0) filters nothing: the same draws as no top-k at all."""
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4]]).expand(200, -1)
    a = sample_next(logits, 1.0, 0, None, torch.Generator().manual_seed(0))
    b = sample_next(logits, 1.0, None, None, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and set(a.tolist()) == {0, 1, 2, 3, 4}
    m = FixedLogits([0.0, 0.1, 0.2])
    off = generate(m, [[0]], max_new_tokens=8, seed=1)
    assert generate(m, [[0]], max_new_tokens=8, top_k=0, seed=1) == off


def test_any_seed_torch_generator_takes_is_accepted():
    """torch.Generator.manual_seed takes -(2**63) .. 2**64 - 1; each such seed is reproducible."""
    m = FixedLogits([0.0] * 50)
    for seed in (-1, -(2**63), 2**63, 2**64 - 1):
        first = generate(m, [[1]], max_new_tokens=5, seed=seed)
        assert generate(m, [[1]], max_new_tokens=5, seed=seed) == first
    with pytest.raises(ConfigError, match="seed must fit in 64 bits"):
        generate(m, [[1]], seed=2**64)


def test_cli_sampling_flags_reach_the_sampler(tmp_path, capsys):
    """Each decoding flag changes the text, and the CLI's text is the API's with the same settings."""
    from lmforge import api
    from lmforge.cli import main

    run, _ = _run_dir(tmp_path, dict(GPT2, vocab_size=320))  # 20 embedding rows past the tokenizer's 300
    flags = dict(max_new_tokens=8, temperature=0.1, top_k=10, top_p=0.8, repetition_penalty=1.5, seed=11)
    argv = [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main(["generate", str(run), "the cat", *argv]) == 0
    model, tok = api.load(run, pack=True)  # as the CLI runs on a CPU
    text = api.generate(model, tok, "the cat", **flags)
    assert capsys.readouterr().out == text + "\n"
    off = dict(top_k=None, top_p=None, repetition_penalty=1.0, seed=12, temperature=1.0, max_new_tokens=4)
    for key, value in off.items():  # so a flag the CLI dropped would show
        assert api.generate(model, tok, "the cat", **{**flags, key: value}) != text, key


def test_cli_stops_at_the_tokenizers_eos(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.models.store import load_model, save_model

    run, tok = _run_dir(tmp_path, dict(GPT2, vocab_size=300))
    model = load_model(run)
    with torch.no_grad():  # the final norm outputs eos's embedding, whatever the input: greedy picks eos
        model.tok_emb.weight[tok.eos_id] = 1.0  # its logit is d_model = 32; the others' are sums of ~0.02s
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(model.tok_emb.weight[tok.eos_id])
    save_model(model, tmp_path / "eos")
    tok.save(tmp_path / "eos")
    assert main(["generate", str(tmp_path / "eos"), "the cat", "--temperature", "0", "--max-new-tokens",
                 "5"]) == 0
    assert capsys.readouterr().out == "\n"  # nothing before eos; eos itself is not text


def test_cli_dtype_reaches_the_loaded_model(tmp_path, capsys, monkeypatch):
    from lmforge import api
    from lmforge.cli import main

    run, _ = _run_dir(tmp_path, dict(GPT2, vocab_size=300))
    loaded, real_load = [], api.load

    def load(*args, **kwargs):  # the real loader; keeps the model it returned
        model, tok = real_load(*args, **kwargs)
        loaded.append(model)
        return model, tok

    monkeypatch.setattr(api, "load", load)
    for dtype, weights, head in (("bf16", torch.bfloat16, "PackedLinear"),
                                 ("int8", torch.bfloat16, "Int8Linear"),
                                 ("fp32", torch.float32, "PackedLinear")):
        assert main(["generate", str(run), "the cat", "--dtype", dtype, "--max-new-tokens", "2"]) == 0
        assert loaded[-1].tok_emb.weight.dtype == weights and type(loaded[-1].head).__name__ == head, dtype


def test_api_load_refuses_a_bad_device_before_reading_like_the_cli(tmp_path, monkeypatch):
    """lmforge.load(path, device=...) takes the names --device takes; a bad one is a ConfigError."""
    from lmforge import api

    run, _ = _run_dir(tmp_path, dict(GPT2, vocab_size=300))
    with pytest.raises(ConfigError, match="device 'tpu' is not valid; use auto, cpu, cuda or cuda:N"):
        api.load(run, device="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available; use device=cpu"):
        api.load(run, device="cuda")
    model, _ = api.load(run, device="auto")  # and "auto" picks the CPU here
    assert next(model.parameters()).device.type == "cpu"


def test_cli_defaults_are_generate_configs():
    """`lmforge generate` and api.generate() decode alike when no flag is given: one set of defaults."""
    import argparse
    from dataclasses import asdict

    from lmforge.config import GenerateConfig
    from lmforge.generate import register

    parser = argparse.ArgumentParser()
    register(parser)
    args = vars(parser.parse_args(["RUN", "prompt"]))
    assert {k: args[k] for k in asdict(GenerateConfig())} == asdict(GenerateConfig())
