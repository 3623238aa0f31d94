"""SwiGLU's elementwise product as Triton kernels (triton_swiglu.py); modules/swiglu.py holds the PyTorch form and
picks per call (HYDRALM_SWIGLU in ``kernels/backend.py``)."""
