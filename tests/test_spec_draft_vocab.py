"""A draft model's LM head over part of the vocabulary (spec/draft_vocab.py): each weight format's row selection
computes the selected outputs as the whole layer does; the reduced head scores only its ids; drafting with it keeps
greedy output identical and guesses only tokens of the subset."""

from __future__ import annotations

import pytest
import torch
from test_spec_draft import GREEDY, VOCAB, assert_no_leak, make_llm, pair, plain, prompts, reference  # noqa: F401

from tokenmill.config import EngineConfig
from tokenmill.kernels import cpu_kernels
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.linear import FloatLinear, GgufQ4Linear, GgufQ8Linear, Int8Linear, Linear
from tokenmill.spec.draft_model import DraftModelProposer
from tokenmill.spec.draft_vocab import SubsetHead, draft_vocabulary
from tokenmill.spec.proposer import DraftRequest

N, K = 70, 512  # rows not a multiple of the 16-row tiles, K a multiple of Q6_K's 256


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _half(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * 0.02).half()


def _layers(int8_activations: bool) -> dict[str, Linear]:
    q4 = torch.randint(0, 16, (N, K), generator=_gen(1), dtype=torch.uint8)
    q8 = torch.randint(-127, 128, (N, K), generator=_gen(2), dtype=torch.int8)
    layers: dict[str, Linear] = {
        "q4_f16": GgufQ4Linear(q4, _half((N, K // 32), 3), _half((N, K // 32), 4)),
        "q4_fp32": GgufQ4Linear(q4, _half((N, K // 32), 3).float() * 3.1, _half((N, K // 32), 4).float() / 7),
        "q8": GgufQ8Linear(q8, _half((N, K // 32), 5)),
        "q6k": GgufQ8Linear(torch.randint(-32, 32, (N, K), generator=_gen(6), dtype=torch.int8),
                            _half((N, K // 256), 7),
                            sub_scales=torch.randint(-128, 128, (N, K // 16), generator=_gen(8), dtype=torch.int8)),
    }
    for layer in layers.values():
        layer.int8_activations = int8_activations
    return layers


IDS = torch.tensor([0, 3, 15, 16, 17, 40, 69])  # inside and across row tiles, the padded last one included


@pytest.mark.parametrize("int8_activations", [False, True], ids=["bf16", "int8"])
def test_gguf_row_selection_computes_the_same_outputs(int8_activations) -> None:
    """Bit for bit where the block kernels run: each output row goes through the same operations whatever tile it
    sits in."""
    x = torch.randn(5, K, generator=_gen(9)).bfloat16()
    exact = cpu_kernels().module is not None
    for name, layer in _layers(int8_activations).items():
        chosen = layer.select_rows(IDS)
        assert type(chosen) is type(layer) and chosen.out_features == len(IDS), name
        assert chosen.int8_activations == int8_activations and chosen.scales.dtype == layer.scales.dtype, name
        assert torch.equal(chosen.dequantized(), layer.dequantized()[IDS]), name
        for got, want in ((chosen(x), layer(x)[:, IDS]), (chosen.logits(x), layer.logits(x)[:, IDS])):
            if exact:
                assert torch.equal(got, want), name
            else:  # the fp32 fallback matmul may sum in another order for another width
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_float_and_int8_row_selection() -> None:
    weight = torch.randn(N, K, generator=_gen(10))
    x = torch.randn(4, K, generator=_gen(11))
    bias = torch.randn(N, generator=_gen(12))
    fp32 = FloatLinear(weight, bias)
    # fp32 sums that MKL may order differently at another width: within a few ulps of outputs of size ~20
    torch.testing.assert_close(fp32.select_rows(IDS)(x), fp32(x)[:, IDS], rtol=2e-5, atol=1e-4)
    assert torch.equal(fp32.select_rows(IDS).weight, weight[IDS]) and torch.equal(fp32.select_rows(IDS).bias, bias[IDS])
    int8 = Int8Linear.quantize(weight, torch.bfloat16)
    chosen = int8.select_rows(IDS)
    assert torch.equal(chosen.qweight, int8.qweight[IDS]) and torch.equal(chosen.scales, int8.scales[IDS])
    # bf16 outputs: PyTorch's kernel may round a column's sum differently at another width, by at most an ulp
    torch.testing.assert_close(chosen(x.bfloat16()), int8(x.bfloat16())[:, IDS], rtol=1 / 128, atol=1e-2)
    packed = FloatLinear(weight.bfloat16())
    if packed.prepack(keep_weight=True):
        chosen = packed.select_rows(IDS)
        assert chosen.packing == packed.packing and chosen.weight is None
        torch.testing.assert_close(chosen(x.bfloat16()), packed(x.bfloat16())[:, IDS], rtol=1 / 128, atol=1e-2)


def test_draft_vocabulary_and_the_reduced_head() -> None:
    assert draft_vocabulary(300, 5, always=(299, 2, 299)).tolist() == [0, 1, 2, 3, 4, 299]
    assert draft_vocabulary(300, 300).tolist() == list(range(300))
    for size in (0, 301):
        with pytest.raises(ValueError, match="between 1 and"):
            draft_vocabulary(300, size)
    head = _layers(False)["q8"]
    ids = draft_vocabulary(N, 20, always=(69,))
    reduced = SubsetHead(head, ids)
    x = torch.randn(3, K, generator=_gen(13)).bfloat16()
    logits = reduced.logits(x)
    assert logits.shape == (3, N) and logits.dtype == torch.float32
    assert torch.equal(logits[:, ids], head.select_rows(ids).logits(x))
    outside = torch.ones(N, dtype=torch.bool)
    outside[ids] = False
    assert bool(torch.isneginf(logits[:, outside]).all())
    assert reduced.weight_bytes() == head.select_rows(ids).weight_bytes() < head.weight_bytes() / 2  # 2 of 5 tiles


def test_the_option_is_checked() -> None:
    for bad in ({"speculative": "ngram", "speculative_draft_vocab": 100}, {"speculative_draft_vocab": 100},
                {"speculative": "self", "speculative_draft_vocab": 0}):
        with pytest.raises(ValueError, match="speculative_draft_vocab"):
            EngineConfig(**bad)


SUBSET = 120


@pytest.mark.parametrize("method", ["draft", "self"])
def test_a_reduced_draft_head_keeps_greedy_output_identical(pair, reference, method) -> None:  # noqa: F811
    options = {"speculative_draft_vocab": SUBSET}
    if method == "self":
        options |= {"speculative": "self", "speculative_layers": (0,), "speculative_model": None}
    llm = make_llm(*pair, **options)
    head = llm.engine.speculator.proposer.runner.lm_head
    assert isinstance(head, SubsetHead) and head.ids.tolist() == list(range(SUBSET))  # eos (0) is among them
    assert [r.token_ids for r in llm.generate(prompts(), GREEDY, use_tqdm=False)] == reference
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0
    assert_no_leak(llm)


def test_a_reduced_head_guesses_only_its_tokens_and_its_requests(pair) -> None:  # noqa: F811
    """Each guess is the whole head's wherever that one is in the subset or among its own request's tokens, and
    never any other token."""
    def guesses(vocab_size: int | None, asked: list[DraftRequest]) -> list[list[int]]:
        proposer = DraftModelProposer.load(
            pair[1], GGUFFile(pair[0]), torch.float32, torch.device("cpu"), weight_format="float",
            int4_group_size=32, prepack=None, enforce_eager=True, num_blocks=64, block_size=16, max_step_tokens=64,
            max_positions=1024, measure_cost=False,
            vocab=None if vocab_size is None else draft_vocabulary(VOCAB, vocab_size, [VOCAB - 1]))
        return proposer.propose_batch(asked)

    # Half the prompts from the upper ids, which only the requests' own tokens can bring back.
    asked = [DraftRequest(str(i), [t if i % 2 else VOCAB - 2 - t for t in prompt], [], 6)
             for i, prompt in enumerate(prompts())]
    whole, reduced = guesses(None, asked), guesses(SUBSET, asked)
    allowed = [set(range(SUBSET)) | {VOCAB - 1} | set(r.prompt_token_ids) for r in asked]
    assert any(t >= SUBSET and t not in allowed[i] for i, chain in enumerate(whole) for t in chain)
    assert any(t >= SUBSET for chain in reduced for t in chain)  # a prompt's own upper tokens were guessed
    for chain, wanted, ok in zip(reduced, whole, allowed, strict=True):
        assert len(chain) == len(wanted) and set(chain) <= ok
        if wanted[0] in ok:  # the first guess follows the same tokens in both
            assert chain[0] == wanted[0]


def test_row_tokens_add_only_their_own_rows_scores() -> None:
    head = _layers(False)["q8"]
    reduced = SubsetHead(head, draft_vocabulary(N, 20))
    x = torch.randn(3, K, generator=_gen(14)).bfloat16()
    whole = head.logits(x)
    reduced.set_rows([("a", [5, 30, 31, 30]), ("b", []), ("c", [69, 2])])
    logits = reduced.logits(x)
    for r, extra in ((0, [30, 31]), (2, [69])):
        torch.testing.assert_close(logits[r, extra], whole[r, extra], rtol=1e-5, atol=1e-4)  # fp32 sums, other order
    assert torch.equal(logits[:, :20], whole[:, :20])
    assert bool(torch.isneginf(logits[1, 20:]).all()) and bool(torch.isneginf(logits[0, [32, 69]]).all())
    assert bool(torch.isneginf(reduced.logits(x)[0, 30]))  # the rows hold for one call only
    # A request's tokens are read once; later calls add only the new ones; a forgotten id starts afresh.
    reduced.set_rows([("a", [5, 30, 31, 30, 40]), ("b", [33]), ("a", [5, 30])])
    assert reduced._row_extras == [[30, 31, 40], [33], [30]]
    reduced.forget("b")
    with pytest.raises(ValueError, match="rows"):
        reduced.set_rows([("b", [34])])
        reduced.logits(x)
    assert reduced._seen["b"] == (1, [34])
