"""The embedding API (OPPORollout): consistent experiences, overcommit across calls, misuse errors;
the plain PyTorch example learns; TRL's PPO trainer gets the same losses from our rollout stage as
from its own for the same tokens."""
import math
import sys
from pathlib import Path

import pytest
import torch

from oppo_runtime import Experiences, OPPORollout, SamplingParams
from oppo_runtime.models import DenseContext, ModelConfig, build_model, load_model, load_tokenizer
from oppo_runtime.ppo.default_task import VOCAB, case_reward, default_prompts, ensure_default_models

from _scripts import load_script

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny models: thread hand-offs cost more than the math
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return ensure_default_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def models(paths):
    return (load_model(paths["actor"]), load_model(paths["reward"], kind="score"),
            load_model(paths["critic"], kind="score"), load_model(paths["actor"]))


def make(models, paths, **kw):
    actor, reward, critic, ref = models
    kw.setdefault("sampling", SamplingParams(max_new_tokens=20))
    return OPPORollout(actor, tokenizer=load_tokenizer(paths["actor"]), reward_model=reward, critic=critic,
                       reference=ref, rule_reward=case_reward, chunk_size=4, **kw)


def ids(n, seed=0):
    return [p["prompt_ids"] for p in default_prompts(n, seed=seed)]


def dense(model, prompt, response):
    seq = torch.tensor(prompt + response)
    hidden = model(seq, torch.arange(len(seq)), DenseContext(torch.tensor([0, len(seq)])))
    return hidden, len(prompt)


# ------------------------------------------------------------------------------------ experiences
def test_experiences_are_consistent_and_equal_a_dense_forward(models, paths):
    actor, reward, critic, ref = models
    ro = make(models, paths, critic_final_value=True)
    prompts = ids(6)
    exp = ro.generate_and_score(prompts)
    assert isinstance(exp, Experiences) and len(exp) == 6
    B, T = exp.response_ids.shape
    assert exp.prompt_ids.shape == exp.prompt_mask.shape and exp.prompt_ids.shape[0] == B
    for name in ("logprobs", "ref_logprobs", "values", "versions", "response_mask"):
        assert getattr(exp, name).shape == (B, T), name
    assert sorted(exp.prompt_uids) == list(range(6))
    assert [prompts[u] for u in exp.prompt_uids] == exp.prompts       # left padding strips back to the prompt
    m = exp.response_mask
    assert (exp.response_ids[~m] == ro.pad_token_id).all() and (exp.versions[~m] == -1).all()
    assert (exp.versions[m] == 0).all() and (exp.logprobs[~m] == 0).all() and (exp.logprobs[m] <= 0).all()
    assert m[:, 0].all() and (m.long().diff(dim=1) <= 0).all()        # right padding, no holes
    for b in range(B):
        prompt, resp = exp.prompts[b], exp.responses[b]
        with torch.no_grad():
            h, P = dense(ref, prompt, resp)
            lp = ref.compute_logprobs(h[P - 1:-1], torch.tensor(resp))
            hc, _ = dense(critic, prompt, resp)
            v = critic.compute_scores(hc)
            hr, _ = dense(reward, prompt, resp)
            r = reward.compute_scores(hr)[-1]
        t = len(resp)
        torch.testing.assert_close(exp.ref_logprobs[b, :t], lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exp.logprobs[b, :t], lp, atol=1e-4, rtol=0)    # ref == actor's weights
        torch.testing.assert_close(exp.values[b, :t], v[P - 1:-1], atol=1e-5, rtol=1e-5)
        assert math.isclose(float(exp.final_values[b]), float(v[-1]), abs_tol=1e-5)
        assert math.isclose(float(exp.score_parts["reward"][b]), float(r), abs_tol=1e-5)
        assert math.isclose(float(exp.score_parts["rule"][b]), case_reward(prompt, resp), abs_tol=1e-6)
        assert math.isclose(float(exp.scores[b]), float(r) + case_reward(prompt, resp), abs_tol=1e-5)
    assert ro.pool.num_free == ro.pool.num_pages


def test_string_prompts_are_tokenized_and_texts_decoded(models, paths):
    ro = make(models, paths)
    tok = load_tokenizer(paths["actor"])
    exp = ro.generate_and_score(["abc:", "XYZ:"])
    texts = ["abc:", "XYZ:"]
    assert exp.prompts == [tok.encode(texts[u]) for u in exp.prompt_uids]
    assert exp.texts == [tok.decode(r) for r in exp.responses]


def test_overcommit_conserves_prompts_across_calls_and_versions_record_the_policy(models, paths):
    ro = make(models, paths, overcommit=3)
    stream = iter(ids(40, seed=3))
    lens = iter([int(x) for x in torch.randint(1, 20, (40,), generator=torch.Generator().manual_seed(0))])
    seen, sent = [], 0
    for step in range(4):
        k = ro.prompts_needed(4)
        assert k == (7 if step == 0 else 4)
        exp = ro.generate_and_score([next(stream) for _ in range(k)], target_lens=[next(lens) for _ in range(k)],
                                    batch_size=4)
        sent += k
        assert len(exp) == 4 and ro.num_in_flight == 3
        assert (exp.versions[exp.response_mask] <= step).all()
        seen += exp.prompt_uids
        ro.update_weights()
    final = ro.generate_and_score([next(stream)], batch_size=4)     # the deferred ones plus one new
    seen += final.prompt_uids
    sent += 1
    assert sorted(seen) == list(range(sent)), "every prompt comes back exactly once"
    assert ro.num_in_flight == 0 and ro.pool.num_free == ro.pool.num_pages
    assert ro.version == 4 and int(final.versions.max()) == 4


def test_update_weights_copies_a_state_dict_and_shared_modules_need_none(paths):
    actor = load_model(paths["actor"])
    ro = OPPORollout(actor, sampling=SamplingParams(max_new_tokens=4))
    other = build_model(actor.config, seed=7)
    ro.update_weights(5, state_dict=other.state_dict())
    assert ro.version == 5 and torch.equal(actor.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert (ro.generate_and_score(ids(2)).versions[:, 0] == 5).all()


def test_a_transformers_model_is_wrapped_without_copying_its_parameters(paths):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(paths["actor"])
    ro = OPPORollout(hf, sampling=SamplingParams(max_new_tokens=6))
    assert ro.actor_model.model.embed_tokens.weight is hf.model.embed_tokens.weight
    exp = ro.generate_and_score(ids(3))
    with torch.no_grad():
        out = hf(torch.tensor([exp.prompts[0] + exp.responses[0]])).logits[0].log_softmax(-1)
    P, resp = len(exp.prompts[0]), exp.responses[0]
    lp = out[P - 1:-1].gather(-1, torch.tensor(resp)[:, None])[:, 0]
    torch.testing.assert_close(exp.logprobs[0, :len(resp)], lp, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ misuse
@pytest.mark.parametrize("prompts, error, match", [
    (torch.ones(2, 5, dtype=torch.long), TypeError, "unpadded"),
    ("abc", TypeError, "list of prompts"),
    ([], ValueError, "empty"),
    ([[3, 4], []], ValueError, r"prompts\[1\] is empty"),
    ([[3, 4.0]], TypeError, "must be ints"),
    ([[[3, 4]]], ValueError, "nested"),
    ([[3, 4], "ab"], TypeError, "mix"),
    ([[3, 999]], ValueError, rf"outside the actor's vocabulary \[0, {len(VOCAB)}\)"),
    ([torch.ones(1, 3, dtype=torch.long)], ValueError, "1-D"),
    ([list(range(3, 60)) * 5], ValueError, "does not fit the context"),
])
def test_bad_prompts_raise_a_clear_error_at_the_call_and_queue_nothing(models, paths, prompts, error, match):
    ro = make(models, paths)
    with pytest.raises(error, match=match):
        ro.generate_and_score(prompts)
    assert ro.num_in_flight == 0


def test_string_prompts_without_a_tokenizer_are_refused(paths):
    ro = OPPORollout(paths["actor"])
    with pytest.raises(TypeError, match="no tokenizer"):
        ro.generate_and_score(["abc:"])


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(paths):
    class BigTokenizer:
        eos_token_id, pad_token_id = 1, 0

        def __len__(self):
            return len(VOCAB) + 1

    with pytest.raises(ValueError, match=f"tokenizer has {len(VOCAB) + 1} tokens but the actor's vocabulary "
                                         f"has {len(VOCAB)}"):
        OPPORollout(paths["actor"], tokenizer=BigTokenizer())


def test_a_scorer_with_another_vocabulary_is_refused(paths):
    cfg = ModelConfig.from_hf_dir(paths["critic"])
    cfg.vocab_size = 80
    with pytest.raises(ValueError, match=f"critic has a vocabulary of 80 tokens, the actor {len(VOCAB)}"):
        OPPORollout(paths["actor"], critic=build_model(cfg, "score"))


def test_a_scorer_on_another_device_is_refused(paths):
    reward = load_model(paths["reward"], kind="score").to("meta")
    with pytest.raises(ValueError, match="reward_model is on meta but the actor's page pool is on cpu"):
        OPPORollout(paths["actor"], reward_model=reward)
    with pytest.raises(ValueError, match=r"reward_model is on meta but the scorers' page pool \(scorer_device\) is on cpu"):
        OPPORollout(paths["actor"], reward_model=reward, scorer_device="cpu")
    with pytest.raises(ValueError, match="actor is on cpu but the actor's page pool is on meta"):
        OPPORollout(load_model(paths["actor"]), device="meta")


def test_scorers_placed_apart_score_the_same_and_follow_critic_updates(models, paths):
    """scorer_device (another GPU in production; here the CPU again): the scorers' own page pool,
    the same experiences, before and after a critic update."""
    actor, reward, critic, ref = models
    new_critic = {k: v + 0.01 for k, v in critic.state_dict().items()}
    out = {}
    for placed in (None, "cpu"):
        c = load_model(paths["critic"], kind="score")          # updated below: not the shared fixture
        ro = OPPORollout(actor, tokenizer=load_tokenizer(paths["actor"]), reward_model=reward, critic=c,
                         reference=ref, rule_reward=case_reward, chunk_size=4, overcommit=2,
                         sampling=SamplingParams(max_new_tokens=20), scorer_device=placed)
        assert (ro.scorer_pool is ro.pool) == (placed is None)
        first = ro.generate_and_score(ids(6), target_lens=[3, 19, 7, 12, 1, 16], batch_size=4)
        ro.update_weights(critic_state_dict=new_critic)        # the 2 deferred ones are re-scored
        second = ro.generate_and_score(ids(2, seed=5), batch_size=4)
        assert ro.num_in_flight == 0
        assert ro.pool.num_free == ro.pool.num_pages and ro.scorer_pool.num_free == ro.scorer_pool.num_pages
        out[placed] = (first, second)
    for a, b in zip(out[None], out["cpu"]):
        assert a.prompt_uids == b.prompt_uids and torch.equal(a.response_ids, b.response_ids)
        for name in ("values", "ref_logprobs", "scores"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=1e-6)


def test_wrong_model_kinds_and_batch_sizes_are_refused(models, paths):
    with pytest.raises(TypeError, match="reference: expected a CausalLM"):
        OPPORollout(paths["actor"], reference=models[1])
    ro = make(models, paths)
    with pytest.raises(ValueError, match="batch_size 5"):
        ro.generate_and_score(ids(2), batch_size=5)
    with pytest.raises(ValueError, match="target_lens has 1 entries for 2 prompts"):
        ro.generate_and_score(ids(2), target_lens=[3])


# ------------------------------------------------------------------------------------ examples
def _load_example(name):
    return load_script(EXAMPLES, name)


def test_plain_pytorch_example_learns_the_default_task(tmp_path):
    """30 PPO steps of 16 prompts: the mean reward of the last 5 steps beats the first 5 by >= 0.2
    (a random policy scores about 0.4; a typical run goes 0.41 -> 0.8)."""
    example = _load_example("plain_pytorch_ppo")
    hist = example.train(steps=30, cache_dir=str(tmp_path), log_every=0)
    first, last = sum(hist[:5]) / 5, sum(hist[-5:]) / 5
    assert last >= first + 0.2, (first, last, hist)


def test_plain_pytorch_example_is_under_150_lines():
    assert len((EXAMPLES / "plain_pytorch_ppo.py").read_text().splitlines()) < 150


# ------------------------------------------------------------------------------------ TRL
TRL_SEED = 16   # its rollout has no [PAD] mid-response: TRL reads a generated pad as the end (docs/embedding.md)


def _trl_trainer(cls, out, flags, seed=TRL_SEED):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig

    arg = dict(zip(flags[::2], flags[1::2]))
    tok = AutoTokenizer.from_pretrained(arg["--sft_model_path"], padding_side="left")
    tok.add_special_tokens({"pad_token": "[PAD]"})
    texts = [p["text"] for p in default_prompts(8, seed=1)]
    ds = Dataset.from_dict({"input_ids": [tok(t)["input_ids"] for t in texts]})
    args = PPOConfig(output_dir=str(out), per_device_train_batch_size=8, total_episodes=8, response_length=10,
                     num_ppo_epochs=1, num_mini_batches=1, optim="sgd", learning_rate=0.1, num_sample_generations=0,
                     stop_token="eos", report_to="none", use_cpu=True, bf16=False, seed=seed, logging_steps=1,
                     save_strategy="no", disable_tqdm=True, kl_coef=0.05, missing_eos_penalty=1.0)
    load = AutoModelForCausalLM.from_pretrained
    score = AutoModelForSequenceClassification.from_pretrained
    return cls(args=args, processing_class=tok, model=load(arg["--sft_model_path"]), ref_model=load(arg["--sft_model_path"]),
               reward_model=score(arg["--reward_model_path"], num_labels=1),
               value_model=score(arg["--reward_model_path"], num_labels=1), train_dataset=ds, eval_dataset=ds)


def test_trl_gets_the_same_losses_from_our_rollout_as_from_its_own(tmp_path):
    pytest.importorskip("trl")
    import numpy as np
    oppo_trl = _load_example("oppo_trl")
    _trl = oppo_trl._trl
    flags = _load_example("trl_default_task").prepare(str(tmp_path / "task"), num_prompts=8)

    class Recording(oppo_trl.OPPOPPOTrainer):
        def _generate_and_score(self, queries, pad):
            qr, rows = super()._generate_and_score(queries, pad)
            self.recorded, self.recorded_P = qr.clone(), queries.shape[1]
            return qr, rows

    np.random.seed(0)
    ours = _trl_trainer(Recording, tmp_path / "ours", flags)
    ours.train()
    qr, P = ours.recorded, ours.recorded_P
    pad = ours.processing_class.pad_token_id
    resp = qr[:, P:]
    first_pad = (resp == pad).float().argmax(1)
    assert not any(bool((resp[b] == pad).any() and (resp[b, int(first_pad[b]):] != pad).any()) for b in range(8)), \
        "pick another TRL_SEED: this rollout generated [PAD] inside a response"

    np.random.seed(0)
    theirs = _trl_trainer(_trl.PPOTrainer, tmp_path / "theirs", flags)
    orig = _trl.batch_generation

    def same_tokens(model, queries, batch_size, pad_token_id, generation_config):
        assert torch.equal(qr[:, :queries.shape[1]], queries), "both trainers see the same queries"
        logits = _trl.forward(model, qr, pad_token_id).logits[:, queries.shape[1] - 1:-1]
        return qr, logits / generation_config.temperature       # what generate's scores hold

    _trl.batch_generation = same_tokens
    try:
        theirs.train()
    finally:
        _trl.batch_generation = orig
    assert (resp != pad).any(1).all() and (resp == ours.processing_class.eos_token_id).any(), \
        "every row has tokens and some end at EOS (so TRL reads the critic one past the response)"
    a, b = ours.state.log_history[0], theirs.state.log_history[0]
    for key in ("objective/kl", "objective/scores", "objective/non_score_reward", "objective/rlhf_reward",
                "loss/policy_avg", "loss/value_avg", "val/ratio", "policy/approxkl_avg", "val/clipfrac_avg",
                "objective/entropy"):
        assert math.isclose(a[key], b[key], rel_tol=1e-3, abs_tol=1e-5), (key, a[key], b[key])
    for (name, p), q in zip(ours.model.named_parameters(), theirs.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=f"after the update: {name}")


def test_trl_example_script_runs_a_few_steps(tmp_path):
    pytest.importorskip("trl")
    import subprocess
    flags = _load_example("trl_default_task").prepare(str(tmp_path / "task"), num_prompts=120)
    cmd = [sys.executable, str(EXAMPLES / "trl_ppo.py"), *flags, "--output_dir", str(tmp_path / "out"),
           "--per_device_train_batch_size", "4", "--total_episodes", "8", "--response_length", "8",
           "--num_ppo_epochs", "1", "--num_mini_batches", "1", "--per_device_eval_batch_size", "50",
           "--num_sample_generations", "0", "--stop_token", "eos", "--report_to", "none", "--logging_steps", "1",
           "--disable_tqdm", "true", "--use_cpu", "true", "--bf16", "false"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("'loss/policy_avg'") == 2, out.stdout[-2000:]
