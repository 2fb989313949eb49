"""Engine behaviour on the real model: batch invariance, chunking, preemption, stops, seeds, bad input, no leaks."""

from __future__ import annotations

import pytest

from tests.conftest import CHAT_QUESTIONS, RAW_PROMPTS, chat_prompt
from tokenmill import LLM, InvalidRequestError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(llm_fp32) -> list[str]:
    mixed = RAW_PROMPTS + [chat_prompt(llm_fp32.tokenizer, q) for q in CHAT_QUESTIONS]
    assert len(mixed) == 32
    return mixed


@pytest.fixture(scope="module")
def alone(llm_fp32, prompts) -> list[list[int]]:
    """Each prompt generated on its own: the reference for every batched variant."""
    return [llm_fp32.generate(p, GREEDY, use_tqdm=False)[0].token_ids for p in prompts]


def assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.engine.has_unfinished_requests()


def test_batch_of_32_matches_alone(llm_fp32, prompts, alone) -> None:
    batched = [r.token_ids for r in llm_fp32.generate(prompts, GREEDY, use_tqdm=False)]
    assert batched == alone
    assert_no_leak(llm_fp32)


def test_forced_chunking_matches_alone(model_path, prompts, alone) -> None:
    llm = LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=512, max_num_batched_tokens=24)
    batched = [r.token_ids for r in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert batched == alone
    assert_no_leak(llm)


def test_forced_preemption_matches_alone(model_path, prompts, alone) -> None:
    llm = LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=24, block_size=16)
    batched = [r.token_ids for r in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert llm.engine.stats().num_preemptions > 0
    assert batched == alone
    assert_no_leak(llm)


def test_abort_frees_blocks_and_others_continue(llm_fp32, prompts) -> None:
    engine = llm_fp32.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts[:4]]
    engine.step()
    engine.step()
    final = engine.abort(ids[1])
    assert final is not None and final.finish_reason == "abort"
    assert engine.abort(ids[1]) is None  # second abort of the same id is a no-op
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {ids[0], ids[2], ids[3]}
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in finished.values())
    assert_no_leak(llm_fp32)


def test_stop_string_excluded_and_matched_across_tokens(llm_fp32) -> None:
    prompt = "1, 2, 3, 4, 5,"
    free = llm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert " 9" in free.text  # counting continues
    # "8, 9" spans several tokens: matching must work across token boundaries
    stopped = llm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=24, stop=["8, 9"]),
                                use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "8, 9"
    assert stopped.text == free.text[: free.text.index("8, 9")]


def test_stop_token_ids_and_max_tokens(llm_fp32) -> None:
    free = llm_fp32.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert free.outputs[0].finish_reason == "length" and len(free.token_ids) == 8
    stop_id = free.token_ids[3]
    stopped = llm_fp32.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=8,
                                                                     stop_token_ids=[stop_id]), use_tqdm=False)[0]
    first = free.token_ids.index(stop_id)
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop_id


def test_eos_stops_chat_reply_unless_ignored(llm_fp32) -> None:
    reply = llm_fp32.chat([{"role": "user", "content": "What is the capital of France?"}],
                          SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert reply.finish_reason == "stop" and "Paris" in reply.text
    assert reply.token_ids[-1] in llm_fp32.tokenizer.stop_token_ids
    ignored = llm_fp32.chat([{"role": "user", "content": "What is the capital of France?"}],
                            SamplingParams(temperature=0, max_tokens=len(reply.token_ids) + 4, ignore_eos=True))
    assert len(ignored[0].token_ids) == len(reply.token_ids) + 4


def test_seeded_sampling_is_reproducible_inside_any_batch(llm_fp32, prompts) -> None:
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm_fp32.generate(prompts[0], seeded, use_tqdm=False)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = llm_fp32.generate(prompts[:6], [others, others, seeded, others, GREEDY, others], use_tqdm=False)
    in_batch = llm_fp32.generate([prompts[5], prompts[0]], [others, seeded], use_tqdm=False)[1].token_ids
    assert in_batch == alone
    other_seed = llm_fp32.generate(prompts[0], SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16,
                                                              seed=99, ignore_eos=True), use_tqdm=False)
    assert other_seed[0].token_ids != alone
    assert len(mixed) == 6


def test_n_samples_and_logprobs(llm_fp32) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7, logprobs=2, ignore_eos=True)
    [result] = llm_fp32.generate("Once upon a time", params, use_tqdm=False)
    assert [c.index for c in result.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in result.outputs}) > 1
    for completion in result.outputs:
        assert len(completion.logprobs) == 6
        for token, lp in zip(completion.token_ids, completion.logprobs, strict=True):
            assert lp.token_id == token and lp.logprob <= 0
            assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]


def test_min_tokens_blocks_eos(llm_fp32) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, min_tokens=30)
    reply = llm_fp32.chat([{"role": "user", "content": "Say hi."}], params)[0]
    assert len(reply.token_ids) >= 30


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [3]}, "stop"),
    ({"stop": {"a": 1}}, "stop"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"logprobs": 100}, "logprobs"),
    ({"n": 0}, "n"),
    ({"seed": "x"}, "seed"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field and field in str(info.value)


def test_bad_prompts_rejected_while_others_carry_on(llm_fp32) -> None:
    engine = llm_fp32.engine
    good = engine.add_request("Hello there", SamplingParams(temperature=0, max_tokens=4))
    too_long = [100] * engine.max_model_len
    for bad, field in [(too_long, "prompt"), ("", "prompt"), ([10**9], "prompt"), (3.5, "prompt")]:
        with pytest.raises(InvalidRequestError) as info:
            engine.add_request(bad, SamplingParams())  # type: ignore[arg-type]
        assert info.value.field == field
    with pytest.raises(InvalidRequestError):
        engine.add_request("x", SamplingParams(), request_id=good)  # duplicate id
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == [good] and len(outs[0].token_ids) == 4
    assert_no_leak(llm_fp32)


def test_batch_with_a_bad_prompt_adds_nothing(llm_fp32) -> None:
    with pytest.raises(InvalidRequestError):
        llm_fp32.generate(["fine", ""], GREEDY, use_tqdm=False)
    assert_no_leak(llm_fp32)


def test_out_of_vocab_stop_token_or_logit_bias_rejected(llm_fp32) -> None:
    with pytest.raises(InvalidRequestError) as info:
        llm_fp32.engine.add_request("hi", SamplingParams(stop_token_ids=[10**6], min_tokens=1, max_tokens=2))
    assert info.value.field == "stop_token_ids"
    vocab = llm_fp32.engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError) as info:
        llm_fp32.engine.add_request("hi", SamplingParams(logit_bias={vocab: 1.0}, max_tokens=2))
    assert info.value.field == "logit_bias"
    assert_no_leak(llm_fp32)


def test_tiny_temperature_is_greedy_and_huge_top_k_is_no_top_k(llm_fp32) -> None:
    greedy = llm_fp32.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    tiny = llm_fp32.generate("The quick brown fox", SamplingParams(temperature=1e-300, max_tokens=8), use_tqdm=False)
    assert tiny[0].token_ids == greedy[0].token_ids
    wide = SamplingParams(temperature=1.0, top_k=2**70, max_tokens=4, seed=5)
    plain = SamplingParams(temperature=1.0, max_tokens=4, seed=5)
    assert (llm_fp32.generate("Hello", wide, use_tqdm=False)[0].token_ids
            == llm_fp32.generate("Hello", plain, use_tqdm=False)[0].token_ids)
