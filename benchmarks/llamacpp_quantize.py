"""Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize, via llama-cpp-python's ctypes API).

Usage: python benchmarks/llamacpp_quantize.py IN.gguf OUT.gguf TYPE [--threads 2]   (TYPE: Q8_0, Q4_0, Q4_1, Q4_K_M, ...)
Same defaults as llama.cpp's llama-quantize tool (llama_model_quantize_default_params), no imatrix.
"""
import argparse
import llama_cpp as L

p = argparse.ArgumentParser()
p.add_argument("inp")
p.add_argument("out")
p.add_argument("type", help="LLAMA_FTYPE_MOSTLY_<TYPE>, e.g. Q8_0, Q4_0, Q4_K_M")
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
params = L.llama_model_quantize_default_params()
params.nthread = a.threads
params.ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{a.type.upper()}")
rc = L.llama_model_quantize(a.inp.encode(), a.out.encode(), params)
raise SystemExit(f"llama_model_quantize returned {rc}" if rc else 0)
