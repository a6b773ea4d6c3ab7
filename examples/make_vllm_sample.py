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


def top_k(text):
    """argparse type of ``--top-k``: an int in ``[1, VOCAB]``."""
    value = int(text)
    if not 1 <= value <= VOCAB:
        raise argparse.ArgumentTypeError(f"must be in [1, {VOCAB}] (the vocabulary), got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data",
                                                      "vllm_prompt_logprobs.jsonl"))
    parser.add_argument("--top-k", type=top_k, default=4, help=f"1 to {VOCAB}")
    args = parser.parse_args(argv)
    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
        parser.error(f"--out {args.out}: no directory {directory}")
    if os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a directory")
    model = tiny_model()
    # written beside --out, then renamed over it: a failed run leaves --out as it was
    partial = os.path.join(directory, f".{os.path.basename(args.out)}.{os.getpid()}.partial")
    try:
        with open(partial, "x") as handle:
            for number, token_ids in enumerate(prompts()):
                response = vllm_style_response(model, token_ids, args.top_k,
                                               model_name="tiny-gpt2",
                                               request_id=f"cmpl-sample-{number}")
                handle.write(json.dumps(response) + "\n")
        os.replace(partial, args.out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
