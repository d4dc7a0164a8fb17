"""The bilevel search: mask sampler, architect, per-space tasks, loop and CLI."""
