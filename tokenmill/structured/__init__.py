"""Structured output: a request's grammar (JSON schema, regex, choice, Lark) enforced by masking the sampler's logits.

`params.StructuredOutputs` says what a request must produce; `grammar.GrammarCompiler` turns it into a grammar once
(cached, time-bounded) and gives each request its own matcher; `masks.StructuredOutputManager` fills one step's token
masks from the matchers, on a worker thread while the model runs.
"""
