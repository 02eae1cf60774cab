"""The generation stage: KV-cached decoding (decode), samplers (sampling), beam search (beam), text
(text, api), timing (stats) and sample.py's command line (cli).

The public Python API: `complete(model, tok, prompts, n)` returns completions, `stream_text(...)` yields
text pieces as they are generated, `generate(model, ids, n)` works on ids.
"""

from llm.generate.api import Completion, complete, encode_prompts, generate, stream_text
from llm.generate.decode import Decoder, fit_prompts, prefill, stream_tokens
from llm.generate.sampling import SamplingError, SamplingParams
from llm.generate.stats import Stats
from llm.generate.text import TextStream

__all__ = ["Completion", "Decoder", "SamplingError", "SamplingParams", "Stats", "TextStream", "complete",
           "encode_prompts", "fit_prompts", "generate", "prefill", "stream_text", "stream_tokens"]
