"""llmmesh's load generator: what the mesh costs over calling Triton directly.

Run from the repository root: `.venv/bin/python -m loadtest --help` (see loadtest/README.md).
The same workload goes to the gateway's public API and, with the same token ids, straight to Triton's
ModelStreamInfer; Triton serves the benchmark instrument (triton_models/instrument), which stands in
for a GPU engine, so what is measured is the mesh itself.
"""
