"""Rotary position embedding as a Triton kernel (triton_rotary.py); modules/rotary.py holds the PyTorch form and
picks per call (HYDRALM_ROTARY in ``kernels/backend.py``)."""
