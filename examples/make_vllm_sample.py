"""Write examples/data/vllm_prompt_logprobs.jsonl: what a vLLM OpenAI-compatible server returns
for a few prompts, computed with a tiny local GPT-2-style model (random, seeded; no download).

    python examples/make_vllm_sample.py [--out FILE] [--top-k 4]

Each line is one completions response (vLLM's ``CompletionResponse`` as serialized by the
server) for the request::

    {"prompt": [token ids], "max_tokens": 1, "prompt_logprobs": K, "logprobs": K,
     "return_tokens_as_token_ids": true, "return_token_ids": true, "temperature": 0}

Import it with ``fastkd import --from vllm FILE --vocab-size 64 --top-k K --out DIR``.
"""
import argparse
import json
import os

import torch

from fastkd.cache.importer import vllm_style_response

VOCAB = 64


def tiny_model(seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2, use_cache=False, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).eval()


def prompts(count: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(length),), generator=generator).tolist()
            for length in torch.randint(3, 9, (count,), generator=generator)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data",
                                                      "vllm_prompt_logprobs.jsonl"))
    parser.add_argument("--top-k", type=int, default=4)
    args = parser.parse_args(argv)
    model = tiny_model()
    with open(args.out, "w") as handle:
        for number, token_ids in enumerate(prompts()):
            response = vllm_style_response(model, token_ids, args.top_k, model_name="tiny-gpt2",
                                           request_id=f"cmpl-sample-{number}")
            handle.write(json.dumps(response) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
