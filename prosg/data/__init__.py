"""Data for ProSG: the multi-stage prompt-forgetting benchmark and user (prompt, response) data.

- :mod:`prosg.data.multistage`: seeded generator of multi-stage prompts and their exact
  per-stage verifiers (docs/benchmark.md).
- :mod:`prosg.data.vocab`: the benchmark's fixed vocabulary and whitespace tokenizer.
- :mod:`prosg.data.hf`: JSONL (prompt, response) pairs tokenised with a HF
  ``tokenizers`` file, for real RWKV-4 checkpoints.
- :mod:`prosg.data.batching`: padding pairs into tensors with attention and loss masks.
- :mod:`prosg.data.jsonl`: JSONL reading (errors name the line) and atomic writing.
"""

from __future__ import annotations

from prosg.data.batching import IGNORE_INDEX, Batch, Collator, TokenizedPair, collate
from prosg.data.hf import PairEncoder, load_pairs, load_tokenizer
from prosg.data.jsonl import JSONLError, read_jsonl, write_jsonl
from prosg.data.multistage import (
    OPS,
    SETTINGS,
    Example,
    MultiStageConfig,
    Stage,
    StageInfo,
    StageScore,
    Verification,
    dataset_fingerprint,
    encode_example,
    generate_example,
    generate_examples,
    load_examples,
    mean_scores,
    parse_prompt,
    prompt_is_tagged,
    save_examples,
    setting,
    setting_name,
    stage_lengths,
    summarize,
    verify,
)
from prosg.data.vocab import VOCAB, SymbolTokenizer, UnknownTokenError, benchmark_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "OPS",
    "SETTINGS",
    "VOCAB",
    "Batch",
    "Collator",
    "Example",
    "JSONLError",
    "MultiStageConfig",
    "PairEncoder",
    "Stage",
    "StageInfo",
    "StageScore",
    "SymbolTokenizer",
    "TokenizedPair",
    "UnknownTokenError",
    "Verification",
    "benchmark_tokenizer",
    "collate",
    "dataset_fingerprint",
    "encode_example",
    "generate_example",
    "generate_examples",
    "load_examples",
    "load_pairs",
    "load_tokenizer",
    "mean_scores",
    "parse_prompt",
    "prompt_is_tagged",
    "read_jsonl",
    "save_examples",
    "setting",
    "setting_name",
    "stage_lengths",
    "summarize",
    "verify",
    "write_jsonl",
]
