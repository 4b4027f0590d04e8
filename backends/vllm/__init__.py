"""The vLLM engine: QLM plans, vLLM generates.

Runs only in the vLLM virtualenv (`make vllm` creates `.venv-vllm`): vLLM pins its own
torch and transformers. `ops.py`, `options.py` and `priority.py` import nothing of
vLLM, so the main virtualenv (the planner's tests, benchmarks) can use them.
"""
