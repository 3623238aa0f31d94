"""Chunk-sparse top-k retrieval attention, laid out by form:

reference.py      the dense oracle (plain loops, N x N mask), small inputs only
routing.py        each token's top-k past chunks (shared by every path); the blocked from-scratch router
triton_routing.py the from-scratch router as one Triton kernel (CUDA)
gather.py         the gather path: CPU, and calls that carry a state (prefill with a bank, decoding)
flex.py           flex_attention with a routed block mask (CUDA, parallel forward from scratch)
triton_sparse.py  Triton kernels from scratch, forward and backward (retrieved chunks, autograd Function);
                  with selection_csr.py (the selections inverted into per-chunk lists) and triton_local.py
                  (the local part and the merge)
"""
