"""Softmax attention over a local band or the whole causal past:

local.py  SDPA paths (sliding window by blocks, full causal with a cache offset): CPU and the reference
flex.py   flex_attention for sliding windows on CUDA, and the compiled flex call other ops share
"""
