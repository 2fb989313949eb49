"""Speculative decoding: proposers guess the next tokens, the target model checks them all in one step.

`proposer.py` (the interface) and one module per drafter (`ngram.py`); `verifier.py` accepts a prefix of the guesses
under the target's own distribution; `adaptive.py` chooses how many guesses each request gets per step;
`speculator.py` ties them to the engine loop.
"""
