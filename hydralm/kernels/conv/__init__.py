"""The Gated DeltaNet block's short convolution as Triton kernels (triton_short_conv.py); modules/short_conv.py holds
the PyTorch form and picks per call (HYDRALM_SHORT_CONV in ``kernels/backend.py``)."""
