"""The vLLM engine: QLM plans, vLLM generates.

Runs only in the vLLM virtualenv (`make vllm` creates `.venv-vllm`): vLLM pins its own
torch and transformers. `options.py` and `priority.py` import nothing of vLLM, so the
main virtualenv (tests, benchmarks that start a vLLM worker) can use them.
"""
