"""Quantise a GGUF file with llama.cpp's own quantiser, through the llama_cpp bindings' C API: what llama.cpp's
llama-quantize tool does (llama_backend_init, the default parameters with the type set, llama_model_quantize),
without compiling the tool (it would add llama.cpp's common library and the multimodal library to the build:
scripts/setup_llamacpp_env.sh). Runs with llama.cpp's own environment's Python, outside the finetune package:

    .venv-llamacpp/bin/python finetune/tools/llama_quantize.py IN.gguf OUT.gguf Q8_0|Q4_K_M
"""

import ctypes
import sys


def main(argv) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    import llama_cpp

    src, out, kind = argv
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}", None)
    if ftype is None:
        print(f"llama_quantize: unknown type {kind!r} (this llama.cpp has LLAMA_FTYPE_MOSTLY_<type>)", file=sys.stderr)
        return 2
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    code = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    llama_cpp.llama_backend_free()
    if code != 0:
        print(f"llama_quantize: llama_model_quantize returned {code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
