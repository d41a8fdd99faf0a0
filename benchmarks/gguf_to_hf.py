"""Write a GGUF's weights out as a float32 Hugging Face folder (safetensors, config, generation config,
tokenizer with its chat template), with transformers' own GGUF reader (dequantized on load).

Why: a peer server that cannot read GGUF (vLLM for CPUs) then serves exactly the weights that kiln serves
from the GGUF, so a side-by-side run (benchmarks/serve_side_by_side.sh, MODEL=OUT_DIR) compares servers,
not weights. Both sides compute in float32 from the same dequantized values.

Usage: python benchmarks/gguf_to_hf.py GGUF OUT_DIR
   e.g. python benchmarks/gguf_to_hf.py "$(python -c 'from kiln.builder.engine_cache import default_model; print(default_model())')" /work/smollm2-hf-f32
"""
import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("gguf", type=Path, help="the .gguf file")
p.add_argument("out", type=Path, help="the folder to write (created)")
a = p.parse_args()

folder, name = str(a.gguf.resolve().parent), a.gguf.name
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
# dequantize=True: unpack every weight to float32 at load and drop the quantizer (by default transformers
# keeps the GGUF blocks packed, and such a model cannot be saved).
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                             quantization_config=GgufConfig(gguf_file=name, dequantize=True))
a.out.mkdir(parents=True, exist_ok=True)
model.save_pretrained(a.out)
tokenizer.save_pretrained(a.out)

missing = [f for f in ("config.json", "generation_config.json", "tokenizer_config.json") if not (a.out / f).exists()]
if missing:
    raise SystemExit(f"{a.out}: {', '.join(missing)} not written")
if tokenizer.chat_template is None:
    print("warning: the GGUF carries no chat template; the folder has none")
print(f"{a.out}: {model.num_parameters() / 1e6:.1f}M parameters, float32, "
      f"chat template {'saved' if tokenizer.chat_template else 'absent'}")
