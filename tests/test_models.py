"""Models: parity with transformers, paged == dense, autograd, checkpoint loading and its errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from oppo_runtime.models import (CausalLM, CheckpointError, DenseContext, ModelConfig, PagedContext,
                                 ScalarHeadModel, build_model, load_model, load_tokenizer, save_model)

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "llama": ("Llama", dict(attention_bias=True, mlp_bias=True)),
    "llama3-rope": ("Llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(head_dim=32)),
    "mistral": ("Mistral", dict(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
LENGTHS = [7, 13, 1, 10]


def rel_err(a, b):
    a, b = a.float(), b.float()
    err = ((a - b).norm() / b.norm()).item()
    print(f"relative error {err:.2e}")
    return err


def hf_dir(tmp_path, family, head, seed=0, name=None, **extra):
    prefix, kwargs = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(**TINY, **kwargs, **extra, num_labels=1)
    torch.manual_seed(seed)
    suffix = "ForCausalLM" if head == "causal_lm" else "ForSequenceClassification"
    model = getattr(transformers, prefix + suffix)(config).eval()
    with torch.no_grad():   # transformers inits biases to 0 and norms to 1: make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / (name or f"{family}-{head}")
    model.save_pretrained(path)
    return path


def ragged_batch(lengths, vocab=128, seed=1):
    """Right-padded [B, T] ids (pad 0) with its mask, and the packed form."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, :n] = 1
    packed = torch.cat([ids[b, :n] for b, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return ids, mask, packed, positions, cu


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_causal_lm_logits_match_transformers(tmp_path, family, dtype, tol):
    path = hf_dir(tmp_path, family, "causal_lm")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ours = load_model(path, "causal_lm", dtype=dtype)
    assert ours.dtype == dtype
    ids, mask, packed, positions, cu = ragged_batch(LENGTHS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        got = ours.compute_logits(ours(packed, positions, DenseContext(cu)))
    assert rel_err(got, ref) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_score_model_matches_transformers_at_last_token(tmp_path, family, dtype, tol):
    path = hf_dir(tmp_path, family, "score")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).eval()
    ours = load_model(path, "score", dtype=dtype)
    ids, mask, packed, positions, cu = ragged_batch(LENGTHS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        scores = ours.compute_scores(ours(packed, positions, DenseContext(cu)))
    assert scores.dtype == torch.float32 and scores.shape == (sum(LENGTHS),)
    assert rel_err(scores[cu[1:].long() - 1], ref) < tol


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**TINY)
    hf = transformers.Qwen3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path / "sharded")
    ids, mask, packed, positions, cu = ragged_batch(LENGTHS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        assert rel_err(ours.compute_logits(ours(packed, positions, DenseContext(cu))), ref) < 1e-4


def test_saved_model_reloads_in_ours_and_in_transformers(tmp_path):
    path = hf_dir(tmp_path, "llama3-rope", "causal_lm")
    ours = load_model(path)
    save_model(ours, tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids, mask, packed, positions, cu = ragged_batch(LENGTHS)
    with torch.no_grad():
        a = ours.compute_logits(ours(packed, positions, DenseContext(cu)))
        b = again.compute_logits(again(packed, positions, DenseContext(cu)))
        ref = hf(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert torch.equal(a, b)
    assert rel_err(a, ref) < 1e-4
    assert not [f for f in os.listdir(tmp_path / "saved") if f.startswith(".tmp")]


def test_logprobs_equal_log_softmax_of_logits(tmp_path):
    model = build_model(ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **TINY}), seed=3)
    _, _, packed, positions, cu = ragged_batch(LENGTHS)
    with torch.no_grad():
        hidden = model(packed, positions, DenseContext(cu))
        ref = torch.log_softmax(model.compute_logits(hidden).float(), -1).gather(-1, packed[:, None])[:, 0]
        got = model.compute_logprobs(hidden, packed, chunk_rows=5)
    torch.testing.assert_close(got, ref)


# ----------------------------------------------------------------------------- paged == dense
def _paged_caches(model, num_blocks, block_size):
    layers, hkv, d = model.kv_geometry()
    return [(torch.zeros(num_blocks, block_size, hkv, d), torch.zeros(num_blocks, block_size, hkv, d))
            for _ in range(layers)]


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_paged_prefill_chunks_and_decode_equal_dense(tmp_path, family):
    torch.manual_seed(0)
    model = load_model(hf_dir(tmp_path, family, "causal_lm"))
    block_size, max_blocks = 4, 8
    prompt_lens, chunk_lens, decode_steps = [5, 9, 2], [3, 6, 4], 3
    B = len(prompt_lens)
    total = [p + c + decode_steps for p, c in zip(prompt_lens, chunk_lens)]
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(1, 128, (n,), generator=g) for n in total]
    perm = torch.randperm(B * max_blocks, generator=g).to(torch.int32)
    block_tables = perm.view(B, max_blocks)
    caches = _paged_caches(model, B * max_blocks, block_size)

    def step(starts, ends, is_decode):
        ids = torch.cat([seqs[b][s:e] for b, (s, e) in enumerate(zip(starts, ends))])
        pos = torch.cat([torch.arange(s, e) for s, e in zip(starts, ends)])
        slots = torch.cat([block_tables[b, pos_b // block_size].long() * block_size + pos_b % block_size
                           for b, pos_b in enumerate(torch.arange(s, e) for s, e in zip(starts, ends))])
        n = [e - s for s, e in zip(starts, ends)]
        ctx = PagedContext(kv_caches=caches, slot_mapping=slots, block_tables=block_tables,
                           context_lens=torch.tensor(ends, dtype=torch.int32),
                           cu_seqlens_q=torch.tensor([0] + n).cumsum(0).to(torch.int32),
                           max_seqlen_q=max(n), is_decode=is_decode)
        with torch.no_grad():
            return model.compute_logits(model(ids, pos, ctx))

    outs = [[] for _ in range(B)]

    def collect(logits, starts, ends):
        off = 0
        for b, (s, e) in enumerate(zip(starts, ends)):
            outs[b].append(logits[off:off + e - s])
            off += e - s

    zero = [0] * B
    collect(step(zero, prompt_lens, False), zero, prompt_lens)
    chunk_end = [p + c for p, c in zip(prompt_lens, chunk_lens)]
    collect(step(prompt_lens, chunk_end, False), prompt_lens, chunk_end)
    for t in range(decode_steps):
        starts = [c + t for c in chunk_end]
        ends = [s + 1 for s in starts]
        collect(step(starts, ends, True), starts, ends)

    cu = torch.tensor([0] + total).cumsum(0).to(torch.int32)
    with torch.no_grad():
        dense = model.compute_logits(model(torch.cat(seqs), torch.cat([torch.arange(n) for n in total]),
                                           DenseContext(cu)))
    paged = torch.cat([torch.cat(o) for o in outs])
    assert rel_err(paged, dense) < 1e-5


# ----------------------------------------------------------------------------- autograd
def test_gradient_checkpointing_gives_the_same_grads():
    config = ModelConfig.from_dict({"architectures": ["Qwen3ForSequenceClassification"], **TINY})
    model = build_model(config, seed=1)
    assert isinstance(model, ScalarHeadModel)
    _, _, packed, positions, cu = ragged_batch(LENGTHS)

    def grads(checkpointing):
        model.zero_grad()
        model.train()
        model.gradient_checkpointing = checkpointing
        model.compute_scores(model(packed, positions, DenseContext(cu))).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert all(torch.isfinite(g).all() for g in plain.values())
    assert all(g.abs().sum() > 0 for n, g in plain.items() if "norm" not in n)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_causal_lm_logprob_loss_backward_is_finite():
    model = build_model(ModelConfig.from_dict({"architectures": ["MistralForCausalLM"], **TINY}), seed=2)
    model.train()
    _, _, packed, positions, cu = ragged_batch(LENGTHS)
    loss = -model.compute_logprobs(model(packed, positions, DenseContext(cu)), packed).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- config
def test_config_reads_both_rope_spellings():
    base = {"architectures": ["LlamaForCausalLM"], **TINY}
    old = ModelConfig.from_dict({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5,
                                                             "factor": 2.0}})
    assert old == new and old.rope_theta == 5e5 and old.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert ModelConfig.from_dict(old.to_hf_dict()) == old


def test_config_derives_head_dim_and_kv_heads():
    c = ModelConfig.from_dict({"architectures": ["MistralForCausalLM"], **TINY, "num_key_value_heads": None})
    assert (c.head_dim, c.num_key_value_heads) == (16, 4)
    assert build_model(c).kv_geometry() == (2, 4, 16)


def test_unsupported_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        ModelConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], **TINY,
                               "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_sliding_window_smaller_than_context_is_refused():
    d = {"architectures": ["MistralForCausalLM"], **TINY, "sliding_window": 32}
    with pytest.raises(ValueError, match="sliding-window attention .*window 32.* not supported"):
        ModelConfig.from_dict(d)
    assert ModelConfig.from_dict(d, max_model_len=32).sliding_window == 32
    assert ModelConfig.from_dict({**d, "sliding_window": 256}).sliding_window == 256
    qwen = {"architectures": ["Qwen2ForCausalLM"], **TINY, "sliding_window": 32, "use_sliding_window": False}
    assert ModelConfig.from_dict(qwen).sliding_window is None
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_dict({**qwen, "use_sliding_window": True, "max_window_layers": 1})


def test_score_head_needs_one_label():
    with pytest.raises(ValueError, match="num_labels=2"):
        ModelConfig.from_dict({"architectures": ["LlamaForSequenceClassification"], **TINY,
                               "id2label": {"0": "a", "1": "b"}})


# ----------------------------------------------------------------------------- bad input
def test_directory_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_unsupported_architecture_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], **TINY}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        load_model(tmp_path)


def test_no_safetensors_refuses_pickles(tmp_path):
    path = hf_dir(tmp_path, "qwen2", "causal_lm")
    os.remove(path / "model.safetensors")
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*pytorch_model.bin"):
        load_model(path)


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    path = hf_dir(tmp_path, "llama", "causal_lm")
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors .*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(path)


def test_unexpected_tensor_is_named_but_rotary_inv_freq_is_ignored(tmp_path):
    path = hf_dir(tmp_path, "llama", "causal_lm")
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(path)
    _rewrite(path, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model\.layers\.0\.extra\.weight"):
        load_model(path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    path = hf_dir(tmp_path, "mistral", "causal_lm")
    _rewrite(path, lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.norm\.weight has shape "
                                              r"\(32,\), expected \(64,\)"):
        load_model(path)


def test_causal_lm_as_score_needs_allow_new_head(tmp_path):
    path = hf_dir(tmp_path, "qwen2", "causal_lm")
    with pytest.raises(CheckpointError, match="Qwen2ForCausalLM.*allow_new_head"):
        load_model(path, "score")
    critic = load_model(path, "score", allow_new_head=True, seed=5)
    actor = load_model(path)
    assert critic.config.architecture == "Qwen2ForSequenceClassification"
    torch.testing.assert_close(critic.model.embed_tokens.weight, actor.model.embed_tokens.weight)
    again = load_model(path, "score", allow_new_head=True, seed=5)
    assert torch.equal(critic.score.weight, again.score.weight) and critic.score.weight.std() > 0


def test_score_checkpoint_is_not_a_causal_lm(tmp_path):
    with pytest.raises(CheckpointError, match="LlamaForSequenceClassification.*kind='causal_lm'"):
        load_model(hf_dir(tmp_path, "llama", "score"), "causal_lm")


def test_tokenizer_loads_ids_and_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"},
                                                                 "pad_token": "<pad>"}))
    t = load_tokenizer(tmp_path)
    assert t.encode("hello world") == [2, 3]
    assert t.decode([2, 3, 1]) == "hello world"
    assert (t.eos_token_id, t.pad_token_id, t.vocab_size) == (1, 0, 5)
