"""BERT equals Hugging Face BERT on tiny random configs (hidden states, pooler, MLM, NSP), and saves/loads."""

import dataclasses

import pytest
import torch

from lmforge.config import ModelConfig, load_config
from lmforge.models.bert import BertForPreTraining, BertModel
from lmforge.models.store import load_model, save_model

transformers = pytest.importorskip("transformers")


def tiny(**kw) -> ModelConfig:
    base = dict(family="bert", vocab_size=99, max_seq_len=32, n_layer=2, n_head=4, d_model=32, d_ff=37,
                norm_eps=1e-12, norm_position="post", mlp="gelu", type_vocab_size=2)
    return ModelConfig(**{**base, **kw})


def hf_config(cfg: ModelConfig):
    return transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.ff_dim, hidden_act="gelu",
        max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def hf_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A test-local copy of the HF -> lmforge name map (the parity test must not trust convert.py)."""
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        if k.startswith("encoder.layer."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            pre = f"blocks.{i}."
            if rest.startswith("attention.self."):
                continue  # q, k, v are concatenated below
            name = {"attention.output.dense": "attn.o", "attention.output.LayerNorm": "ln1",
                    "intermediate.dense": "mlp.fc", "output.dense": "mlp.proj", "output.LayerNorm": "ln2"}
            mod, p = rest.rsplit(".", 1)
            out[pre + name[mod] + "." + p] = v
            continue
        table = {"embeddings.word_embeddings.weight": "tok_emb.weight",
                 "embeddings.position_embeddings.weight": "pos_emb.weight",
                 "embeddings.token_type_embeddings.weight": "type_emb.weight",
                 "embeddings.LayerNorm.weight": "emb_ln.weight", "embeddings.LayerNorm.bias": "emb_ln.bias",
                 "pooler.dense.weight": "pooler.weight", "pooler.dense.bias": "pooler.bias",
                 "cls.predictions.transform.dense.weight": "mlm.dense.weight",
                 "cls.predictions.transform.dense.bias": "mlm.dense.bias",
                 "cls.predictions.transform.LayerNorm.weight": "mlm.ln.weight",
                 "cls.predictions.transform.LayerNorm.bias": "mlm.ln.bias",
                 "cls.predictions.bias": "mlm.bias",
                 "cls.seq_relationship.weight": "nsp.weight", "cls.seq_relationship.bias": "nsp.bias"}
        if k in table:
            out[table[k]] = v
    n = max(int(k.split(".")[2]) for k in sd if "encoder.layer." in k) + 1
    for i in range(n):
        for p in ("weight", "bias"):
            qkv = [sd[f"encoder.layer.{i}.attention.self.{x}.{p}"] for x in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(qkv)
    return out


def load_from_hf(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"mlm.decoder.weight"}, (missing, unexpected)


def inputs(cfg, B=3, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    tt = torch.zeros_like(ids)
    tt[:, T // 2:] = 1
    am = torch.ones_like(ids)
    am[1, 7:] = 0  # right padding in one row
    am[2, 9:] = 0
    return ids, tt, am


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_pretraining_matches_hf(attn_impl):
    cfg = tiny(attn_impl=attn_impl)
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(hf_config(cfg)).eval()
    ours = BertForPreTraining(cfg).eval()
    load_from_hf(ours, hf)
    ids, tt, am = inputs(cfg)
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=tt, attention_mask=am, output_hidden_states=True)
        out = ours(ids, token_type_ids=tt, attention_mask=am)
    real = am.bool()  # padding positions are garbage on both sides; compare real tokens only
    torch.testing.assert_close(out.last_hidden_state[real], ref.hidden_states[-1][real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.mlm_logits[real], ref.prediction_logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.nsp_logits, ref.seq_relationship_logits, atol=1e-5, rtol=1e-4)
    # only-at-positions MLM logits are the same numbers
    pos = torch.zeros_like(real)
    pos[0, 3], pos[2, 1] = True, True
    sub = ours(ids, token_type_ids=tt, attention_mask=am, mlm_positions=pos).mlm_logits
    torch.testing.assert_close(sub, out.mlm_logits[pos])


def test_masked_lm_and_backbone_match_hf():
    cfg = tiny(heads="mlm")
    torch.manual_seed(1)
    hf = transformers.BertForMaskedLM(hf_config(cfg)).eval()
    ours = BertForPreTraining(cfg).eval()
    assert ours.pooler is None and ours.nsp is None  # BertForMaskedLM has neither
    load_from_hf(ours, hf)
    ids, tt, am = inputs(cfg, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, tt, am).mlm_logits[am.bool()],
                                   hf(input_ids=ids, token_type_ids=tt, attention_mask=am).logits[am.bool()],
                                   atol=1e-4, rtol=1e-4)
    cfg = tiny(heads="none")
    hf = transformers.BertModel(hf_config(cfg)).eval()
    ours = BertForPreTraining(cfg).eval()
    assert ours.mlm is None and ours.nsp is None
    load_from_hf(ours, hf)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am)  # no token_type_ids: both default to segment 0
        out = ours(input_ids=ids, attention_mask=am)
    torch.testing.assert_close(out.last_hidden_state[am.bool()], ref.last_hidden_state[am.bool()],
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-4)


def test_pre_norm_option_and_padding_invariance():
    cfg = tiny(norm_position="pre")
    model = BertForPreTraining(cfg).eval()
    assert model.ln_f is not None
    ids = torch.randint(5, cfg.vocab_size, (1, 8))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    am = torch.tensor([[1] * 8 + [0] * 4])
    with torch.no_grad():
        a = model(ids).last_hidden_state
        b = model(padded, attention_mask=am).last_hidden_state[:, :8]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # padding changes nothing for real tokens


def test_decoder_is_tied_and_save_load_roundtrip(tmp_path):
    cfg = load_config("bert-tiny").model
    model = BertForPreTraining(cfg).eval()
    assert model.mlm.decoder is None  # logits use tok_emb.weight
    with torch.no_grad():
        model.tok_emb.weight[5].add_(1.0)
    save_model(model, tmp_path / "run")
    back = load_model(tmp_path / "run").eval()
    ids = torch.tensor([[2, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).mlm_logits, model(ids).mlm_logits)
    untied = BertForPreTraining(dataclasses.replace(cfg, tie_embeddings=False, heads="mlm"))
    assert untied.mlm.decoder is not None
    assert isinstance(untied, BertModel)


def test_too_long_input_is_a_clear_error():
    from lmforge.errors import ConfigError

    model = BertForPreTraining(tiny())
    with pytest.raises(ConfigError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_gelu_tanh_bert_matches_hf_gelu_pytorch_tanh():
    """mlp=gelu_tanh is HF's hidden_act=gelu_pytorch_tanh, in the blocks and in the MLM head's transform."""
    cfg = tiny(mlp="gelu_tanh", heads="mlm")
    hf_cfg = hf_config(cfg)
    hf_cfg.hidden_act, hf_cfg.initializer_range = "gelu_pytorch_tanh", 0.5  # big activations: GELUs differ
    torch.manual_seed(2)
    hf = transformers.BertForMaskedLM(hf_cfg).eval()
    ours = BertForPreTraining(cfg).eval()
    load_from_hf(ours, hf)
    ids, tt, am = inputs(cfg, seed=2)
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=tt, attention_mask=am).logits[am.bool()]
        got = ours(ids, tt, am).mlm_logits[am.bool()]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_position_ids_are_used_as_hf_uses_them():
    cfg = tiny(heads="none")
    torch.manual_seed(3)
    hf = transformers.BertModel(hf_config(cfg)).eval()
    ours = BertForPreTraining(cfg).eval()
    load_from_hf(ours, hf)
    ids, tt, _ = inputs(cfg, seed=3)  # (3, 11)
    pos = torch.stack([torch.arange(11) + 3, 2 * torch.arange(11), torch.arange(11) + 20])  # all < 32
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=tt, position_ids=pos).last_hidden_state
        got = ours(ids, token_type_ids=tt, position_ids=pos).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_init_is_berts_and_pre_norm_output_is_normalised():
    """BERT init: Linear / Embedding weights N(0, init_std), every bias 0, every norm weight 1; with
    norm_position=pre the encoder's output passes the final LayerNorm (per token mean 0, variance 1)."""
    torch.manual_seed(0)
    model = BertForPreTraining(tiny(d_model=64, init_std=0.05)).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        elif "ln" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.dim() == 2 and p.numel() >= 2000:
            assert abs(p.std().item() - 0.05) < 0.005 and abs(p.mean().item()) < 0.005, name
    pre = BertForPreTraining(tiny(norm_position="pre")).eval()
    with torch.no_grad():
        h = pre(torch.randint(5, 99, (2, 9))).last_hidden_state
    torch.testing.assert_close(h.mean(-1), torch.zeros(2, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(2, 9), atol=1e-4, rtol=0)


def test_num_params_and_full_context():
    """non_embedding leaves out the token, position and segment tables; max_seq_len tokens still fit."""
    cfg = tiny()
    model = BertForPreTraining(cfg).eval()
    tables = (cfg.vocab_size + cfg.max_seq_len + cfg.type_vocab_size) * cfg.d_model
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=True) == model.num_params() - tables
    with torch.no_grad():
        out = model(torch.randint(5, 99, (1, cfg.max_seq_len)))
    assert out.last_hidden_state.shape == (1, cfg.max_seq_len, cfg.d_model)
