"""Structured output on a tiny random model with a byte-level vocabulary: every finished output matches its JSON
schema, regex or choice; grammar-free requests are untouched; greedy speculation under a grammar is identical to
greedy without it; bad constraints are refused naming the field; masks are applied exactly."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import llguidance.torch as llg_torch
import pytest
import torch
from conftest import write_tiny_gguf

from tokenmill import LLM, SamplingParams
from tokenmill.sampling_params import InvalidRequestError
from tokenmill.spec.tree import check_tree, path_tokens, spine_length
from tokenmill.structured import masks as masks_module
from tokenmill.structured.masks import StructuredOutputManager, TokenMasks, allowed_tree
from tokenmill.structured.params import StructuredOutputs
from tokenmill.tokenizer import _byte_alphabet

SCHEMAS = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/data/json_schemas.json").read_text())
# Multi-byte tokens next to the 256 single bytes, so that masks must allow or forbid whole pieces of JSON.
PIECES = ['{"', '":', '", "', '"}', ", ", ": ", "true", "false", "null", "[", "]}", "12", "0.", "ORD-", "20"]


_BYTE_TOKENS = ["<|endoftext|>", *_byte_alphabet().values(), *PIECES]
_BYTE_METADATA = {"tokenizer.ggml.tokens": _BYTE_TOKENS, "tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0,
                  "tokenizer.ggml.token_type": [3] + [1] * (len(_BYTE_TOKENS) - 1)}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("structured") / "bytes.gguf"
    return write_tiny_gguf(path, hidden=256, heads=4, kv_heads=2, ff=256, vocab=len(_BYTE_TOKENS), context=1024,
                           metadata=_BYTE_METADATA)


def make_llm(path: Path, **options: object) -> LLM:
    base: dict[str, object] = {"dtype": "float32", "device": "cpu", "num_kv_blocks": 512, "block_size": 16}
    return LLM(str(path), **(base | options))


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return make_llm(tiny_model)


def sampled(constraint: StructuredOutputs, seed: int, max_tokens: int = 600) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured_outputs=constraint)


def test_every_sampled_output_matches_its_schema(llm) -> None:
    """12 schemas x 5 seeds, all in one batch: each output that finished on its own validates."""
    cases = [(name, seed) for name in SCHEMAS for seed in range(5)]
    params = [sampled(StructuredOutputs(json=SCHEMAS[name]), seed) for name, seed in cases]
    outputs = llm.generate(["Answer in JSON:"] * len(cases), params, use_tqdm=False)
    finished = 0
    for (name, _), out in zip(cases, outputs, strict=True):
        if out.finish_reason == "length":  # a random model may wander within a number or string
            continue
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMAS[name])
        finished += 1
    assert finished >= 0.9 * len(cases)


def test_regex_choice_and_json_object(llm) -> None:
    regex = r"[A-Z]{2}-[0-9]{3}(-x)?"
    choices = ("yes", "no", "maybe later")
    for seed in range(6):
        out = llm.generate("id:", sampled(StructuredOutputs(regex=regex), seed), use_tqdm=False)[0]
        assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), out.text
        out = llm.generate("pick:", sampled(StructuredOutputs(choice=choices), seed), use_tqdm=False)[0]
        assert out.finish_reason == "stop" and out.text in choices
    outs = llm.generate(["obj:"] * 6, [sampled(StructuredOutputs(json_object=True), s, 400) for s in range(6)],
                        use_tqdm=False)
    objects = [json.loads(o.text) for o in outs if o.finish_reason == "stop"]
    assert objects and all(isinstance(o, dict) for o in objects)


def test_a_grammar_that_must_end_outranks_min_tokens(llm) -> None:
    """Once the regex is complete only end-of-sequence is allowed; min_tokens blocks it: the request still ends."""
    out = llm.generate("x", SamplingParams(temperature=0, max_tokens=20, min_tokens=10,
                                           structured_outputs=StructuredOutputs(regex="ab")), use_tqdm=False)[0]
    assert out.text == "ab" and out.finish_reason == "stop"
    out = llm.generate("x", SamplingParams(temperature=1.0, max_tokens=20, min_tokens=10,
                                           structured_outputs=StructuredOutputs(regex="a{0}")), use_tqdm=False)[0]
    assert out.text == "" and out.finish_reason == "stop"


def test_grammar_free_requests_are_untouched(llm) -> None:
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate("hello there", plain, use_tqdm=False)[0].token_ids
    mixed = llm.generate(["hello there", "x", "hello there"],
                         [plain, sampled(StructuredOutputs(json=SCHEMAS["person"]), 1), plain], use_tqdm=False)
    assert mixed[0].token_ids == alone and mixed[2].token_ids == alone


def test_mask_overlap_off_gives_the_same_tokens(tiny_model, llm) -> None:
    params = [sampled(StructuredOutputs(json=SCHEMAS[n]), 3) for n in ("order", "recipe", "shape")]
    on = [o.token_ids for o in llm.generate(["a", "b", "c"], params, use_tqdm=False)]
    off = make_llm(tiny_model, structured_outputs_overlap=False)
    assert [o.token_ids for o in off.generate(["a", "b", "c"], params, use_tqdm=False)] == on


@pytest.mark.parametrize("overlap", [True, False])
def test_greedy_with_speculation_is_identical_and_drafts_respect_the_grammar(tiny_model, llm, overlap,
                                                                             caplog) -> None:
    """Prompts that repeat themselves give prompt-lookup drafts; the grammar forbids some of them; the last prompt
    gives none, so steps mix grammar rows with and without drafts. No step may fail (a failed step is retried
    request by request, which would hide a broken mask fill behind identical output)."""
    regex = r"(ab|cd|[0-9]){4,60}"
    prompts = ["abcdabcdab12cdabcdab", "cdcd1212cdcd1212cd", "{\"a\": 1, \"a\": 1, \"a\": 1", "q"]
    constraints = [StructuredOutputs(regex=regex), StructuredOutputs(regex=regex),
                   StructuredOutputs(json={"type": "object", "properties": {"a": {"type": "integer"}}}),
                   StructuredOutputs(regex=r"[xyz]{30}")]
    params = [SamplingParams(temperature=0, max_tokens=60, structured_outputs=c) for c in constraints]
    plain = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    spec = make_llm(tiny_model, speculative="ngram", num_speculative_tokens=4, prompt_lookup_min=1,
                    speculative_adaptive=False, structured_outputs_overlap=overlap)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert [o.token_ids for o in got] == plain
    assert re.fullmatch(regex, got[0].text) and re.fullmatch(regex, got[1].text)
    assert re.fullmatch(r"[xyz]{30}", got[3].text)
    stats = spec.engine.stats().spec_decode
    assert stats is not None and stats.num_drafts > 0


def test_seeded_sampling_with_speculation_under_a_grammar_gives_the_tokens_without_it(tiny_model, llm) -> None:
    """Each verify row draws as a step without drafts would (spec/verifier.py), over the grammar's mask at that row,
    so seeded grammar-bound requests sample the same tokens with prompt lookup as without."""
    regex = r"(ab|cd|[0-9]){4,60}"
    prompts = ["abcdabcdab12cdabcdab", "cdcd1212cdcd1212cd", "q"]
    constraints = [StructuredOutputs(regex=regex)] * 2 + [StructuredOutputs(regex=r"[xyz]{30}")]
    params = [SamplingParams(temperature=0.8, top_k=3, seed=i, max_tokens=60, structured_outputs=c)
              for i, c in enumerate(constraints)]
    plain = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    spec = make_llm(tiny_model, speculative="ngram", num_speculative_tokens=4, prompt_lookup_min=1,
                    speculative_adaptive=False)
    assert [o.token_ids for o in spec.generate(prompts, params, use_tqdm=False)] == plain
    stats = spec.engine.stats().spec_decode
    assert stats is not None and stats.num_accepted_tokens > 0


def test_preemption_keeps_the_grammar_state(tiny_model) -> None:
    small = make_llm(tiny_model, num_kv_blocks=24, max_num_seqs=8)
    params = [sampled(StructuredOutputs(json=SCHEMAS["address"]), s, 200) for s in range(8)]
    outs = small.generate(["x" * 30] * 8, params, use_tqdm=False)
    assert small.engine.stats().num_preemptions > 0
    for out in outs:
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), SCHEMAS["address"])
    stats = small.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_bad_constraints_are_refused_naming_the_field(llm) -> None:
    engine = llm.engine
    bad = [StructuredOutputs(json={"type": "object", "properties": {"a": {"type": "strin"}}}),
           StructuredOutputs(json="{not json"), StructuredOutputs(regex="(a|b"),
           StructuredOutputs(json={"type": "array", "uniqueItems": True}, field_name="response_format"),
           StructuredOutputs(grammar="start: undefined_rule")]
    for constraint in bad:
        with pytest.raises(InvalidRequestError) as error:
            engine.add_request("x", SamplingParams(structured_outputs=constraint))
        assert error.value.field == constraint.field_name and "invalid" in error.value.message
    assert not engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputs(regex="a", choice=("a",))
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(InvalidRequestError, match="choice"):
        StructuredOutputs(choice=())
    with pytest.raises(InvalidRequestError, match="choice"):
        StructuredOutputs(choice=5)  # type: ignore[arg-type]


def test_grammars_are_compiled_once_and_slow_ones_time_out(llm, monkeypatch) -> None:
    compiler = llm.engine.structured.compiler
    constraint = StructuredOutputs(json={"type": "object", "properties": {"zz": {"type": "integer"}}})
    compiled = compiler.num_compiled
    for _ in range(3):
        compiler.compile(constraint)
    assert compiler.num_compiled == compiled + 1
    original = compiler._build

    def slow(key):
        time.sleep(0.5)
        return original(key)

    monkeypatch.setattr(compiler, "_build", slow)
    monkeypatch.setattr(compiler, "timeout_s", 0.05)
    slow_one = StructuredOutputs(regex="slow[0-9]+")
    with pytest.raises(InvalidRequestError, match="did not compile within"):
        compiler.compile(slow_one)
    # A timeout is not cached: the compilation went on, and a later request gets its result.
    monkeypatch.setattr(compiler, "timeout_s", 5.0)
    assert compiler.compile(slow_one) is not None
    # Callers asking for the same constraint at once share one compilation.
    before = compiler.num_compiled
    same = StructuredOutputs(regex="shared[0-9]+")
    with ThreadPoolExecutor(4) as pool:
        grammars = list(pool.map(lambda _: compiler.compile(same), range(4)))
    assert compiler.num_compiled == before + 1 and all(g is grammars[0] for g in grammars)


def test_json_key_order_is_kept() -> None:
    a = StructuredOutputs(json={"properties": {"b": {}, "a": {}}})
    b = StructuredOutputs(json={"properties": {"a": {}, "b": {}}})
    assert a.key() != b.key() and a.key()[1].index('"b"') < a.key()[1].index('"a"')


def test_numbers_are_written_with_bounded_digits(llm) -> None:
    """Free numbers stop at 16 integer and 10 fraction digits (a sampled model cannot write digits until
    max_tokens); a schema's own bounds still allow longer ones; one the bounds conflict with compiles as it came."""
    compiler = llm.engine.structured.compiler

    def allows(schema: dict, text: str) -> bool:
        matcher = compiler.compile(StructuredOutputs(json=schema)).matcher()
        ids = [compiler.tokenizer.tokenize_bytes(bytes([b]))[0] for b in text.encode()]
        return matcher.num_valid(ids) == len(ids)

    wrapped = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    assert allows(wrapped, '{"x": -1234567890123456.0123456789}')
    assert not allows(wrapped, '{"x": 0.01234567891}') and not allows(wrapped, '{"x": 12345678901234567}')
    assert not allows(wrapped, '{"x": 1e5}')
    assert allows({"type": "integer", "maximum": 1e18}, "123456789012345678")
    assert allows({"type": "object"}, '{"a": [1.5, {"b": null}], "c": "d"}')
    assert not allows({"type": "object"}, '{"a": [1.12345678901')
    assert allows({"allOf": [{"type": "number"}, {"minimum": 1e17}]}, "200000000000000000.5")


@pytest.mark.parametrize("vocab", [31, 32, 100])
def test_token_masks_apply_exactly(vocab) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen)
    words = -(-vocab // 32)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, words), generator=gen, dtype=torch.int64).to(torch.int32)
    rows = torch.tensor([1, 3])
    expected = logits.clone()
    for r, row in enumerate(rows.tolist()):
        for t in range(vocab):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                expected[row, t] = float("-inf")
    TokenMasks(rows, bitmask).apply(logits)
    assert torch.equal(logits, expected)


def test_cli_constraint_flags(tiny_model, tmp_path, capsys) -> None:
    from tokenmill.entrypoints.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["sentiment"]))
    code = main(["generate", "--model", str(tiny_model), "--dtype", "float32", "--num-kv-blocks", "64",
                 "--max-tokens", "300", "--temperature", "1", "--seed", "2", "--json-schema", f"@{schema}", "go"])
    assert code == 0
    text = capsys.readouterr().out.split("\n")[1]
    jsonschema.validate(json.loads(text), SCHEMAS["sentiment"])
    code = main(["generate", "--model", str(tiny_model), "--dtype", "float32", "--num-kv-blocks", "64",
                 "--choice", "left", "--choice", "right", "go"])
    assert code == 0 and capsys.readouterr().out.split("\n")[1] in ("left", "right")
    assert main(["generate", "--model", str(tiny_model), "--regex", "a", "--json", "go"]) == 2
    assert "exactly one" in capsys.readouterr().err


# ---- token trees under a grammar ------------------------------------------------------------------------------

def test_a_tree_is_cut_to_what_its_grammar_allows(llm) -> None:
    """The spine keeps its allowed prefix; a leaf stays where its parent row was kept and its grammar allows it
    there, in order, so the result is a tree of the kernels' shape again."""
    a, b, c, d, x, z = llm.tokenizer.encode("abcdxz")
    grammar = llm.engine.structured.compiler.compile(StructuredOutputs(regex=r"(ab|cd){1,3}")).matcher()
    drafts, parents = [a, b, c, x, c, z, a, d], [0, 1, 2, 3, 0, 0, 2, 3]  # a spine of 4, leaves off rows 0, 0, 2, 3
    tokens, kept = allowed_tree(grammar, drafts, parents)
    assert (tokens, kept) == ([a, b, c, c, a, d], [0, 1, 2, 0, 2, 3])  # "abcx" cut to "abc"; z cannot start
    check_tree(kept, len(tokens))
    assert spine_length(kept) == 3
    # no leaf left: a chain
    assert allowed_tree(grammar, [a, b, z, x], [0, 1, 0, 1]) == ([a, b], [])
    # the request-level entry point: trees and chains alike, requests without a grammar untouched
    tree = SimpleNamespace(grammar=grammar, draft_token_ids=list(drafts), draft_parents=list(parents))
    chain = SimpleNamespace(grammar=grammar, draft_token_ids=[c, d, x, a], draft_parents=[])
    free = SimpleNamespace(grammar=None, draft_token_ids=[x, z], draft_parents=[0, 0])
    StructuredOutputManager.trim_drafts([tree, chain, free])
    assert (tree.draft_token_ids, tree.draft_parents) == (tokens, kept)
    assert chain.draft_token_ids == [c, d] and free.draft_token_ids == [x, z]


def test_each_tree_row_is_masked_after_its_own_path(llm) -> None:
    """Row r's mask is that of a fresh matcher after the drafts on the way to r (a leaf's path leaves the spine), also
    where the grammar stops on the way; the request's matcher is where it was afterwards."""
    a, b, c, d = llm.tokenizer.encode("abcd")
    manager = llm.engine.structured
    grammar = manager.compiler.compile(StructuredOutputs(regex=r"(ab|cd){1,2}"))
    matcher = grammar.matcher()
    matcher.accept(a)
    drafts, parents = [b, c, d, a, 0], (0, 1, 2, 1, 3)  # row 4 ("abcd") stops the grammar; a leaf then takes EOS
    rows = torch.arange(2, 2 + len(drafts) + 1)
    masks = manager._fill([(matcher.inner, 0, drafts, parents)], rows)

    def mask_after(path: list[int]) -> torch.Tensor:
        fresh = grammar.matcher()
        assert fresh.accept(a) and all(fresh.accept(t) for t in path)
        one = llg_torch.allocate_token_bitmask(1, manager.compiler.vocab_size)
        llg_torch.fill_next_token_bitmask(fresh.inner, one, 0)
        return one[0]

    for row in range(len(drafts) + 1):
        assert torch.equal(masks.bitmask[row], mask_after(path_tokens(parents, drafts, row))), f"row {row}"
    assert torch.equal(masks.rows, rows)
    assert not matcher.failed and not matcher.is_terminated
    assert matcher.num_valid([b, c, d]) == 3  # still after "a"


def test_trees_under_a_grammar_keep_greedy_and_seeded_output(tiny_model, llm, monkeypatch, caplog) -> None:
    """Draft-model trees (width 3) under grammars: the leaves the grammar allows are verified too, and greedy and
    seeded outputs are those without speculation. No step may fail (a failed step is retried request by request)."""
    draft = write_tiny_gguf(tiny_model.with_name("bytes_draft.gguf"), layers=1, hidden=256, heads=4, kv_heads=2,
                            ff=256, vocab=len(_BYTE_TOKENS), context=1024, metadata=_BYTE_METADATA)
    regex = r"(ab|cd|[0-9]){4,60}"
    prompts = ["abcdabcdab12cdabcdab", "cdcd1212cdcd1212cd", "{\"a\": 1, \"a\": 1", "q"]
    constraints = [StructuredOutputs(regex=regex), StructuredOutputs(regex=regex),
                   StructuredOutputs(json={"type": "object", "properties": {"a": {"type": "integer"}}}),
                   StructuredOutputs(regex=r"[xyz]{30}")]
    kept_leaves: list[int] = []
    cut = masks_module.allowed_tree

    def counting(*args):
        tokens, parents = cut(*args)
        kept_leaves.append(len(tokens) - spine_length(parents) if parents else 0)
        return tokens, parents

    monkeypatch.setattr(masks_module, "allowed_tree", counting)
    for params in ([SamplingParams(temperature=0, max_tokens=60, structured_outputs=c) for c in constraints],
                   [SamplingParams(temperature=0.8, top_k=3, seed=i, max_tokens=60, structured_outputs=c)
                    for i, c in enumerate(constraints)]):
        plain = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        spec = make_llm(tiny_model, speculative="draft", speculative_model=str(draft), num_speculative_tokens=4,
                        speculative_tree_width=3, speculative_adaptive=False)
        assert [o.token_ids for o in spec.generate(prompts, params, use_tqdm=False)] == plain
        stats = spec.engine.stats()
        assert stats.spec_decode is not None and stats.spec_decode.num_accepted_tokens > 0
        assert stats.num_free_blocks == stats.num_total_blocks
    assert sum(kept_leaves) > 0  # trees reached the verifier with leaves, not only their spines
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
