"""QLoRA / IR-QLoRA finetuning: the NF4 linear, IEC, the Alpaca data path, the schedule, resume, merge.

Everything runs on the CPU with the embedded tiny model and a handful of short steps (the default
suite's budget); the GPU twin of these runs is tests/test_gpu_finetune.py.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from refquant import data, runs  # noqa: E402
from refquant import finetune as ft  # noqa: E402
from refquant.backends.nf4_linear import NF4IECLoraLinear, NF4Linear, iec_check, iec_delta_weight, lora_config  # noqa: E402
from refquant.backends.normalfloat_ops import torch_nf4_dequantize  # noqa: E402

TINY = runs.DEFAULT_MODEL


def _records(n=12):
    return [{"instruction": f"Say something about item {i}.", "input": "" if i % 3 else f"context {i} " * (1 + i % 4),
             "output": f"Item {i} is " + "very " * (i % 5) + "fine."} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY))


def _small_llama(seed: int = 0):
    """A 2-layer LLaMA with random weights (hidden 64) and the tiny model's vocabulary: the training-loop
    tests' model (the embedded tiny model's NF4 dequantization dominates a CPU step; its own run is the
    ``slow`` test below and the GPU test)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=4094,
                      eos_token_id=4095, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def nf4_model():
    """The small LLaMA with every decoder linear as an NF4 base (quantized once for the module)."""
    hf = _small_llama()
    ft.quantize_to_nf4(hf, ft.FinetuneConfig())
    return hf


# ------------------------------------------------------------------------------------------ the NF4 layer


@pytest.mark.parametrize("icq", [False, True])
def test_nf4_linear_dequantizes_like_the_backend_and_its_matmul_has_the_dense_gradient(icq):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128, generator=g) * 0.05)
    layer = NF4Linear.from_linear(lin, icq=icq, tau_n=2)
    assert torch.equal(layer.dequantize(torch.float32), torch_nf4_dequantize(layer.nf4(), torch.float32))
    assert layer.codes.numel() == 64 * 128 // 2  # two codes per byte
    x = torch.randn(3, 5, 128, generator=g, requires_grad=True)
    W = layer.dequantize(torch.float32)
    layer(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, W, lin.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())
    # 4-bit codes + double-quantized absmax (8 bits per block + one float per 256 blocks + the offset)
    n_blocks = 64 * 128 // 64
    expected = 64 * 128 * 4 + n_blocks * 8 + 32 * math.ceil(n_blocks / 256) + 32
    if icq:
        expected += n_blocks * 8 + 32 * math.ceil(n_blocks / 256)
    assert layer.storage_bits() == expected


# ------------------------------------------------------------------------------------------ IEC


def test_iec_forward_matches_a_hand_computation_and_merges():
    r, n_in, n_out = 4, 16, 8
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g))
    base = NF4Linear.from_linear(lin)
    cfg = lora_config(["q"], r=r, lora_alpha=16, iec=True)
    layer = NF4IECLoraLinear(base, "default", config=cfg, r=r, lora_alpha=16)
    A = torch.randn(r, n_in, generator=g)
    B = torch.randn(n_out, r, generator=g)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        layer.lora_iec_beta_A["default"].fill_(0.7)
        layer.lora_iec_beta_B["default"].fill_(-1.3)
    x = torch.randn(2, n_in, generator=g)
    got = layer(x)
    # by hand, float64: h_j = (A x)_j + beta_A * mean(x[4j:4j+4]); y_o = (B h)_o + beta_B * h_{o // 2}; * alpha / r
    xd, Ad, Bd, Wd = x.double().numpy(), A.double().numpy(), B.double().numpy(), base.dequantize().double().numpy()
    want = np.zeros((2, n_out))
    for b in range(2):
        h = [Ad[j] @ xd[b] + 0.7 * xd[b, 4 * j:4 * j + 4].mean() for j in range(r)]
        for o in range(n_out):
            y = sum(Bd[o, j] * h[j] for j in range(r)) + (-1.3) * h[o // (n_out // r)]
            want[b, o] = Wd[o] @ xd[b] + y * 16 / r
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-5, atol=1e-5)
    # the merged layer: dequantize(W) + s (B + beta_B E)(A + beta_A M)
    merged = layer.merged_linear()
    torch.testing.assert_close(merged(x), got, rtol=1e-5, atol=1e-5)
    d = iec_delta_weight(A, B, torch.tensor(0.7), torch.tensor(-1.3), 16 / r)
    torch.testing.assert_close(merged.weight, base.dequantize() + d, rtol=1e-6, atol=1e-6)
    # the betas start at 0 and train
    fresh = NF4IECLoraLinear(base, "default", config=cfg, r=r, lora_alpha=16)
    assert float(fresh.lora_iec_beta_A["default"].detach()) == 0.0 and fresh.lora_iec_beta_B["default"].requires_grad


def test_iec_rank_must_divide_the_features():
    iec_check(256, 64, 64)
    with pytest.raises(ValueError, match="r=64 to divide in_features and out_features; out_features=96"):
        iec_check(256, 96, 64)
    lin = torch.nn.Linear(64, 48, bias=False)
    cfg = lora_config(["q"], r=32, iec=True)
    with pytest.raises(ValueError, match="divide"):
        NF4IECLoraLinear(NF4Linear.from_linear(lin), "default", config=cfg, r=32, lora_alpha=16)


# ------------------------------------------------------------------------------------------ data


def test_alpaca_prompt_split_and_loss_on_response_tokens_only(tokenizer, tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(_records(5)))
    recs, info = data.load_alpaca(str(path))
    assert info["name"] == "alpaca_data.json" and info["n_examples"] == 5
    assert data.format_alpaca(recs[0]).endswith("### Input:\ncontext 0 \n\n### Response: ")
    assert data.format_alpaca(recs[1]) == data.ALPACA_PROMPT_NO_INPUT.format(instruction=recs[1]["instruction"])
    with pytest.raises(ValueError, match="not an Alpaca example"):
        data._alpaca_records([{"text": "x"}], "bad.json")
    cfg = ft.FinetuneConfig(source_max_len=24, target_max_len=6)
    ex = ft.tokenize_examples(recs, tokenizer, cfg)
    assert all(s[0] == tokenizer.bos_token_id and len(s) <= 24 for s in ex.sources)
    assert all(len(t) <= 6 for t in ex.targets)
    ids, mask, labels = ft.collate(ex, [0, 1, 2], pad_id=tokenizer.eos_token_id)
    for b, i in enumerate([0, 1, 2]):
        ns, nt = len(ex.sources[i]), len(ex.targets[i])
        assert (labels[b, :ns] == ft.IGNORE_INDEX).all() and (labels[b, ns + nt:] == ft.IGNORE_INDEX).all()
        assert labels[b, ns:ns + nt].tolist() == ex.targets[i] and int(mask[b].sum()) == ns + nt
    # the loss counts exactly the target tokens and equals a plain cross-entropy over them
    model = runs.load(TINY, "torch", "cpu", "float32").model
    with torch.no_grad():
        s, n = ft.loss_sum(model, ids, mask, labels)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    assert n == sum(len(ex.targets[i]) for i in [0, 1, 2])
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                            ignore_index=ft.IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-4)


def test_standin_is_built_from_wikitext2_train_and_named():
    if data.resolve_data_dir() is None:
        pytest.skip("REFQUANT_DATA_DIR not set")
    recs, info = data.load_alpaca(data.ALPACA_STANDIN, max_examples=5)
    assert len(recs) == 5 and info["name"] == data.ALPACA_STANDIN
    assert info["built_from"]["dataset"] == "wikitext2" and info["built_from"]["split"] == "train"
    assert all(r["instruction"] == data.ALPACA_STANDIN_INSTRUCTION and r["input"] and r["output"] for r in recs)


def test_heldout_split_and_length_groups_match_datasets_and_transformers():
    train, test = data.alpaca_train_eval_split(50, 8, seed=42)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"i": list(range(50))}).train_test_split(test_size=8, shuffle=True, seed=42)
    assert ds["test"]["i"] == test.tolist() and ds["train"]["i"] == train.tolist()
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [int(v) for v in np.random.default_rng(0).integers(10, 500, size=203)]
    ours = ft.length_grouped_indices(lengths, 16, torch.Generator().manual_seed(5))
    theirs = get_length_grouped_indices(lengths, 16, generator=torch.Generator().manual_seed(5))
    assert ours == theirs
    cfg = ft.FinetuneConfig(batch_size=16)
    seen = sorted(i for k in range(13) for i in ft.batch_indices(k, 203, lengths, cfg))
    assert seen == list(range(203))  # one epoch = 13 batches covers every example once


def test_lr_schedules_match_transformers():
    from transformers import get_scheduler

    for schedule in ft.LR_SCHEDULES:
        cfg = ft.FinetuneConfig(steps=200, lr_schedule=schedule)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        warm = math.ceil(cfg.warmup_ratio * cfg.steps)
        sched = get_scheduler(schedule, opt, num_warmup_steps=warm, num_training_steps=cfg.steps)
        for step in range(12):
            assert ft.lr_at(step, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), (schedule, step)
            opt.step()
            sched.step()
    cfg = ft.FinetuneConfig(steps=200, lr_schedule="constant_with_warmup")
    assert ft.lr_at(0, cfg) == 0.0 and ft.lr_at(3, cfg) == pytest.approx(cfg.lr / 2) and ft.lr_at(6, cfg) == cfg.lr
    assert ft.lr_at(0, ft.FinetuneConfig()) == 2e-4  # the originals: "constant" ignores warmup_ratio


# ------------------------------------------------------------------------------------------ training


def _small_cfg(**kw):
    base = dict(steps=2, batch_size=2, micro_batch_size=2, source_max_len=16, target_max_len=8, save_steps=1,
                gradient_checkpointing=False, r=8)
    base.update(kw)
    return ft.FinetuneConfig.for_method(kw.pop("method", "qlora"), **{k: v for k, v in base.items() if k != "method"})


def _check_resume(nf4_model, tokenizer, tmp_path, cfg):
    ex = ft.tokenize_examples(_records(6), tokenizer, cfg)
    state_before = torch.get_rng_state()

    def fresh():
        m = copy.deepcopy(nf4_model)
        ft.add_adapters(m, cfg)
        return m

    a = fresh()
    sa, _ = ft.train(a, ex, cfg, tmp_path / "a", tokenizer.eos_token_id)
    b = fresh()
    sb1, _ = ft.train(b, ex, cfg, tmp_path / "b", tokenizer.eos_token_id, stop_after=1)  # "crash" after step 1
    assert sb1.step == 1
    with pytest.raises(FileExistsError, match="--resume"):
        ft.train(fresh(), ex, cfg, tmp_path / "b", tokenizer.eos_token_id)
    c = fresh()
    sc, _ = ft.train(c, ex, cfg, tmp_path / "b", tokenizer.eos_token_id, resume=True)
    assert sc.step == 2 and [h["loss"] for h in sc.history] == [h["loss"] for h in sa.history]
    for (n, p), (_, q) in zip(ft.adapter_state(a).items(), ft.adapter_state(c).items()):
        assert torch.equal(p, q), n
    assert any(float(p.abs().sum()) > 0 for n, p in ft.adapter_state(a).items() if "lora_B" in n)  # it trained
    assert torch.equal(torch.get_rng_state(), state_before)  # the caller's RNG is untouched
    with pytest.raises(ValueError, match="different settings"):
        ft.train(fresh(), ex, dataclasses.replace(cfg, lr=1e-3), tmp_path / "b", tokenizer.eos_token_id, resume=True)


def test_resume_after_a_crash_equals_an_uninterrupted_run(nf4_model, tokenizer, tmp_path):
    # IR-QLoRA's IEC adapters with dropout (the RNG state must be restored as well), accumulation over 2 micro-batches
    _check_resume(nf4_model, tokenizer, tmp_path, _small_cfg(method="irqlora", lora_dropout=0.1, micro_batch_size=1))


@pytest.mark.slow
def test_resume_on_the_tiny_model(tokenizer, tmp_path):
    hf = runs.load(TINY, "torch", "cpu", "float32").model
    cfg = _small_cfg(r=64, gradient_checkpointing=True)
    ft.quantize_to_nf4(hf, cfg)
    _check_resume(hf, tokenizer, tmp_path, cfg)


def test_merged_model_equals_the_unmerged_one_and_loads_with_refquant(nf4_model, tokenizer, tmp_path):
    cfg = ft.FinetuneConfig.for_method("irqlora", r=8)  # IEC adapters on the NF4 base
    model = copy.deepcopy(nf4_model)
    ft.add_adapters(model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_" in n and "beta" not in n else 0.1))
    ids = torch.tensor([tokenizer("The game began development in 2010 .")["input_ids"]])
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        ft.merge_adapters(model)
        merged = model(input_ids=ids).logits
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    ft._save_merged(model, TINY, tmp_path / "merged", {"test": True})  # the tiny model's tokenizer files
    again = runs.load(tmp_path / "merged", "torch", "cpu", "float32")
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).logits, merged, rtol=1e-5, atol=1e-5)


def test_config_and_cli_flags():
    from refquant import cli

    a = cli.build_parser().parse_args(["finetune", "--method", "irqlora", "--out", "x", "--steps", "5", "--lr", "1e-4",
                                       "--no-group-by-length", "--lora-dropout", "0.1"])
    cfg = ft.config_from_args(a)
    assert (cfg.method, cfg.steps, cfg.lr, cfg.group_by_length, cfg.lora_dropout, cfg.eval_tau_n) == \
        ("irqlora", 5, 1e-4, False, 0.1, 125)
    assert ft.FinetuneConfig().to_dict()["r"] == 64 and ft.FinetuneConfig().compute_dtype == "float32"
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        ft.FinetuneConfig(batch_size=16, micro_batch_size=3)
    with pytest.raises(ValueError, match="method"):
        ft.FinetuneConfig(method="lora")


def test_c4_head_is_the_protocols_first_windows(tokenizer):
    if data.resolve_data_dir() is None:
        pytest.skip("REFQUANT_DATA_DIR not set")
    full, _ = data.get_eval_tokens("c4", tokenizer, seqlen=32)
    head, info = ft.c4_eval_head(tokenizer, 32, 3)
    assert info["first_windows_only"] == 3 and np.array_equal(head, full[:3 * 32])


def _study_loaded(method: str):
    from refquant import pipeline

    loaded = runs.load(TINY, "torch", "cpu", "float32")
    runs.quantize(loaded, pipeline.QuantConfig.of(method), None)
    return loaded


@pytest.mark.parametrize("kind, method", [("qlora", "nf4"), pytest.param("irqlora", "icq", marks=pytest.mark.slow)])
def test_study_finetune_trains_on_the_rows_base_and_writes_the_merged_weights(kind, method, tmp_path, monkeypatch):
    """The study's entry point: the base it trains on is the row's quantized weight exactly, the model the
    evaluations read changes by the trained LoRA delta only, and the caller's RNG is untouched."""
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(_records(40)))
    quick = {"config": {**ft.STUDY_PRESETS["reduced"]["config"], "steps": 1, "save_steps": 1}, "max_examples": None}
    monkeypatch.setitem(ft.STUDY_PRESETS, "reduced", quick)
    loaded = _study_loaded(method)
    before = {n: loaded.model.get_submodule(n).weight.detach().clone() for n in ft.decoder_linears(loaded.model)}
    rng = torch.random.get_rng_state()
    info = ft.study_finetune(loaded, kind, protocol="reduced", data_source=str(path))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert info["base_max_abs_diff"] == 0.0
    assert info["steps_done"] == 1 and info["config"]["method"] == kind and info["data"]["n_examples"] == 40
    assert math.isfinite(info["loss_first"]) and math.isfinite(info["eval_loss"])
    assert info["evaluated_base"] == "the training base"
    deltas = [float((loaded.model.get_submodule(n).weight.detach() - w).abs().max()) for n, w in before.items()]
    assert max(deltas) > 0  # one AdamW step moves every B away from zero: W + B A differs from W
    assert max(deltas) < 1e-2  # ... by a small delta (lr 2e-4, one step)
    with pytest.raises(ValueError, match="kind must be one of"):
        ft.study_finetune(loaded, "lora")


def test_study_full_protocol_is_the_originals_settings():
    assert ft.STUDY_PRESETS["full"] == {"config": {}, "max_examples": None}
    cfg = ft.FinetuneConfig.for_method("irqlora", **ft.STUDY_PRESETS["full"]["config"])
    assert (cfg.steps, cfg.batch_size, cfg.source_max_len, cfg.target_max_len, cfg.eval_tau_n) == (10000, 16, 384, 128, 125)
