"""SeFi-IDE method code: pure torch/numpy, never imports ComfyUI."""
