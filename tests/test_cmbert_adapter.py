"""The CM-BERT adapter without the upstream: settings, the fusion module, the loss term, the data
files' structure, the BERT name mapping, the optimiser compatibility shim and the report's labels."""
from __future__ import annotations

import argparse
import pickle
import warnings

import numpy as np
import pytest
import torch

from deqfusion.adapters import cmbert as A
from deqfusion.adapters.cmbert import convert as C
from deqfusion.adapters.cmbert import data as D
from deqfusion.adapters.common.settings import SettingsError
from deqfusion.adapters.common.torch_compat import legacy_scalar_overloads, torch_accepts_legacy_overloads

SMALL = {"f_max_iter": 12, "b_max_iter": 12}


def test_settings_defaults_are_the_papers_cmu_mosi_setting():
    s = A.Settings()
    assert s.is_deq and s.jac_weight == 0.01 and s.seq_len == 50 and A.Settings.baseline == "sum"
    kw = s.fusion_kwargs()
    assert kw["f_max_iter"] == 105 and kw["b_max_iter"] == 106 and kw["num_groups"] == 1 and kw["ablation"] == "full"


def test_settings_from_environment_and_errors():
    s = A.Settings.from_env({"DEQFUSION_CMBERT_FUSION": "sum", "DEQFUSION_CMBERT_SEQ_LEN": "40"})
    assert s.fusion == "sum" and s.seq_len == 40 and A.build_fusion(s) is None
    with pytest.raises(SettingsError, match="DEQFUSION_CMBERT_SEQLEN"):
        A.Settings.from_env({"DEQFUSION_CMBERT_SEQLEN": "40"})
    with pytest.raises(SettingsError, match="seq_len"):
        A.Settings(seq_len=1)
    with pytest.raises(SettingsError, match="sum"):
        A.Settings(fusion="concat")


def test_sum_baseline_returns_the_upstreams_map_untouched():
    summed = torch.randn(2, 50, 50)
    assert A.fuse(None, torch.zeros(2, 50, 50), torch.zeros(2, 50, 50), summed) is summed
    assert A.loss_term(None) == 0.0


def _maps(batch=3, n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.relu(torch.randn(batch, n, n, generator=g)) for _ in range(2)]


def test_deq_fusion_fuses_two_maps_rows_as_channels_and_hands_over_the_jacobian_term_once():
    fusion = A.build_fusion(A.Settings(options=SMALL))
    assert isinstance(fusion, A.CMBertFusion) and fusion.deq.config.dim == 50 and fusion.deq.config.num_modalities == 2
    text, audio = _maps()
    fused = A.fuse(fusion, text, audio, text + audio)
    assert fused.shape == (3, 50, 50) and torch.isfinite(fused).all()
    term = A.loss_term(fusion)
    assert torch.is_tensor(term) and term.requires_grad and float(term) >= 0
    assert A.loss_term(fusion) == 0.0                     # taken once
    (fused.square().mean() + term).backward()
    grads = [p.grad for p in fusion.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    fusion.eval()
    with torch.no_grad():
        A.fuse(fusion, text, audio, text + audio)
    assert A.loss_term(fusion) == 0.0 and fusion.last_stats is not None
    summary = A.stats_summary(fusion)
    assert summary["samples"] == 3 and sum(summary["status"].values()) == 3


def test_jacobian_weight_scales_the_term():
    torch.manual_seed(0)
    f1 = A.build_fusion(A.Settings(options=SMALL, jac_weight=1.0))
    torch.manual_seed(0)
    f2 = A.build_fusion(A.Settings(options=SMALL, jac_weight=0.01))
    text, audio = _maps()
    torch.manual_seed(1)
    f1(text, audio)
    torch.manual_seed(1)
    f2(text, audio)
    assert torch.allclose(A.loss_term(f2), 0.01 * A.loss_term(f1))


def test_map_size_mismatch_names_the_setting():
    fusion = A.build_fusion(A.Settings(options=SMALL))
    text, audio = _maps(n=40)
    with pytest.raises(ValueError, match="DEQFUSION_CMBERT_SEQ_LEN=40"):
        fusion(text, audio)


def test_cmbert_init_does_not_redraw_the_fusion_but_other_functions_apply():
    fusion = A.build_fusion(A.Settings(options=SMALL))
    before = {k: v.clone() for k, v in fusion.state_dict().items()}

    def init_bert_weights(module):  # what CM-BERT's BertPreTrainedModel applies (same name)
        if isinstance(module, torch.nn.Linear):
            module.weight.data.normal_(0.0, 0.02)
            module.bias.data.zero_()

    torch.nn.Sequential(fusion).apply(init_bert_weights)
    assert all(torch.equal(before[k], v) for k, v in fusion.state_dict().items())
    lin = fusion.deq.modality_blocks[0].lin1
    assert float(lin.bias.abs().sum()) > 0

    def zero(module):
        if isinstance(module, torch.nn.Linear):
            module.bias.data.zero_()

    fusion.apply(zero)
    assert float(lin.bias.abs().sum()) == 0


def test_fusion_parameter_names_fall_in_the_upstreams_groups():
    """run_classifier.py trains names containing 'BertFinetun' and gives 'BertFine' names lr 0.01 unless
    they contain 'bias' / 'LayerNorm.weight': the fusion's names must not hit another rule by accident."""
    fusion = A.build_fusion(A.Settings(options=SMALL))
    for name, _ in fusion.named_parameters():
        full = "BertFinetun.fusion." + name
        assert "encoder.layer." not in full and "pooler" not in full and "LayerNorm" not in full


# ------------------------------------------------------------------------------------------------
# data


def _tsv(path, rows):
    path.write_bytes(b"text\tlabel\r\n" + b"".join(f"{t}\t{y}\r\n".encode() for t, y in rows))


def test_generated_audio_has_the_upstreams_structure_and_a_signal(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for split, n in (("train", 30), ("dev", 7), ("test", 9)):
        _tsv(text / f"{split}.tsv", [(" ".join(["w"] * (3 + i % 60)), round(-3 + 6 * i / n, 1)) for i in range(n)])
    path = D.generate_audio(tmp_path / "a.pickle", text)
    with open(path, "rb") as fh:
        obj = pickle.load(fh)
    assert isinstance(obj, tuple) and len(obj) == 3
    assert [a.shape for a in obj] == [(30, 50, 5), (7, 50, 5), (9, 50, 5)] and all(a.dtype == np.float64 for a in obj)
    ys = np.asarray(D.labels(text / "train.tsv"))
    assert np.corrcoef(obj[0][:, 0, 0], ys)[0, 1] > 0.5           # learnable
    assert (obj[0][0, 3:] == 0).all() and (obj[0][0, :3] != 0).all()  # word positions, then padding
    # a subset keeps text rows and audio rows aligned
    counts = D.write_subset(text, path, tmp_path / "sub" / "text", tmp_path / "sub" / "a.pickle", (5, 2, 3))
    assert counts == {"train": 5, "dev": 2, "test": 3}
    sub = D.load_audio(tmp_path / "sub" / "a.pickle")
    assert np.array_equal(sub[0], obj[0][:5]) and len(D.labels(tmp_path / "sub" / "text" / "train.tsv")) == 5
    assert (tmp_path / "sub" / "text" / "train.tsv").read_bytes().startswith(b"text\tlabel\r\n")


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(D.DataError, match="apply_patches.sh cmbert"):
        D.check_text(tmp_path)
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(pickle.dumps((np.zeros((3, 50, 4)), np.zeros((1, 50, 5)), np.zeros((1, 50, 5)))))
    with pytest.raises(D.DataError, match=r"\(N, 50, 5\)"):
        D.load_audio(bad)
    with pytest.raises(D.DataError, match="does not exist"):
        D.locate_audio(None, tmp_path / "missing.pickle")
    assert D.locate_audio(tmp_path) is None                        # a clone without the pickle: None, caller decides


# ------------------------------------------------------------------------------------------------
# BERT conversion (names; the equivalence with CM-BERT's own class is in test_cmbert_upstream.py)


def test_parameter_name_mapping():
    assert C.cmbert_name("embeddings.word_embeddings.weight") == "bert.embeddings.word_embeddings.weight"
    assert C.cmbert_name("bert.encoder.layer.3.attention.output.LayerNorm.gamma") == \
        "bert.encoder.layer.3.attention.output.LayerNorm.weight"
    assert C.cmbert_name("encoder.layer.11.intermediate.dense.bias") == "bert.encoder.layer.11.intermediate.dense.bias"
    assert C.cmbert_name("pooler.dense.weight") == "bert.pooler.dense.weight"
    assert C.cmbert_name("embeddings.position_ids") is None and C.cmbert_name("cls.predictions.bias") is None
    with pytest.raises(C.ConvertError, match="unexpected BERT parameter"):
        C.cmbert_name("encoder.layer.0.attention.self.distance_embedding.weight")


def test_models_cmbert_would_build_differently_are_refused():
    base = {"num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 768, "hidden_act": "gelu"}
    C.check_for_cmbert(base)
    with pytest.raises(C.ConvertError, match="num_attention_heads=16 layers"):
        C.check_for_cmbert(dict(base, num_hidden_layers=24, num_attention_heads=16))
    with pytest.raises(C.ConvertError, match="768"):
        C.check_for_cmbert(dict(base, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16))
    C.check_for_cmbert(dict(base, hidden_size=32), any_size=True)


def test_vocabulary_files():
    assert C.vocab_lines({"b": 1, "a": 0, "c": 2}) == ["a", "b", "c"]
    with pytest.raises(C.ConvertError, match="gaps"):
        C.vocab_lines({"a": 0, "c": 2})
    vocab = C.words_vocab(["I LOVE it, really", "love IT"])
    assert vocab[:5] == list(C.SPECIAL_TOKENS) and vocab[5:8] == ["it", "love", ","]


def test_transformers_state_dict_maps_completely(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=8)
    bert = transformers.BertModel(cfg)
    state = C.cmbert_state_dict(bert.state_dict())
    params = dict(bert.named_parameters())
    assert len(state) == len(params) and all(k.startswith("bert.") for k in state)
    assert torch.equal(state["bert.encoder.layer.1.output.dense.weight"], params["encoder.layer.1.output.dense.weight"])
    out = C.write_folder(tmp_path / "b", state, C.cmbert_config(cfg), [f"t{i}" for i in range(30)], {"kind": "test"})
    assert sorted(p.name for p in out.iterdir()) == sorted([C.CONFIG_NAME, C.WEIGHTS_NAME, C.VOCAB_NAME, C.SOURCE_NAME])
    with pytest.raises(C.ConvertError, match="--force"):
        C.write_folder(out, state, C.cmbert_config(cfg), [f"t{i}" for i in range(30)], {"kind": "test"})
    assert C.folder_source(out) == {"kind": "test"}
    with pytest.raises(C.ConvertError, match="python -m deqfusion.adapters.cmbert.convert"):
        C.check_folder(tmp_path)


# ------------------------------------------------------------------------------------------------
# BertAdam's torch-1.x overloads


def test_legacy_scalar_overloads_give_todays_arithmetic_without_warnings():
    g = torch.tensor([1.0, -2.0, 3.0])
    want_add = torch.zeros(3).add_(g, alpha=0.1)
    want_mul = torch.ones(3).addcmul_(g, g, value=0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with legacy_scalar_overloads():
            got_add = torch.zeros(3).add_(0.1, g)
            got_mul = torch.ones(3).addcmul_(0.001, g, g)
            assert torch.equal(torch.zeros(3).add_(g), g)          # other overloads pass through
    assert torch.equal(got_add, want_add) and torch.equal(got_mul, want_mul)
    assert "add_" not in torch.Tensor.__dict__ and "addcmul_" not in torch.Tensor.__dict__  # restored
    assert isinstance(torch_accepts_legacy_overloads(), bool)


def test_bertadam_steps_through_the_shim():
    optimization = pytest.importorskip("pytorch_pretrained_bert.optimization")
    p = torch.nn.Parameter(torch.ones(4))
    opt = optimization.BertAdam([p], lr=0.1, warmup=-1, t_total=-1, weight_decay=0.0)
    p.grad = torch.full((4,), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with legacy_scalar_overloads():
            opt.step()
    # no bias correction in BertAdam: m = 0.1 g, v = 0.001 g^2, update = m / (sqrt(v) + 1e-6)
    step = 0.1 * 0.05 / ((0.001 * 0.25) ** 0.5 + 1e-6)
    assert torch.allclose(p.detach(), torch.full((4,), 1.0 - step), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# the reproduce command's table


def test_reproduce_is_registered_and_labels_every_number():
    from deqfusion.adapters.cmbert import reproduce as P
    from deqfusion.cli import build_parser

    args = build_parser().parse_args(["reproduce", "cmbert", "--random-bert", "--rows", "96,24,24", "--ablation"])
    assert args.func is P.run_cmbert and args.rows == (96, 24, 24) and args.ablation == []
    rows = P.build_rows(args)
    assert [r.key for r in rows] == ["sum"] + [f"deq:{a}" for a in P.ABLATION_ROWS]
    main = P.build_rows(argparse.Namespace(option=None, jac_weight=None, no_baseline=False, ablation=None))
    runs = [{"row": r.key, "seed": s, "metrics": {"acc7": 0.4, "acc": 0.8, "F1": 0.81, "mae": 0.9, "corr": 0.6 + s / 10},
             "data": {"bert_source": {"kind": "random"}, "audio_generated": False}} for r in main for s in (0, 1)]
    labels = P.labels_for(runs)
    assert labels == [P.RANDOM_BERT]
    text = P.render_tables(P.summarize(runs, main), main, labels)
    ours = [line for line in text.splitlines() if line.startswith("| CM-BERT") and "paper" not in line]
    assert len(ours) == 2 and all(line.rstrip(" |").endswith(P.RANDOM_BERT) for line in ours)
    assert "| 40.0 ± 0.0 | 80.0 ± 0.0 | 81.0 ± 0.0 | 0.900 ± 0.000 | 0.650 ± 0.071 |" in text
    assert "| CM-BERT + DEQ fusion — paper | 46.1 | 85.4 | 85.4 | 0.737 | 0.797 |" in text
    real = [dict(r, data={"bert_source": {"kind": "transformers"}, "audio_generated": False}) for r in runs]
    assert P.labels_for(real) == [] and "not a result" not in P.render_tables(P.summarize(real, main), main, [])
