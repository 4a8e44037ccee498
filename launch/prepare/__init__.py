"""`longtrain prepare-data`: documents (JSONL, Parquet, plain text) tokenized once, in parallel and in constant
memory, into a content-addressed directory of the form `spec.prepared` describes (sources, tokenizer, cache,
pipeline, summary: one module each). Driver-side only: workers read the result, never these modules."""
