"""vLLM's own `LLM.generate` on the test prompts: the reference the vLLM worker's tokens
must equal. Run by the tests with the vLLM virtualenv's Python:

    python tests/vllm/vllm_reference.py IN.json OUT.json

IN: {"models": {name: folder}, "prompts": [[ids]], "max_tokens": N}; OUT: {name: [[ids]]}.
The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the caller):
one start-up of a few seconds instead of three spawned processes.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(open(sys.argv[1]).read())
    out = {}
    for name, path in spec["models"].items():
        llm = LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=4, kv_cache_memory_bytes=32 << 20,
                  enforce_eager=True, seed=0)
        params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0)
        results = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
        out[name] = [list(r.outputs[0].token_ids) for r in results]
        del llm
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":  # vLLM may spawn processes: they must not run main() again
    main()
