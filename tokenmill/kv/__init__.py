"""The KV cache in one package: the block pool (ids, reference counts, the prefix-cache index), the manager that is
the scheduler's facade over it (block tables, slots, context lengths, truncation), and the tensors themselves."""
