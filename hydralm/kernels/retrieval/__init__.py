"""Chunk-sparse top-k retrieval attention, laid out by form:

reference.py  the dense oracle (plain loops, N x N mask), small inputs only
routing.py    each token's top-k past chunks (shared by every path)
gather.py     the gather path: CPU, and calls that carry a state (prefill with a bank, decoding)
flex.py       flex_attention with a routed block mask (CUDA, parallel forward from scratch)
"""
